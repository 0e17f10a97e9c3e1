"""Annotators, real and simulated, and how much their labels can be trusted (docs/DESIGN.md, "Code
layout")."""
