"""The evaluate stage on tiny fine-tuned models: labelled metrics, plots, overlays, and predictions that
re-score to the same numbers with :mod:`mcf.evaluate.metrics` alone."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.integrate import simpson
from test_finetune import tiny_configs, write_fixture

from mcf.data.aflw19 import AFLW19, AFLW19Config, read_mat
from mcf.data.lapa import LaPa, LaPaConfig, read_label
from mcf.errors import EXIT_STAGE, GateError, StageError
from mcf.evaluate import evaluate as evaluate_module
from mcf.evaluate import metrics as M
from mcf.evaluate.evaluate import EvaluateConfig, main
from mcf.evaluate.plots import draw_landmarks, read_png
from mcf.evaluate.scoring import CLASSES, predict_landmarks, predict_parsing
from mcf.params import Common, ParamsError
from mcf.train.finetune import main_alignment, main_parsing

VARIANTS = ("mcf", "scratch")


def _read_landmark_table(path: Path) -> tuple[list[str], np.ndarray]:
    """Names and points ``[N, 19, 2]`` from a predictions CSV (exact float round trip)."""
    df = pd.read_csv(path, float_precision="round_trip")
    xs, ys = (df[[f"{c}{i}" for i in range(19)]].to_numpy() for c in "xy")
    return df["name"].tolist(), np.stack([xs, ys], axis=-1)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvaluateConfig, dict[str, Any], Path]:
    root = write_fixture(tmp_path_factory.mktemp("eval"))
    align, parse = tiny_configs(root)
    for variant in VARIANTS:
        main_alignment(Common(seed=0), align, variant)
        main_parsing(Common(seed=0), parse, variant)
    cfg = EvaluateConfig(
        alignment=align.out, parsing=parse.out, backbone=str(root / "backbone"),
        scratch_backbone=str(root / "backbone_init"), out=str(root / "evaluate"),
        metrics=str(root / "metrics" / "evaluate.json"), overlays=2,
    )
    main(Common(seed=0), cfg)
    return cfg, json.loads(Path(cfg.metrics).read_text()), root


@pytest.fixture
def scored(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tasks whose models the stage ran on test images, in order: the real scorers, wrapped."""
    calls: list[str] = []

    def spy(task: str, real: Any) -> Any:
        def scorer(*args: Any) -> Any:
            calls.append(task)
            return real(*args)
        return scorer

    for task, name in (("alignment", "predict_landmarks"), ("parsing", "predict_parsing")):
        monkeypatch.setattr(evaluate_module, name, spy(task, getattr(evaluate_module, name)))
    return calls


def test_metrics_are_labelled_and_complete(evaluated: tuple[EvaluateConfig, dict, Path]) -> None:
    _, metrics, _ = evaluated
    assert metrics["dataset"] == {"alignment": "SynthFace-AFLW19", "parsing": "SynthFace-LaPa"}
    for variant in VARIANTS:
        for split, n in (("full", 6), ("frontal", None)):
            scores = metrics["alignment"][variant][split]
            assert set(scores) == {"nme_diag", "nme_box", "nme_inter_ocular", "auc_box_0.07", "fr_box_0.07",
                                   "images"}
            assert n is None or scores["images"] == n
            assert 0 < scores["nme_diag"] < scores["nme_box"] and 0 <= scores["auc_box_0.07"] <= 100
        assert list(metrics["parsing"][variant]["f1"]) == list(CLASSES)
        f1 = metrics["parsing"][variant]["f1"]  # the mean is over the classes present, background aside
        present = [v for c, v in f1.items() if c != "background" and v is not None]
        assert present and metrics["parsing"][variant]["f1_mean"] == pytest.approx(np.mean(present))
        assert all(0 <= v <= 100 for v in present)
        probe = metrics["probe"][variant]
        assert probe["nme_diag"] > 0 and 0 <= probe["identity_accuracy"] <= 100


def test_plots_and_overlays_are_written(evaluated: tuple[EvaluateConfig, dict, Path]) -> None:
    """ced.csv and f1.csv hold what the metrics say: f1.csv's row for each class is that class's F1 (a
    check of its class column alone passed values one class off)."""
    cfg, metrics, _ = evaluated
    out = Path(cfg.out)
    ced = pd.read_csv(out / "plots" / "ced.csv")
    assert list(ced.columns) == ["threshold", *VARIANTS] and len(ced) == 701
    assert ced["threshold"].iloc[-1] == pytest.approx(0.07) and (np.diff(ced["mcf"]) >= 0).all()
    f1 = pd.read_csv(out / "plots" / "f1.csv")
    assert list(f1["class"]) == list(CLASSES[1:])
    for variant in VARIANTS:
        want = [metrics["parsing"][variant]["f1"][c] for c in CLASSES[1:]]
        assert f1[variant].tolist() == pytest.approx([np.nan if v is None else v for v in want], nan_ok=True)
    for name in ["ced.png", *(f"confusion_{v}.png" for v in VARIANTS)]:
        assert read_png(out / name).ndim == 3
    overlays = sorted(p.name for p in (out / "overlays").glob("*.png"))
    tasks = ("alignment", "parsing")
    assert overlays == sorted(f"{t}_{v}_{i}.png" for t in tasks for v in VARIANTS for i in (0, 1))


def _quantitative_fields(spec: Any) -> set[str]:
    """The fields a Vega-Lite spec encodes as numbers, wherever they sit (encoding, layers)."""
    if isinstance(spec, list):
        return set().union(*map(_quantitative_fields, spec))
    if not isinstance(spec, dict):
        return set()
    own = {spec["field"]} if spec.get("type") == "quantitative" and "field" in spec else set()
    return own.union(*(_quantitative_fields(v) for k, v in spec.items() if k != "data"))


def test_dvc_plots_of_evaluate_encode_numbers_as_numbers(
    evaluated: tuple[EvaluateConfig, dict, Path], tmp_path: Path
) -> None:
    """dvc.yaml's plots of the CSVs evaluate writes, rendered by `dvc plots show`: every axis the template
    reads as a quantity holds numbers. bar_horizontal reads x as the quantity and y as the category, so
    ``x: class`` drew the class names on a number axis and the F1 values as categories."""
    cfg, _, _ = evaluated
    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(root / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    shutil.copytree(Path(cfg.out) / "plots", tmp_path / params["evaluate"]["out"] / "plots")
    ids = [next(iter(p)) for p in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]]
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", *ids], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors") and sorted(shown["data"]) == sorted(ids)
    for plot_id, renders in shown["data"].items():
        for render in renders:
            spec = render["content"]
            points = spec["data"]["values"]
            assert points, plot_id
            for field in _quantitative_fields(spec):
                values = [point[field] for point in points]  # "" where a class has no F1 (null): no bar
                assert all(re.fullmatch(r"|-?\d+(\.\d*)?(e[+-]?\d+)?", v) for v in values), (plot_id, field)


def test_overlays_leave_out_points_that_have_no_pixel() -> None:
    """A diverged model's NaN or far-off point is not drawn (OpenCV refuses it) and spares the others."""
    image = np.zeros((40, 50, 3), np.uint8)
    drawn = draw_landmarks(image, np.array([[np.nan, 3.0], [1e30, -1e30], [25.0, 20.0]]))
    assert drawn[20, 25].tolist() == [255, 0, 0] and drawn[:10].max() == 0 and drawn[:, 40:].max() == 0


def test_alignment_predictions_rescore_to_the_metrics(evaluated: tuple[EvaluateConfig, dict, Path]) -> None:
    cfg, metrics, root = evaluated
    ann = read_mat(root / "aflw19")
    row = {name: i for i, name in enumerate(ann.names)}
    for variant in VARIANTS:
        names, pred = _read_landmark_table(Path(cfg.out) / "predictions" / f"alignment_{variant}.csv")
        idx = np.array([row[n] for n in names])
        gt, box, frontal = ann.points[idx], ann.boxes[idx], ann.visible[idx].all(axis=1)
        for split, keep in (("full", slice(None)), ("frontal", frontal)):
            want = metrics["alignment"][variant][split]
            p, g, b = pred[keep], gt[keep], box[keep]
            nme_box = M.nme(p, g, "box", b)
            assert 100 * M.nme(p, g, "diag", b).mean() == pytest.approx(want["nme_diag"])
            assert 100 * nme_box.mean() == pytest.approx(want["nme_box"])
            assert 100 * M.nme(p, g, "inter_ocular").mean() == pytest.approx(want["nme_inter_ocular"])
            auc, fr = M.auc_fr(nme_box)
            assert (100 * auc, 100 * fr) == pytest.approx((want["auc_box_0.07"], want["fr_box_0.07"]))
        table = pd.read_csv(Path(cfg.out) / "predictions" / f"alignment_{variant}.csv")
        np.testing.assert_allclose(table["nme_diag"], 100 * M.nme(pred, gt, "diag", box), rtol=1e-9)
        assert table["frontal"].tolist() == frontal.tolist()
        assert table["nme_diag"].mean() == pytest.approx(metrics["alignment"][variant]["full"]["nme_diag"])


def test_ced_is_of_nme_box_the_curve_the_auc_integrates(
    evaluated: tuple[EvaluateConfig, dict, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PROTOCOL.md: the CED (ced.csv, ced.png) is of NME_box, the curve AUC_box integrates. The tiny models
    miss by more than 0.07, a flat zero curve under any normaliser, so predictions are set to known NME_box
    values inside 0..0.07, where NME_diag (≤ NME_box/√2) would give another curve."""
    cfg, _, _ = evaluated
    wanted: list[np.ndarray] = []  # each variant's NME_box per image, in scoring order

    def shifted(model: Any, dataset: Any, batch_size: int) -> dict[str, Any]:
        p = predict_landmarks(model, dataset, batch_size)
        one_px = M.nme(p["gt"] + np.array([1.0, 0.0]), p["gt"], "box", p["box"])  # 1 / √(w·h) per image
        wanted.append(np.linspace(0.00505, 0.06505, len(one_px)))  # off the 1e-4 grid
        shift = np.stack([wanted[-1] / one_px, np.zeros_like(one_px)], axis=-1)  # every point moves by it
        return p | {"pred": p["gt"] + shift[:, None]}

    monkeypatch.setattr(evaluate_module, "predict_landmarks", shifted)
    for sub in ("predictions", "plots", "overlays"):
        (tmp_path / sub).mkdir()
    results = evaluate_module.evaluate_alignment(dataclasses.replace(cfg, overlays=0), tmp_path,
                                                 *evaluate_module.alignment_inputs(cfg))
    ced = pd.read_csv(tmp_path / "plots" / "ced.csv")
    for i, variant in enumerate(VARIANTS):
        np.testing.assert_allclose(ced[variant], M.ced_curve(wanted[i])[1])
        auc = 100 * simpson(ced[variant], x=ced["threshold"]) / 0.07
        assert auc == pytest.approx(results[variant]["full"]["auc_box_0.07"])


def test_parsing_predictions_rescore_to_the_metrics(evaluated: tuple[EvaluateConfig, dict, Path]) -> None:
    cfg, metrics, root = evaluated
    labels = sorted((root / "lapa" / "LaPa" / "test" / "labels").glob("*.png"))
    for variant in VARIANTS:
        conf = np.zeros((11, 11), dtype=np.int64)
        for path in labels:
            pred = read_png(Path(cfg.out) / "predictions" / f"parsing_{variant}" / "test" / path.name)
            gt = read_label(path)
            assert pred.shape == gt.shape  # original image size
            conf += M.confusion_matrix(pred, gt)
        want = metrics["parsing"][variant]
        assert want["pixels"] == conf.sum()
        f1 = M.f1_per_class(conf)
        for c, v in zip(CLASSES, f1, strict=True):
            assert want["f1"][c] == (None if np.isnan(v) else pytest.approx(100 * v))


@pytest.mark.parametrize("task", ["alignment", "parsing"])
def test_synthface_numbers_cannot_be_labelled_as_the_real_dataset(
    task: str, evaluated: tuple[EvaluateConfig, dict, Path], scored: list[str]
) -> None:
    """Refused before any model is scored: a wrong parsing label failed only after the alignment scoring."""
    cfg, _, root = evaluated
    bad = dataclasses.replace(
        cfg, **{f"{task}_label": "AFLW-19"}, out=str(root / "bad"), metrics=str(root / "bad.json")
    )
    with pytest.raises(ParamsError, match=f"{task}_label.*SynthFace"):
        main(Common(seed=0), bad)
    assert scored == []
    assert not (root / "bad").exists() and not (root / "bad.json").exists()


def test_real_data_numbers_cannot_be_labelled_as_synthface() -> None:
    """params.yaml's default labels say SynthFace: a run pointed at the real AFLW-19 or LaPa with them
    would file real numbers under SynthFace, so the check goes both ways."""
    from mcf.evaluate.evaluate import check_label

    with pytest.raises(ParamsError, match="not SynthFace, so the label must not contain"):
        check_label("SynthFace-AFLW19", "alignment_label", synthetic=False)
    check_label("AFLW-19", "alignment_label", synthetic=False)
    check_label("SynthFace-LaPa", "parsing_label", synthetic=True)


@pytest.mark.parametrize("label", ["", "  "])
def test_an_empty_label_on_real_data_is_refused(label: str) -> None:
    """An empty label passed the SynthFace check on real data, and the metrics named no dataset."""
    from mcf.evaluate.evaluate import check_label

    with pytest.raises(ParamsError, match=r"evaluate\.alignment_label: .*empty: name the dataset"):
        check_label(label, "alignment_label", synthetic=False)


@pytest.mark.parametrize("task", ["alignment", "parsing"])
@pytest.mark.parametrize("moved", ["missing", "empty"])
def test_a_data_root_gone_since_the_fine_tune_is_not_taken_for_real_data(
    task: str, moved: str, evaluated: tuple[EvaluateConfig, dict, Path], tmp_path: Path, scored: list[str]
) -> None:
    """The models' model.pt names the data they were fine-tuned on. A root deleted since (or a fetch
    output not pulled) was refused as 'the data is not SynthFace, so the label must not contain
    SynthFace', sending the user to relabel SynthFace numbers as the real dataset's. A missing root is an
    input missing (exit 2), an empty one the reader's own error naming what it lacks; the label stays.
    Either is refused before any model is scored: the parsing root was found only after the alignment
    scoring."""
    cfg, _, root = evaluated
    gone = tmp_path / "gone"
    if moved == "empty":
        gone.mkdir()
    for variant in VARIANTS:
        ckpt = torch.load(Path(getattr(cfg, task)) / variant / "model.pt", weights_only=True)
        ckpt["data"]["root"] = str(gone)
        (tmp_path / task / variant).mkdir(parents=True)
        torch.save(ckpt, tmp_path / task / variant / "model.pt")
    bad = dataclasses.replace(cfg, **{task: str(tmp_path / task)}, out=str(tmp_path / "bad"),
                              metrics=str(tmp_path / "bad.json"))
    error = ParamsError if moved == "missing" else StageError
    with pytest.raises(error) as err:
        main(Common(seed=0), bad)
    assert str(gone) in str(err.value) and "label" not in str(err.value), err.value
    assert scored == []
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("under", ["a file", "a file's child"])
def test_a_metrics_path_that_cannot_be_written_is_refused_before_scoring(
    under: str, evaluated: tuple[EvaluateConfig, dict, Path], tmp_path: Path, scored: list[str]
) -> None:
    """The JSON is written last: a metrics path through a file failed (exit 1, 'Not a directory') only
    after every model was scored. Now the same exit 1, naming the file in the way, before any scoring."""
    cfg, _, _ = evaluated
    blocker = tmp_path / "metrics"
    blocker.write_text("not a folder\n")
    metrics = blocker / "evaluate.json" if under == "a file" else blocker / "sub" / "evaluate.json"
    bad = dataclasses.replace(cfg, out=str(tmp_path / "bad"), metrics=str(metrics))
    with pytest.raises(StageError, match=f"evaluate.metrics {metrics}: {blocker} is a file") as err:
        main(Common(seed=0), bad)
    assert err.value.exit_code == EXIT_STAGE and scored == []
    assert not (tmp_path / "bad").exists() and blocker.read_text() == "not a folder\n"


def test_best_epoch_on_test_is_labelled_beside_the_last_epoch(evaluated: tuple[EvaluateConfig, dict, Path],
                                                               ) -> None:
    """FaRL's selection (PROTOCOL §3): one fine-tuning epoch here, so its best is the last epoch's score,
    which the fine-tune computed with evaluate's own functions on the same EMA weights."""
    _, metrics, _ = evaluated
    for variant in VARIANTS:
        align = metrics["alignment"][variant]
        assert align["best_epoch_on_test"] == {
            "nme_diag_full": pytest.approx(align["full"]["nme_diag"]), "epoch": 1, "epochs": 1}
        parse = metrics["parsing"][variant]
        best = {"f1_mean": pytest.approx(parse["f1_mean"]), "epoch": 1, "epochs": 1}
        assert parse["best_epoch_on_test"] == best


@pytest.mark.parametrize(("task", "other"), [("alignment", "parsing"), ("parsing", "alignment")])
def test_models_of_the_other_task_are_refused_by_name(
    task: str, other: str, evaluated: tuple[EvaluateConfig, dict, Path], scored: list[str]
) -> None:
    """Before any model is scored: alignment models given as the parsing ones passed the alignment
    scoring first."""
    cfg, _, root = evaluated
    swapped = dataclasses.replace(cfg, **{task: getattr(cfg, other)}, out=str(root / "bad"),
                                  metrics=str(root / "bad.json"))
    refused = f"mcf/model.pt: this model was fine-tuned for '{other}', not '{task}'"
    with pytest.raises(StageError, match=refused):
        main(Common(seed=0), swapped)
    assert scored == []
    assert not (root / "bad").exists() and not (root / "bad.json").exists()


def test_a_model_filed_under_the_other_variant_is_refused_by_name(
    evaluated: tuple[EvaluateConfig, dict, Path], scored: list[str], tmp_path: Path
) -> None:
    """The scratch model copied into mcf/ was scored and filed as MCF's, exit 0: a scratch score published
    as the pre-trained one. model.pt records its variant, so the folder must agree with it."""
    cfg, _, root = evaluated
    for variant in VARIANTS:  # each folder holds the other variant's model
        other = next(v for v in VARIANTS if v != variant)
        (tmp_path / "alignment" / variant).mkdir(parents=True)
        shutil.copy(Path(cfg.alignment) / other / "model.pt", tmp_path / "alignment" / variant / "model.pt")
    bad = dataclasses.replace(cfg, alignment=str(tmp_path / "alignment"), out=str(tmp_path / "bad"),
                              metrics=str(tmp_path / "bad.json"))
    with pytest.raises(StageError, match=r"mcf/model.pt: this model was fine-tuned as variant 'scratch', "
                                         r"not 'mcf'"):
        main(Common(seed=0), bad)
    assert scored == []
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.json").exists()


def test_a_missing_probe_backbone_is_refused_before_scoring(evaluated: tuple[EvaluateConfig, dict, Path],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The probes read the pre-training exports; one missing failed only after every model was scored."""
    cfg, _, root = evaluated
    for key in ("backbone", "scratch_backbone"):
        bad = dataclasses.replace(cfg, **{key: str(root / "nope")}, out=str(root / "bad"),
                                  metrics=str(root / "bad.json"))
        with caplog.at_level("INFO"), pytest.raises(ParamsError, match=f"evaluate.{key}.*nope"):
            main(Common(seed=0), bad)
        assert not any("alignment mcf" in r.getMessage() for r in caplog.records)
        assert not (root / "bad").exists() and not (root / "bad.json").exists()
    main(Common(seed=0), dataclasses.replace(  # without the probes the exports are not needed
        cfg, backbone=str(root / "nope"), probe=dataclasses.replace(cfg.probe, enabled=False),
        out=str(root / "noprobe"), metrics=str(root / "noprobe.json")))
    assert "probe" not in json.loads((root / "noprobe.json").read_text())


def test_an_identities_table_that_lost_a_row_is_refused_before_scoring(
    evaluated: tuple[EvaluateConfig, dict, Path], tmp_path: Path, scored: list[str]
) -> None:
    """The probe's identities table was read only after every alignment and parsing model was scored, so
    a lost row ended a long run at its very end. Now the same StageError comes before any scoring."""
    import shutil

    from mcf.synth.writers import IDENTITIES_CSV

    cfg, _, root = evaluated
    data = tmp_path / "aflw19"
    shutil.copytree(root / "aflw19", data)
    table = pd.read_csv(data / IDENTITIES_CSV)
    lost = table[table["split"] == "test"]["name"].iloc[0]
    table[table["name"] != lost].to_csv(data / IDENTITIES_CSV, index=False)
    for variant in VARIANTS:  # the alignment models, fine-tuned on the copy
        ckpt = torch.load(Path(cfg.alignment) / variant / "model.pt", weights_only=True)
        ckpt["data"]["root"] = str(data)
        (tmp_path / "alignment" / variant).mkdir(parents=True)
        torch.save(ckpt, tmp_path / "alignment" / variant / "model.pt")
    bad = dataclasses.replace(cfg, alignment=str(tmp_path / "alignment"), out=str(tmp_path / "bad"),
                              metrics=str(tmp_path / "bad.json"))
    with pytest.raises(StageError, match=rf"{IDENTITIES_CSV}: no identity for 1 of .*{re.escape(lost)}"):
        main(Common(seed=0), bad)
    assert scored == []
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.json").exists()


def test_probe_fits_recover_linear_structure(caplog: pytest.LogCaptureFixture) -> None:
    from mcf.evaluate.probe import fit_landmarks, identity_accuracy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12))
    points = (x[:, :4] @ rng.normal(size=(4, 38))).reshape(200, 19, 2)
    pred = fit_landmarks(x[:150], points[:150], x[150:], alpha=1e-3)
    np.testing.assert_allclose(pred, points[150:], atol=1e-2)
    ids = np.repeat(np.arange(4), 50)
    feats = 0.3 * rng.normal(size=(200, 6)) + 5 * np.eye(6)[ids]
    assert identity_accuracy(feats[::2], ids[::2], feats[1::2], ids[1::2], c=1.0) == 1.0
    assert identity_accuracy(feats[:100], ids[:100], feats[100:], ids[100:], c=1.0) is None  # unseen ids
    # scored over the test images of seen identities alone: ids 0, 1 train; ids 1, 2 test, half unseen
    assert identity_accuracy(feats[:100], ids[:100], feats[75:125], ids[75:125], c=1.0) == 1.0
    assert "identity probe not scored: no test image has a training identity" in caplog.text


def test_best_epoch_on_test_picks_the_lowest_nme_and_the_highest_f1(
        evaluated: tuple[EvaluateConfig, dict, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """NME is better low and F1 high: recorded scores of three epochs, the best is the middle one. The
    validation scores pick another epoch (the earliest of a tie), and the test score after it stands."""
    import mcf.evaluate.evaluate as E

    cfg, _, root = evaluated
    recorded = {"alignment": [9.0, 1.0, 5.0], "parsing": [1.0, 9.0, 5.0]}
    val = {"alignment": [4.0, 6.0, 3.0], "parsing": [8.0, 2.0, 8.0]}
    real = E.load_finetuned

    def with_scores(path: Path, task: str | None = None) -> tuple[Any, dict[str, Any]]:
        model, meta = real(path, task)
        return model, meta | {"test_by_epoch": recorded[meta["task"]], "val_by_epoch": val[meta["task"]]}

    monkeypatch.setattr(E, "load_finetuned", with_scores)
    out = dataclasses.replace(cfg, out=str(root / "best"), metrics=str(root / "best.json"),
                              probe=dataclasses.replace(cfg.probe, enabled=False), overlays=0)
    main(Common(seed=0), out)
    metrics = json.loads((root / "best.json").read_text())
    for task, score in (("alignment", "nme_diag_full"), ("parsing", "f1_mean")):
        assert metrics[task]["mcf"]["best_epoch_on_test"] == {score: 1.0 if task == "alignment" else 9.0,
                                                              "epoch": 2, "epochs": 3}
    assert metrics["alignment"]["mcf"]["best_epoch_on_val"] == {"nme_diag_val": 3.0, "nme_diag_full": 5.0,
                                                                "epoch": 3, "epochs": 3}
    assert metrics["parsing"]["mcf"]["best_epoch_on_val"] == {"f1_mean_val": 8.0, "f1_mean": 1.0,
                                                              "epoch": 1, "epochs": 3}


def test_best_epoch_on_val_without_test_scores_names_the_epoch_alone() -> None:
    """Validation scored, the test split not (test_each_epoch false): the pick has no test score to
    stand beside; an epoch whose score is None (F1 of no class) is never picked."""
    from mcf.evaluate.evaluate import best_epochs

    meta = {"task": "alignment", "test_by_epoch": [], "val_by_epoch": [3.0, 2.0, 2.5]}
    assert best_epochs(meta, min) == {"best_epoch_on_val": {"nme_diag_val": 2.0, "epoch": 2, "epochs": 3}}
    meta = {"task": "parsing", "test_by_epoch": [4.0, None], "val_by_epoch": [None, 1.0]}
    assert best_epochs(meta, max) == {"best_epoch_on_test": {"f1_mean": 4.0, "epoch": 1, "epochs": 2},
                                      "best_epoch_on_val": {"f1_mean_val": 1.0, "epoch": 2, "epochs": 2}}
    assert best_epochs({"task": "parsing"}, max) == {}


def test_probe_features_are_the_mean_patch_token_and_cls() -> None:
    """The pooled mean is over the patch tokens only, CLS beside it (after the final norm)."""
    from mcf.evaluate.probe import pooled_features
    from mcf.models.backbone import BackboneConfig, create_backbone

    backbone = create_backbone(BackboneConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    images = torch.randn(3, 3, 32, 32)
    items = [{"image": images[i], "name": f"n{i}"} for i in range(3)]
    feats, rest = pooled_features(backbone, items, batch_size=2)
    tokens = backbone.eval().forward_features(images).detach().double()
    np.testing.assert_allclose(feats, torch.cat([tokens[:, 1:].mean(1), tokens[:, 0]], 1).numpy(), atol=1e-5)
    assert rest == {"name": ["n0", "n1", "n2"]}
    # without a class token (a timm export may have none) token 0 is a patch: the mean over all, no CLS
    plain = create_backbone(BackboneConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2),
                            class_token=False, global_pool="avg")
    feats, _ = pooled_features(plain, items, batch_size=2)
    tokens = plain.eval().forward_features(images).detach().double()
    np.testing.assert_allclose(feats, tokens.mean(1).numpy(), atol=1e-5)


def test_probes_fitted_on_the_images_they_score_recover_each_images_landmarks_and_identity(
    tmp_path: Path,
) -> None:
    """run_probes pairs each image's features with its own landmarks, crop matrix and identity: fitted on
    the very images it scores, a ridge of alpha 1e-8 on more features (64) than images (6) interpolates
    their crop landmarks, which map back to the GT (NME_diag ~0), and a barely regularised logistic
    regression names every identity (100%). The stage's own metrics, a random tiny backbone's, were
    checked only for being numbers in range."""
    from test_finetune import SYNTH, TINY

    from mcf.evaluate.probe import ProbeConfig, ProbeData, probe_inputs, run_probes
    from mcf.models.backbone import create_backbone, save_backbone
    from mcf.synth import write_aflw19

    write_aflw19(SYNTH, 0, tmp_path / "aflw19")
    inputs = probe_inputs(AFLW19Config(root=str(tmp_path / "aflw19"), n_train=16, size=32, crop_size=48))
    torch.manual_seed(0)
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    same = ProbeData(inputs.test, inputs.test, inputs.identities)
    cfg = ProbeConfig(ridge_alpha=1e-8, logreg_c=1e4, logreg_max_iter=1000)
    scores = run_probes({"mcf": str(tmp_path / "export")}, same, cfg, batch_size=4)["mcf"]
    assert scores["nme_diag"] < 1e-3 and scores["identity_accuracy"] == 100.0


def test_identity_probe_with_one_training_identity_is_none(caplog: pytest.LogCaptureFixture) -> None:
    from mcf.evaluate.probe import identity_accuracy

    x = np.random.default_rng(0).normal(size=(6, 4))
    assert identity_accuracy(x[:4], np.zeros(4, int), x[4:], np.zeros(2, int), c=1.0) is None
    assert "identity probe not scored: training holds one identity" in caplog.text


def test_an_image_missing_from_the_identities_table_fails_the_probe_naming_it(tmp_path: Path) -> None:
    """A SynthFace identities table that lost a test image's row (cut short at a row boundary, or a line
    deleted) passes check_written_split, which counts train rows only; the identity probe then ended the
    evaluate stage, after every model was scored, in a KeyError traceback naming neither table nor stage."""
    from test_finetune import SYNTH

    from mcf.evaluate.probe import probe_inputs
    from mcf.synth import write_aflw19
    from mcf.synth.writers import IDENTITIES_CSV

    write_aflw19(SYNTH, 0, tmp_path / "aflw19")
    table = pd.read_csv(tmp_path / "aflw19" / IDENTITIES_CSV)
    lost = table[table["split"] == "test"]["name"].iloc[0]
    table[table["name"] != lost].to_csv(tmp_path / "aflw19" / IDENTITIES_CSV, index=False)
    data = AFLW19Config(root=str(tmp_path / "aflw19"), n_train=16, size=32, crop_size=48)
    message = rf"{IDENTITIES_CSV}: no identity for 1 of the \d+ AFLW-19 images, e.g. '{re.escape(lost)}'"
    with pytest.raises(StageError, match=message):
        probe_inputs(data)


def test_an_image_whose_outer_eye_corners_coincide_fails_the_gate_by_name(
    evaluated: tuple[EvaluateConfig, dict, Path],
) -> None:
    """The inter-ocular NME divides by the distance between points 6 and 11: where an annotation puts them
    together, evaluate's aflw19 gate refuses it naming the image (exit 3), before any scoring; numpy's
    ValueError gave a traceback with an index into the scored subset."""
    import scipy.io

    from mcf.data.aflw19 import split_indices

    cfg, _, root = evaluated
    mat_path = root / "aflw19" / "AFLWinfo_release.mat"
    original = mat_path.read_bytes()
    ann = read_mat(root / "aflw19")
    row = split_indices(ann, "full", 16)[2]
    mat = scipy.io.loadmat(str(mat_path))
    for offset in (0, 19):  # x, then y: point 11 onto point 6
        mat["data"][row, 11 + offset] = mat["data"][row, 6 + offset]
    try:
        scipy.io.savemat(str(mat_path), {k: v for k, v in mat.items() if not k.startswith("__")})
        bad = dataclasses.replace(cfg, out=str(root / "bad"), metrics=str(root / "bad.json"))
        named = rf"between\(column=eye_gap\): 1 unexpected .*{re.escape(ann.names[row])}"
        with pytest.raises(GateError, match=named):
            main(Common(seed=0), bad)
    finally:
        mat_path.write_bytes(original)
    assert not (root / "bad").exists() and not (root / "bad.json").exists()


@pytest.mark.parametrize("task", ["alignment", "parsing"])
def test_a_model_whose_output_is_not_finite_is_refused_naming_the_image(
    evaluated: tuple[EvaluateConfig, dict, Path], task: str
) -> None:
    """A model that outputs NaN (weights that diverged, a checkpoint from elsewhere) scored NaN landmarks,
    then failed the metrics' JSON write with a traceback; its parsing argmax read NaN as the top logit."""
    cfg, _, _ = evaluated
    (model, meta), = evaluate_module._checkpoints(getattr(cfg, task), ["mcf"], task).values()
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    if task == "alignment":
        dataset = AFLW19(AFLW19Config(**meta["data"]), "full")
        with pytest.raises(StageError, match=r"output on .+ is not finite \(\d+ of \d+ images"):
            predict_landmarks(model, dataset, 4)
    else:
        dataset = LaPa(LaPaConfig(**meta["data"]), "test")
        with pytest.raises(StageError, match=r"output on test/\S+ is not finite"):
            predict_parsing(model, dataset, 4)


def test_the_parsing_confusion_has_ground_truth_rows(evaluated: tuple[EvaluateConfig, dict, Path],
                                                     tmp_path: Path) -> None:
    """predict_parsing's matrix, which confusion_<variant>.png plots with ground truth down the side, is
    the written maps' against the labels, GT as rows: transposed, every F1 stays the same (2·TP / (#GT +
    #pred) is symmetric), so the F1 checks could not tell."""
    cfg, _, root = evaluated
    (model, meta), = evaluate_module._checkpoints(cfg.parsing, ["mcf"], "parsing").values()
    dataset = LaPa(LaPaConfig(**meta["data"]), "test")
    conf, names = predict_parsing(model, dataset, 4, tmp_path)
    want = sum(M.confusion_matrix(read_png(tmp_path / f"{name}.png"),
                                  read_label(dataset.dir / "labels" / f"{name.split('/')[1]}.png"))
               for name in names)
    assert not np.array_equal(want, want.T)  # else a transposition would pass
    np.testing.assert_array_equal(conf, want)


def test_parsing_logits_are_upsampled_to_the_label_size(evaluated: tuple[EvaluateConfig, dict, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """§4: the 112² logits are upsampled to 512² (``label_size``), the size the model trained against,
    then warped back to each image; not to the input size (448), which the tiny fixtures share with it."""
    from mcf.evaluate import scoring

    cfg, _, _ = evaluated
    (model, meta), = evaluate_module._checkpoints(cfg.parsing, ["mcf"], "parsing").values()
    dataset = LaPa(LaPaConfig(**{**meta["data"], "label_size": 40}), "test")
    assert dataset.cfg.size != 40
    sizes, real = [], scoring.parsing_logits

    def spy(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        sizes.append(size)
        return real(logits, size)

    monkeypatch.setattr(scoring, "parsing_logits", spy)
    predict_parsing(model, dataset, 4)
    assert sizes and set(sizes) == {(40, 40)}


def test_a_model_pt_with_non_finite_weights_is_refused_at_load(
    evaluated: tuple[EvaluateConfig, dict, Path], tmp_path: Path
) -> None:
    """fine-tuning never writes one, but a model.pt from elsewhere can hold NaN weights: evaluate and
    predict (both load through load_finetuned) refuse it naming the file, before any image."""
    from mcf.models.backbone import read_weights
    from mcf.train.finetune import load_finetuned

    cfg, _, _ = evaluated
    ckpt = read_weights(Path(cfg.alignment) / "mcf" / "model.pt")
    ckpt["state_dict"]["classifier.bias"][0] = float("inf")
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(StageError, match=r"model.pt: 1 tensors hold NaN or infinite weights, e.g. "
                                         r"\['classifier.bias'\]"):
        load_finetuned(tmp_path / "model.pt", "alignment")


def test_a_label_with_dollar_signs_is_drawn_as_written(tmp_path: Path) -> None:
    """A dataset label is free text from params: "$\\foo$" in it was parsed as maths, and its unknown
    symbol failed the evaluate stage at its plots, after every prediction; the report's figures too."""
    from mcf.evaluate.plots import plot_ced, plot_confusion
    from mcf.report import figures

    label = "SynthFace $\\foo$"
    plot_ced({"mcf": (np.linspace(0, 0.07, 5), np.linspace(0, 1, 5))}, tmp_path / "ced.png", f"CED, {label}")
    plot_confusion(np.eye(3), ["a", "b", "c"], tmp_path / "confusion.png", label)
    assert read_png(tmp_path / "ced.png").size and read_png(tmp_path / "confusion.png").size
    assert figures.ced_png(pd.DataFrame({"threshold": [0.0, 0.07], "mcf": [0.0, 1.0]}), label)
    assert figures.f1_png(pd.DataFrame({"class": ["skin"], "mcf": [50.0]}), label)


def test_non_finite_probe_features_fail_naming_the_export_and_image(tmp_path: Path) -> None:
    """An export whose features hold NaN (damaged weights) ended the evaluate stage, after every model was
    scored, in scikit-learn's ValueError advising HistGradientBoosting for missing values."""
    from test_finetune import SYNTH

    from mcf.evaluate.probe import ProbeConfig, probe_inputs, run_probes
    from mcf.models.backbone import BackboneConfig, create_backbone, save_backbone
    from mcf.synth import write_aflw19

    write_aflw19(SYNTH, 0, tmp_path / "aflw19")
    inputs = probe_inputs(AFLW19Config(root=str(tmp_path / "aflw19"), n_train=16, size=32, crop_size=48))
    size = BackboneConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    backbone = create_backbone(size)
    with torch.no_grad():
        backbone.norm.weight[3] = float("nan")
    save_backbone(backbone, size, tmp_path / "export")
    first = inputs.train.ann.names[inputs.train.indices[0]]
    with pytest.raises(StageError, match=rf"{tmp_path / 'export'}: .*not finite.*{re.escape(first)}"):
        run_probes({"mcf": str(tmp_path / "export")}, inputs, ProbeConfig(), batch_size=4)


@pytest.fixture
def kept_figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The figures the plot functions draw, kept open (they close them once saved) for their contents."""
    from mcf.evaluate import plots

    figures: list[Any] = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


def test_the_confusion_plot_is_row_normalised_with_ground_truth_down_the_side(
    tmp_path: Path, kept_figures: list[Any]
) -> None:
    """Each row is a ground-truth class's pixels shared over the predicted classes (its cells sum to 1;
    a class absent from the labels is a row of zeros, not NaN), on a fixed 0..1 colour scale, each share
    of 0.5% or more written as a whole percentage in its cell; shares over 50% in white."""
    from mcf.evaluate.plots import plot_confusion

    matrix = np.array([[6, 2, 0, 0], [0, 0, 0, 0], [10, 0, 989, 1], [0, 1, 0, 3]])  # rows: GT
    plot_confusion(matrix, ["a", "b", "c", "d"], tmp_path / "confusion.png", "title")
    (fig,) = kept_figures
    (ax,) = fig.axes
    share = np.array([[0.75, 0.25, 0, 0], [0, 0, 0, 0], [0.01, 0, 0.989, 0.001], [0, 0.25, 0, 0.75]])
    np.testing.assert_allclose(np.ma.filled(ax.images[0].get_array(), np.nan), share)  # NaN is masked
    assert ax.images[0].get_clim() == (0, 1)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "ground truth", "title")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c", "d"]
    cells = {(t.get_position(), t.get_text(), t.get_color()) for t in ax.texts}
    assert cells == {((0, 0), "75", "white"), ((1, 0), "25", "black"), ((0, 2), "1", "black"),
                     ((2, 2), "99", "white"), ((1, 3), "25", "black"), ((3, 3), "75", "white")}  # (x, y)


def test_the_ced_plot_draws_each_curve_as_given(tmp_path: Path, kept_figures: list[Any]) -> None:
    """One line per variant, NME thresholds across and the share of images up, labelled for the legend,
    on a 0..1 scale whatever the curves reach."""
    from mcf.evaluate.plots import plot_ced

    curves = {"mcf": (np.linspace(0, 0.07, 8), np.linspace(0, 0.5, 8)), "scratch": (np.linspace(0, 0.07, 8),
                                                                                     np.zeros(8))}
    plot_ced(curves, tmp_path / "ced.png", "CED")
    (fig,) = kept_figures
    (ax,) = fig.axes
    for line, (label, (thresholds, fractions)) in zip(ax.get_lines(), curves.items(), strict=True):
        assert line.get_label() == label
        np.testing.assert_array_equal(line.get_xdata(), thresholds)
        np.testing.assert_array_equal(line.get_ydata(), fractions)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mcf", "scratch"]
    assert ax.get_ylim() == (0, 1) and ax.get_title() == "CED" and "NME_box" in ax.get_xlabel()


def test_overlay_dots_sit_on_continuous_coordinates_gt_green_under_red_predictions() -> None:
    """Points are continuous coordinates, in which pixel column x spans x..x+1: a dot's centre of mass lies
    within half a pixel of its point. The ground truth is green, the prediction red and drawn over it; a
    dot that only partly touches the image is drawn."""
    image = np.zeros((200, 320, 3), np.uint8)  # a dot of radius 2
    for point in ((11.5, 5.5), (25.3, 17.8), (200.2, 100.7)):
        red = draw_landmarks(image, np.array([point]))[..., 0].astype(float)
        ys, xs = np.mgrid[: red.shape[0], : red.shape[1]] + 0.5
        centre = ((red * xs).sum() / red.sum(), (red * ys).sum() / red.sum())
        assert np.abs(np.subtract(centre, point)).max() <= 0.5, (point, centre)
    both = draw_landmarks(image, np.array([[100.5, 100.5]]), np.array([[100.5, 100.5], [200.5, 50.5]]))
    assert both[100, 100].tolist() == [255, 0, 0] and both[50, 200].tolist() == [0, 255, 0]
    edge = draw_landmarks(image, np.array([[-1.0, 60.5], [320.5, 80.5], [100.5, 200.5]]))
    assert edge[60, 0, 0] > 0 and edge[80, 319, 0] > 0 and edge[199, 100, 0] > 0
    assert not image.any()  # drawn on a copy


def test_label_overlays_blend_half_the_class_colour_and_leave_background_as_it_is() -> None:
    """``alpha`` is the class colour's weight: half by default, the colour alone at 1."""
    from mcf.evaluate.plots import PALETTE, blend_labels

    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [10, 4]])
    out, opaque = blend_labels(image, labels).astype(int), blend_labels(image, labels, alpha=1.0)
    assert out[0, 0].tolist() == opaque[0, 0].tolist() == [100, 100, 100]
    for y, x in ((0, 1), (1, 0), (1, 1)):
        assert np.abs(out[y, x] - (100 + PALETTE[labels[y, x]].astype(int)) / 2).max() <= 1
        assert opaque[y, x].tolist() == PALETTE[labels[y, x]].tolist()


def test_pngs_are_rgb_and_label_files_others_read(tmp_path: Path) -> None:
    """write_png's files are ordinary PNGs (RGB, not OpenCV's BGR; labels one channel of class ids), as the
    report, ``dvc plots`` and people open them; read_png reads back what any writer wrote."""
    from PIL import Image

    from mcf.evaluate.plots import write_png

    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 11
    write_png(tmp_path / "rgb.png", rgb)
    write_png(tmp_path / "labels.png", labels)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)
    with Image.open(tmp_path / "labels.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), labels)
    Image.fromarray(rgb).save(tmp_path / "pil.png")
    assert np.array_equal(read_png(tmp_path / "pil.png"), rgb)
    assert np.array_equal(read_png(tmp_path / "labels.png"), labels)
