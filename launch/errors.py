"""Errors of the launch layer that the CLI reports as one line (kept free of heavy imports)."""


class PlacementError(RuntimeError):
    """Ray could not place the workers as the layout requires."""


class WorkerDied(RuntimeError):
    """A worker's process died and no restarts were left; says how to resume."""


class WorkerError(RuntimeError):
    """A worker raised an unexpected exception; one line here, its traceback in the run folder."""
