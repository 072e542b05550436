"""Process pools that leave Ctrl-C to their parent.

A terminal's Ctrl-C sends SIGINT to every process of its foreground group, a pool's workers too. A worker
that took it died with its own traceback, and a ProcessPoolExecutor it broke could hang at exit (its
manager thread dies on a cancelled future in CPython 3.11), Ctrl-C again doing nothing; the parent stops
the run anyway, with the CLI's one line and exit 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager


def ignore_ctrl_c() -> None:
    """A pool worker's initializer: SIGINT is its parent's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def workers_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside ignore SIGINT from their first instruction, before an initializer runs (a
    spawned worker imports for a second or more): an ignored signal stays ignored across fork and exec.

    A Ctrl-C meanwhile is lost, so hold it only while a pool starts its workers. Off the main thread (a
    flow's task) it changes nothing: only the main thread may set handlers, and the initializer remains.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def cancelled_on_error(pool: Executor) -> Iterator[Executor]:
    """Shut ``pool`` down on leaving; on an error (Ctrl-C too) cancel its queued tasks first, so that only
    the running ones are waited for, not the rest of the stage's (``Executor.map`` queues them all)."""
    try:
        yield pool
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    finally:
        pool.shutdown()
