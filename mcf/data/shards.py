"""Webdataset tar shards of face crops: the format that crosses the crop → subset → pretrain boundary.

Schema of one sample (one member group in a tar, keyed by ``__key__`` = ``crop_id``):

- ``jpg``: the square RGB crop, JPEG bytes, ``crop.size`` pixels on a side;
- ``json``: ``{"crop_id", "sample_id", "face", "box": [x1, y1, x2, y2], "landmarks": [[x, y] * 5],
  "score"}`` with box and landmarks in the source image's pixels.

Shards are named ``crops-000000.tar`` …; ``webdataset.WebDataset`` streams them as they are from local
disk (tests/test_shards.py and tests/test_crop.py check it; the stages read local disk only, and streaming
from S3 is not tested). The stages write and read them with the standard library's ``tarfile``:
the format is plain tar, and importing webdataset would import torch, seconds of start-up in stages
that never touch a tensor.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from mcf.errors import StageError
from mcf.pools import cancelled_on_error, worker_init, workers_ignore_ctrl_c

if TYPE_CHECKING:
    import pandas as pd

T = TypeVar("T")
SHARD_PATTERN = "crops-%06d.tar"
READ_BACK = ["shard", "width", "height", "mean", "std"]
# The Arrow type of each crop-manifest column that can be null in every row (docs/CONTRACTS.md): no
# rejection leaves `reason` all null (always so in a subset), Haar gives no landmarks, nothing kept no
# read-back values. pandas would write such a column with Arrow's null type.
NULLABLE_TYPES = {
    "reason": "string", "detector": "string", "box": "list<double>", "landmarks": "list<double>",
    "score": "double", "face_size": "double", "blur": "double", "phash": "string", "shard": "string",
    "width": "int64", "height": "int64", "mean": "double", "std": "double",
}  # fmt: skip


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an ``[H, W, 3]`` uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes, name: str = "crop") -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB array from image bytes; a damaged image fails naming ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    # PIL's errors for bytes that do not decode; DecompressionBombError (no OSError) for a header that
    # declares more pixels than Pillow opens
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise StageError(f"{name}: not a decodable image ({type(err).__name__}: {err})") from None


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One read-only member with mtime 0 and no owner, so equal crops give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    samples: Iterable[tuple[str, bytes, dict[str, Any]]], out_dir: str | Path, shard_size: int
) -> list[str]:
    """Write ``(crop_id, jpeg_bytes, meta)`` triples into shards of ``shard_size``; return shard names.

    There is always at least one shard (an empty tar when there are no samples), so a reader finds the
    folder well-formed and the gate reports the empty set.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, count = [SHARD_PATTERN % 0], 0
    tar = tarfile.open(out_dir / names[0], "w")
    try:
        for crop_id, jpeg, meta in samples:
            if count == shard_size:
                tar.close()
                names.append(SHARD_PATTERN % len(names))
                tar, count = tarfile.open(out_dir / names[-1], "w"), 0
            _add(tar, f"{crop_id}.jpg", jpeg)
            _add(tar, f"{crop_id}.json", json.dumps(meta).encode())
            count += 1
    finally:
        tar.close()
    return names


def shard_urls(shard_dir: str | Path) -> list[str]:
    """The shard files in a folder, in order; none is a :class:`StageError` (one line from the CLI)."""
    urls = sorted(str(p) for p in Path(shard_dir).glob("crops-*.tar"))
    if not urls:
        raise StageError(f"no crops-*.tar shards in {shard_dir}; rerun the stage that wrote it")
    return urls


def _check_end(tar: tarfile.TarFile) -> None:
    """Raise ``ReadError`` unless the end-of-archive marker follows the last member.

    ``tarfile`` ends its iteration quietly at a cut after the first header, which would read a
    half-copied shard as a shorter one.
    """
    members = tar.getmembers()  # every header (already read when the caller iterated)
    tar.fileobj.seek(tar.offset)
    if tar.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"cut short: no end-of-archive marker after its {len(members)} members")


@contextmanager
def open_shard(url: str | Path) -> Iterator[tarfile.TarFile]:
    """A shard opened for reading; a cut-short or foreign file, read now or while iterating, fails
    naming the shard.

    Plain tar only (``r:``): a compressed file would inflate while read, and pre-training reads members
    at their byte offsets in the file.
    """
    try:
        with tarfile.open(url, "r:") as tar:
            yield tar
            _check_end(tar)
    except (tarfile.TarError, OSError) as err:
        raise StageError(f"{url}: not a readable crop shard ({type(err).__name__}: {err}); "
                         "rerun the stage that wrote it") from None


def file_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The regular file members of an open shard, in order; a sparse or repeated one is a ``ReadError``.

    ``tarfile`` fills a GNU or PAX sparse member's holes in memory, and gives its expanded size, which
    pre-training would read from the member's raw offset past its stored bytes. A name written twice
    (a crop appended again) would be one crop to the stages, which keep the last member of a sample's
    group, and two to pre-training's index; webdataset refuses it.
    """
    seen: set[str] = set()
    for info in tar:
        if not info.isfile():
            continue
        if info.sparse is not None:
            raise tarfile.ReadError(f"member {info.name!r} is a sparse file")
        if info.name in seen:
            raise tarfile.ReadError(f"member {info.name!r} occurs twice")
        seen.add(info.name)
        yield info


def member_key(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name, as webdataset splits it: the key is the name up to the
    first dot of its file name (``crop_id`` has no dots); no dot gives an empty extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def iter_groups(
    url: str | Path, read: Callable[[tarfile.TarFile, tarfile.TarInfo], T]
) -> Iterator[tuple[str, dict[str, T]]]:
    """``(key, {extension: read(tar, member)})`` per sample of one shard, grouping members as webdataset
    does; a sample without its jpg or json member fails naming the shard.

    Pre-training's index reads the same groups as the stages: counting jpg members alone, it trained
    quietly on the crops before a zero-filled tail (tarfile's end of archive), which leaves a sample
    without its json, where the stages refused the shard.
    """
    key, group = None, {}
    with open_shard(url) as tar:
        for info in file_members(tar):
            name, ext = member_key(info.name)
            if not ext:
                raise StageError(f"{url}: member {info.name!r} has no extension")
            if name != key and group:
                yield _whole(url, key, group)
                group = {}
            key, group[ext] = name, read(tar, info)
    if group:  # after open_shard's end-of-archive check: a shard cut short inside its last sample says so
        yield _whole(url, key, group)


def _whole(url: str | Path, key: str, group: dict[str, T]) -> tuple[str, dict[str, T]]:
    """``(key, group)`` of a sample that holds both members every sample has (docs/CONTRACTS.md)."""
    if not {"jpg", "json"} <= group.keys():
        raise StageError(f"{url}: sample {key!r} lacks a jpg or json member (has {sorted(group)})")
    return key, group


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    """A member's bytes, for the stages' reader (pre-training keeps its offset and size instead)."""
    return tar.extractfile(info).read()


def iter_samples(urls: str | list[str]) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Stream ``(crop_id, rgb, meta)`` from shards, in shard order."""
    for key, jpeg, meta in iter_encoded(urls):
        yield key, decode_jpeg(jpeg, f"crop {key}"), meta


def iter_encoded(urls: str | list[str]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Stream ``(crop_id, jpeg_bytes, meta)`` without decoding, to re-shard crops with no JPEG loss."""
    for url in [urls] if isinstance(urls, str) else urls:
        for key, group in iter_groups(url, _read):
            try:
                meta = json.loads(group["json"])
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError: tar checks headers only
                raise StageError(f"{url}: sample {key!r}: json member is not JSON ({err})") from None
            yield key, group["jpg"], meta


def _shard_stats(url: str) -> list[tuple[str, str, int, int, float, float]]:
    return [
        (key, Path(url).name, rgb.shape[1], rgb.shape[0], float(rgb.mean()), float(rgb.std()))
        for key, rgb, _ in iter_samples(url)
    ]


def read_back(shard_dir: str | Path, workers: int = 1) -> pd.DataFrame:
    """Per written crop: its shard, size and pixel statistics, decoded as pre-training will read it.

    Shards are decoded on ``workers`` processes, results in shard order: one core takes ~1 ms a crop,
    over 5 hours at the paper's 20M crops.
    """
    import pandas as pd  # here: the training path (pretrain_data) reads shards without pandas

    urls = shard_urls(shard_dir)
    with contextlib.ExitStack() as stack:
        mapped: Iterable[list] = map(_shard_stats, urls)
        if workers > 1 and len(urls) > 1:  # spawn: the stages' OpenCV thread pools must not be forked
            pool = ProcessPoolExecutor(min(workers, len(urls)), mp_context=get_context("spawn"),
                                       initializer=worker_init)
            with workers_ignore_ctrl_c():  # map starts the workers
                mapped = stack.enter_context(cancelled_on_error(pool, "read back")).map(_shard_stats, urls)
        per_shard = list(tqdm(mapped, total=len(urls), desc="read back", unit="shard"))
    stats = pd.DataFrame([r for rows in per_shard for r in rows], columns=["crop_id", *READ_BACK])
    return stats.astype({"width": "Int64", "height": "Int64"})


def write_manifest(manifest: pd.DataFrame, path: str | Path) -> None:
    """Write a crop or subset manifest with its documented column types, whatever values it holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"string": pa.string(), "double": pa.float64(), "int64": pa.int64(),
             "list<double>": pa.list_(pa.float64())}
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    for i, field in enumerate(table.schema):
        if field.type == pa.null() and field.name in NULLABLE_TYPES:
            table = table.set_column(i, field.name, table.column(i).cast(types[NULLABLE_TYPES[field.name]]))
    pq.write_table(table, path)
