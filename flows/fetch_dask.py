"""Prefect flow ``fetch_dask``: the ``fetch`` stage's downloads fanned out over a Dask cluster.

The rows (LAION-Face parquet rows, S3 keys, local files) are listed once and cut into slices of
``rows_per_task``; each slice is a Prefect task on prefect-dask's ``DaskTaskRunner`` that builds its own
fetcher and runs the stage's download loop (:func:`mcf.data.sources.download.fetch_records`) with its own
journal file and its share of the journal of earlier runs, which the flow reads once. The records come
back in row order and the manifest, detections and gate are the stage's own
(:func:`mcf.data.fetch.publish`), so the output is what ``mcf fetch`` writes, and a run killed half-way
resumes from the journal folder, split or not. Workers write into the shared staging and journal folders:
on a cluster (``address``) they must see this checkout's files at the same absolute paths (a shared
filesystem). SynthFace renders on ``fetch.synthetic.workers`` processes; there is nothing to download, so
it is refused here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import submit_in_order, task_runner
from mcf.data.fetch import (
    FetchConfig,
    arrived,
    journal_dir,
    limits,
    publish,
    remote_detections,
    remote_source,
)
from mcf.data.sources.download import (
    Journal,
    Record,
    fetch_records,
    previous_successes,
    require_rows,
    to_manifest,
)
from mcf.io import atomic_dir, resolved, stage_lock
from mcf.params import ParamsError, load


@task(task_run_name="fetch-{part}", cache_policy=NO_CACHE)
def fetch_part(
    cfg: FetchConfig,
    rows: pd.DataFrame,
    part: str,
    journaled: list[dict[str, Any]],
    reusable: pd.DataFrame,
    staging: str,
) -> list[Record]:
    """One slice of rows into the shared staging folder, on a Dask worker; its records in row order.

    ``journaled`` is the slice's share of the journal of earlier runs (:func:`journal_by_slice`), and
    ``reusable`` its share of the previous output's successes (:func:`previous_by_slice`).
    """
    out = Path(cfg.out)
    source = remote_source(cfg, rows)
    return fetch_records(source, out, journal_dir(out), Path(staging), limits(cfg), part, journaled, reusable)


def journal_by_slice(entries: list[dict[str, Any]], sample_ids: pd.Series, rows_per_task: int) -> list[list]:
    """The journal's entries, split by the slice of ``rows_per_task`` rows that has their sample id.

    The flow reads the journal once: each slice reading the whole folder read every earlier run's entry
    once per slice, and the files the slices before it were writing (1M entries take 7.7 s and 1.6 GB to
    read, and a 20M-row run has 2,000 slices).
    """
    position = {sample_id: i for i, sample_id in enumerate(sample_ids.astype(str))}
    shares: list[list] = [[] for _ in range(0, len(sample_ids), rows_per_task)]
    for entry in entries:
        i = position.get(str(entry["sample_id"]))
        if i is not None:
            shares[i // rows_per_task].append(entry)
    return shares


def previous_by_slice(
    successes: pd.DataFrame, sample_ids: pd.Series, rows_per_task: int
) -> list[pd.DataFrame]:
    """The previous output's successes (:func:`previous_successes`), split by the slice of ``rows_per_task``
    rows that has their sample id.

    The flow reads the previous manifest once: each slice filtering it in the parquet reader scanned all
    its rows, quadratic in the rows: a rerun over 20M rows in 2,000 slices read 40G rows (0.4 s a slice
    at 2M rows, ten times that at 20M).
    """
    position = {sample_id: i // rows_per_task for i, sample_id in enumerate(sample_ids.astype(str))}
    groups = successes.groupby(successes["sample_id"].astype(str).map(position)).indices
    return [successes.iloc[groups.get(i, [])] for i in range(0, -(-len(sample_ids) // rows_per_task))]


@flow(name="fetch_fan_out")
def fan_out(cfg: FetchConfig, staging: str, rows_per_task: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """List the rows once, read their released detections (before any download, as `mcf fetch` does),
    run :func:`fetch_part` on slices of ``rows_per_task`` (:func:`submit_in_order`); the manifest and
    the detections of the images that arrived.

    The rows are listed here, not passed in: a flow's parameters go to the Prefect API, which refuses
    them past 512 KB (a few thousand rows); the tasks' go to the Dask workers.
    """
    source = remote_source(cfg)
    require_rows(source)
    detections = remote_detections(cfg, source.rows)
    slices = [source.rows.iloc[i : i + rows_per_task] for i in range(0, len(source.rows), rows_per_task)]
    parts = [f"part-{i:06d}" for i in range(len(slices))]
    journaled = journal_by_slice(Journal(journal_dir(Path(cfg.out))).load(), source.rows["sample_id"],
                                 rows_per_task)
    reusable = previous_by_slice(previous_successes(Path(cfg.out), source.match), source.rows["sample_id"],
                                 rows_per_task)
    calls = (
        (cfg, rows, part, share, old, staging)
        for rows, part, share, old in zip(slices, parts, journaled, reusable, strict=True)
    )
    records = submit_in_order(fetch_part, calls)
    manifest = to_manifest(source, [record for part in records for record in part])
    return manifest, arrived(detections, manifest)


def absolute(cfg: FetchConfig) -> FetchConfig:
    """The paths a worker reads or writes, made absolute: a worker on another host resolves them alike."""
    local = dataclasses.replace(cfg.local, root=str(resolved(cfg.local.root)))
    return dataclasses.replace(cfg, out=str(resolved(cfg.out)), local=local)


@flow(name="fetch_dask")
def fetch_dask(
    params_file: str = "params.yaml",
    address: str | None = None,
    n_workers: int | None = None,
    processes: bool = True,
    rows_per_task: int = 10_000,
) -> dict[str, int]:
    """Run the fetch stage of ``params_file`` on Dask; returns the count of rows per status.

    A local cluster has ``n_workers`` workers (default: one per CPU), processes or threads; each
    worker downloads its slice on ``fetch.threads`` threads.
    """
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task must be at least 1, not {rows_per_task}")
    _, cfg = load("fetch", params_file, every_section=True)  # as `mcf fetch`: any section, before work
    if cfg.source == "synthetic":
        # a params error (exit 2 for the flow's retries): running it again is refused the same way
        raise ParamsError("fetch.source", "synthetic: SynthFace renders on fetch.synthetic.workers processes "
                          "(`mcf fetch`); fetch_dask fans out downloads (laion-face, s3, local)", params_file)
    cfg = absolute(cfg)
    runner = task_runner(address, n_workers or os.cpu_count() or 1, processes)
    out = Path(cfg.out)
    with stage_lock("fetch"):  # `mcf fetch` and this flow share the output and its journal
        with atomic_dir(out, sign="manifest.parquet") as staging:
            manifest, detections = fan_out.with_options(task_runner=runner)(cfg, str(staging), rows_per_task)
            publish(manifest, detections, staging)
        shutil.rmtree(journal_dir(out), ignore_errors=True)
    return manifest["status"].value_counts().to_dict()
