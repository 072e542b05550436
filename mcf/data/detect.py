"""Face detections for the crop stage: the source's table, or an OpenCV detector run on the image.

A detection is a :class:`Face`: ``box`` (x1, y1, x2, y2) and optional ``landmarks`` (10 floats: x, y of the
image-left eye, image-right eye, nose tip, image-left and image-right mouth corners), in source pixels,
plus a ``score`` in 0..1 (``None`` when the detector has no calibrated confidence, as for Haar).
"""

from __future__ import annotations

import dataclasses
import functools
import re
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


def load_detections(path: str | Path) -> dict[str, list[Face]]:
    """The detections table (docs/CONTRACTS.md) grouped by ``sample_id``, faces in ``face`` order."""
    table = read_table(path, DETECTION_COLUMNS, "rerun `mcf fetch`")
    grouped: dict[str, list[Face]] = {}
    table = table.sort_values(["sample_id", "face"], kind="stable")
    # what the crop gate would reject only after every image was cropped is refused here, naming the row
    bad_index = table[table.duplicated(["sample_id", "face"]) | (table["face"] < 0)]
    if len(bad_index):
        row = bad_index.iloc[0]
        raise StageError(f"{path}: sample {row.sample_id} face {row.face}: face indices must be unique "
                         "within a sample and >= 0")
    for row in table.itertuples(index=False):
        where = f"{path}: sample {row.sample_id} face {row.face}"
        # a null inside becomes NaN: not finite; a null box has no values
        box = () if row.box is None else tuple(np.asarray(row.box, np.float64).tolist())
        lms = row.landmarks
        landmarks = None if lms is None or len(lms) == 0 else tuple(np.asarray(lms, np.float64).tolist())
        if len(box) != 4 or (landmarks is not None and len(landmarks) != 10):
            raise StageError(
                f"{where}: box needs 4 values and landmarks 10, got {len(box)} and {len(landmarks or ())}"
            )
        if not np.isfinite([*box, *(landmarks or ())]).all():
            raise StageError(f"{where}: box or landmarks not finite")
        if box[2] < box[0] or box[3] < box[1]:
            raise StageError(f"{where}: box {list(box)} is not x1, y1, x2, y2 with x1 <= x2 and y1 <= y2")
        score = None if pd.isna(row.score) else float(row.score)
        if score is not None and not 0.0 <= score <= 1.0:
            raise StageError(f"{where}: score {score} is outside 0..1")
        face = Face(int(row.face), box, landmarks, score, "table")  # type: ignore[arg-type]
        grouped.setdefault(str(row.sample_id), []).append(face)
    return grouped


class Detector(Protocol):
    def __call__(self, rgb: np.ndarray) -> list[Face]: ...


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image with its longer side at most ``max_side``, and the factor back to source pixels."""
    scale = max(rgb.shape[:2]) / max_side
    if scale <= 1.0:
        return rgb, 1.0
    h, w = (max(1, round(n / scale)) for n in rgb.shape[:2])  # a thin strip keeps one pixel row
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA), scale


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
        small, scale = _downscale(rgb, self.cfg.max_side)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        rects = self.cascade.detectMultiScale(
            gray,
            scaleFactor=self.cfg.haar_scale_factor,
            minNeighbors=self.cfg.haar_min_neighbors,
            minSize=(self.cfg.min_size, self.cfg.min_size),
        )
        faces = [
            Face(0, (x * scale, y * scale, (x + w) * scale, (y + h) * scale), None, None, "haar")
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
        small, scale = _downscale(rgb, self.cfg.max_side)
        self.model.setInputSize((small.shape[1], small.shape[0]))
        _, found = self.model.detect(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        faces = []
        for x, y, w, h, *rest in np.zeros((0, 15)) if found is None else found:
            if min(w, h) < self.cfg.min_size:
                continue
            x, y, w, h = (float(v) for v in (x, y, w, h))  # float32 stays float32 and is no JSON number
            box = (x * scale, y * scale, (x + w) * scale, (y + h) * scale)
            landmarks = tuple(float(v) * scale for v in rest[:10])
            faces.append(Face(0, box, landmarks, float(np.clip(rest[10], 0.0, 1.0)), "yunet"))
        return _ordered(faces)


@functools.lru_cache(maxsize=4)
def make_detector(cfg: DetectorConfig) -> Detector:
    """The configured detector, built once per process (worker processes each build their own)."""
    return YuNetDetector(cfg) if cfg.yunet_model else HaarDetector(cfg)
