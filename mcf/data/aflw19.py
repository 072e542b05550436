"""AFLW-19 face alignment, read from the real on-disk format (PROTOCOL.md §3).

``<root>/AFLWinfo_release.mat`` holds ``bbox`` [N, 4] (left, right, top, bottom), ``data`` [N, 38]
(19 x then 19 y), ``mask_new`` [N, 19], ``nameList`` (cell of relative paths) and ``ra`` (a 1-based
permutation); images live at ``<root>/data/flickr/<name>``.

Splits: ``train`` = ``ra[:n_train - n_val]``, ``val`` = ``ra[n_train - n_val:n_train]`` (empty unless
``n_val`` > 0: an honest split for picking an epoch), ``full`` = ``ra[n_train:]`` (the test set) and
``frontal`` = the ``full`` rows whose 19 ``mask_new`` flags are all 1.

One sample (:class:`AFLW19` item), S = ``size``:

- ``image``: float32 [3, S, S], ImageNet-normalised RGB crop;
- ``landmarks``: float32 [19, 2], (x, y) in normalised crop coordinates (0..1 inside the crop);
- ``matrix``: float64 [2, 3], original-image pixels → crop pixels at S (augmentation included);
- ``name``: str (the ``nameList`` entry); ``box``: float32 [4] (left, right, top, bottom), original;
- ``gt``: float32 [19, 2] original-image landmarks; ``visible``: bool [19] (``mask_new``).

The box maps exactly onto a ``crop_size``² crop (x and y scaled apart), the training augmentation
is composed into the same affine matrix (one resampling), and the crop is resized to S.
Coordinates follow :mod:`mcf.data.transforms` (pixel j spans [j, j+1)).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import scipy.io
import torch
from PIL import Image
from scipy.io.matlab import MatReadError
from torch.utils.data import Dataset
from tqdm import tqdm

from mcf.data import transforms as T
from mcf.errors import StageError
from mcf.evaluate.metrics import OUTER_EYE_CORNERS
from mcf.params import ParamsError, param
from mcf.synth.writers import AFLW_MAT, IDENTITIES_CSV, is_synthface

Split = Literal["train", "val", "full", "frontal"]
SPLITS: tuple[str, ...] = ("train", "val", "full", "frontal")
N_POINTS = 19
MAT_NAME = AFLW_MAT
MAT_HEADER_BYTES = 128  # a v5 MAT-file's text, subsystem offset, version and endianness


@dataclasses.dataclass(frozen=True)
class AlignmentAugment:
    """Training augmentation; a magnitude or probability of 0 turns one off. No flip (the protocol)."""

    shift: float = param(0.05, ge=0.0, lt=1.0)  # uniform ± share of the crop, per axis
    rotation: float = param(10.0, ge=0.0, le=180.0)  # uniform ± degrees
    scale_min: float = param(0.9, gt=0.0)
    scale_max: float = param(1.1, gt=0.0)
    occlusion_p: float = param(0.3, ge=0.0, le=1.0)  # a random black rectangle
    # inside: within the crop, each side drawn apart; clipped: FaRL's, centred anywhere, cut at the edges
    occlusion: Literal["inside", "clipped"] = "inside"
    occlusion_max: float = param(0.4, gt=0.05, le=1.0)  # largest side (clipped: height), share of crop
    noise_p: float = param(0.2, ge=0.0, le=1.0)
    # gaussian: added after the photometric ones; blend: FaRL's mix with uniform noise, before them
    noise: Literal["gaussian", "blend"] = "gaussian"
    noise_std: float = param(8.0, ge=0.0)  # gaussian: intensity levels (0..255)
    noise_alpha: float = param(0.5, ge=0.0, le=1.0)  # blend: the noise's weight is drawn from [0, this)
    photometric: T.Photometric = dataclasses.field(default_factory=T.Photometric)

    def __post_init__(self) -> None:
        if self.scale_max < self.scale_min:
            raise ParamsError("scale_max", f"must be >= scale_min ({self.scale_min}), got {self.scale_max}")


@dataclasses.dataclass(frozen=True)
class AFLW19Config:
    """Where the data is and how it is cropped (a nested section of the fine-tuning params)."""

    root: str = "outputs/fetch/aflw19"
    n_train: int = param(20000, ge=1)  # the first n_train of ``ra`` train (and val), the rest test
    n_val: int = param(0, ge=0)  # the last n_val of those: a validation split carved from train
    size: int = param(448, ge=8)  # model input resolution S
    crop_size: int = param(512, ge=8)  # the box maps onto this square first (the protocol's 512)
    augment: AlignmentAugment = dataclasses.field(default_factory=AlignmentAugment)

    def __post_init__(self) -> None:
        if self.n_val >= self.n_train:
            raise ParamsError("n_val", f"must be < n_train ({self.n_train}), got {self.n_val}")


def _cell_str(x: Any) -> str:
    """One ``nameList`` entry as ``scipy.io.loadmat`` returns it (nested object/char arrays)."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            if x.dtype.kind == "U":
                return "".join(x.ravel().tolist())
            raise ValueError(f"got {x!r}")
        x = x.ravel()[0]
    return str(x)


def _inside(name: str) -> bool:
    """Whether a ``nameList`` entry names a file below the folder it is joined to: an absolute name
    replaces that folder, and ``..`` climbs out of it, so a downloaded .mat could have any image this user
    may read taken into the data set."""
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


@dataclasses.dataclass(frozen=True)
class Annotations:
    """The arrays of ``AFLWinfo_release.mat``, in 0-based, per-sample form."""

    names: list[str]
    boxes: np.ndarray  # [N, 4] left, right, top, bottom
    points: np.ndarray  # [N, 19, 2]
    visible: np.ndarray  # [N, 19] bool
    order: np.ndarray  # [N] 0-based permutation (``ra`` - 1)


def read_mat(root: str | Path) -> Annotations:
    """Read and check ``<root>/AFLWinfo_release.mat``; a missing or malformed file fails naming it."""
    path = Path(root) / MAT_NAME
    if not path.is_file():
        raise StageError(f"AFLW-19 annotation file not found: {path} (is data.root an AFLW-19 tree?)")
    size = path.stat().st_size
    if size < MAT_HEADER_BYTES:  # scipy fails on these with an IndexError or TypeError, not a read error
        raise StageError(f"{path}: {size} bytes, shorter than a MATLAB file's {MAT_HEADER_BYTES}-byte header "
                         "(cut short, or not a MATLAB file)")
    try:
        mat = scipy.io.loadmat(str(path))
    except (ValueError, OSError, NotImplementedError, MatReadError) as err:
        raise StageError(f"{path}: cannot read as a MATLAB file: {err}") from err
    missing = [k for k in ("bbox", "data", "mask_new", "nameList", "ra") if k not in mat]
    if missing:
        raise StageError(f"{path}: missing field(s) {missing}")
    boxes = np.asarray(mat["bbox"], dtype=np.float64)
    data = np.asarray(mat["data"], dtype=np.float64)
    n = len(boxes)
    names = []
    for row, x in enumerate(np.asarray(mat["nameList"], dtype=object).ravel()):
        try:
            names.append(_cell_str(x))
        except ValueError as err:
            raise StageError(f"{path}: nameList row {row} is not a string ({err})") from None
        if not _inside(names[-1]):
            raise StageError(f"{path}: nameList row {row} is {names[-1]!r}, not a file name inside "
                             "data/flickr (as 3/image00002.jpg)")
    order = np.asarray(mat["ra"]).ravel().astype(np.int64) - 1
    mask = np.asarray(mat["mask_new"])
    shapes = {"bbox": (boxes.shape, (n, 4)), "data": (data.shape, (n, 2 * N_POINTS)),
              "mask_new": (mask.shape, (n, N_POINTS)), "nameList": ((len(names),), (n,))}
    for key, (got, want) in shapes.items():
        if got != want:
            raise StageError(f"{path}: field {key} has shape {got}, expected {want}")
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise StageError(f"{path}: ra is not a 1-based permutation of 1..{n}")
    rows, cols = np.nonzero(~np.isin(mask, (0, 1)))
    if rows.size:  # astype(bool) would read a NaN, -1 or 2 as visible, and the row as frontal
        raise StageError(f"{path}: mask_new must hold 0 or 1, got {float(mask[rows[0], cols[0]])} at row "
                         f"{rows[0]}, point {cols[0]} ({np.unique(rows).size} row(s) in all)")
    points = np.stack([data[:, :N_POINTS], data[:, N_POINTS:]], axis=-1)
    return Annotations(names, boxes, points, mask.astype(bool), order)


def identities_table(root: str | Path, columns: list[str]) -> pd.DataFrame:
    """``columns`` of a SynthFace tree's identities table: one that fetch's gate passed but is now cut
    short, not UTF-8 or without a column is a one-line :class:`StageError`, not pandas' traceback."""
    path = Path(root) / IDENTITIES_CSV
    try:
        return pd.read_csv(path, usecols=columns)
    except ValueError as err:  # EmptyDataError, ParserError, UnicodeDecodeError, a column missing
        cause = str(err).splitlines()[0] if str(err) else ""
        raise StageError(f"{path}: not a readable identities table ({type(err).__name__}: {cause}); "
                         "rerun `mcf fetch`") from None


def check_written_split(root: str | Path, n_train: int) -> None:
    """A SynthFace tree records each image's split: an ``n_train`` other than the one it was written
    with would test on training images (``fetch.synthetic.aflw.n_train`` and ``data.n_train`` differ)."""
    path = Path(root) / IDENTITIES_CSV
    if not is_synthface(root):
        return  # the real AFLW-19: its split is ra's order alone
    if not path.is_file():
        raise StageError(f"{root} is a SynthFace tree without its {IDENTITIES_CSV}: its split cannot be "
                         "checked (run `mcf fetch` again)")
    written = int((identities_table(root, ["split"])["split"] == "train").sum())
    if written != n_train:
        raise StageError(
            f"n_train = {n_train}, but {root} was written with {written} training images "
            "(fetch.synthetic.aflw.n_train): set both to the same number"
        )


def split_indices(ann: Annotations, split: Split, n_train: int, n_val: int = 0) -> np.ndarray:
    """0-based row indices of ``split`` (see the module docstring)."""
    n = len(ann.names)
    if n_train > n:
        raise ParamsError("data.n_train", f"{n_train} exceeds the {n} samples in {MAT_NAME}")
    if split == "train":
        return ann.order[: n_train - n_val]
    if split == "val":
        return ann.order[n_train - n_val : n_train]
    if split == "full":
        return ann.order[n_train:]
    if split == "frontal":
        test = ann.order[n_train:]
        return test[ann.visible[test].all(axis=1)]
    raise ValueError(f"unknown AFLW-19 split {split!r} (valid: {', '.join(SPLITS)})")


def read_rgb(path: Path, *, exif_orientation: bool = False) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB; a missing or undecodable file fails naming it.

    The pixels as stored: AFLW-19's and LaPa's annotations (and LaPa's label PNGs, and the data gates'
    header sizes) are on the stored pixel grid, so a JPEG's EXIF orientation tag is ignored unless
    ``exif_orientation`` (a photo of one's own, shown as a viewer shows it).
    """
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    flags = cv2.IMREAD_COLOR | (0 if exif_orientation else cv2.IMREAD_IGNORE_ORIENTATION)
    try:
        bgr = cv2.imread(str(path), flags)
    except cv2.error as err:  # a header past OpenCV's size bounds (a damaged size field) raises, not None
        raise StageError(f"cannot decode image: {path} (OpenCV: {err.err})") from None
    if bgr is None:
        raise StageError(f"cannot decode image: {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def image_size(path: Path) -> tuple[int, int, bool]:
    """(width, height) from the header, (0, 0) when missing or unreadable, and whether the whole file
    decodes: OpenCV (:func:`read_rgb`) decodes a JPEG cut short in part, grey below the cut with only a
    libjpeg warning on stderr, so a half-copied image keeps its header size and reads as a whole one.
    A header declaring more pixels than Pillow opens (a damaged size field) is unreadable.

    JPEGs are decoded at 1/8 scale (Pillow's draft): every coefficient is still read, at half the cost.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                im.draft("RGB", (max(w // 8, 1), max(h // 8, 1)))  # a 0 here divides by zero
                im.load()
            except (OSError, SyntaxError, ValueError):  # Pillow's errors for bytes that do not decode
                return w, h, False
            return w, h, True
    except (OSError, Image.DecompressionBombError):  # the latter is no OSError
        return 0, 0, False


def sample_augment(cfg: AlignmentAugment, crop_size: int, rng: np.random.Generator) -> np.ndarray:
    """One random shift/rotation/scale about the crop centre, as a ``[2, 3]`` crop → crop matrix."""
    c = crop_size / 2.0
    angle = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation))
    scale = rng.uniform(cfg.scale_min, cfg.scale_max)
    shift = rng.uniform(-cfg.shift, cfg.shift, size=2) * crop_size
    return T.around((c, c), angle, scale, (shift[0], shift[1]))


class AFLW19(Dataset):
    """AFLW-19 crops for one split; ``augment=True`` for training (random per call)."""

    def __init__(self, cfg: AFLW19Config, split: Split, *, augment: bool = False) -> None:
        self.cfg, self.split, self.augment = cfg, split, augment
        self.root = Path(cfg.root)
        self.ann = read_mat(self.root)
        check_written_split(self.root, cfg.n_train)
        self.indices = split_indices(self.ann, split, cfg.n_train, cfg.n_val)
        self._rng: np.random.Generator | None = None
        self._rng_pid = -1

    def __len__(self) -> int:
        return len(self.indices)

    def rng(self) -> np.random.Generator:
        """A generator per process, seeded from torch's seed (different in each DataLoader worker and,
        with non-persistent workers, each epoch; reproducible after ``torch.manual_seed``)."""
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng, self._rng_pid = np.random.default_rng(torch.initial_seed()), os.getpid()
        return self._rng

    def image_path(self, i: int) -> Path:
        """The image file of dataset item ``i``."""
        return self.root / "data" / "flickr" / self.ann.names[self.indices[i]]

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        cfg, s = self.cfg, self.cfg.size
        box, gt = self.ann.boxes[row], self.ann.points[row]
        try:
            m = T.box_matrix(box, cfg.crop_size)
        except ValueError as err:
            raise StageError(f"{self.ann.names[row]}: {err}") from err
        rgb = read_rgb(self.image_path(i))
        rng = self.rng() if self.augment else None
        if rng is not None:
            m = T.compose(sample_augment(cfg.augment, cfg.crop_size, rng), m)
        crop = T.warp_affine(rgb, m, cfg.crop_size)
        if rng is not None:
            crop = self._photometric(crop, rng)
        matrix = crop_matrix(m, cfg)
        return {
            "image": T.to_tensor(T.resize_square(crop, s)),
            "landmarks": torch.from_numpy((T.apply(matrix, gt) / s).astype(np.float32)),
            "matrix": torch.from_numpy(matrix),
            "name": self.ann.names[row],
            "box": torch.from_numpy(box.astype(np.float32)),
            "gt": torch.from_numpy(gt.astype(np.float32)),
            "visible": torch.from_numpy(self.ann.visible[row].copy()),
        }

    def _photometric(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Occlusion, noise and the colour augmentations, in FaRL's order for its kinds of occlusion and
        noise (occlusion, noise, gray, gamma, blur)."""
        aug = self.cfg.augment
        if rng.random() < aug.occlusion_p:
            occlude = T.occlude_clipped if aug.occlusion == "clipped" else T.occlude
            crop = occlude(crop, rng, aug.occlusion_max)
        if aug.noise == "blend" and rng.random() < aug.noise_p:
            crop = T.blend_noise(crop, rng, aug.noise_alpha)
        crop = T.photometric(crop, aug.photometric, rng)
        if aug.noise == "gaussian" and rng.random() < aug.noise_p and aug.noise_std > 0:
            crop = T.add_noise(crop, rng, aug.noise_std)
        return crop


def crop_matrix(m: np.ndarray, cfg: AFLW19Config) -> np.ndarray:
    """Original pixels → crop pixels at the model's S, from ``m`` (original → ``crop_size``² crop)."""
    return T.compose(np.diag([cfg.size / cfg.crop_size, cfg.size / cfg.crop_size, 1.0])[:2], m)


def to_original(
    points: np.ndarray | torch.Tensor, matrix: np.ndarray | torch.Tensor, size: int
) -> np.ndarray:
    """Normalised crop points ``[B, K, 2]`` → original-image pixels, through the inverse of each
    ``matrix`` ``[B, 2, 3]`` (the ``matrix`` key of the samples); exact (float64)."""
    p = torch.as_tensor(points).detach().cpu().double().numpy() * size
    m = torch.as_tensor(matrix).detach().cpu().double().numpy()
    inv = np.linalg.inv(np.concatenate([m, np.broadcast_to([[[0.0, 0.0, 1.0]]], (len(m), 1, 3))], axis=1))
    return T.apply(inv[:, :2], p)


def landmark_extent(points: np.ndarray, width: int, height: int) -> dict[str, float]:
    """The gates' ``x_min``, ``x_max``, ``y_min``, ``y_max``: landmark extremes ÷ image width or height,
    0..1 inside the image. Landmarks of another size of the image (a tree resized without its
    annotations) or scaled for viewing fall outside."""
    x, y = points[:, 0], points[:, 1]
    return {"x_min": x.min() / max(width, 1), "x_max": x.max() / max(width, 1),
            "y_min": y.min() / max(height, 1), "y_max": y.max() / max(height, 1)}


# table()'s columns, named also when a split is empty: the gate then fails on the row count alone
TABLE_COLUMNS = ("name", "split", "exists", "decodes", "width", "height", "box_left", "box_right", "box_top",
                 "box_bottom", "box_w", "box_h", "centre_in_box", "x_min", "x_max", "y_min", "y_max",
                 "visible", "finite", "eye_gap")


def table(cfg: AFLW19Config, split: Split) -> pd.DataFrame:
    """One row per sample of ``split`` for the ``aflw19`` data gate (every image decoded once).

    Columns: name, split, exists, decodes (the whole file, see :func:`image_size`), width, height,
    box_left/right/top/bottom, box_w, box_h, centre_in_box (the landmarks' mean lies in the box: a
    ``bbox`` stored left, top, right, bottom, or its rows shifted against the landmarks', puts it out),
    x_min, x_max, y_min, y_max (landmarks ÷ image width/height: inside the image is 0..1), visible,
    finite (every landmark and box coordinate is: an inf passes the null and range checks),
    eye_gap (pixels between the outer eye corners: the inter-ocular NME divides by it).
    """
    ann = read_mat(cfg.root)
    check_written_split(cfg.root, cfg.n_train)
    rows = []
    for row in tqdm(split_indices(ann, split, cfg.n_train, cfg.n_val), desc=f"aflw19 {split} table"):
        w, h, decodes = image_size(Path(cfg.root) / "data" / "flickr" / ann.names[row])
        pts, box = ann.points[row], ann.boxes[row]
        centre = pts.mean(axis=0)
        rows.append({
            "name": ann.names[row], "split": split, "exists": w > 0, "decodes": decodes,
            "width": w, "height": h,
            "box_left": box[0], "box_right": box[1], "box_top": box[2], "box_bottom": box[3],
            "box_w": box[1] - box[0], "box_h": box[3] - box[2],
            "centre_in_box": bool(box[0] <= centre[0] <= box[1] and box[2] <= centre[1] <= box[3]),
            **landmark_extent(pts, w, h),
            "visible": int(ann.visible[row].sum()),
            "finite": bool(np.isfinite(pts).all() and np.isfinite(box).all()),
            "eye_gap": float(np.linalg.norm(pts[OUTER_EYE_CORNERS[0]] - pts[OUTER_EYE_CORNERS[1]])),
        })
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
