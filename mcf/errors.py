"""Errors that end a stage with a message for the user rather than a traceback."""


class StageError(RuntimeError):
    """A stage cannot go on: bad input data, a failed data gate, a non-finite loss.

    The CLI prints ``str(err)`` and exits 1; the stage has left no output that DVC could take as done.
    """
