"""The four stages of the recognizer (see `model.Model`).

Each stage family is a registry that maps the option value (`--Transformation TPS`, ...) to a
builder; adding a stage means adding one entry to its registry.
"""
from utils import UserError


def lookup(registry, flag, name):
    """The registry entry for `name`; an unknown name is a UserError that lists the known ones."""
    key = "None" if name is None else str(name)  # a YAML null reads as the stage 'None'
    if key not in registry:
        raise UserError(f"--{flag} {name}: unknown; choose one of {', '.join(registry)}")
    return registry[key]
