"""The layers below dataset.py: the LMDB format and its writing, the records of query and relabel sets,
leaf selection, batch sampling (docs/DESIGN.md, "Code layout")."""
