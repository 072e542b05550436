"""Crop filters that look at pixels: sharpness (variance of the Laplacian) and near-duplicates (DCT pHash)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


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


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


def duplicates(hashes: Sequence[int], max_distance: int) -> list[bool]:
    """For each hash in order: is it within ``max_distance`` bits of an earlier hash that was kept?

    Multi-index hashing, so it scales past a quadratic scan: the 64 bits are cut into
    ``max_distance + 1`` blocks, and two hashes that close must agree exactly on at least one block
    (pigeonhole), so only hashes sharing a block value are compared.
    """
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    blocks = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    index: list[dict[int, list[int]]] = [{} for _ in blocks]
    kept: list[int] = []
    flags = []
    for h in hashes:
        keys = [(h >> lo) & mask for lo, mask in blocks]
        near = {j for table, key in zip(index, keys, strict=True) for j in table.get(key, ())}
        dup = any(hamming(h, kept[j]) <= max_distance for j in near)
        flags.append(dup)
        if not dup:
            for table, key in zip(index, keys, strict=True):
                table.setdefault(key, []).append(len(kept))
            kept.append(h)
    return flags
