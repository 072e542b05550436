"""Webdataset tar shards of face crops: the format that crosses the crop → subset → pretrain boundary.

Schema of one sample (one member group in a tar, keyed by ``__key__`` = ``crop_id``):

- ``jpg``: the square RGB crop, JPEG bytes, ``crop.size`` pixels on a side;
- ``json``: ``{"crop_id", "sample_id", "face", "box": [x1, y1, x2, y2], "landmarks": [[x, y] * 5],
  "score"}`` with box and landmarks in the source image's pixels.

Shards are named ``crops-000000.tar`` …; they stream with ``webdataset.WebDataset`` from disk or S3.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

SHARD_PATTERN = "crops-%06d.tar"


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an ``[H, W, 3]`` uint8 RGB array."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB array from image bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_shards(
    samples: Iterable[tuple[str, bytes, dict[str, Any]]], out_dir: str | Path, shard_size: int
) -> list[str]:
    """Write ``(crop_id, jpeg_bytes, meta)`` triples into shards of ``shard_size``; return shard names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A fixed member mtime makes the shards byte-identical across reruns (same DVC hash for the same crops).
    with wds.ShardWriter(str(out_dir / SHARD_PATTERN), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for crop_id, jpeg, meta in samples:
            sink.write({"__key__": crop_id, "jpg": jpeg, "json": json.dumps(meta).encode()})
    return sorted(p.name for p in out_dir.glob("crops-*.tar"))


def shard_urls(shard_dir: str | Path) -> list[str]:
    """The shard files in a folder, in order."""
    urls = sorted(str(p) for p in Path(shard_dir).glob("crops-*.tar"))
    if not urls:
        raise FileNotFoundError(f"no crops-*.tar shards in {shard_dir}")
    return urls


def iter_samples(urls: str | list[str]) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Stream ``(crop_id, rgb, meta)`` from shards with webdataset, in shard order."""
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
    for sample in dataset:
        yield sample["__key__"], sample["jpg"], sample["json"]


def iter_encoded(urls: str | list[str]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Stream ``(crop_id, jpeg_bytes, meta)`` without decoding, to re-shard crops with no JPEG loss."""
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    for sample in dataset:
        yield sample["__key__"], sample["jpg"], json.loads(sample["json"])
