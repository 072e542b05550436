"""The Dask task runner that the fan-out flows (``fetch_dask``, ``crop_dask``) map their slices on."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect import Task
from prefect.futures import wait
from prefect_dask import DaskTaskRunner

from mcf import pools

WINDOW = 256  # tasks submitted and unfinished at once: twice the workers of a 128-core cluster


def task_runner(address: str | None, n_workers: int, processes: bool) -> DaskTaskRunner:
    """A runner on the cluster at ``address``, or on a local cluster of ``n_workers`` one-thread workers."""
    if address:
        return DaskTaskRunner(address=address)
    cluster: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": 1, "processes": processes,
                               "dashboard_address": "127.0.0.1:0"}  # a local cluster stays local
    if processes:  # threads talk in-process (inproc://); processes over TCP, on loopback only
        cluster["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=cluster)


def submit_in_order(task: Task, calls: Iterable[tuple], window: int = WINDOW) -> list:
    """``task(*args)`` for each of ``calls`` on the flow's task runner, at most ``window`` submitted and
    unfinished at once (:func:`mcf.pools.submit_in_order`); the results in call order.

    Dask's scheduler keeps a task's arguments until it has run, and registers a task run per call: the
    paper's 20M images are 625,000 chunks. A failure is raised once the tasks in flight have finished.
    """
    return list(pools.submit_in_order(task.submit, calls, window, wait))
