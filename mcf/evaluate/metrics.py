"""Alignment and parsing metrics of the FaRL protocol (PROTOCOL.md §3–4), as pure NumPy functions.

Every function returns fractions (NME 0.0093, F1 0.9388); callers multiply by 100 when they report,
as the papers do (FaRL's "0.943" NME is 0.00943 here, "93.88" F1 is 0.9388).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.integrate import simpson

Unit = Literal["diag", "box", "inter_ocular"]
UNITS: tuple[str, ...] = ("diag", "box", "inter_ocular")
OUTER_EYE_CORNERS = (6, 11)  # AFLW-19 ids of the outer eye corners (inter-ocular unit)


def _points(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != 2:
        raise ValueError(f"{name}: expected [N, K, 2] points, got shape {x.shape}")
    return x


def nme(pred: np.ndarray, gt: np.ndarray, unit: Unit, box: np.ndarray | None = None) -> np.ndarray:
    """Per-image normalised mean error ``[N]``: mean point distance over all points ÷ the unit.

    pred, gt: ``[N, K, 2]`` in original-image pixels (visibility ignored, all K points).
    box: ``[N, 4]`` GT boxes ``(left, right, top, bottom)``, needed for ``diag`` (√(w²+h²)) and
    ``box`` (√(w·h)); ``inter_ocular`` is the GT distance between points 6 and 11.
    """
    pred, gt = _points(pred, "pred"), _points(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    err = np.linalg.norm(pred - gt, axis=-1).mean(axis=-1)
    if unit == "inter_ocular":
        a, b = OUTER_EYE_CORNERS
        if gt.shape[1] <= max(a, b):
            raise ValueError(f"nme unit 'inter_ocular' needs points {a} and {b} (AFLW-19's outer eye "
                             f"corners), got {gt.shape[1]} points")
        norm = np.linalg.norm(gt[:, a] - gt[:, b], axis=-1)
    elif unit in ("diag", "box"):
        if box is None:
            raise ValueError(f"nme unit {unit!r} needs the GT box")
        box = np.asarray(box, dtype=np.float64)
        if box.shape != (len(gt), 4):  # a [4, N] table of columns must not be reshaped into boxes
            raise ValueError(f"box: expected [{len(gt)}, 4] (left, right, top, bottom), got {box.shape}")
        w, h = box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]
        # An inverted box (right < left) gives √(w·h) of a negative, NaN, or a positive diagonal:
        # both sides must be positive, whichever unit reads them.
        if not np.all((w > 0) & (h > 0)):
            bad = np.flatnonzero(~((w > 0) & (h > 0)))[:5]
            raise ValueError(f"nme unit {unit!r} needs GT boxes with left < right and top < bottom; "
                             f"image(s) {bad} have none")
        norm = np.sqrt(w**2 + h**2) if unit == "diag" else np.sqrt(w * h)
    else:
        raise ValueError(f"unknown nme unit {unit!r} (valid: {', '.join(UNITS)})")
    if not np.all(norm > 0):  # NaN is no unit either
        bad = np.flatnonzero(~(norm > 0))[:5]
        raise ValueError(f"nme unit {unit!r} is zero, negative or NaN for image(s) {bad}")
    return err / norm


def ced_curve(
    nme_values: np.ndarray, threshold: float = 0.07, step: float = 1e-4
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: thresholds ``0, step, …, threshold`` and the share of images
    whose NME is at most each threshold."""
    values = np.asarray(nme_values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("ced_curve: no NME values")
    thresholds = np.linspace(0.0, threshold, int(round(threshold / step)) + 1)
    fractions = (values[None, :] <= thresholds[:, None]).mean(axis=1)
    return thresholds, fractions


def auc_fr(nme_box: np.ndarray, threshold: float = 0.07, step: float = 1e-4) -> tuple[float, float]:
    """AUC@threshold (Simpson's rule over the CED, ÷ threshold) and FR@threshold (share above it): the
    images the CED does not count at ``threshold``, so a NaN NME (a diverged point) is a failure.

    The grid ends at ``threshold``, as PROTOCOL §3 says. FaRL's scorer builds it with ``np.arange(0,
    threshold + step, step)``, which at 0.07 yields 702 points ending at 0.0701: its AUC integrates
    one step further (up to +0.14 points ×100) and its FR counts an NME in (0.07, 0.0701] as a pass.
    """
    thresholds, fractions = ced_curve(nme_box, threshold, step)
    auc = float(simpson(fractions, x=thresholds) / threshold)
    fr = float((~(np.asarray(nme_box, dtype=np.float64) <= threshold)).mean())  # not `> threshold`: NaN
    return auc, fr


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_classes: int = 11) -> np.ndarray:
    """``[n_classes, n_classes]`` int64 counts, rows = GT class, columns = predicted class.

    Sum the matrices of all images to get the dataset's single confusion matrix.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    for name, x in (("pred", pred), ("gt", gt)):
        if x.size and (x.min() < 0 or x.max() >= n_classes):
            raise ValueError(f"{name} labels must be in 0..{n_classes - 1}, got {x.min()}..{x.max()}")
    idx = gt.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n_classes**2).reshape(n_classes, n_classes)


def f1_per_class(conf: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2·TP / (#GT + #pred); NaN for a class absent from both GT and predictions."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(axis=1) + conf.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * tp / denom, np.nan)


def f1_mean(f1s: np.ndarray) -> float:
    """Mean F1 over the non-background classes 1..10 (hair included), as LaPa papers report it.

    A class absent from both GT and predictions (NaN) is left out of the mean rather than blanking it:
    the real LaPa test set holds every class, a small one may not. NaN only when every class is absent.
    """
    f1s = np.asarray(f1s, dtype=np.float64)
    if f1s.ndim != 1 or f1s.size < 2:
        raise ValueError(f"f1_mean: expected per-class F1 [n_classes], got shape {f1s.shape}")
    scored = f1s[1:][~np.isnan(f1s[1:])]
    return float(scored.mean()) if scored.size else float("nan")
