"""Metrics on hand-built cases whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcf.errors import StageError
from mcf.evaluate.metrics import auc_fr, ced_curve, confusion_matrix, f1_mean, f1_per_class, nme
from mcf.evaluate.scoring import CLASSES, alignment_scores, finite, parsing_scores


def _landmarks() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gt = rng.uniform(100, 200, (2, 19, 2))
    gt[:, 6], gt[:, 11] = (110.0, 150.0), (130.0, 150.0)  # outer eye corners 20 px apart
    box = np.array([[100.0, 130.0, 100.0, 140.0], [100.0, 160.0, 100.0, 180.0]])  # 30×40 and 60×80
    return gt, box


def test_nme_units_on_a_shifted_landmark_set() -> None:
    gt, box = _landmarks()
    pred = gt + np.array([3.0, 4.0])  # every point 5 px off
    np.testing.assert_allclose(nme(pred, gt, "diag", box), [5 / 50, 5 / 100])
    np.testing.assert_allclose(nme(pred, gt, "box", box), [5 / np.sqrt(1200), 5 / np.sqrt(4800)])
    np.testing.assert_allclose(nme(pred, gt, "inter_ocular"), [5 / 20, 5 / 20])


def test_nme_averages_over_all_points_ignoring_visibility() -> None:
    gt, box = _landmarks()
    pred = gt.copy()
    pred[0, 3] += [0.0, 19.0]  # one point 19 px off: mean error 1 px
    np.testing.assert_allclose(nme(pred, gt, "diag", box), [1 / 50, 0.0])


def test_nme_rejects_bad_input() -> None:
    gt, box = _landmarks()
    with pytest.raises(ValueError, match="needs the GT box"):
        nme(gt, gt, "diag")
    with pytest.raises(ValueError, match="unknown nme unit 'pupil'"):
        nme(gt, gt, "pupil", box)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        nme(gt[:, :5], gt, "inter_ocular")


def test_nme_refuses_boxes_not_one_row_per_image() -> None:
    """Boxes laid out by column (``[4, N]``, as ``np.array([lefts, rights, tops, bottoms])`` gives) were
    reshaped to ``[N, 4]`` without a word, so the NME was divided by scrambled boxes."""
    gt, box = _landmarks()
    for bad in (box.T, box.ravel(), box[:1]):
        with pytest.raises(ValueError, match=r"box: expected \[2, 4\]"):
            nme(gt + 1.0, gt, "diag", bad)


@pytest.mark.parametrize("points", [5, 11])
def test_nme_inter_ocular_needs_the_eye_corners(points: int) -> None:
    """Point 11 is the twelfth: 11 points lack it, refused by name rather than an IndexError."""
    gt, _ = _landmarks()
    with pytest.raises(ValueError, match=f"needs points 6 and 11 .* got {points} points"):
        nme(gt[:, :points], gt[:, :points], "inter_ocular")


def test_ced_auc_fr_on_a_known_distribution() -> None:
    values = np.array([0.01, 0.05, 0.08, 0.1])
    thresholds, fractions = ced_curve(values)
    assert len(thresholds) == 701 and thresholds[-1] == pytest.approx(0.07)
    assert fractions[0] == 0 and fractions[-1] == 0.5
    auc, fr = auc_fr(values)
    # CED: 0 below 0.01, 1/4 up to 0.05, 1/2 after: area 0.25·0.04 + 0.5·0.02 = 0.02
    assert auc == pytest.approx(0.02 / 0.07, abs=2e-3)
    assert fr == 0.5
    uniform = np.linspace(0, 0.07, 100001)  # CED = t / 0.07: AUC 1/2
    assert auc_fr(uniform)[0] == pytest.approx(0.5, abs=1e-4)
    assert auc_fr(np.zeros(5)) == pytest.approx((1.0, 0.0))


def test_alignment_scores_by_hand() -> None:
    """PROTOCOL §3 on three images worked by hand: the dataset NME is the mean of the per-image NMEs (not
    pooled error ÷ pooled unit, nor their median, which two images cannot tell from the mean), ×100; AUC
    is composite Simpson's rule on 0, 1e-4, …, 0.07 (weights 1, 4, 2, …, 4, 1 times h/3), not the
    trapezoid rule (29.88) nor the exact area under the steps (29.897)."""
    gt, box = _landmarks()  # boxes 30×40 (diagonal 50) and 60×80 (diagonal 100), eye corners 20 px apart
    gt, box = np.concatenate([gt, gt[:1]]), np.concatenate([box, box[:1]])  # a third image like the first
    pred = gt + np.array([[[3.0, 4.0]], [[0.3, 0.4]], [[6.0, 8.0]]])  # every point 5, 0.5, then 10 px off
    scores = alignment_scores(pred, gt, box)
    # NME_box 5/√1200 = 0.144 and 10/√1200 = 0.289 fail; 0.5/√4800 = 0.00722 passes, and the CED is 1/3
    # from grid point 73 on: Simpson's weights over points 73..700 sum to 4·314 + 2·313 + 1 = 1883
    want = {
        "nme_diag": 100 * (5 / 50 + 0.5 / 100 + 10 / 50) / 3,  # 10.17; median 10; pooled 100 · 15.5 / 200
        "nme_box": 100 * (15 / np.sqrt(1200) + 0.5 / np.sqrt(4800)) / 3,
        "nme_inter_ocular": 100 * (5 / 20 + 0.5 / 20 + 10 / 20) / 3,
        "auc_box_0.07": 100 / 3 * 1883 * 1e-4 / 3 / 0.07,  # 29.889
        "fr_box_0.07": 100 * 2 / 3,
        "images": 3,
    }
    assert scores == pytest.approx(want, rel=1e-9)


def test_confusion_and_f1_on_a_known_label_map() -> None:
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 10, 10], [2, 2, 10, 10]])
    pred = gt.copy()
    pred[0, 2] = 0  # one skin pixel predicted as background
    pred[3, 3] = 2  # one hair pixel predicted as left brow
    conf = confusion_matrix(pred, gt)
    assert conf.shape == (11, 11) and conf.sum() == 16 and conf[1, 0] == 1 and conf[10, 2] == 1
    f1 = f1_per_class(conf)
    np.testing.assert_allclose(f1[[0, 1, 2, 10]], [2 * 4 / (4 + 5), 2 * 3 / 7, 2 * 4 / 9, 2 * 3 / 7])
    assert np.isnan(f1[5])  # a class in neither GT nor prediction
    both = confusion_matrix(np.stack([pred, gt]), np.stack([gt, gt]))
    np.testing.assert_array_equal(both, conf + confusion_matrix(gt, gt))  # accumulable over images


def test_f1_mean_skips_background_and_keeps_hair() -> None:
    f1s = np.array([0.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.4])
    assert f1_mean(f1s) == pytest.approx(0.85)


def test_f1_mean_leaves_out_a_class_absent_from_labels_and_predictions() -> None:
    f1s = np.array([0.0, 0.9, np.nan, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.0])
    assert f1_mean(f1s) == pytest.approx(0.8)  # the 9 classes present, not NaN for all
    assert np.isnan(f1_mean(np.array([1.0] + [np.nan] * 10)))


def test_an_empty_subset_has_only_its_count() -> None:
    gt, box = _landmarks()
    assert alignment_scores(gt[:0], gt[:0], box[:0]) == {"images": 0}
    assert alignment_scores(gt, gt, box)["nme_diag"] == 0.0
    one = alignment_scores(gt[:1] + np.array([3.0, 4.0]), gt[:1], box[:1])  # a subset of one image is scored
    assert one["images"] == 1 and one["nme_diag"] == pytest.approx(100 * 5 / 50)


@pytest.mark.parametrize(("side", "bad"), [("gt", 11), ("gt", -1), ("pred", 11), ("pred", -1)])
def test_confusion_rejects_out_of_range_labels(side: str, bad: int) -> None:
    """Either map, either end: unchecked, a pred label of 11 with gt 0 lands on cell 11, gt 1's background
    column, counted there without a word; a negative one is numpy's bincount error, naming no map."""
    good = np.zeros((2, 2), int)
    wrong = good.copy()
    wrong[1, 0] = bad
    maps = {"pred": wrong, "gt": good} if side == "pred" else {"pred": good, "gt": wrong}
    named = rf"^{side} labels must be in 0..10, got {min(bad, 0)}..{max(bad, 0)}$"
    with pytest.raises(ValueError, match=named):
        confusion_matrix(**maps)


def test_fr_counts_a_nan_nme_as_a_failure_as_the_ced_does() -> None:
    """FR@0.07 is the share the CED leaves out at 0.07 (FaRL: 1 − CED[-1]). A NaN NME (a diverged point)
    is no pass in the CED, but ``nme > 0.07`` is False for NaN, so FR counted it as a pass: 0.5, not 0.75."""
    values = np.array([0.01, np.nan, 0.08, 0.1])
    _, fractions = ced_curve(values)
    auc, fr = auc_fr(values)
    assert fr == 0.75 and fr == 1 - fractions[-1]


def test_an_nme_at_the_threshold_passes_in_the_fr_as_in_the_ced() -> None:
    """The CED counts NME <= t, so an NME of exactly 0.07 (the grid's last point) is a pass there and in
    FR@0.07: of 0.07 and 0.08, one fails (FR 1/2, not 1)."""
    values = np.array([0.07, 0.08])
    _, fractions = ced_curve(values)
    assert fractions[-1] == 0.5 and auc_fr(values)[1] == 0.5


def test_nme_refuses_a_zero_unit() -> None:
    """A unit of 0 (outer eye corners at one point, a box of no width) made every NME of the image inf,
    and the dataset's mean with it: refused, naming the image (the data gates' eye_gap and box_w > 0)."""
    gt, box = _landmarks()
    gt[1, 11] = gt[1, 6]
    with pytest.raises(ValueError, match=r"'inter_ocular' is zero, negative or NaN for image\(s\) \[1\]"):
        nme(gt + 1.0, gt, "inter_ocular")
    box[0, 1] = box[0, 0]  # right = left
    with pytest.raises(ValueError, match=r"'box' needs GT boxes with left < right .* image\(s\) \[0\]"):
        nme(gt + 1.0, gt, "box", box)


@pytest.mark.parametrize("unit", ["box", "diag"])
@pytest.mark.parametrize("flip", [(0, 1), (2, 3), "both"])
def test_nme_refuses_an_inverted_box(unit: str, flip: tuple[int, int] | str) -> None:
    """A box with right < left (or bottom < top) made √(w·h) the root of a negative, a silent NaN NME,
    or, inverted on both axes or read as a diagonal, a plausible positive unit: refused, naming the image."""
    gt, box = _landmarks()
    pairs = [(0, 1), (2, 3)] if flip == "both" else [flip]
    for a, b in pairs:
        box[1, [a, b]] = box[1, [b, a]]
    with pytest.raises(ValueError, match=rf"'{unit}' needs GT boxes with left < right .* image\(s\) \[1\]"):
        nme(gt + 1.0, gt, unit, box)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_one_non_finite_output_value_refuses_the_batch_naming_its_image(bad: float) -> None:
    """``finite`` refuses an output that is not finite, not only an output that is nowhere finite: one NaN
    logit is read as the largest by argmax, one NaN heatmap value makes the soft-argmax point NaN."""
    output = torch.zeros(3, 19, 8, 8)
    output[1, 4, 2, 5] = bad
    with pytest.raises(StageError, match=r"output on b is not finite \(1 of 3 images"):
        finite(output, ["a", "b", "c"])
    kept = output[[0, 2]]
    assert finite(kept, ["a", "c"]) is kept  # a finite batch passes through as it is


def test_parsing_scores_write_a_class_absent_from_both_maps_as_null() -> None:
    """A class in neither GT nor predictions has no F1: JSON null, not 0 (which would read as a class
    missed entirely), and the mean is over the classes present."""
    gt = np.array([[0, 1], [10, 10]])
    pred = np.array([[0, 1], [10, 1]])
    scores = parsing_scores(confusion_matrix(pred, gt))
    assert scores["pixels"] == 4 and scores["f1"]["background"] == 100.0
    assert [scores["f1"][c] for c in ("skin", "hair")] == pytest.approx([100 * 2 / 3] * 2)
    assert all(scores["f1"][c] is None for c in CLASSES[2:10])
    assert scores["f1_mean"] == pytest.approx(100 * 2 / 3)  # skin and hair alone
