"""``mcf.pools`` piece by piece: worker initializers, parent watching, the Ctrl-C mask, cancelling a pool.

test_cli runs the stages' own pools under a real Ctrl-C and SIGKILL; these pin each part on its own, fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context

import pytest

from mcf.errors import StageError
from mcf.pools import cancelled_on_error, ignore_ctrl_c, on_death, worker_init, workers_ignore_ctrl_c

pytestmark = pytest.mark.usefixtures("ctrl_c")  # CI's background job starts with SIGINT ignored


def _sigint_blocked() -> bool:
    return signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def _ctrl_c_here() -> str:
    try:
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C reaches every process of its group
        time.sleep(0.01)  # a Python handler runs between bytecodes
    except KeyboardInterrupt:
        return "taken by the task"
    return "left to the parent"


@pytest.mark.parametrize("initializer", [ignore_ctrl_c, worker_init])
def test_a_worker_started_with_ctrl_c_unblocked_leaves_it_to_its_parent(
    initializer: Callable[[], None]
) -> None:
    """A worker started outside :func:`workers_ignore_ctrl_c` (a pool starts more as tasks come) has SIGINT
    unblocked: only its initializer keeps a Ctrl-C from ending its task in KeyboardInterrupt, or the
    worker itself, which breaks the pool."""
    assert not _sigint_blocked()
    with ProcessPoolExecutor(1, mp_context=get_context("fork"), initializer=initializer) as pool:
        assert pool.submit(_ctrl_c_here).result(timeout=30) == "left to the parent"


def test_on_death_acts_once_the_process_dies_and_at_once_if_it_is_gone() -> None:
    """A spawned worker imports for seconds: its parent may be dead and reaped before it starts watching,
    and a watch that never fires leaves the worker waiting for work for ever."""
    alive, fired = subprocess.Popen(["sleep", "30"]), threading.Event()
    try:
        on_death(alive.pid, fired.set)
        assert not fired.wait(0.2)
    finally:
        alive.kill()
        alive.wait()
    assert fired.wait(5)
    gone, fired = subprocess.Popen(["true"]), threading.Event()
    gone.wait()
    on_death(gone.pid, fired.set)
    assert fired.wait(5)


def test_without_pidfd_a_process_other_than_the_parent_is_not_taken_for_dead(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pidfd_open only a change of this process's own parent can be seen; another pid is not
    covered. Taken for dead at once, a torchrun worker watching its launcher (mcf.train.distributed)
    would stop itself as it starts."""
    monkeypatch.delattr(os, "pidfd_open")
    other, fired = subprocess.Popen(["sleep", "30"]), threading.Event()
    try:
        on_death(other.pid, fired.set)  # a daemon thread, left watching for this process's reparenting
        assert not fired.wait(0.3)
    finally:
        other.kill()
        other.wait()


def test_a_ctrl_c_while_workers_start_waits_and_is_raised_on_leaving() -> None:
    """Blocked, not ignored: a Ctrl-C meanwhile (a pool queueing its tasks) is held, then raised once the
    block ends. Taken at once, it reaches workers not yet ignoring it; ignored, it was lost and the stage
    ran on."""
    held = []
    with pytest.raises(KeyboardInterrupt), workers_ignore_ctrl_c():
        signal.raise_signal(signal.SIGINT)
        held.append(_sigint_blocked())
    assert held == [True] and not _sigint_blocked()


def test_the_ctrl_c_mask_is_restored_after_an_error_and_kept_when_nested() -> None:
    """Left blocked after an error inside, every later Ctrl-C of the stage would be lost; an inner block
    must hand back the outer one's mask, not unblock it."""
    assert not _sigint_blocked()
    with pytest.raises(ValueError, match="^a worker failed$"), workers_ignore_ctrl_c():
        raise ValueError("a worker failed")
    assert not _sigint_blocked()
    with workers_ignore_ctrl_c():
        with workers_ignore_ctrl_c():
            pass
        assert _sigint_blocked()
    assert not _sigint_blocked()


@pytest.mark.parametrize("error", [ValueError("a chunk failed"), KeyboardInterrupt()])
def test_an_error_or_ctrl_c_cancels_the_queued_tasks(error: BaseException) -> None:
    """``Executor.map`` queues every task of a stage: on an error, or a Ctrl-C, the pool's shutdown would
    run each queued one before the stage could stop."""
    started: list[int] = []

    def task(i: int) -> int:
        started.append(i)
        time.sleep(0.05)
        return i

    pool = ThreadPoolExecutor(1)
    with pytest.raises(type(error)), cancelled_on_error(pool, "test"):
        futures = [pool.submit(task, i) for i in range(20)]
        while not started:
            time.sleep(0.005)
        raise error
    assert len(started) <= 2 and sum(f.cancelled() for f in futures) >= 18


def test_a_pool_is_shut_down_on_leaving_and_a_tasks_own_error_is_raised_as_itself() -> None:
    """Not shut down, a pool's workers wait for work until the process ends. A task's RuntimeError (torch
    raises them) is not a dead worker, though a broken pool's error is a RuntimeError too."""
    pool = ThreadPoolExecutor(1)
    with cancelled_on_error(pool, "test"):
        assert pool.submit(abs, -1).result() == 1
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, -1)

    def fails() -> None:
        raise RuntimeError("a task's own")

    pool = ThreadPoolExecutor(1)
    with pytest.raises(RuntimeError, match="^a task's own$") as err, cancelled_on_error(pool, "test"):
        pool.submit(fails).result()
    assert not isinstance(err.value, StageError)
