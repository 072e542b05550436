"""Process pools that leave Ctrl-C to their parent, and end with it.

A terminal's Ctrl-C sends SIGINT to every process of its foreground group, a pool's workers too. A worker
that took it died with its own traceback, and a ProcessPoolExecutor it broke could hang at exit (its
manager thread dies on a cancelled future in CPython 3.11), Ctrl-C again doing nothing; the parent stops
the run anyway, with the CLI's one line and exit 130.

A worker waits on its pool's task queue for ever, which nothing closes when the parent is killed outright
(the out-of-memory killer, a CI runner's SIGKILL): it stayed, holding its memory and the stage's stdout,
so whatever read that to its end (dvc repro, a CI runner, ``subprocess.run``) hung. :func:`worker_init`
ends it with its parent; :func:`on_death` serves any process that must not outlive another.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor
from contextlib import contextmanager
from functools import partial
from typing import Any

from mcf.errors import StageError


def ignore_ctrl_c() -> None:
    """A pool worker's initializer: SIGINT is its parent's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_init() -> None:
    """A pool worker's initializer: Ctrl-C is its parent's to act on, and the worker ends with it."""
    ignore_ctrl_c()
    exit_with_parent()


def exit_with_parent() -> None:
    """End this process (``os._exit``) once the process that started it (multiprocessing's parent) dies.

    Not prctl(PR_SET_PDEATHSIG): it follows the OS parent, which for a forkserver's worker (crop's) is the
    fork server, and that stays while any of its workers lives (each holds its pipe); and it fires when
    the thread that forked ends, not the process.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:  # not started by multiprocessing: no parent of its to follow
        return
    on_death(parent.pid, lambda: os._exit(1))


def on_death(pid: int, action: Callable[[], object]) -> None:
    """Call ``action`` from a daemon thread once the process ``pid`` (an ancestor of this one) dies.

    Linux 5.3 and later: the thread waits on a pidfd of ``pid``, which turns readable when it dies; one
    that died before this ran (a spawned process imports for seconds) is seen at once. Elsewhere (macOS;
    a kernel or sandbox without pidfd_open) the thread checks each second whether this process was handed
    to another parent: there a ``pid`` that died before this ran, or that is not this process's OS parent
    (a fork server's workers), is not covered.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # died (and was reaped) before this ran
        watch = action
    except (AttributeError, OSError):  # no pidfd_open here (not Linux, before 5.3, refused by seccomp)
        watch = partial(_when_reparented, os.getppid(), action)
    else:
        watch = partial(_when_readable, pidfd, action)
    threading.Thread(target=watch, name=f"mcf-watch-{pid}", daemon=True).start()


def _when_readable(pidfd: int, action: Callable[[], object]) -> None:
    waiter = select.poll()
    waiter.register(pidfd, select.POLLIN)
    waiter.poll()  # no timeout: returns once the process has died
    os.close(pidfd)
    action()


def _when_reparented(ppid: int, action: Callable[[], object]) -> None:
    while os.getppid() == ppid:
        time.sleep(1)
    action()


@contextmanager
def workers_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside take no SIGINT before their initializer ignores it (a spawned worker
    imports for a second or more): the calling thread blocks it, and a blocked signal stays blocked across
    fork and exec.

    Blocked, not ignored: a Ctrl-C meanwhile (a pool queues all its tasks here) waits, and is raised as
    KeyboardInterrupt on leaving, or at once when another thread takes it; ignored, it was lost, and the
    stage ran on. Threads started inside (a pool's own) keep it blocked, which leaves it to the others.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending Ctrl-C is raised here


@contextmanager
def cancelled_on_error(pool: Executor, what: str) -> Iterator[Executor]:
    """Shut ``pool`` down on leaving; on an error (Ctrl-C too) cancel its queued tasks first, so that only
    the running ones are waited for, not the rest of the stage's (``Executor.map`` queues them all).

    A worker killed outright (the out-of-memory killer's usual victim: the process holding the image)
    breaks the pool: a :class:`StageError` naming ``what`` and the likely cause, not a traceback ending in
    "terminated abruptly".
    """
    try:
        yield pool
    except BrokenExecutor:
        pool.shutdown(cancel_futures=True)
        raise StageError(f"a worker process of {what} died: most often killed by the out-of-memory killer "
                         "(see `dmesg`), else by its own error printed above; nothing was published: run it "
                         "again, with fewer workers if memory ran short") from None
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    finally:
        pool.shutdown()


def submit_in_order(submit: Callable[..., Any], calls: Iterable[tuple], window: int,
                    settle: Callable[[list], Any] | None = None) -> Iterator[Any]:
    """``submit(*call)`` for each of ``calls`` (a pool's or a task runner's), at most ``window`` submitted
    and unfinished at once; yields their results in call order.

    Submitting all at once holds every call's arguments until it runs: at the paper's 20M images, every
    chunk's sources (a process pool's queue; some 30 GiB on a Dask scheduler). On a failure, ``settle``
    (when given) waits for the calls in flight before it is raised: they may write into a staging folder
    the caller deletes (a cluster's workers go on after the flow ends).
    """
    inflight: deque = deque()
    try:
        for call in calls:  # the next call is made (a chunk built) only once a result is taken
            inflight.append(submit(*call))
            if len(inflight) == window:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
    except Exception:  # not Ctrl-C, nor a generator closed unfinished: a pool shutdown's to handle
        if settle is not None:
            settle(list(inflight))
        raise
