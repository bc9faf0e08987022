"""Errors of the launch layer that the CLI reports as one line (kept free of heavy imports)."""


class PlacementError(RuntimeError):
    """Ray could not place the workers as the layout requires."""
