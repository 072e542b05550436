"""Errors that end a stage with a message for the user rather than a traceback, and their exit codes."""

EXIT_STAGE = 1  # StageError: bad input, a non-finite loss, an unreachable source (a rerun may pass)
EXIT_PARAMS = 2  # ParamsError: the stage rejected its params (a rerun fails the same way)
EXIT_GATE = 3  # GateError: a data gate failed on a table the stage writes or reads (a rerun fails alike)
EXIT_ACCESS = 4  # AccessError: no access to the stage's data, no credentials (a rerun fails the same way)


class StageError(RuntimeError):
    """A stage cannot go on: bad input data, a failed data gate, a non-finite loss.

    The CLI prints ``str(err)`` and exits 1 (3 for a :class:`GateError`, 4 for an :class:`AccessError`);
    the stage has left no output that DVC could take as done.
    """

    exit_code = EXIT_STAGE


class GateError(StageError):
    """A data gate failed: the data is wrong, not the network, so running the stage again fails the
    same way. The CLI exits 3, which the Prefect flow does not retry."""

    exit_code = EXIT_GATE


class WeightsError(StageError, ValueError):
    """A weights file that is missing, cut short or not a weights-only checkpoint (exit 1).

    Also a ``ValueError``, which the teacher loaders report as a bad ``teacher.source``.
    """


class AccessError(StageError):
    """No access to the stage's data: no credentials, a profile no file defines, access denied, no such
    bucket, a folder the user may not read. Not the network: running the stage again fails the same way
    until the environment or the params change. The CLI exits 4, which the Prefect flow does not retry."""

    exit_code = EXIT_ACCESS
