"""The Dask task runner that the fan-out flows (``fetch_dask``, ``crop_dask``) map their slices on."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from distributed.comm.addressing import parse_address, parse_host_port
from prefect import Task
from prefect.futures import PrefectFuture, wait
from prefect_dask import DaskTaskRunner

from mcf import pools
from mcf.errors import EXIT_PARAMS

WINDOW = 256  # tasks submitted and unfinished at once: twice the workers of a 128-core cluster
STOPS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and the SIGTERM a Prefect worker's cancel sends
_stop: threading.Event | None = None  # the stop of the run that fans out (stop_on): module state, see there
PROBE_TIMEOUT_S = 5.0  # a scheduler's kernel accepts a TCP connect at once, however busy its event loop
TCP_SCHEMES = ("tcp", "tls", "ws", "wss")  # Dask's comms over TCP, which a plain connect can check


class Stopped(RuntimeError):
    """The run that fanned out was stopped: no more tasks were submitted, those in flight finished."""


class SchedulerUnreachable(ConnectionError):
    """Nothing answers at the Dask scheduler address given: a wrong address, or no scheduler started.

    ``exit_code`` is a params error's, which the mcf flow does not retry (flows/pipeline.py): the next
    try would find the same address.
    """

    exit_code = EXIT_PARAMS


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`SchedulerUnreachable` unless a TCP connect to ``address`` succeeds within ``timeout``.

    Dask's client retries a refused connect for its 30 s connect timeout before it fails, and the mcf
    flow retried fetch twice, 30 s apart: a wrong address failed after 2.5 minutes. Here a refused
    address fails at once, a name that does not resolve once the resolver says so, a host that does not
    answer after ``timeout``. An address Dask reaches otherwise than over TCP (inproc://,
    ucx://), or one without a port, is left to Dask. The scheduler logs the connect, closed before
    Dask's handshake, at INFO level.
    """
    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except ValueError:
        return
    if scheme not in TCP_SCHEMES:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:  # refused, timed out, a name that does not resolve
        raise SchedulerUnreachable(
            f"no Dask scheduler answers at {address}: a TCP connect ({timeout:g} s timeout) got "
            f"{err or type(err).__name__}; start the scheduler, or give the address it listens on"
        ) from None


def task_runner(address: str | None, n_workers: int, processes: bool) -> DaskTaskRunner:
    """A runner on the cluster at ``address`` (checked at once, :func:`probe`), or on a local cluster of
    ``n_workers`` one-thread workers."""
    if address:
        probe(address)
        return DaskTaskRunner(address=address)
    cluster: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": 1, "processes": processes,
                               "dashboard_address": "127.0.0.1:0"}  # a local cluster stays local
    if processes:  # threads talk in-process (inproc://); processes over TCP, on loopback only
        cluster["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=cluster)


def submit_in_order(task: Task, calls: Iterable[tuple], window: int = WINDOW) -> list:
    """``task(*args)`` for each of ``calls`` on the flow's task runner, at most ``window`` submitted and
    unfinished at once (:func:`mcf.pools.submit_in_order`); the results in call order.

    Dask's scheduler keeps a task's arguments until it has run, and Prefect registers a task run per call:
    the paper's 20M images are 2,000 fetch slices and 20,000 crop chunks (params.paper.yaml; 625,000 at
    the default chunk_size of 32). A failure is raised once the tasks in flight have finished; a Ctrl-C
    or a cancel at once (:func:`stops_held`); a stop of the run that fans out (:func:`stop_on`) before the
    next submit.
    """
    def submit(*args: Any) -> PrefectFuture:
        if _stop is not None and _stop.is_set():
            raise Stopped("the flow run was stopped: no more tasks submitted")
        with stops_held():
            return task.submit(*args)

    return list(pools.submit_in_order(submit, calls, window, wait))


@contextmanager
def stop_on(event: threading.Event) -> Iterator[None]:
    """Fan-outs in the body submit no more tasks once ``event`` is set (:class:`Stopped`).

    A cancel or a Ctrl-C is raised in the flow's main thread only: a fan-out in a task's thread
    (flows/pipeline.py's ``dask_stage``) went on submitting every slice until the worker's SIGKILL, 30 s
    later. Module state, read where the flow submits: the fan-out flows take no such parameter (a flow's
    go to the Prefect API).
    """
    global _stop
    outer, _stop = _stop, event
    try:
        yield
    finally:
        _stop = outer


@contextmanager
def stops_held() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM back until the body is done, then handle it as it came; a second one is
    not held (the first submit starts the cluster, which may hang).

    prefect-dask's submit serializes the task's context with pydantic, which raises the KeyboardInterrupt
    or Prefect's TerminationSignal of a signal handled meanwhile as a PydanticSerializationError: the
    fan-out took that for a failed task and waited for every task in flight before it stopped. Python
    runs handlers in the main thread only, so elsewhere (a task's thread) there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, STOPS):
        yield  # None: a handler not set from Python, which could not be put back
        return
    came: list[int] = []
    handlers: dict[int, Any] = {}

    def put_back() -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    def hold(sig: int, _frame: Any) -> None:
        came.append(sig)
        put_back()

    handlers.update((sig, signal.signal(sig, hold)) for sig in STOPS)
    try:
        yield
    finally:
        put_back()
        for sig in came:
            signal.raise_signal(sig)  # to the handler put back: Prefect's, Python's Ctrl-C, the default
