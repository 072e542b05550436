"""Stage ``crop``: raw images plus face detections go to square face crops in webdataset shards.

Output folder ``crop.out``:

- ``shards/crops-*.tar``: the kept crops, ``crop.size`` pixels square (sample schema in
  :mod:`mcf.data.shards`), in manifest order.
- ``manifest.parquet``: one row per detected face, kept or not: ``crop_id`` (str, unique, the shard key),
  ``sample_id``, ``face`` (int), ``status`` (``kept``/``rejected``), ``reason`` (null when kept, else one
  of :data:`REASONS`), ``detector`` (``table``/``haar``/``yunet``), ``box`` (x1, y1, x2, y2),
  ``landmarks`` (10 floats or null), ``score`` (null for Haar), ``face_size`` (shorter box side, source
  pixels), ``blur`` (variance of the Laplacian of the grey crop), ``phash``
  (16 hex digits), and, read back from the written shards, ``shard``, ``width``, ``height``, ``mean``,
  ``std`` (null for rejected rows). An image OpenCV cannot decode gets one ``undecodable`` row per
  table face, or one row (face 0, no detector, box or landmarks) when the detector would have run; one
  this process may not read fails the stage instead (:func:`_raise_if_denied`).

The work is split as :func:`crop_chunk` (one chunk of source images to one part shard plus manifest rows)
and :func:`merge` (near-duplicate removal in a fixed order, re-sharding, read-back), so a serial run, the
process pool here and a Prefect/Dask map over chunks all give the same output.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from mcf.data.detect import DetectionTable, DetectorConfig, Face, box_misses, load_detections, make_detector
from mcf.data.quality import blur_score, duplicates, phash
from mcf.data.shards import encode_jpeg, iter_encoded, read_back, write_manifest, write_shards
from mcf.errors import StageError
from mcf.io import atomic_dir, read_table
from mcf.params import Common, ParamsError, build, param, require_apart, require_path
from mcf.pools import cancelled_on_error, submit_in_order, worker_init, workers_ignore_ctrl_c

log = logging.getLogger(__name__)

# The 5-point template in face-box units (0..1): eyes, nose tip, mouth corners, image-left first.
TEMPLATE = np.array([[0.34, 0.40], [0.66, 0.40], [0.50, 0.58], [0.37, 0.76], [0.63, 0.76]])
# undecodable: OpenCV cannot read the image; outside_image: the box misses the image (a detection for
# another version of it); bad_landmarks: non-finite, or all five at one point
REASONS = ("undecodable", "outside_image", "bad_landmarks", "too_small", "low_score", "blurry", "duplicate")
ROW_COLUMNS = (
    "crop_id sample_id face status reason detector box landmarks score face_size blur phash"
).split()
PART_SIZE = 1 << 30  # a chunk's crops all go to one part shard


@dataclasses.dataclass(frozen=True)
class CropConfig:
    """``crop`` section of params.yaml."""

    input: str = "outputs/fetch"  # the fetch stage's output folder (fetch.out)
    out: str = "outputs/crop"
    # crop side in pixels: the pre-training resolution. Each worker holds its chunk's crops (as JPEGs) until
    # its part shard is written, so memory grows as size²; an unbounded size ended in OpenCV's out-of-memory
    # traceback. 1024 is 4.6× the paper's 224 and above FaRL's 448-512 inputs; the backbone's img_size is
    # not tied to it (the crops are resized to it as they are read).
    size: int = param(64, ge=16, le=1024)
    margin: float = param(0.25, ge=0.0, le=2.0)  # context added on each side, as a share of the face box
    align: bool = False  # warp the 5 landmarks onto TEMPLATE (similarity) when the face has landmarks
    pad: Literal["constant", "reflect"] = "constant"  # how crops reaching outside the image are filled
    detections: Literal["auto", "table", "detector"] = "auto"  # auto: table where it has the image
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    min_face_size: float = param(24.0, ge=0.0)  # shorter box side, source pixels
    min_score: float = param(0.9, ge=0.0, le=1.0)  # not applied to detectors without a score (Haar)
    min_blur: float = param(20.0, ge=0.0)  # variance of the Laplacian of the grey crop
    dup_hamming: int | None = param(2, ge=0, le=31)  # pHash distance counted as a duplicate; null: off
    jpeg_quality: int = param(95, ge=50, le=100)
    shard_size: int = param(1000, ge=1)  # crops per output shard
    chunk_size: int = param(32, ge=1)  # source images per work unit
    workers: int = param(2, ge=1)  # processes; the output does not depend on it

    def __post_init__(self) -> None:
        require_apart(self.out, self.input, "crop.input", "fetch")


@dataclasses.dataclass(frozen=True)
class Source:
    """One source image; ``faces`` is None when the detector must find them."""

    sample_id: str
    path: str
    faces: tuple[Face, ...] | None


@dataclasses.dataclass
class ChunkResult:
    """What :func:`crop_chunk` hands to :func:`merge`: manifest rows and the folder of its part shard."""

    rows: pd.DataFrame
    part: str


def crop_id(sample_id: str, face: int) -> str:
    """A shard-safe key (webdataset splits keys at dots): unsafe ids are replaced and hashed."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)
    if safe != sample_id:
        safe = f"{safe}_{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"
    return f"{safe}_{face:03d}"


def face_transform(face: Face, cfg: CropConfig) -> np.ndarray:
    """The ``[2, 3]`` affine from source pixels to crop pixels (continuous coordinates)."""
    grow = 1.0 + 2.0 * cfg.margin
    if cfg.align and face.landmarks is not None:
        from mcf.data.transforms import similarity  # imported here: it loads torch, unaligned runs do not

        dst = ((TEMPLATE - 0.5) / grow + 0.5) * cfg.size
        return similarity(np.asarray(face.landmarks).reshape(5, 2), dst)
    x1, y1, x2, y2 = face.box
    s = cfg.size / (max(x2 - x1, y2 - y1, 1.0) * grow)
    return np.array([[s, 0.0, cfg.size / 2 - s * (x1 + x2) / 2], [0.0, s, cfg.size / 2 - s * (y1 + y2) / 2]])


def warp_crop(rgb: np.ndarray, m: np.ndarray, size: int, pad: str) -> np.ndarray:
    """Warp ``rgb`` by the continuous-coordinate affine ``m`` into a ``size``-square crop.

    Only the region the crop sees is touched (with ``reflect``, also the pixels the mirror at an image edge
    reads, as far inside it as the crop reaches outside), and it is first shrunk with area averaging when
    the warp would shrink it by 2× or more (a bilinear warp alone aliases). Outside the image: ``pad``.
    What reaches the warp stays small however large the image: OpenCV's warps refuse a side of 32767 px
    or more.
    """
    m = m.copy()
    m[:, 2] += m[:, :2].sum(axis=1) * 0.5 - 0.5  # OpenCV samples at pixel centres
    edge = [-0.5, size - 0.5]  # the crop's outer pixel edges, in pixel-centre coordinates
    corners = cv2.invertAffineTransform(m) @ np.array([[x, y, 1.0] for x in edge for y in edge]).T
    scale = np.sqrt(abs(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]))
    k = int(1.0 / scale + 1e-9)  # shrink by k first: the warp's remaining scale is then in (0.5, 1]
    h, w = rgb.shape[:2]
    spans = []
    for v, n in zip(corners, (w, h), strict=True):
        lo, hi = int(np.floor(v.min())) - 2, int(np.ceil(v.max())) + 3  # pixels lo..hi-1, unclipped
        if pad == "reflect":  # BORDER_REFLECT_101 reads pixel -i for i and n-1+i for n-1-i (in the image
            # shrunk by k, up to a shrunk pixel further)
            below = 1 - lo + 2 * k if lo < 0 else hi  # what mirrors the pixels the crop reaches below 0
            above = 2 * n - 1 - hi - 2 * k if hi > n else lo  # and beyond n - 1
            lo, hi = min(lo, above), max(hi, below)
        spans.append((max(lo, 0), min(hi, n)))
    (x0, x1), (y0, y1) = spans
    if x0 >= x1 or y0 >= y1:  # the crop lies wholly outside the image (never with reflect): all pad
        return np.zeros((size, size, *rgb.shape[2:]), rgb.dtype)
    roi = rgb[y0:y1, x0:x1]
    m[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)
    if k >= 2:
        small = cv2.resize(roi, (-(-roi.shape[1] // k), -(-roi.shape[0] // k)), interpolation=cv2.INTER_AREA)
        kx, ky = roi.shape[1] / small.shape[1], roi.shape[0] / small.shape[0]
        m = m @ np.array([[kx, 0, 0.5 * kx - 0.5], [0, ky, 0.5 * ky - 0.5], [0, 0, 1]])
        roi = small
    border = cv2.BORDER_CONSTANT if pad == "constant" else cv2.BORDER_REFLECT_101
    return cv2.warpAffine(roi, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)


def _row(sample_id: str, face: Face | None) -> dict[str, Any]:
    """A rejected manifest row for ``face``; ``None`` stands for an undecodable image's unknown faces."""
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS) | {
        "sample_id": sample_id,
        "face": 0,
        "status": "rejected",
        "score": np.nan,
        "face_size": np.nan,
        "blur": np.nan,
    }
    if face is not None:
        row |= {
            "face": face.face,
            "detector": face.detector,
            "box": list(face.box),
            "landmarks": None if face.landmarks is None else list(face.landmarks),
            "score": np.nan if face.score is None else face.score,
            "face_size": face.size,
        }
    return row | {"crop_id": crop_id(sample_id, row["face"])}


def _crop_face(rgb: np.ndarray, face: Face, sample_id: str, cfg: CropConfig) -> tuple[dict, bytes | None]:
    """One manifest row for ``face``, and the JPEG of its crop when it passes the per-crop filters."""
    row = _row(sample_id, face)
    if box_misses(face.box, rgb.shape[1], rgb.shape[0]):
        return row | {"reason": "outside_image"}, None
    points = None if face.landmarks is None or not cfg.align else np.asarray(face.landmarks).reshape(5, 2)
    if points is not None and not (np.isfinite(points).all() and np.ptp(points, axis=0).any()):
        return row | {"reason": "bad_landmarks"}, None  # the face cannot be aligned by them
    if face.size < cfg.min_face_size:
        return row | {"reason": "too_small"}, None
    if face.score is not None and face.score < cfg.min_score:
        return row | {"reason": "low_score"}, None
    crop = warp_crop(rgb, face_transform(face, cfg), cfg.size, cfg.pad)
    row |= {"blur": blur_score(crop), "phash": f"{phash(crop):016x}"}
    if row["blur"] < cfg.min_blur:
        return row | {"reason": "blurry"}, None
    return row | {"status": "kept"}, encode_jpeg(crop, cfg.jpeg_quality)


def _meta(row: dict) -> dict[str, Any]:
    """The shard's ``json`` member for a kept row (schema in :mod:`mcf.data.shards`)."""
    lms = row["landmarks"]
    return {
        "crop_id": row["crop_id"],
        "sample_id": row["sample_id"],
        "face": row["face"],
        "box": row["box"],
        "landmarks": None if lms is None else [lms[i : i + 2] for i in range(0, 10, 2)],
        "score": None if np.isnan(row["score"]) else row["score"],
    }


def _raise_if_denied(path: str) -> None:
    """Raise the ``PermissionError`` of an image this process may not read (chmod 000, another user's).

    OpenCV returns None for it as for bytes it cannot decode, but it is the environment's fault, not the
    data's: the stage fails on one line naming the file (the CLI's exit 1) rather than filing it
    ``undecodable``. Other errors (a missing file) stay with the ``undecodable`` row.
    """
    try:
        Path(path).open("rb").close()
    except PermissionError:
        raise
    except OSError:
        pass


def crop_chunk(sources: Sequence[Source], cfg: CropConfig, part: str | Path) -> ChunkResult:
    """Crop one chunk of source images into a part shard under ``part``; a pure function of its inputs."""
    rows: list[dict] = []
    samples: list[tuple[str, bytes, dict]] = []
    for src in sources:
        bgr = cv2.imread(src.path, cv2.IMREAD_COLOR)
        if bgr is None:
            _raise_if_denied(src.path)
            log.warning("rejecting %s: OpenCV cannot decode %s", src.sample_id, src.path)
            faces = src.faces if src.faces is not None else (None,)
            rows += [_row(src.sample_id, face) | {"reason": "undecodable"} for face in faces]
            continue
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        faces = src.faces if src.faces is not None else make_detector(cfg.detector)(rgb)
        for face in faces:
            row, jpeg = _crop_face(rgb, face, src.sample_id, cfg)
            rows.append(row)
            if jpeg is not None:
                samples.append((row["crop_id"], jpeg, _meta(row)))
    write_shards(samples, part, PART_SIZE)
    return ChunkResult(pd.DataFrame(rows, columns=ROW_COLUMNS), str(part))


def merge(results: Sequence[ChunkResult], cfg: CropConfig, out_dir: str | Path) -> pd.DataFrame:
    """Join chunk results in order: reject near-duplicates, write the final shards, read them back.

    Duplicates are decided here, after the parallel part, in manifest order (the first crop wins), so
    the outcome does not depend on how the chunks were scheduled.
    """
    out_dir = Path(out_dir)
    frames = [r.rows for r in results if len(r.rows)]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS)
    kept = rows.index[rows["status"] == "kept"]
    if cfg.dup_hamming is not None and len(kept):
        dup = duplicates([int(h, 16) for h in rows.loc[kept, "phash"]], cfg.dup_hamming)
        rows.loc[kept[dup], ["status", "reason"]] = ["rejected", "duplicate"]
    keep = set(rows.loc[rows["status"] == "kept", "crop_id"])
    parts = [str(p) for r in results for p in sorted(Path(r.part).glob("crops-*.tar"))]
    samples = (s for s in (iter_encoded(parts) if parts else ()) if s[0] in keep)
    # a copy of every kept crop: an hour or more at the paper's 20M, so it shows a bar
    with tqdm(samples, total=len(keep), desc="write shards", unit="crop") as copied:  # closed on an error too
        write_shards(copied, out_dir / "shards", cfg.shard_size)
    stats = read_back(out_dir / "shards", cfg.workers)
    manifest = rows.merge(stats, on="crop_id", how="left")
    strays = stats[~stats["crop_id"].isin(rows["crop_id"])]  # written but not in the manifest: gate fails
    return pd.concat([manifest, strays], ignore_index=True) if len(strays) else manifest


def finish(manifest: pd.DataFrame, cfg: CropConfig, out_dir: str | Path) -> None:
    """Run the ``crop`` gate on the output, then write the manifest (before the atomic rename)."""
    from mcf.validate.gate import run_gate

    run_gate(manifest, "crop", stage="crop", config=cfg)  # every crop at cfg.size, past cfg.min_*
    write_manifest(manifest, Path(out_dir) / "manifest.parquet")


@dataclasses.dataclass(frozen=True)
class Sources:
    """The fetched images in ``sample_id`` order with their table detections, as arrays: a slice is that
    chunk's :class:`Source` list, built when the chunk is handed out (a Source and its faces per image
    held some 24 GB in the parent at the paper's 20M images)."""

    folder: Path  # the fetch output
    sample_ids: np.ndarray  # str objects
    paths: np.ndarray  # str objects: the image files, under ``folder``
    table: DetectionTable | None
    starts: np.ndarray  # each image's rows in ``table`` (DetectionTable.spans); empty without a table
    stops: np.ndarray
    table_only: bool  # crop.detections 'table': an image the table lacks has no faces (else the detector's)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: slice) -> list[Source]:
        chunk = []
        for i in range(*index.indices(len(self))):
            faces: tuple[Face, ...] | None = () if self.table_only else None
            if self.table is not None and self.stops[i] > self.starts[i]:
                faces = self.table.faces(int(self.starts[i]), int(self.stops[i]))
            chunk.append(Source(self.sample_ids[i], str(self.folder / self.paths[i]), faces))
        return chunk

    def chunks(self, size: int) -> Iterator[list[Source]]:
        """Consecutive chunks of ``size`` images, each built as it is asked for."""
        return (self[i : i + size] for i in range(0, len(self), size))


def load_sources(cfg: CropConfig) -> Sources:
    """The fetched images (status ``success``) in ``sample_id`` order, with their table detections."""
    fetch_dir = Path(cfg.input)
    require_path(fetch_dir / "manifest.parquet", "crop.input", made_by="fetch")
    wanted = ["sample_id", "path", "status"]
    manifest = read_table(fetch_dir / "manifest.parquet", wanted, "rerun `mcf fetch`", only=True)
    manifest = manifest[(manifest["status"] == "success") & manifest["path"].notna()]
    manifest = manifest.assign(sample_id=manifest["sample_id"].astype(str)).sort_values(["sample_id", "path"])
    table_path = fetch_dir / "detections.parquet"
    table = load_detections(table_path) if cfg.detections != "detector" and table_path.is_file() else None
    if cfg.detections == "table" and table is None:
        raise StageError(f"crop.detections is 'table' but {table_path} does not exist")
    sample_ids = manifest["sample_id"].to_numpy(object, copy=True)  # not a view: it kept every column
    starts, stops = table.spans(sample_ids) if table is not None else (np.zeros(0, np.int64),) * 2
    paths = manifest["path"].to_numpy(object, copy=True)
    return Sources(fetch_dir, sample_ids, paths, table, starts, stops, cfg.detections == "table")


def _pool_context() -> BaseContext:
    """Workers forked from a clean server process that has imported this module once.

    Plain fork inherits OpenCV's thread pool in a broken state (workers can hang in OpenCV), and
    spawn re-imports this module's dependencies (OpenCV, pandas) in every worker.
    """
    if sys.platform != "linux":
        return get_context("spawn")
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _worker_init() -> None:
    worker_init()
    cv2.setNumThreads(1)  # one OpenCV thread per worker process: the pool is the parallelism


def run_chunks(sources: Sources, cfg: CropConfig, parts_dir: str | Path) -> list[ChunkResult]:
    """Crop all sources in chunks of ``cfg.chunk_size``, over ``cfg.workers`` processes, in chunk order.
    Two chunks a worker are handed out at a time, so only those are built (:class:`Sources`)."""
    calls = ((crop_chunk, chunk, cfg, str(Path(parts_dir) / f"part-{i:06d}"))
             for i, chunk in enumerate(sources.chunks(cfg.chunk_size)))
    bar = tqdm(total=len(sources), desc="crop", unit="img")
    results: list[ChunkResult] = []

    def take(result: ChunkResult) -> None:
        bar.update(min(cfg.chunk_size, len(sources) - cfg.chunk_size * len(results)))
        results.append(result)

    if cfg.workers == 1 or len(sources) <= cfg.chunk_size:
        for fn, *args in calls:
            take(fn(*args))
    else:
        pool = ProcessPoolExecutor(cfg.workers, mp_context=_pool_context(), initializer=_worker_init)
        with cancelled_on_error(pool, "crop"):
            # no settle: cancelled_on_error's shutdown waits for the running chunks, and wait() would
            # hang on the queued ones it cancels (a future cancelled there is never notified)
            mapped = submit_in_order(pool.submit, calls, 2 * cfg.workers)
            with workers_ignore_ctrl_c():  # the first submits start the workers (and a forkserver)
                take(next(mapped))
            for result in mapped:
                take(result)
    bar.close()
    return results


def crop(cfg: CropConfig) -> pd.DataFrame:
    """The whole stage: sources, chunks, merge, gate, atomic rename onto ``cfg.out``."""
    sources = load_sources(cfg)
    with atomic_dir(cfg.out, sign="manifest.parquet") as tmp:
        results = run_chunks(sources, cfg, tmp / "parts")
        manifest = merge(results, cfg, tmp)
        if (tmp / "parts").exists():  # no image to crop made no chunk: the gate names the empty output
            shutil.rmtree(tmp / "parts")
        finish(manifest, cfg, tmp)
    counts = manifest["reason"].fillna("kept").value_counts().to_dict()
    log.info("crop: %d images, %d faces: %s -> %s", len(sources), len(manifest), counts, cfg.out)
    return manifest


def main(common: Common, cfg: CropConfig) -> None:
    """``mcf crop``: crop is deterministic, so ``common.seed`` is not used."""
    crop(cfg)


def _bench_images(root: Path, n: int, side: int, jpegs: bool = True) -> Path:
    """A fetch folder of ``n`` textured ``side``-pixel JPEGs (only their tables without ``jpegs``), each
    with one table detection."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows, faces = [], []
    for i in range(n):
        if jpegs:
            base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
            img = cv2.resize(base, (side, side), interpolation=cv2.INTER_CUBIC)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"images/{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        rows.append({"sample_id": f"bench-{i:06d}", "path": f"images/{i:06d}.jpg", "status": "success"})
        w = rng.uniform(0.3, 0.6) * side
        x, y = rng.uniform(0, side - w, 2)
        faces.append(
            {
                "sample_id": f"bench-{i:06d}",
                "face": 0,
                "box": [x, y, x + w, y + w],
                "landmarks": None,
                "score": 0.99,
            }
        )
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    pd.DataFrame(faces).to_parquet(root / "detections.parquet")
    return root


def _held(value: Any) -> int:
    """Bytes a dataclass of arrays holds: the arrays, and the strings an object array points to."""
    total = 0
    for field in dataclasses.fields(value):
        item = getattr(value, field.name)
        if isinstance(item, np.ndarray):
            total += item.nbytes + (sum(map(sys.getsizeof, item)) if item.dtype == object else 0)
        elif dataclasses.is_dataclass(item):
            total += _held(item)
    return total


def bench_crop(argv: list[str]) -> None:
    """Crop-stage throughput: crops and images per second through detection, warping, filters and
    sharding (the stage minus its data gate), on generated textured images or a fetch output."""
    p = argparse.ArgumentParser(prog="mcf bench crop", description=bench_crop.__doc__)
    p.add_argument("--input", help="a fetch output folder (default: generate --images textured images)")
    p.add_argument("--images", type=int, default=400, help="generated images (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=320, help="generated image side (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="crop processes (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="crop side (default: %(default)s)")
    p.add_argument("--detector", action="store_true", help="ignore detection tables: run the OpenCV detector")
    p.add_argument("--list-only", action="store_true",
                   help="time and size the image list alone (load_sources), on generated tables: no JPEGs")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be at least 1, got {args.images}")
    try:  # the stage's own bounds: crop.size at 100000 was OpenCV's out-of-memory traceback
        build(CropConfig, {"size": args.size, "workers": args.workers})
    except ParamsError as err:
        p.error(f"--{err.key} {err.message}")
    if args.image_size < 8:  # the texture is an (image-size / 8)² noise, upscaled
        p.error(f"--image-size must be at least 8, got {args.image_size}")
    if args.input and not (Path(args.input) / "manifest.parquet").is_file():
        p.error(f"--input {args.input}: no manifest.parquet there; give a fetch output folder (mcf fetch)")
    with tempfile.TemporaryDirectory(prefix="mcf-bench-crop-") as tmp:
        root = Path(tmp)
        fetch = Path(args.input) if args.input else _bench_images(
            root / "fetch", args.images, args.image_size, jpegs=not args.list_only)
        mode = "detector" if args.detector else "auto"
        cfg = CropConfig(
            input=str(fetch),
            out=str(Path(tmp) / "crop"),
            size=args.size,
            workers=args.workers,
            detections=mode,
        )
        start = time.perf_counter()
        sources = load_sources(cfg)
        listed = time.perf_counter() - start
        print(f"crop bench: image list of {len(sources)} images loaded in {listed:.2f} s, "
              f"{_held(sources) / max(len(sources), 1):.0f} B an image held")
        if args.list_only:
            return
        start = time.perf_counter()
        results = run_chunks(sources, cfg, Path(tmp) / "parts")
        middle = time.perf_counter()
        manifest = merge(results, cfg, Path(tmp) / "crop")
        seconds = time.perf_counter() - start
    kept = int((manifest["status"] == "kept").sum())
    # why the others went: at a small --image-size every face is too_small, and 0 kept said nothing more
    rejected = ", ".join(f"{n} {why}" for why, n in manifest["reason"].dropna().value_counts().items())
    print(
        f"crop bench: {len(sources)} images, {len(manifest)} faces, {kept} crops kept"
        f"{f' (rejected: {rejected})' if rejected else ''}, "
        f"{args.size}px, workers={cfg.workers}, detections={mode}: {seconds:.2f} s "
        f"(crop {middle - start:.2f} s, merge {seconds - (middle - start):.2f} s) = "
        f"{len(manifest) / seconds:.1f} faces/s ({kept / seconds:.1f} crops kept/s), "
        f"{len(sources) / seconds:.1f} images/s"
    )
