"""Prefect flow ``crop_dask``: the ``crop`` stage fanned out over a Dask cluster, same output as ``mcf crop``.

The stage's own split is reused: :func:`mcf.data.crop.crop_chunk` is a pure function of one chunk of
source images, mapped here as Prefect tasks on prefect-dask's ``DaskTaskRunner``; :func:`merge` then
removes near-duplicates in manifest order and re-shards, so the result does not depend on where or in
what order the chunks ran. A local cluster is started by default; ``address`` joins a running one
(``tcp://scheduler:8786``), whose workers must have ``mcf`` installed and see this checkout's files at
the same absolute paths (a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import cv2
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import submit_in_order, task_runner
from mcf.data.crop import ChunkResult, CropConfig, Source, crop_chunk, finish, load_sources, merge
from mcf.io import atomic_dir, resolved, stage_lock
from mcf.params import load


@task(task_run_name="crop-{part}", cache_policy=NO_CACHE)
def crop_part(sources: list[Source], cfg: CropConfig, part: str) -> ChunkResult:
    """One chunk of source images to one part shard and its manifest rows, on a Dask worker."""
    cv2.setNumThreads(1)  # the cluster's workers are the parallelism
    return crop_chunk(sources, cfg, part)


@flow(name="crop_fan_out")
def fan_out(cfg: CropConfig, parts_dir: str) -> list[ChunkResult]:
    """:func:`crop_part` over chunks of ``cfg.chunk_size`` images (:func:`submit_in_order`).

    The images are listed here, not passed in: a flow's parameters go to the Prefect API, which refuses
    them past 512 KB (the default run's 1,200 images are 750 KB); the tasks' go to the Dask workers.
    """
    chunks = load_sources(cfg).chunks(cfg.chunk_size)  # each built as it is submitted
    return submit_in_order(crop_part, ((chunk, cfg, str(Path(parts_dir) / f"part-{i:06d}"))
                                       for i, chunk in enumerate(chunks)))


@flow(name="crop_dask")
def crop_dask(
    params_file: str = "params.yaml",
    address: str | None = None,
    n_workers: int | None = None,
    processes: bool = True,
) -> dict[str, int]:
    """Run the crop stage of ``params_file`` on Dask; returns the count of crops per status/reason.

    A local cluster has ``n_workers`` workers (default: ``crop.workers``), processes or threads.
    """
    _, cfg = load("crop", params_file, every_section=True)  # as `mcf crop`: any section, before work
    # absolute paths: a worker on another host resolves them the same way
    yunet = cfg.detector.yunet_model and str(resolved(cfg.detector.yunet_model))
    cfg = dataclasses.replace(cfg, input=str(resolved(cfg.input)), out=str(resolved(cfg.out)),
                              detector=dataclasses.replace(cfg.detector, yunet_model=yunet))
    runner = task_runner(address, n_workers or cfg.workers, processes)
    with stage_lock("crop"), atomic_dir(cfg.out, sign="manifest.parquet") as tmp:  # shared with `mcf crop`
        results = fan_out.with_options(task_runner=runner)(cfg, str(tmp / "parts"))
        manifest = merge(results, cfg, tmp)
        if (tmp / "parts").exists():  # no image to crop made no chunk: the gate names the empty output
            shutil.rmtree(tmp / "parts")
        finish(manifest, cfg, tmp)
    return manifest["reason"].fillna("kept").value_counts().to_dict()
