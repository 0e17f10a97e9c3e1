"""Active-learning choices: which samples a round queries and which it looks at again (docs/DESIGN.md,
"Code layout")."""
