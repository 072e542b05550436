"""LaPa face parsing, read from the real on-disk format (PROTOCOL.md §4).

``<root>/LaPa/{train,val,test}/images/<stem>.jpg``, ``labels/<stem>.png`` (8-bit grayscale, values
0..10) and ``landmarks/<stem>.txt`` (a line "106", then 106 lines "x y").

Alignment: a similarity transform takes landmarks 104, 105, 54, 84, 90 (image-left eye centre,
image-right eye centre, nose tip, image-left and image-right mouth corners) onto :data:`TEMPLATE`
on the ``warp_size``² aligned square; the training augmentation is composed into that similarity;
then the tanh warp (:mod:`mcf.data.transforms`, factor ``warp_factor``) gives the
``warp_size``² warped square, resized to the model resolution S. Image and label go through the
same single resampling (the label with nearest neighbour).

One sample (:class:`LaPa` item):

- ``image``: float32 [3, S, S], ImageNet-normalised, warped space;
- ``label``: int64 [L, L], L = ``label_size`` (512 in the protocol, where the logits are upsampled
  to 512² for the loss), classes 0..10 in warped space (0 where the warp reaches outside the image);
- ``params``: dict of float64 tensors to invert the warp: ``matrix`` [2, 3] (original pixels →
  aligned square, augmentation included), ``warp_factor`` [], ``warp_size`` [];
- ``name``: str (``<split>/<stem>``); ``orig_size``: int64 [2] = (H, W) of the original image.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mcf.data import transforms as T
from mcf.data.aflw19 import image_size, landmark_extent, read_rgb
from mcf.errors import StageError
from mcf.io import PNG_SIGNATURE
from mcf.params import ParamsError, param

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
N_LANDMARKS = 106
ALIGN_POINTS = (104, 105, 54, 84, 90)
# FaRL-like 5-point template on 512² (x, y): eyes, nose tip, mouth corners. It centres the face with
# the eyes a little above the middle, leaving room for hair and chin inside the aligned square.
TEMPLATE = np.array([[196.0, 226.0], [316.0, 226.0], [256.0, 286.0], [220.0, 360.4], [292.0, 360.4]])
PNG_GREY, PNG_PALETTE = 0, 3  # IHDR colour types
UNCLIPPED_REACH = 8.0  # an unclipped scale's std must be under 1/8 of the way to a zero scale


@dataclasses.dataclass(frozen=True)
class ParsingAugment:
    """Training augmentation, composed into the similarity before the warp; 0 turns one off."""

    rotation_std: float = param(0.314, ge=0.0)  # radians, normal
    scale_std: float = param(0.1, ge=0.0)  # normal around 1
    # the scale is clipped to 1 ± this many scale_std; 0: unclipped, as FaRL's (params.paper.yaml)
    scale_clip: float = param(3.0, ge=0.0)
    shift: float = param(0.01, ge=0.0, lt=1.0)  # uniform ± share of the aligned square, per axis
    photometric: T.Photometric = dataclasses.field(default_factory=T.Photometric)

    def __post_init__(self) -> None:
        # A scale of 0 makes the matrix singular (LinAlgError mid-training) and a negative one turns the
        # face upside down: the clip must stop short of 0, and an unclipped draw must practically never
        # reach it (beyond 8 std: 6e-16 of draws; FaRL's 0.1 is 10 std away).
        reach = self.scale_clip or UNCLIPPED_REACH
        if self.scale_std * reach >= 1.0:
            raise ParamsError("scale_std", f"must be < 1 / {reach:g} (1 / scale_clip, or "
                              f"1 / {UNCLIPPED_REACH:g} unclipped) so that no scale reaches 0, "
                              f"got {self.scale_std}")


@dataclasses.dataclass(frozen=True)
class LaPaConfig:
    """Where the data is and how it is aligned (a nested section of the fine-tuning params)."""

    root: str = "outputs/fetch/lapa"  # the folder that holds ``LaPa/``
    size: int = param(448, ge=8)  # model input resolution S
    label_size: int = param(512, ge=8)  # resolution L of the training label (logits upsampled to it)
    warp_size: int = param(512, ge=8)  # the aligned and warped squares
    warp_factor: float = param(0.8, gt=0.0, lt=1.0)
    augment: ParsingAugment = dataclasses.field(default_factory=ParsingAugment)


def read_landmarks(path: Path) -> np.ndarray:
    """``[106, 2]`` finite float64 from a LaPa landmark file; a missing or malformed file fails naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path}")
    try:  # UnicodeDecodeError (a binary file) is a ValueError too
        lines = path.read_text().split("\n")
        n = int(lines[0].strip())
        # every point line, blank lines aside: a line past the header's count is a damaged file, not extra
        rows = [(i, ln.split()) for i, ln in enumerate(lines[1:], 2) if ln.strip()]
        if len(rows) != n:
            raise ValueError(f"{len(rows)} point lines for header {n}")
        for i, values in rows:
            if len(values) != 2:
                raise ValueError(f"line {i}: expected 'x y', got {len(values)} values")
        pts = np.array([[float(v) for v in values] for _, values in rows], dtype=np.float64).reshape(n, 2)
    except ValueError as err:
        raise StageError(f"{path}: malformed landmark file: {err}") from err
    if n != N_LANDMARKS:
        raise StageError(f"{path}: expected {N_LANDMARKS} points 'x y', got header {n}")
    bad = np.flatnonzero(~np.isfinite(pts).all(axis=1))
    if bad.size:  # float() reads "nan" and "inf": the alignment's SVD would fail on them mid-training
        raise StageError(f"{path}: landmark coordinates must be finite, not at point(s) {bad[:5].tolist()}")
    return pts


def _png_format(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None for a file that is not a PNG."""
    with path.open("rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _misread_format(path: Path) -> str | None:
    """The format of a label PNG that OpenCV would not read as stored class ids, or None."""
    fmt = _png_format(path)
    if fmt is None or not (fmt[1] == PNG_PALETTE or (fmt[1] == PNG_GREY and fmt[0] < 8)):
        return None
    kind = "palette (indexed-colour)" if fmt[1] == PNG_PALETTE else "grayscale"
    return f"a {fmt[0]}-bit {kind} PNG"


def read_label(path: Path) -> np.ndarray:
    """``[H, W]`` class map as stored (LaPa's are 8-bit grayscale); missing, undecodable or
    multi-channel files fail naming the file.

    A grayscale PNG under 8 bits or a palette PNG fails too: OpenCV scales 1-, 2- and 4-bit grey up to
    0..255 (class 10 would read as 170) and expands a palette into colours, not class ids.
    """
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    if problem := _misread_format(path):
        raise StageError(f"{path}: {problem}; a LaPa label is an 8-bit (or 16-bit) grayscale PNG whose "
                         "values are the class ids 0..10: re-save it so")
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise StageError(f"cannot decode label: {path}")
    if label.ndim != 2:
        raise StageError(f"{path}: label must have one channel, got shape {label.shape}")
    return label


def align_matrix(points5: np.ndarray, warp_size: int) -> np.ndarray:
    """Similarity ``[2, 3]``: original pixels → the aligned ``warp_size``² square, from the five points
    of :data:`TEMPLATE` (``landmarks[ALIGN_POINTS]`` in LaPa; a detector's or the alignment model's)."""
    return T.similarity(points5, TEMPLATE * (warp_size / 512.0))


def sample_augment(cfg: ParsingAugment, warp_size: int, rng: np.random.Generator) -> np.ndarray:
    """One random rotation/scale about the square's centre plus a shift: aligned → aligned."""
    c = warp_size / 2.0
    scale = float(rng.normal(1.0, cfg.scale_std))
    if cfg.scale_clip:
        scale = float(np.clip(scale, 1 - cfg.scale_clip * cfg.scale_std, 1 + cfg.scale_clip * cfg.scale_std))
    shift = rng.uniform(-cfg.shift, cfg.shift, size=2) * warp_size
    return T.around((c, c), rng.normal(0.0, cfg.rotation_std), scale, (shift[0], shift[1]))


def stems(root: str | Path, split: Split) -> list[str]:
    """Sorted image stems of ``split``; a missing split folder fails naming it."""
    folder = Path(root) / "LaPa" / split / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"LaPa image folder not found: {folder}")
    return sorted(p.stem for p in folder.glob("*.jpg"))


class LaPa(Dataset):
    """LaPa in warped space for one split; ``augment=True`` for training (random per call)."""

    def __init__(self, cfg: LaPaConfig, split: Split, *, augment: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown LaPa split {split!r} (valid: {', '.join(SPLITS)})")
        self.cfg, self.split, self.augment = cfg, split, augment
        self.dir = Path(cfg.root) / "LaPa" / split
        self.stems = stems(cfg.root, split)
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.stems)

    def rng(self) -> np.random.Generator:
        """A generator per process seeded from torch's seed (see :meth:`mcf.data.aflw19.AFLW19.rng`)."""
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng, self._rng_pid = np.random.default_rng(torch.initial_seed()), os.getpid()
        return self._rng

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image (RGB), label and landmarks of item ``i``, checked to belong together."""
        stem = self.stems[i]
        rgb = read_rgb(self.dir / "images" / f"{stem}.jpg")
        label_path = self.dir / "labels" / f"{stem}.png"
        label = read_label(label_path)
        if label.shape != rgb.shape[:2]:
            raise StageError(f"{label_path}: label size {label.shape} != image size {rgb.shape[:2]}")
        return rgb, label, read_landmarks(self.dir / "landmarks" / f"{stem}.txt")

    def __getitem__(self, i: int) -> dict[str, Any]:
        cfg = self.cfg
        rgb, label, landmarks = self.read(i)
        try:
            matrix = align_matrix(landmarks[list(ALIGN_POINTS)], cfg.warp_size)
        except ValueError as err:
            raise StageError(f"{self.dir / 'landmarks' / self.stems[i]}.txt: {err}") from err
        rng = self.rng() if self.augment else None
        if rng is not None:
            matrix = T.compose(sample_augment(cfg.augment, cfg.warp_size, rng), matrix)
        maps = T.tanh_warp_maps(matrix, cfg.warp_factor, cfg.warp_size, cfg.warp_size)
        warped = T.remap(rgb, maps)
        if rng is not None:
            warped = T.photometric(warped, cfg.augment.photometric, rng)
        warped = T.resize_square(warped, cfg.size)
        if cfg.label_size != cfg.warp_size:
            maps = T.tanh_warp_maps(matrix, cfg.warp_factor, cfg.warp_size, cfg.label_size)
        lab = T.remap(label, maps, nearest=True)
        return {
            "image": T.to_tensor(warped),
            "label": torch.from_numpy(lab.astype(np.int64)),
            "params": {
                "matrix": torch.from_numpy(matrix),
                "warp_factor": torch.tensor(cfg.warp_factor, dtype=torch.float64),
                "warp_size": torch.tensor(float(cfg.warp_size), dtype=torch.float64),
            },
            "name": f"{self.split}/{self.stems[i]}",
            "orig_size": torch.tensor(rgb.shape[:2], dtype=torch.int64),
        }


def _unpack(params: dict[str, Any]) -> tuple[np.ndarray, float, int]:
    m = torch.as_tensor(params["matrix"]).detach().cpu().double().numpy()
    if m.shape != (2, 3):
        raise ValueError(f"params['matrix'] must be one sample's [2, 3] (index the batch), got {m.shape}")
    return m, float(params["warp_factor"]), int(round(float(params["warp_size"])))


def warp_to_original(
    logits: torch.Tensor, params: dict[str, Any], orig_size: tuple[int, int] | torch.Tensor
) -> torch.Tensor:
    """Warped maps ``[C, S, S]`` (any S) of ONE sample → ``[C, H, W]`` on the original image grid.

    Take the argmax of the result for the protocol's test metric. ``params`` is the sample's
    ``params`` dict (index a batched one with :func:`sample_params`).
    """
    m, wf, ws = _unpack(params)
    h, w = (int(v) for v in orig_size)
    return T.tanh_warp_unwarp(logits, m, wf, ws, (h, w))


def sample_params(params: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Sample ``i``'s ``params`` out of a collated batch."""
    return {k: v[i] for k, v in params.items()}


# table()'s columns, named also when a split is empty: the gate then fails on the row count alone
TABLE_COLUMNS = ("stem", "split", "has_image", "has_label", "has_landmarks", "image_decodes", "width",
                 "height", "label_width", "label_height", "size_match", "label_format_ok", "label_min",
                 "label_max", "n_landmarks", "x_min", "x_max", "y_min", "y_max")


def table(cfg: LaPaConfig, split: Split) -> pd.DataFrame:
    """One row per stem found in any of the three folders of ``split``, for the ``lapa`` data gate.

    Columns: stem, split, has_image, has_label, has_landmarks, image_decodes (the whole file, see
    :func:`mcf.data.aflw19.image_size`), width, height, label_width, label_height, size_match,
    label_format_ok (False for a label :func:`read_label` refuses by its PNG format: class 10 of a 4-bit
    PNG reads as 170, so label_max alone would not say why; a missing label is has_label's), label_min,
    label_max (-1 when unreadable), n_landmarks (-1 when unreadable), x_min, x_max, y_min, y_max
    (:func:`mcf.data.aflw19.landmark_extent`; NaN when the landmarks or the image are unreadable, which
    n_landmarks and image_decodes report).
    """
    base = Path(cfg.root) / "LaPa" / split
    if not base.is_dir():
        raise StageError(f"no LaPa {split} split at {base} (is data.root a LaPa tree?)")
    found = {sub: {p.stem for p in (base / sub).glob(f"*.{ext}")}
             for sub, ext in (("images", "jpg"), ("labels", "png"), ("landmarks", "txt"))}
    rows = []
    for stem in tqdm(sorted(set().union(*found.values())), desc=f"lapa {split} table"):
        w, h, decodes = image_size(base / "images" / f"{stem}.jpg")
        label_path = base / "labels" / f"{stem}.png"
        label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
        lh, lw = label.shape[:2] if label is not None else (0, 0)
        try:
            points = read_landmarks(base / "landmarks" / f"{stem}.txt")
        except (FileNotFoundError, StageError):
            points = None
        unknown = dict.fromkeys(("x_min", "x_max", "y_min", "y_max"), float("nan"))
        extent = landmark_extent(points, w, h) if points is not None and w > 0 else unknown
        ok = label is not None and label.ndim == 2
        rows.append({
            "stem": stem, "split": split, "has_image": stem in found["images"],
            "has_label": stem in found["labels"], "has_landmarks": stem in found["landmarks"],
            "image_decodes": decodes, "width": w, "height": h, "label_width": lw, "label_height": lh,
            "size_match": w > 0 and (w, h) == (lw, lh),
            "label_format_ok": not label_path.is_file() or _misread_format(label_path) is None,
            "label_min": int(label.min()) if ok else -1, "label_max": int(label.max()) if ok else -1,
            "n_landmarks": -1 if points is None else len(points), **extent,
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
