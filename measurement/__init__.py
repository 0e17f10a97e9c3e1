"""Measuring models and strategies (docs/DESIGN.md, "Code layout")."""
