"""The Dask task runner that the fan-out flows (``fetch_dask``, ``crop_dask``) map their slices on."""

from __future__ import annotations

from typing import Any

from prefect_dask import DaskTaskRunner


def task_runner(address: str | None, n_workers: int, processes: bool) -> DaskTaskRunner:
    """A runner on the cluster at ``address``, or on a local cluster of ``n_workers`` one-thread workers."""
    if address:
        return DaskTaskRunner(address=address)
    cluster: dict[str, Any] = {"n_workers": n_workers, "threads_per_worker": 1, "processes": processes,
                               "dashboard_address": "127.0.0.1:0"}  # a local cluster stays local
    if processes:  # threads talk in-process (inproc://); processes over TCP, on loopback only
        cluster["host"] = "127.0.0.1"
    return DaskTaskRunner(cluster_kwargs=cluster)
