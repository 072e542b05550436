"""Crop filters that look at pixels: sharpness (variance of the Laplacian) and near-duplicates (DCT pHash)."""

from __future__ import annotations

import argparse
import itertools
import re
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from mcf.errors import StageError
from mcf.io import read_table


def blur_score(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: low for blurry or flat crops."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def phash(rgb: np.ndarray) -> int:
    """64-bit perceptual hash: signs of the 8×8 lowest DCT frequencies of a 32×32 grey thumbnail
    against their median (the DC term left out of the median, as it only carries brightness)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    thumb = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(thumb)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def duplicates(hashes: Sequence[int], max_distance: int) -> list[bool]:
    """For each hash in order: is it within ``max_distance`` bits of an earlier hash that was kept?

    Vectorised multi-index hashing, as a paper-scale crop (20M hashes) needs: the 64 bits are dealt
    into ``max_distance + 1`` interleaved blocks, and two hashes that close agree exactly on at least one
    block (pigeonhole), so only hashes sharing a block value are compared (numpy, every pair once; the
    interleaving spreads the face-typical low DCT frequencies over all blocks). A repeat of an exact hash
    is always a duplicate; only the distinct hashes are paired. Then one pass in order keeps a hash
    unless one of its close earlier hashes was kept.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    values, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # distinct hashes in order of first appearance
    u = values[order]
    edges = _close_pairs(u, max_distance)
    dup_u = np.zeros(len(u), dtype=bool)
    if len(edges):
        edges = edges[np.lexsort((edges[:, 0], edges[:, 1]))]  # grouped by the later hash
        later, starts = np.unique(edges[:, 1], return_index=True)
        for k, earlier in zip(later.tolist(), np.split(edges[:, 0], starts[1:]), strict=True):
            dup_u[k] = not dup_u[earlier].all()
    rank = np.empty(len(u), dtype=np.int64)
    rank[order] = np.arange(len(u))
    repeat = np.ones(len(h), dtype=bool)
    repeat[first] = False
    return (dup_u[rank[inverse]] | repeat).tolist()


def _close_pairs(u: np.ndarray, max_distance: int) -> np.ndarray:
    """Distinct [earlier, later] index pairs of ``u`` within ``max_distance`` bits, as an (E, 2) array."""
    found = [np.zeros((0, 2), dtype=np.int64)]
    for j in range(max_distance + 1):
        mask = np.uint64(sum(1 << b for b in range(j, 64, max_distance + 1)))
        keys = u & mask
        idx = np.argsort(keys, kind="stable")
        keys = keys[idx]
        group_end = np.searchsorted(keys, keys, side="right")  # one past each position's group
        pos = np.arange(len(u))
        for offset in itertools.count(1):
            pos = pos[pos + offset < group_end[pos]]  # positions whose group reaches `offset` further on
            if not len(pos):
                break
            a, b = idx[pos], idx[pos + offset]
            close = np.bitwise_count(u[a] ^ u[b]) <= max_distance
            found.append(np.sort(np.stack([a[close], b[close]], axis=1), axis=1))
    return np.unique(np.concatenate(found), axis=0)


def manifest_hashes(path: str) -> np.ndarray:
    """The pHashes in a crop manifest, checked as the crop gate checks them: a damaged file, or one
    that is not a crop manifest, is a one-line :class:`StageError`, not a traceback."""
    hashes = read_table(path, ["phash"], "rerun `mcf crop`", only=True)["phash"].dropna()
    if not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes):
        raise StageError(f"{path}: a phash that is not 16 hex digits, as `mcf crop` writes them")
    if hashes.empty:
        raise StageError(f"{path}: no crop has a phash")
    return np.array([int(h, 16) for h in hashes], np.uint64)


def bench_duplicates(argv: list[str]) -> None:
    """Near-duplicate rejection (duplicates(), the crop stage's merge) on clustered hashes: each is a
    parent hash with every bit flipped at rate --spread, as crops of aligned faces share their low DCT
    frequencies. Parents: a crop manifest's pHashes (--manifest) or random ones."""
    p = argparse.ArgumentParser(
        # the docstring as it is, so plain text: cli.describe would make the crop stage depend on mcf.cli
        prog="mcf bench duplicates", description=bench_duplicates.__doc__,
        epilog="Exit status: 0 done; 1 a --manifest that is not a readable crop manifest with pHashes; 2 a "
        "usage error (a --manifest that does not exist); 130 interrupted.",
    )
    p.add_argument("--hashes", type=int, default=1_000_000, help="hashes (default: %(default)s)")
    p.add_argument("--spread", type=float, default=0.1, help="bit flip rate, 0..0.5 (default: %(default)s)")
    p.add_argument("--distance", type=int, default=2, help="crop.dup_hamming (default: %(default)s)")
    p.add_argument("--manifest", help="a crop manifest.parquet whose pHashes are the parents")
    args = p.parse_args(argv)
    if args.hashes < 1 or not 0 <= args.spread <= 0.5 or not 0 <= args.distance <= 31:
        p.error("--hashes must be at least 1, --spread in [0, 0.5], --distance in [0, 31]")
    rng = np.random.default_rng(0)
    if args.manifest:
        if not Path(args.manifest).is_file():
            folder = Path(args.manifest).is_dir()
            p.error(f"--manifest {args.manifest}: "
                    + ("a folder, not a parquet file: give the file itself" if folder else "no such file"))
        parents = manifest_hashes(args.manifest)
    else:
        parents = rng.integers(0, 2**64, 2000, dtype=np.uint64)
    chunks = []
    for start in range(0, args.hashes, 1_000_000):
        n = min(1_000_000, args.hashes - start)
        flips = (rng.random((n, 64)) < args.spread).astype(np.uint64) << np.arange(64, dtype=np.uint64)
        chunks.append(parents[rng.integers(0, len(parents), n)] ^ np.bitwise_or.reduce(flips, axis=1))
    hashes = np.concatenate(chunks).tolist()
    start_time = time.perf_counter()
    found = sum(duplicates(hashes, args.distance))
    seconds = time.perf_counter() - start_time
    print(f"duplicates bench: {args.hashes} hashes from {len(parents)} parents, spread {args.spread}, "
          f"distance {args.distance}: {found} duplicates in {seconds:.2f} s "
          f"= {args.hashes / seconds:,.0f} hashes/s")
