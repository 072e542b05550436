"""Stage ``fetch``: a source to raw images plus ``manifest.parquet`` in ``fetch.out``.

Sources (``fetch.source``), each with its own params section:

- ``synthetic`` (``fetch.synthetic``): SynthFace scenes with exact detections, plus the AFLW-19- and
  LaPa-format sets (``aflw19/``, ``lapa/``) the fine-tuning stages read.
- ``laion-face`` (``fetch.laion_face``): LAION-Face metadata parts, downloaded (resumable).
- ``s3`` (``fetch.s3``): the objects under an S3 prefix, any S3-compatible endpoint.
- ``local`` (``fetch.local``): a folder of images.

Outputs (schemas in docs/CONTRACTS.md): ``manifest.parquet`` (one row per source image, failures included),
``images/``, and ``detections.parquet`` where the source has detections (synthetic, laion-face with
``detections``). Everything is written to a staging folder and published by one rename after the
``fetch`` data gate passed; downloaded files survive a killed run in ``.<out>.partial/``, beside the
folder a linked ``out`` names (:func:`journal_dir`; see :mod:`mcf.data.sources.download`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mcf.data.sources import laion, local, s3
from mcf.data.sources.download import Limits, Source, download
from mcf.data.sources.image import PILLOW_MAX_PIXELS
from mcf.data.sources.laion import LaionFaceConfig
from mcf.data.sources.local import LocalConfig
from mcf.data.sources.s3 import S3Config
from mcf.io import atomic_dir, output_target, resolved
from mcf.params import Common, ParamsError, checking_paths, param
from mcf.synth.config import SynthConfig
from mcf.validate.gate import run_gate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FetchConfig:
    """``fetch``: the source, the output folder and the bounds every download obeys."""

    source: Literal["synthetic", "laion-face", "s3", "local"] = "synthetic"
    # the stage's DVC input (dvc.yaml watches it): local.root, or a folder holding every LAION-Face part and
    # detections file; synthetic and s3 read no local file (s3's objects are not watched)
    data: str = "mcf/synth"
    out: str = "outputs/fetch"
    threads: int = param(16, ge=1)  # concurrent downloads (laion-face, s3, local)
    retries: int = param(1, ge=0)  # extra tries after a timeout, a dropped connection, HTTP 5xx/429
    max_bytes: int = param(20_000_000, ge=1)  # per image; more is `too_large`
    # per image, from the header; more is `decompression_bomb` (up to Pillow's own bound, ~179 M)
    max_pixels: int = param(50_000_000, ge=1, le=PILLOW_MAX_PIXELS)
    synthetic: SynthConfig = dataclasses.field(default_factory=SynthConfig)
    laion_face: LaionFaceConfig = dataclasses.field(default_factory=LaionFaceConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    local: LocalConfig = dataclasses.field(default_factory=LocalConfig)

    def __post_init__(self) -> None:
        section = {"laion-face": "laion_face", "s3": "s3", "local": "local"}.get(self.source)
        if section is not None:
            try:
                getattr(self, section).check_inputs()
            except ParamsError as err:
                raise err.under(section) from None
        self._check_data()
        if self.source == "local" and checking_paths():
            root, out = resolved(self.local.root), resolved(self.out)
            if root in out.parents:  # out == root is refused when writing: it holds no earlier manifest
                raise ParamsError("out", f"{self.out} is inside local.root {self.local.root}: each run would "
                                  "list the previous output's images as new photos")

    def _check_data(self) -> None:
        """What the source reads lies in ``data``: else an edit to it would leave DVC's fetch up to date."""
        data = resolved(self.data)
        if self.source == "local" and resolved(self.local.root) != data:
            raise ParamsError("data", f"must be local.root {self.local.root!r} (not {self.data!r}): dvc.yaml "
                              "watches fetch.data, so new or changed photos rerun fetch")
        if self.source == "laion-face":
            files = [*self.laion_face.parquet, *self.laion_face.detections]
            outside = [f for f in files if not resolved(f).is_relative_to(data)]
            if outside:
                raise ParamsError("data", f"must hold every laion_face.parquet and detections file, not "
                                  f"{outside[:3]}: dvc.yaml watches fetch.data, so a new part reruns fetch")


def journal_dir(out: Path) -> Path:
    """Where a download run keeps its files until the output is published (a stable name), beside the
    folder a linked ``out`` names: `mcf fetch` and fetch_dask (which resolves ``out``) share it."""
    target = output_target(out)
    return target.with_name(f".{target.name}.partial")


def fetch_synthetic(cfg: SynthConfig, seed: int, staging: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render SynthFace into ``staging``; return the manifest and the exact detections."""
    from mcf.synth import write_aflw19, write_corpus, write_lapa

    manifest, detections = write_corpus(cfg, seed, staging)
    write_aflw19(cfg, seed, staging / "aflw19")
    write_lapa(cfg, seed, staging / "lapa")
    return manifest, detections


def remote_source(cfg: FetchConfig, rows: pd.DataFrame | None = None) -> Source:
    """The laion-face, s3 or local source: its rows listed (or ``rows``, a slice listed elsewhere)."""
    if cfg.source == "laion-face":
        return laion.source(cfg.laion_face, cfg.max_bytes, rows)
    if cfg.source == "s3":
        return s3.source(cfg.s3, cfg.max_bytes, cfg.threads, cfg.retries, rows)
    return local.source(cfg.local, cfg.max_bytes, rows)


def limits(cfg: FetchConfig) -> Limits:
    """The bounds every download obeys, serial or on a Dask worker."""
    return Limits(cfg.threads, cfg.retries, max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels)


def remote_detections(cfg: FetchConfig, rows: pd.DataFrame) -> pd.DataFrame | None:
    """LAION-Face's released detections of the listed ``rows`` (None for the other sources).

    Read before the first download: a damaged or misnamed file then fails in seconds, not after hours.
    """
    if cfg.source != "laion-face" or not cfg.laion_face.detections:
        return None
    return laion.read_detections(cfg.laion_face.detections, set(rows["sample_id"]))


def arrived(detections: pd.DataFrame | None, manifest: pd.DataFrame) -> pd.DataFrame | None:
    """The detections of the images that arrived, in their order."""
    if detections is None:
        return None
    fetched = manifest.loc[manifest["status"] == "success", "sample_id"]
    return detections[detections["sample_id"].isin(fetched)].reset_index(drop=True)


def fetch_remote(cfg: FetchConfig, out: Path, staging: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Download the rows of the laion-face, s3 or local source; return the manifest and detections."""
    source = remote_source(cfg)
    detections = remote_detections(cfg, source.rows)
    manifest = download(source, out, journal_dir(out), staging, limits(cfg))
    return manifest, arrived(detections, manifest)


def typed(frame: pd.DataFrame, types: dict[str, pa.DataType]) -> pa.Table:
    """``frame`` as an Arrow table whose all-null columns named in ``types`` take that type: pandas
    writes a column of nulls (or an empty one) as Arrow's ``null``, not as docs/CONTRACTS.md's type."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for name, kind in types.items():
        i = table.schema.get_field_index(name)
        if i >= 0 and table.schema.field(i).type == pa.null():
            table = table.set_column(i, name, table.column(i).cast(kind))
    return table


# the documented types of the columns that can hold nothing but nulls: a run without a failure's error
# column; every column of a detections table without a face (no fetched image in the released ones)
MANIFEST_TYPES = {"error": pa.string()}
DETECTION_TYPES = {"sample_id": pa.string(), "face": pa.int64(), "box": pa.list_(pa.float64()),
                   "landmarks": pa.list_(pa.float64()), "score": pa.float64()}


def publish(manifest: pd.DataFrame, detections: pd.DataFrame | None, staging: Path) -> None:
    """Write the tables beside the images and gate them, inside the staging folder."""
    pq.write_table(typed(manifest, MANIFEST_TYPES), staging / "manifest.parquet")
    if detections is not None:
        pq.write_table(typed(detections, DETECTION_TYPES), staging / "detections.parquet")
    run_gate(manifest, "fetch", stage="fetch")


def main(common: Common, cfg: FetchConfig) -> None:
    out = Path(cfg.out)
    with atomic_dir(out, sign="manifest.parquet") as staging:
        if cfg.source == "synthetic":
            manifest, detections = fetch_synthetic(cfg.synthetic, common.seed, staging)
        else:
            manifest, detections = fetch_remote(cfg, out, staging)
        publish(manifest, detections, staging)
    shutil.rmtree(journal_dir(out), ignore_errors=True)
    ok = int((manifest["status"] == "success").sum())
    log.info("fetch: %d of %d images fetched into %s", ok, len(manifest), out)
