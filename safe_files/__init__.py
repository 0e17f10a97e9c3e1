"""Files that are never seen half-written and folders that one writer holds (docs/DESIGN.md, "Code
layout")."""
