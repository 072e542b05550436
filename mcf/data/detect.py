"""Face detections for the crop stage: the source's table, or an OpenCV detector run on the image.

A detection is a :class:`Face`: ``box`` (x1, y1, x2, y2) and optional ``landmarks`` (10 floats: x, y of the
image-left eye, image-right eye, nose tip, image-left and image-right mouth corners), in source pixels,
plus a ``score`` in 0..1 (``None`` when the detector has no calibrated confidence, as for Haar).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import pandas as pd

from mcf.errors import StageError
from mcf.io import read_table
from mcf.params import ParamsError, param, require_path

DETECTION_COLUMNS = ("sample_id", "face", "box", "landmarks", "score")
HAAR_CASCADE = "haarcascade_frontalface_default.xml"


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """The OpenCV detector for images without detections (``crop.detector`` in params.yaml).

    Haar (bundled with OpenCV) unless ``yunet_model`` names a YuNet ONNX file, which also gives landmarks
    and scores.
    """

    yunet_model: str | None = None
    yunet_score: float = param(0.6, ge=0.0, le=1.0)  # YuNet's own confidence cut, before crop.min_score
    haar_scale_factor: float = param(1.1, gt=1.0)
    haar_min_neighbors: int = param(5, ge=1)
    min_size: int = param(24, ge=8)  # smallest face the detector looks for, in (downscaled) pixels
    max_side: int = param(640, ge=64)  # images are downscaled to this longer side before detecting

    def __post_init__(self) -> None:
        if self.yunet_model is not None:
            require_path(self.yunet_model, "yunet_model")
            if not self.yunet_model.endswith(".onnx"):
                raise ParamsError("yunet_model", f"expected a YuNet .onnx file, got {self.yunet_model}")


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face in source-image pixels."""

    face: int
    box: tuple[float, float, float, float]
    landmarks: tuple[float, ...] | None
    score: float | None
    detector: str  # "table", "haar" or "yunet"

    @property
    def size(self) -> float:
        """The shorter side of the box: a face is at least ``size`` × ``size`` pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def box_misses(box: Sequence[float], width: int, height: int) -> bool:
    """Whether box (x1, y1, x2, y2) covers no pixel of a ``width`` × ``height`` image: a crop of it would
    be padding alone (a detection made on another version of the image, a box meant for another one)."""
    x1, y1, x2, y2 = box
    return x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height


@dataclasses.dataclass(frozen=True)
class DetectionTable:
    """A detections table, checked, as arrays in (``sample_id``, ``face``) order: at the paper's 20M images,
    a :class:`Face` object per detection held some 24 GB in the crop parent; :meth:`faces` builds one
    image's when its chunk is handed out."""

    sample_ids: np.ndarray  # str objects, sorted
    face: np.ndarray  # int64
    box: np.ndarray  # [n, 4] float64
    landmarks: np.ndarray  # [n, 10] float64; NaN where ``has_landmarks`` is False
    has_landmarks: np.ndarray  # bool
    score: np.ndarray  # float64; NaN where the table gives none

    def spans(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each of ``sample_ids``' first row and the row past its last (equal where it has none)."""
        return (np.searchsorted(self.sample_ids, sample_ids, "left"),
                np.searchsorted(self.sample_ids, sample_ids, "right"))

    def faces(self, start: int, stop: int) -> tuple[Face, ...]:
        """Rows ``start:stop`` (one image's, from :meth:`spans`) as faces, in ``face`` order."""
        return tuple(
            Face(int(self.face[i]), tuple(self.box[i].tolist()),  # type: ignore[arg-type]
                 tuple(self.landmarks[i].tolist()) if self.has_landmarks[i] else None,
                 None if np.isnan(self.score[i]) else float(self.score[i]), "table")
            for i in range(start, stop)
        )


def _lengths(column: pd.Series) -> np.ndarray:
    """The length of each list cell; a null cell has none."""
    return np.fromiter((0 if v is None else len(v) for v in column), np.int64, len(column))


def _matrix(column: pd.Series, rows: np.ndarray, width: int) -> np.ndarray:
    """The cells of ``rows`` (each ``width`` long) as float64 rows, NaN elsewhere; a null inside a cell is
    NaN, which the finite check refuses."""
    out = np.full((len(column), width), np.nan)
    if rows.any():
        out[rows] = np.array(column[rows].tolist(), dtype=np.float64)
    return out


def load_detections(path: str | Path) -> DetectionTable:
    """The detections table (docs/CONTRACTS.md), checked row by row in (``sample_id``, ``face``) order."""
    table = read_table(path, DETECTION_COLUMNS, "rerun `mcf fetch`")
    table = table.assign(sample_id=table["sample_id"].astype(str))
    table = table.sort_values(["sample_id", "face"], kind="stable").reset_index(drop=True)
    # what the crop gate would reject only after every image was cropped is refused here, naming the row
    bad_index = table[table.duplicated(["sample_id", "face"]) | (table["face"] < 0)]
    if len(bad_index):
        row = bad_index.iloc[0]
        raise StageError(f"{path}: sample {row.sample_id} face {row.face}: face indices must be unique "
                         "within a sample and >= 0")
    box_len, lms_len = _lengths(table["box"]), _lengths(table["landmarks"])  # an empty landmarks list: none
    box = _matrix(table["box"], box_len == 4, 4)
    has_landmarks = lms_len == 10
    landmarks = _matrix(table["landmarks"], has_landmarks, 10)
    score = table["score"].to_numpy(np.float64, na_value=np.nan)
    finite = np.isfinite(box).all(axis=1) & (np.isfinite(landmarks).all(axis=1) | ~has_landmarks)
    with np.errstate(invalid="ignore"):
        checks = [  # a row's first failed check is its message, as a check per row in this order
            ((box_len != 4) | ((lms_len != 0) & ~has_landmarks),
             lambda i: f"box needs 4 values and landmarks 10, got {box_len[i]} and {lms_len[i]}"),
            (~finite, lambda i: "box or landmarks not finite"),
            ((box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1]),
             lambda i: f"box {box[i].tolist()} is not x1, y1, x2, y2 with x1 <= x2 and y1 <= y2"),
            (~np.isnan(score) & ~((score >= 0.0) & (score <= 1.0)),
             lambda i: f"score {float(score[i])} is outside 0..1"),
        ]
    failed = np.logical_or.reduce([bad for bad, _ in checks])
    if failed.any():
        i = int(np.argmax(failed))
        message = next(say for bad, say in checks if bad[i])
        raise StageError(f"{path}: sample {table.sample_id[i]} face {table.face[i]}: {message(i)}")
    ids = table["sample_id"].to_numpy(object, copy=True)  # not a view: it kept the list columns' cells
    return DetectionTable(ids, table["face"].to_numpy(np.int64), box, landmarks, has_landmarks, score)


class Detector(Protocol):
    def __call__(self, rgb: np.ndarray) -> list[Face]: ...


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The image with its longer side at most ``max_side``, and the factors back to source pixels, x and
    y: each side is rounded to whole pixels, so the shorter one's factor is not the longer one's."""
    scale = max(rgb.shape[:2]) / max_side
    if scale <= 1.0:
        return rgb, (1.0, 1.0)
    h, w = (max(1, round(n / scale)) for n in rgb.shape[:2])  # a thin strip keeps one pixel row
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA), (rgb.shape[1] / w, rgb.shape[0] / h)


def _ordered(faces: list[Face]) -> list[Face]:
    """Faces indexed largest first (ties left to right), so the ``face`` index is deterministic."""
    faces = sorted(faces, key=lambda f: (-(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), f.box[0], f.box[1]))
    return [dataclasses.replace(f, face=i) for i, f in enumerate(faces)]


class HaarDetector:
    """OpenCV's bundled frontal-face Haar cascade: no landmarks and no calibrated score."""

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        path = Path(cv2.data.haarcascades) / HAAR_CASCADE
        self.cascade = cv2.CascadeClassifier(str(path))
        if self.cascade.empty():
            raise StageError(f"could not load the Haar cascade {path}")

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        small, (sx, sy) = _downscale(rgb, self.cfg.max_side)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        rects = self.cascade.detectMultiScale(
            gray,
            scaleFactor=self.cfg.haar_scale_factor,
            minNeighbors=self.cfg.haar_min_neighbors,
            minSize=(self.cfg.min_size, self.cfg.min_size),
        )
        faces = [
            Face(0, (x * sx, y * sy, (x + w) * sx, (y + h) * sy), None, None, "haar")
            for x, y, w, h in np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        ]
        return _ordered(faces)


class YuNetDetector:
    """OpenCV's ``FaceDetectorYN`` with a YuNet ONNX model: boxes, 5 landmarks and a score.

    YuNet lists the subject's right eye (image-left) first, the same order as the detections table.
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        self.cfg = cfg
        try:
            self.model = cv2.FaceDetectorYN.create(str(cfg.yunet_model), "", (320, 320), cfg.yunet_score)
        except cv2.error as err:  # a damaged or foreign .onnx file
            reason = re.sub(r"^.*error: \([^)]*\) ", "", str(err).strip().splitlines()[-1])[:200]
            raise StageError(f"{cfg.yunet_model}: not a YuNet model OpenCV can load ({reason})") from None

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        small, (sx, sy) = _downscale(rgb, self.cfg.max_side)
        self.model.setInputSize((small.shape[1], small.shape[0]))
        _, found = self.model.detect(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        faces = []
        for x, y, w, h, *rest in np.zeros((0, 15)) if found is None else found:
            if min(w, h) < self.cfg.min_size:
                continue
            x, y, w, h = (float(v) for v in (x, y, w, h))  # float32 stays float32 and is no JSON number
            box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
            landmarks = tuple(float(v) * (sy if i % 2 else sx) for i, v in enumerate(rest[:10]))
            faces.append(Face(0, box, landmarks, float(np.clip(rest[10], 0.0, 1.0)), "yunet"))
        return _ordered(faces)


_per_thread = threading.local()


def make_detector(cfg: DetectorConfig) -> Detector:
    """The configured detector, built once per thread (worker processes and threads each build their own).

    OpenCV's cascade and YuNet keep the image being scanned in the object: one shared by the threads of a
    Dask worker (crop_dask with ``processes=False``, or a ``dask worker`` with several threads) failed
    assertions in ``detectMultiScale`` or crashed the process.
    """
    detectors = _per_thread.__dict__.setdefault("detectors", {})
    if cfg not in detectors:
        detectors[cfg] = YuNetDetector(cfg) if cfg.yunet_model else HaarDetector(cfg)
    return detectors[cfg]
