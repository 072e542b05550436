"""``mcf report`` and the markdown summary, on a small run written into a temporary checkout."""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from mcf.cli import main as cli_main
from mcf.io import PNG_SIGNATURE
from mcf.params import ParamsError
from mcf.report import build_report, markdown_summary
from mcf.report.figures import f1_png
from mcf.report.runfiles import Missing, f1_comparison, open_run, read_gates

PARAMS = """\
seed: 0
fetch:
  out: outputs/fetch
  s3:
    endpoint_url: null # e.g. http://127.0.0.1:9000 for MinIO <not a tag>
teacher:
  source: train
  out: outputs/teacher
  live: metrics/teacher
pretrain:
  out: outputs/pretrain
  live: metrics/pretrain
finetune_alignment:
  out: outputs/finetune_alignment
  live: metrics/finetune_alignment
finetune_parsing:
  out: outputs/finetune_parsing
  live: metrics/finetune_parsing
evaluate:
  out: outputs/evaluate
  metrics: metrics/evaluate.json
  variants: [mcf, scratch]
"""

CLASSES = ("skin", "left_brow", "right_brow", "left_eye", "right_eye", "nose",
           "upper_lip", "inner_mouth", "lower_lip", "hair")


def _metrics() -> dict:
    """Distinctive values, so a test can find the row each one sits in."""
    def align(nme: float) -> dict:
        scores = {"nme_diag": nme, "nme_box": 7.0, "nme_inter_ocular": 20.0, "auc_box_0.07": 30.0,
                  "fr_box_0.07": 40.0, "images": 200}
        return {"full": scores, "frontal": {**scores, "nme_diag": nme - 1, "images": 50}}

    def parse(mean: float) -> dict:
        f1 = {"background": 90.0, **{c: mean + i for i, c in enumerate(CLASSES)}}
        f1["hair"] = None  # a class absent from GT and predictions
        return {"f1_mean": mean, "f1": f1, "pixels": 1000}

    return {
        "dataset": {"alignment": "SynthFace-AFLW19", "parsing": "SynthFace-LaPa"},
        "alignment": {"mcf": {**align(5.4321), "best_epoch_on_test": {"nme_diag_full": 5.1234, "epoch": 2,
                                                                       "epochs": 3}},
                      "scratch": align(6.5432)},
        "parsing": {"mcf": {**parse(14.81), "best_epoch_on_test": {"f1_mean": 15.55, "epoch": 3,
                                                                    "epochs": 3}},
                    "scratch": parse(12.34)},
        "probe": {"mcf": {"nme_diag": 9.87, "identity_accuracy": 45.6}},
    }


def _live(folder: Path, series: dict[str, list[float]]) -> None:
    for name, values in series.items():
        tsv = folder / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{5 * (i + 1)}\t{v}\n" for i, v in enumerate(values))
        tsv.write_text(f"step\t{name.rsplit('/', 1)[-1]}\n{rows}")


def _png(path: Path) -> None:
    from mcf.evaluate.plots import write_png

    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, np.full((8, 8, 3), 200, dtype=np.uint8))


def _gate(folder: Path, suite: str, stage: str, success: bool) -> None:
    failed = {
        "success": False,
        "expectation_config": {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "path"}},
        "result": {"unexpected_count": 3, "element_count": 10, "partial_unexpected_list": [None]},
    }
    passed = {"success": True, "expectation_config": {"type": "expect_table_row_count_to_be_between",
                                                      "kwargs": {"min_value": 1}},
              "result": {"observed_value": 10}}
    results = [passed] if success else [passed, failed]
    doc = {
        "success": success, "suite_name": suite, "results": results,
        "statistics": {"evaluated_expectations": len(results),
                       "successful_expectations": sum(r["success"] for r in results)},
        "meta": {"run_id": {"run_name": stage, "run_time": "2026-01-01T00:00:00+00:00"}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{suite}.json").write_text(json.dumps(doc))


def _write_run(tmp_path: Path) -> Path:
    """A checkout holding every file a finished run leaves."""
    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(_metrics()))
    _live(tmp_path / "metrics" / "teacher", {"train/loss": [2.0, 1.0]})
    _live(tmp_path / "metrics" / "pretrain",
          {"train/loss": [84.3, 74.9, 67.9], "train/lr": [1e-3, 2e-3, 1e-4]})
    for task in ("alignment", "parsing"):
        for variant in ("mcf", "scratch"):
            _live(tmp_path / "metrics" / f"finetune_{task}" / variant,
                  {"train/loss": [1.0, 0.5, 0.4], "lr/head": [0.01, 0.005, 0.0],
                   f"test/{'nme_diag_full' if task == 'alignment' else 'f1_mean'}": [7.0, 6.0, 5.5]})
    plots = tmp_path / "outputs" / "evaluate" / "plots"
    plots.mkdir(parents=True)
    thresholds = np.arange(0, 0.0701, 0.01)
    ced = "\n".join(f"{t},{min(0.6, 10 * t)},{min(0.6, 9 * t)}" for t in thresholds)  # at 0.07: 100 - FR
    (plots / "ced.csv").write_text(f"threshold,mcf,scratch\n{ced}\n")
    f1 = _metrics()["parsing"]  # the bars are the per-class F1 the metrics hold, as `evaluate` writes them
    pd.DataFrame({"class": CLASSES, **{v: [f1[v]["f1"][c] for c in CLASSES] for v in f1}}).to_csv(
        plots / "f1.csv", index=False)
    for name in ("alignment_mcf_0", "parsing_scratch_1"):
        _png(tmp_path / "outputs" / "evaluate" / "overlays" / f"{name}.png")
    _png(tmp_path / "outputs" / "evaluate" / "confusion_mcf.png")
    _gate(tmp_path / ".mcf" / "validation", "fetch", "fetch", success=True)
    _gate(tmp_path / ".mcf" / "validation", "lapa", "evaluate", success=False)  # a stage of another name
    return tmp_path


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return _write_run(tmp_path)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The report of a complete run (drawn once: plotting is the slow part)."""
    root = _write_run(tmp_path_factory.mktemp("run"))
    path = build_report(root, out="report/index.html")
    assert path == root / "report" / "index.html"
    return path.read_text(encoding="utf-8")


def _row(table: str, needle: str) -> str:
    """The line of a markdown table holding ``needle``."""
    rows = [line for line in table.splitlines() if needle in line]
    assert len(rows) == 1, rows
    return rows[0]


def test_markdown_summary_labels_each_number_with_its_dataset(run: Path) -> None:
    text = markdown_summary(run)
    mcf, scratch = _row(text, "this run: mcf"), _row(text, "this run: scratch")
    assert "5.432" in mcf and "14.81" in mcf and "6.543" in scratch and "12.34" in scratch
    for row in (mcf, scratch):
        assert "SynthFace-AFLW19" in row and "SynthFace-LaPa" in row
        assert "AFLW-19" not in row and "| LaPa |" not in row
    best = _row(text, "this run, best epoch on test: mcf")  # FaRL's selection, labelled; scratch has none
    assert "5.123" in best and "15.55" in best and "SynthFace-AFLW19" in best
    assert "best epoch on test: scratch" not in text
    paper = _row(text, "MCF ViT-B/16")
    assert "| AFLW-19 |" in paper and "| LaPa |" in paper and "0.932" in paper and "93.96" in paper
    assert "SynthFace" not in paper
    assert "NME_diag full (×100, lower is better)" in text and "F1 mean (%, higher is better)" in text


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("{objective: pixel_mae}", "this run: mcf (pre-trained with pixel_mae)"),
        ("{feature_loss: false}", "this run: mcf (pre-trained with mcf, feature_loss off)"),
        ("{contrastive: false}", "this run: mcf (pre-trained with mcf, contrastive off)"),
    ],
)
def test_an_ablation_does_not_pass_for_mcf_beside_the_papers_mcf(run: Path, model: str, label: str) -> None:
    """The `mcf` variant is whatever pre-training exported: under a README ablation switch its numbers are
    not MCF's, so the rows beside the paper's MCF (and FaRL) name the objective that produced them."""
    params = run / "params.yaml"
    params.write_text(params.read_text().replace("  live: metrics/pretrain\n",
                                                 f"  live: metrics/pretrain\n  model: {model}\n"))
    text, variant = markdown_summary(run), label.removeprefix("this run: ")
    assert "5.432" in _row(text, f"| {label} |") and "5.123" in _row(text, f"best epoch on test: {variant} |")
    assert "this run: mcf |" not in text and "this run: scratch |" in text
    sections = _sections(_page(run))
    paper = _cells(sections["paper"])
    assert [label, "SynthFace-AFLW19", "5.432", "4.432", "SynthFace-LaPa", "14.81"] in paper
    assert [variant, "SynthFace-AFLW19", "9.870", "45.60"] in paper  # the frozen-backbone probe below it
    assert f"{label} (SynthFace-LaPa)" in _cells(sections["f1"])[0]
    # the CED section's alignment table holds the same NME_diag: there too under the objective's name
    ced = [row[:4] for row in _cells(sections["ced"])]
    assert [variant, "full", "SynthFace-AFLW19", "5.432"] in ced and not any(r[0] == "mcf" for r in ced)
    assert f"{variant}: confusion matrix on SynthFace-LaPa" in sections["f1"]


def test_an_ablation_names_its_objective_in_every_plot_legend(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CED and F1 bars and the fine-tunes' curves (test scores among them) draw one line or bar per
    variant: under pixel_mae the `mcf` one is the MAE baseline's and is drawn under its objective's name."""
    from mcf.report import figures

    params = run / "params.yaml"
    switch = "  live: metrics/pretrain\n  model: {objective: pixel_mae}\n"
    params.write_text(params.read_text().replace("  live: metrics/pretrain\n", switch))
    drawn: dict[str, list[str]] = {}

    def record(kind: str, key: str | None) -> Callable[..., bytes]:
        def draw(data: object, *_: object) -> bytes:
            names = list(data) if key is None else [c for c in data.columns if c != key]
            drawn.setdefault(kind, []).extend(names)
            return PNG_SIGNATURE
        return draw

    monkeypatch.setattr(figures, "ced_png", record("ced", "threshold"))
    monkeypatch.setattr(figures, "f1_png", record("f1", "class"))
    monkeypatch.setattr(figures, "curves_png", record("curves", None))
    _page(run)
    label = "mcf (pre-trained with pixel_mae)"
    assert drawn["ced"] == [label, "scratch"] and drawn["f1"] == [label, "scratch"]
    assert drawn["curves"] == ["teacher", "pretrain", label, "scratch", label, "scratch"]


def test_markdown_summary_shows_a_free_text_label_as_written(run: Path) -> None:
    """A dataset label is free text from params: its line break split the table row in two, and its HTML
    reached Prefect's markdown renderer raw."""
    path = run / "metrics" / "evaluate.json"
    metrics = json.loads(path.read_text())
    metrics["dataset"]["alignment"] = "Synth<b>Face</b> | AFLW\nsplit"
    path.write_text(json.dumps(metrics))
    row = _row(markdown_summary(run), "this run: mcf |")
    assert "Synth&lt;b&gt;Face&lt;/b&gt; \\| AFLW split" in row and "<b>" not in row


@pytest.mark.parametrize("damage", [b'{"alignment": ', b"\xff\xfe\x00"])
def test_a_metrics_file_that_does_not_parse_is_a_note(run: Path, damage: bytes) -> None:
    """Cut short or not text at all: a note where the run's rows go, the paper's rows kept (bytes that
    are not UTF-8 raised UnicodeDecodeError, which lost the paper's table and the flow's summary)."""
    (run / "metrics" / "evaluate.json").write_bytes(damage)
    text = markdown_summary(run)
    assert "evaluate.json is not valid JSON" in text and "0.932" in text


def test_markdown_summary_before_evaluate(run: Path) -> None:
    (run / "metrics" / "evaluate.json").unlink()
    text = markdown_summary(run)
    assert "has not reached `evaluate`" in text and "this run:" not in text
    assert "0.932" in text  # the paper's rows stay


def test_markdown_summary_of_a_run_that_did_not_evaluate(run: Path) -> None:
    """A flow run that stopped short (or ran only fetch) must not show the committed metrics as its own."""
    text = markdown_summary(run, evaluated=False)
    assert "this run did not get through `evaluate`" in text and "this run: mcf" not in text


def test_missing_params_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        markdown_summary(tmp_path, "nope.yaml")


def _page(run: Path) -> str:
    return build_report(run, out="report/index.html").read_text(encoding="utf-8")


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="(\w+)">(.*?)</section>', page, flags=re.S))


def test_report_is_self_contained_and_complete(page: str) -> None:
    # Nothing is fetched: every src is an inlined PNG, every href an anchor in the page.
    links = re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', page)
    assert links and all(v.startswith("data:image/png;base64,") for k, v in links if k == "src")
    assert all(v.startswith("#") for k, v in links if k == "href")
    assert not re.search(r"<(script|link|iframe|object|embed)\b|@import|url\(", page, flags=re.I)
    sections = _sections(page)
    assert list(sections) == ["params", "gates", "curves", "ced", "f1", "overlays", "paper"]
    assert not any('class="note"' in sections[k] for k in ("gates", "ced", "f1", "overlays", "paper"))
    # Every inlined image decodes: 4 curve figures, CED, F1, a confusion matrix, 2 overlays.
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 9
    for data in images:
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape[0] > 0
    # The params file is shown as text, escaped (its comment's URL is text, not a link).
    assert "&lt;not a tag&gt;" in sections["params"] and "<not a tag>" not in page
    assert "lapa failed" in sections["gates"] and "3 unexpected of 10" in sections["gates"]
    assert "5.432" in sections["ced"] and "SynthFace-AFLW19" in sections["ced"]
    splits = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td>", sections["ced"])
    assert sorted(splits) == [(v, s) for v in ("mcf", "scratch") for s in ("frontal", "full")]


def test_report_labels_numbers_with_their_dataset(page: str) -> None:
    sections = _sections(page)
    rows = re.findall(r"<tr>(.*?)</tr>", sections["paper"])
    ours = [r for r in rows if "this run: mcf" in r]
    assert len(ours) == 1 and "5.432" in ours[0] and "14.81" in ours[0]
    assert "SynthFace-AFLW19" in ours[0] and "SynthFace-LaPa" in ours[0]
    assert "AFLW-19" not in ours[0] and "<td>LaPa</td>" not in ours[0]
    paper = next(r for r in rows if "MCF ViT-B/16" in r)
    assert "<td>AFLW-19</td>" in paper and "<td>LaPa</td>" in paper and "SynthFace" not in paper
    f1_head = re.findall(r"<th>(.*?)</th>", sections["f1"])
    assert "this run: mcf (SynthFace-LaPa)" in f1_head and "FaRL-B ep16 (LaPa)" in f1_head
    assert "identity accuracy" in sections["paper"] and "45.60" in sections["paper"]


def test_report_labels_the_fine_tunes_test_curves_with_their_dataset(page: str, run: Path) -> None:
    """Each fine-tune's curves hold its test scores on SynthFace: they say so, as the tables do."""
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", _sections(page)["curves"])
    assert "finetune_alignment: training curves, test scores on SynthFace-AFLW19" in captions
    assert "finetune_parsing: training curves, test scores on SynthFace-LaPa" in captions
    assert "pretrain: training curves" in captions
    (run / "metrics" / "evaluate.json").unlink()  # before evaluate: no label to give, none invented
    html = build_report(run, out="report/index.html").read_text(encoding="utf-8")
    assert "finetune_parsing: training curves, test scores on unlabelled data" in html


def test_fine_tune_curves_with_validation_scores_say_so(run: Path) -> None:
    """A fine-tune run with val_each_epoch logs val/ series beside the test ones: the title named test
    scores alone."""
    _live(run / "metrics" / "finetune_parsing" / "scratch", {"val/f1_mean_val": [10.0, 12.0]})
    html = build_report(run, out="report/index.html").read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", _sections(html)["curves"])
    assert "finetune_parsing: training curves, test and validation scores on SynthFace-LaPa" in captions
    assert "finetune_alignment: training curves, test scores on SynthFace-AFLW19" in captions


def test_report_of_a_run_that_stopped_early(run: Path) -> None:
    """Before evaluate (and with a teacher loaded, not trained): notes, not a crash."""
    (run / "metrics" / "evaluate.json").unlink()
    shutil.rmtree(run / "outputs" / "evaluate")
    shutil.rmtree(run / "metrics" / "finetune_parsing")
    params = run / "params.yaml"
    params.write_text(params.read_text().replace("source: train", "source: moco_v3:data/teacher.pth"))
    sections = _sections(_page(run))
    for key in ("ced", "f1", "overlays", "paper"):
        assert "has not reached `evaluate`" in sections[key]
    assert "0.932" in sections["paper"] and "this run:" not in sections["paper"]
    curves = sections["curves"]
    assert "not trained" in curves and "finetune_parsing (scratch): no dvclive curves" in curves
    assert "pretrain: training curves" in curves  # what exists is still shown


def test_report_of_a_checkout_whose_evaluate_outputs_were_not_pulled(run: Path) -> None:
    """A fresh clone has the committed metrics but not the DVC-cached ``outputs/evaluate``: the plots
    become notes, the numbers the metrics hold (alignment table, per-class F1 against FaRL) still show."""
    shutil.rmtree(run / "outputs" / "evaluate")
    sections = _sections(_page(run))
    assert "no CED data" in sections["ced"] and "no F1 data" in sections["f1"]
    splits = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td>", sections["ced"])
    assert sorted(splits) == [(v, s) for v in ("mcf", "scratch") for s in ("frontal", "full")]
    assert "5.432" in sections["ced"] and "SynthFace-AFLW19" in sections["ced"]
    assert "FaRL-B ep16 (LaPa)" in sections["f1"] and "14.81" in sections["f1"]


@pytest.mark.parametrize("newer", [
    lambda m: m["parsing"]["mcf"]["f1"].update(skin=14.82),  # another run's F1 bars, 0.01 apart
    lambda m: m["alignment"]["scratch"]["full"].update({"fr_box_0.07": 35.0}),  # another run's CED
    lambda m: [m[task].pop("scratch") for task in ("alignment", "parsing")],  # another run's variants
], ids=["f1", "ced", "variants"])
def test_evaluate_outputs_of_another_run_than_the_metrics_are_left_out(
    run: Path, newer: Callable[[dict], None]
) -> None:
    """The metrics file is committed, `evaluate.out` DVC-cached: after a `git pull` or `git checkout`
    without `dvc pull` / `dvc checkout` the folder holds another run's CED and F1 data, confusion matrices
    and overlays, which the page drew beside these numbers as theirs. Its CSVs repeat numbers the metrics
    hold (the CED's share at 0.07 is 100 - FR@0.07, the bars the per-class F1): where they disagree, a note
    stands in place of every plot and image from that folder; the numbers of the metrics still show."""
    metrics = _metrics()
    newer(metrics)
    _write_metrics(run, metrics)
    sections = _sections(_page(run))
    for key in ("ced", "f1", "overlays"):
        assert re.search(r"outputs/evaluate is not from the run that wrote \S*metrics/evaluate\.json",
                         sections[key]) and "<img" not in sections[key], sections[key]
    assert ["mcf", "full", "SynthFace-AFLW19", "5.432"] in [row[:4] for row in _cells(sections["ced"])]
    assert ["skin", "14.82" if metrics["parsing"]["mcf"]["f1"]["skin"] == 14.82 else "14.81"] in [
        row[:2] for row in _cells(sections["f1"])]


@pytest.mark.parametrize(("ced", "f1"), [
    ("", ""),  # empty files: a write that never got its bytes in
    ("variant,mcf\n0,0.5\n", "klass,mcf\nskin,50\n"),  # not the key column `evaluate` writes
    ("threshold,mcf\n0,0.5\n0.07,high\n", "class,mcf\nskin,fifty\n"),  # text where a number belongs
    ("threshold,mcf\n0,0.5\nhigh,0.9\n", ""),  # a text threshold: the CED's x axis
])
def test_a_damaged_plot_table_costs_only_its_plot(run: Path, ced: str, f1: str) -> None:
    """A ced.csv or f1.csv that pandas cannot read, or that lacks its key column, replaced the whole
    section with an unnamed error, so the numbers the metrics file holds (and the confusion matrices) went
    with it; text in a number's place was drawn as a categorical axis. Each is a note naming the file."""
    plots = run / "outputs" / "evaluate" / "plots"
    (plots / "ced.csv").write_text(ced)
    (plots / "f1.csv").write_text(f1)
    sections = _sections(_page(run))
    for key, name in (("ced", "ced.csv"), ("f1", "f1.csv")):  # the plot's place: a note naming its file
        first = re.search(r"</h2>(<p class=\"note\">.*?</p>|<figure>)", sections[key]).group(1)
        assert str(plots / name) in first and "could not read this part" not in sections[key]
    assert ["mcf", "frontal", "SynthFace-AFLW19", "4.432", "7.000", "20.000", "30.000", "40.000",
            "50"] in _cells(sections["ced"])
    assert ["skin", "14.81", "12.34", "98.00"] in _cells(sections["f1"])
    assert "mcf: confusion matrix on SynthFace-LaPa" in sections["f1"]


def test_a_damaged_curve_file_costs_only_its_own_runs_curves(run: Path) -> None:
    """An empty dvclive TSV (a run killed as it started) replaced every stage's curves with one note."""
    (run / "metrics" / "teacher" / "plots" / "metrics" / "train" / "loss.tsv").write_text("")
    curves = _sections(_page(run))["curves"]
    assert "loss.tsv is unreadable" in curves and "pretrain: training curves" in curves
    assert "finetune_parsing: training curves" in curves and "could not read this part" not in curves


@pytest.mark.parametrize("rows", ["5\t1.0\n10\tabc\n15\t\n", "5\t1.0\n10\t1.2e-\n"],
                         ids=["text-and-gap", "cut-number"])
def test_text_in_a_curve_file_costs_only_its_own_runs_curves(run: Path, rows: str) -> None:
    """Text in a dvclive series beside an empty cell raised TypeError in matplotlib, which no section
    catches: `mcf report` died with a traceback; text alone drew the loss as a categorical axis."""
    tsv = run / "metrics" / "pretrain" / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.write_text(f"step\tloss\n{rows}")
    curves = _sections(_page(run))["curves"]
    assert f"{tsv}: column `loss` holds text where dvclive writes numbers" in curves
    assert "teacher: training curves" in curves and "finetune_parsing: training curves" in curves
    assert "pretrain: training curves" not in curves and "could not read this part" not in curves


def test_a_folder_named_like_a_curve_file_is_skipped(run: Path) -> None:
    """rglob("*.tsv") also matches folders: reading one raised IsADirectoryError, which replaced every
    stage's curves with one note."""
    (run / "metrics" / "teacher" / "plots" / "metrics" / "extra.tsv").mkdir()
    curves = _sections(_page(run))["curves"]
    assert "teacher: training curves" in curves and "pretrain: training curves" in curves
    assert "could not read this part" not in curves and "extra.tsv" not in curves


def test_report_of_an_empty_checkout(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    sections = _sections(_page(tmp_path))
    assert "has no `evaluate.metrics`" in sections["paper"]
    assert "no data-gate results" in sections["gates"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    assert cli_main(["report", "--root", str(tmp_path), "--out", "r.html"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert "<section id=\"paper\">" in (tmp_path / "r.html").read_text(encoding="utf-8")
    assert cli_main(["report", "--root", str(tmp_path), "--params", "missing.yaml"]) == 2
    assert "params file not found" in capsys.readouterr().err
    assert cli_main(["report", "--root", str(tmp_path), "--params", ""]) == 2  # an unset variable
    assert '"": an empty path' in capsys.readouterr().err  # not "is a folder", of --root
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--root", str(tmp_path), "--out", "."])
    assert exit_.value.code == 2 and "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--root", "--out"])
def test_an_empty_root_or_out_is_a_usage_error_naming_it(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--root "$RUN"`` with the variable unset read the working folder's params.yaml, and ``--out ''``
    said "is a folder ... e.g. /index.html": each is argparse's exit 2 naming its flag."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--root", str(tmp_path), flag, ""])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"argument {flag}: an empty value (an unset variable?)\n")
    assert not (tmp_path / "outputs").exists()


def test_a_rejected_params_file_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The --out folder was made before the params file was read: a mistyped --root or --params, refused
    with exit 2, still left a new outputs/report/ tree (under a --root that did not exist, that too)."""
    root = tmp_path / "typo"
    assert cli_main(["report", "--root", str(root)]) == 2
    assert "params file not found" in capsys.readouterr().err and not root.exists()
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    assert cli_main(["report", "--root", str(tmp_path), "--params", "nope.yaml", "--out", "new/r.html"]) == 2
    assert not (tmp_path / "new").exists()


def test_help_states_the_exit_codes_test_cli_pins(capsys: pytest.CaptureFixture[str]) -> None:
    """0 even when parts of the run are missing; 1 for a full disk and 2 for a bad --out or params file, as
    the other tools."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--help"])
    assert exit_.value.code == 0
    help_ = " ".join(capsys.readouterr().out.split())
    for part in ("Exit status: 0 written (a part of the run that is missing or unreadable is a note",
                 "1 a full disk or a spent quota (one line: free some space and run it again)",
                 "2 bad arguments (an --out that is a folder, an existing file other than an HTML page, or "
                 "cannot be written) or a params file that is missing or not YAML"):
        assert part in help_


def test_an_out_that_cannot_be_written_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out under a file fails before the page is drawn, in one line, not a NotADirectoryError."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--root", str(tmp_path), "--out", "params.yaml/x.html"])
    assert exit_.value.code == 2
    assert f"--out params.yaml/x.html: cannot be written there ({tmp_path}/params.yaml is a file)" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("out", ["x" * 300 + ".html", "x" * 300 + "/r.html"], ids=["file", "folder"])
def test_an_out_named_past_the_file_systems_limit_is_a_usage_error(
    out: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name over 255 bytes (ENAMETOOLONG) raised from the first look at --out: exit 1 and the OS's words
    alone, where the help says 2 for an --out that cannot be written."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--root", str(tmp_path), "--out", out])
    assert exit_.value.code == 2
    assert f"--out {out}: cannot be written there (File name too long)" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["params.yaml", "metrics/evaluate.json", "./params.yaml"])
def test_an_out_that_would_replace_a_run_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    """``--out params.yaml`` replaced the params file with the page; an existing file that is not an HTML
    page is refused untouched, and an existing page is still replaced (a report rewritten)."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        cli_main(["report", "--root", str(tmp_path), "--out", out])
    assert exit_.value.code == 2
    assert f"--out {out}: is a file other than an HTML page" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "r.html").write_text("old page")
    assert cli_main(["report", "--root", str(tmp_path), "--out", "r.html"]) == 0
    assert "<section id=\"paper\">" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_an_out_in_a_read_only_folder_is_a_usage_error_before_the_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder that exists but may not be written (a read-only mount; chmod 555 for a user) passed the
    mkdir check, so the page was drawn and its write failed with a traceback, exit 1, not the help's 2.
    Mounting needs root, as on CI; skipped elsewhere."""
    import subprocess

    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "ro").mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(tmp_path / "ro")],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        with pytest.raises(SystemExit) as exit_:
            cli_main(["report", "--root", str(tmp_path), "--out", "ro/r.html"])
    finally:
        subprocess.run(["umount", "--lazy", str(tmp_path / "ro")], check=True)
    assert exit_.value.code == 2
    assert "--out ro/r.html: cannot be written there (Read-only file system)" in capsys.readouterr().err


def test_a_full_disk_is_one_line_exit_1_as_in_every_command(
    tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The page's write on a full disk: the CLI's one line and exit 1 (a rerun passes once there is
    room), as every stage and tool ends on one; the earlier page stays and no temporary file is left."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (full_disk / "r.html").write_text("old page")
    (full_disk / "fill").write_bytes(b"\0" * (256 * 1024 - 4096))
    assert cli_main(["report", "--root", str(tmp_path), "--out", str(full_disk / "r.html")]) == 1
    # the write of an open file: the OS names no file, and the CLI no folder (as for fetch's full disk)
    err = capsys.readouterr().err
    assert err == f"mcf report: {os.strerror(errno.ENOSPC)}: free some space and run it again\n"
    assert sorted(p.name for p in full_disk.iterdir()) == ["fill", "r.html"]
    assert (full_disk / "r.html").read_text() == "old page"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_at_the_check_of_out_is_exit_1_too(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder whose file system has no inode left, or a user past an inode quota, fails the probe file
    made before the page is drawn: that was exit 2, "cannot be written there", where the page's own
    write on a full disk is exit 1. The probe's full disk is the CLI's one line and exit 1 too."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")

    def full(*_: object, dir: Path, **__: object) -> None:  # noqa: A002 (tempfile's keyword)
        raise OSError(code, os.strerror(code), str(dir / "tmpabc"))

    monkeypatch.setattr("mcf.report.tempfile.TemporaryFile", full)
    assert cli_main(["report", "--root", str(tmp_path), "--out", "r.html"]) == 1
    assert capsys.readouterr().err == (f"mcf report: {os.strerror(code)} under {tmp_path}: free some space "
                                       "and run it again\n")
    assert not (tmp_path / "r.html").exists()


def test_report_with_no_arguments_writes_the_page_the_readme_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: ``mcf report`` in a run's checkout reads ./params.yaml and writes outputs/report/index.html,
    making the folders it needs; ``build_report``'s default is the same page."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["report"]) == 0
    page = tmp_path / "outputs" / "report" / "index.html"
    assert capsys.readouterr().out == "outputs/report/index.html\n"
    assert '<section id="paper">' in page.read_text(encoding="utf-8")
    page.unlink()
    assert build_report(tmp_path) == page and page.is_file()


@pytest.mark.parametrize("out", ["r.htm", "R.HTML"])
def test_an_existing_page_named_htm_or_in_capitals_is_replaced(tmp_path: Path, out: str) -> None:
    """``.htm`` and an upper-case suffix name HTML pages too: refused as "a file other than an HTML page",
    a report written there could not be drawn again."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / out).write_text("old page")
    assert cli_main(["report", "--root", str(tmp_path), "--out", out]) == 0
    assert '<section id="paper">' in (tmp_path / out).read_text(encoding="utf-8")


def test_the_params_file_is_never_replaced_by_its_page_whatever_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A params file with an .html suffix passes the suffix check: the page drawn from it would replace
    it, also when ``--out`` spells its path another way."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "run.html").write_text("seed: 0\n")
    for out in ("run.html", "sub/../run.html"):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["report", "--root", str(tmp_path), "--params", "run.html", "--out", out])
        assert exit_.value.code == 2
        assert f"--out {out}: is a file other than an HTML page" in capsys.readouterr().err
    assert (tmp_path / "run.html").read_text() == "seed: 0\n"


def test_f1_bars_tell_a_class_without_f1_from_an_f1_of_zero() -> None:
    """A class absent from labels and predictions has a null F1; drawn as a zero bar alone, the figure
    showed it as a failed class."""

    def png(value: float) -> bytes:
        return f1_png(pd.DataFrame({"class": ["skin", "hair"], "mcf": [85.0, value]}), "SynthFace-LaPa")

    assert png(float("nan")) != png(0.0)


def _cells(section: str) -> list[list[str]]:
    """Every table row of a section as its cells' text (header rows included)."""
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", section)]


def test_report_tables_put_each_number_in_its_column_with_its_label(page: str) -> None:
    """Whole rows, not substrings: a frontal column showing the full score, the scratch column showing
    mcf's F1, a best-epoch or probe row under the paper's dataset name, each looked right piecewise."""
    sections = _sections(page)
    paper = _cells(sections["paper"])
    assert ["this run: mcf", "SynthFace-AFLW19", "5.432", "4.432", "SynthFace-LaPa", "14.81"] in paper
    assert ["this run: scratch", "SynthFace-AFLW19", "6.543", "5.543", "SynthFace-LaPa", "12.34"] in paper
    assert ["this run, best epoch on test: mcf", "SynthFace-AFLW19", "5.123", "—", "SynthFace-LaPa",
            "15.55"] in paper
    assert ["mcf", "SynthFace-AFLW19", "9.870", "45.60"] in paper  # the frozen-backbone probe
    f1 = _cells(sections["f1"])
    assert f1[0] == ["class", "this run: mcf (SynthFace-LaPa)", "this run: scratch (SynthFace-LaPa)",
                     "FaRL-B ep16 (LaPa)"]
    assert ["skin", "14.81", "12.34", "98.00"] in f1 and ["nose", "19.81", "17.34", "97.92"] in f1
    assert ["hair", "—", "—", "96.52"] in f1
    assert ["mcf", "frontal", "SynthFace-AFLW19", "4.432", "7.000", "20.000", "30.000", "40.000",
            "50"] in _cells(sections["ced"])


def test_a_gate_file_that_is_no_json_object_is_a_note(run: Path) -> None:
    """A list where a gate result belongs raised AttributeError, which the page does not catch."""
    (run / ".mcf" / "validation" / "odd.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="odd.json: not a data-gate result"):
        read_gates(open_run(run))


@pytest.mark.parametrize("damage", [b'{"success": ', b"\xff\xfe\x00"], ids=["cut-short", "not-text"])
def test_a_gate_file_that_does_not_parse_is_a_note_naming_it(run: Path, damage: bytes) -> None:
    """A gate result cut short or not text: the note was json's or the codec's message alone ("Expecting
    value: line 1 column 12"), which named no file among the suites' results."""
    (run / ".mcf" / "validation" / "odd.json").write_bytes(damage)
    gates = _sections(_page(run))["gates"]
    assert re.search(r'<p class="note">could not read this part of the run: \S*odd\.json: not a data-gate '
                     r"result \(", gates), gates


@pytest.mark.parametrize(("where", "damage"), [
    ("alignment", lambda m: m.update(alignment=[1])),
    ("alignment.mcf.full", lambda m: m["alignment"]["mcf"].update(full=5.4)),
    ("parsing.scratch", lambda m: m["parsing"].update(scratch="12.34")),
    ("parsing.mcf.f1", lambda m: m["parsing"]["mcf"].update(f1=[1.0])),
    ("dataset", lambda m: m.update(dataset="SynthFace")),
    ("probe.mcf", lambda m: m["probe"].update(mcf=9.87)),
])
def test_a_metrics_file_of_the_wrong_shape_is_a_note(
    run: Path, where: str, damage: Callable[[dict], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """A JSON object whose parts are not what `evaluate` writes (hand-edited) ended `mcf report` and the
    flow's summary in an AttributeError or TypeError traceback; the report notes it and exits 0."""
    metrics = _metrics()
    damage(metrics)
    (run / "metrics" / "evaluate.json").write_text(json.dumps(metrics))
    assert cli_main(["report", "--root", str(run), "--out", "r.html"]) == 0
    capsys.readouterr()
    sections = _sections((run / "r.html").read_text(encoding="utf-8"))
    for key in ("ced", "f1", "overlays", "paper"):
        assert f"`{where}` is not a JSON object" in sections[key]
    assert "0.932" in sections["paper"] and "this run:" not in sections["paper"]
    assert f"`{where}` is not a JSON object" in markdown_summary(run)


def test_a_null_top_level_metrics_part_reads_as_empty(run: Path) -> None:
    """The page reads an absent or null `probe` (or `dataset`...) as empty: the shape check agrees."""
    (run / "metrics" / "evaluate.json").write_text(json.dumps({**_metrics(), "probe": None, "dataset": None}))
    text = markdown_summary(run)
    assert "this run: mcf" in text and "unlabelled data" in text


@pytest.mark.parametrize(("where", "damage"), [
    ("statistics", lambda d: d.update(statistics=[2, 1])),
    ("statistics.evaluated_expectations", lambda d: d["statistics"].update(evaluated_expectations=None)),
    ("meta.run_id", lambda d: d["meta"].update(run_id="lapa")),
    ("results", lambda d: d.update(results=None)),
    ("results.1", lambda d: d["results"].__setitem__(1, "failed")),
    ("results.1.expectation_config.kwargs", lambda d: d["results"][1]["expectation_config"].update(
        kwargs=["path"])),
    ("results.1.result.partial_unexpected_list", lambda d: d["results"][1]["result"].update(
        partial_unexpected_list=3)),
])
def test_a_gate_result_of_the_wrong_shape_is_a_note(
    run: Path, where: str, damage: Callable[[dict], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """A JSON object whose parts are not what GX stores ended `mcf report` in an AttributeError or
    TypeError traceback; the gates section notes it, the rest of the page stands, exit 0."""
    path = run / ".mcf" / "validation" / "lapa.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    assert cli_main(["report", "--root", str(run), "--out", "r.html"]) == 0
    capsys.readouterr()
    sections = _sections((run / "r.html").read_text(encoding="utf-8"))
    assert f"lapa.json: not a data-gate result as `mcf` stores it (`{where}` is not" in sections["gates"]
    assert "this run: mcf" in sections["paper"]


def test_a_gate_result_without_id_columns_reads(run: Path) -> None:
    """A table without its suite's id column gets no unexpected_index_column_names (gate.validate), and
    GX then lists the failing rows by their integer index: describe() reads that form, so the shape
    check must too (it called the stored result 'not a data-gate result')."""
    from mcf.validate.gate import validate

    table = pd.DataFrame({"split": ["test"] * 2, "width": [1, 0], "label_max": [0, 20]})  # no stem
    doc = validate(table, "lapa").to_json_dict()
    doc["meta"]["run_id"] = {"run_name": "evaluate", "run_time": "2026-01-01T00:00:00+00:00"}
    failed = [r["result"] for r in doc["results"] if "partial_unexpected_index_list" in r["result"]]
    assert failed and all(row == 1 for r in failed for row in r["partial_unexpected_index_list"])
    (run / ".mcf" / "validation" / "lapa.json").write_text(json.dumps(doc))
    lapa = {g.suite: g for g in read_gates(open_run(run))}["lapa"]
    assert not lapa.success and any("column=label_max" in f and "[20]" in f for f in lapa.failures)


@pytest.mark.parametrize("section", ["teacher", "evaluate"])
def test_a_params_section_that_is_no_mapping_is_a_note(
    run: Path, section: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A section that is no mapping (`evaluate: [mcf]`, hand-edited) ended `mcf report` in an
    AttributeError traceback; the paths it lacks are notes, as for an absent section."""
    params = run / "params.yaml"
    text = params.read_text().replace(f"\n{section}:\n", f"\n{section}: [mcf]\nunused_{section}:\n")
    params.write_text(text)
    assert cli_main(["report", "--root", str(run), "--out", "r.html"]) == 0
    capsys.readouterr()
    sections = _sections((run / "r.html").read_text(encoding="utf-8"))
    key = "teacher.out" if section == "teacher" else "evaluate.metrics"
    assert f"params.yaml has no `{key}`" in sections["curves" if section == "teacher" else "paper"]
    assert "pretrain: training curves" in sections["curves"]


def test_report_gate_table_shows_a_failed_suite_as_failed(page: str) -> None:
    """Each suite with the stage that ran it (evaluate ran lapa's): a suite shown as its own stage passed
    while every result's run_name was its suite's."""
    rows = _cells(_sections(page)["gates"])
    when = "2026-01-01T00:00:00+00:00"
    assert rows[1:] == [["fetch", "fetch", when, "passed", "1 / 1"],
                        ["lapa", "evaluate", when, "FAILED", "1 / 2"]]


def test_report_captions_name_the_data_of_every_plot_and_image(page: str) -> None:
    """Every figure of a run's result says which data it shows, so SynthFace never reads as AFLW-19/LaPa."""
    sections = _sections(page)
    captions = {k: re.findall(r"<figcaption>(.*?)</figcaption>", sections[k])
                for k in ("ced", "f1", "overlays")}
    assert captions["ced"] == ["CED of NME_box on SynthFace-AFLW19"]
    assert captions["f1"] == ["Per-class F1 on SynthFace-LaPa", "mcf: confusion matrix on SynthFace-LaPa"]
    assert captions["overlays"] == ["alignment_mcf_0 (SynthFace-AFLW19)",
                                    "parsing_scratch_1 (SynthFace-LaPa)"]


def test_each_fine_tune_variant_reads_its_own_curves(run: Path) -> None:
    shutil.rmtree(run / "metrics" / "finetune_alignment" / "scratch")
    curves = _sections(_page(run))["curves"]
    assert "finetune_alignment (scratch): no dvclive curves" in curves
    assert "finetune_alignment (mcf)" not in curves


def test_only_the_variants_the_params_name_have_curves_to_read(run: Path) -> None:
    """`evaluate.variants: [mcf]`: the fine-tunes ran mcf alone, and no scratch curves are looked for (the
    default pair noted every scratch folder missing)."""
    for task in ("alignment", "parsing"):
        shutil.rmtree(run / "metrics" / f"finetune_{task}" / "scratch")
    params = run / "params.yaml"
    params.write_text(params.read_text().replace("variants: [mcf, scratch]", "variants: [mcf]"))
    curves = _sections(_page(run))["curves"]
    assert "scratch" not in curves and "finetune_parsing: training curves" in curves


def test_summary_names_both_datasets_and_every_variant(run: Path) -> None:
    assert "Measured on: SynthFace-AFLW19, SynthFace-LaPa." in markdown_summary(run)
    metrics = _metrics()
    del metrics["alignment"]["scratch"]  # a variant scored for parsing only still gets its row
    (run / "metrics" / "evaluate.json").write_text(json.dumps(metrics))
    row = _row(markdown_summary(run), "this run: scratch")
    assert "| — | — | SynthFace-LaPa | 12.34 |" in row


def test_the_ced_section_states_its_units_and_draws_the_curve_in_them(
    page: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics hold NME ×100 (nme_box 8.4) but ced.csv's thresholds are fractions (0 to 0.07): the
    table's bare "nme_box" headers beside an axis ending at 0.07 read as one unit, and as the paper
    table's ×100 neither; the headers name their units and the curve is drawn ×100."""
    head = _cells(_sections(page)["ced"])[0]
    assert head[3:] == ["nme_diag (×100)", "nme_box (×100)", "nme_inter_ocular (×100)",
                        "auc_box_0.07 (×100)", "fr_box_0.07 (%)", "images"]
    from mcf.report import figures

    drawn = []
    monkeypatch.setattr(figures, "to_png", lambda fig: drawn.append(fig.axes[0]) or b"")
    figures.ced_png(pd.DataFrame({"threshold": [0.0, 0.035, 0.07], "mcf": [0.0, 0.5, 1.0]}), "SynthFace")
    (line,) = drawn[0].get_lines()
    assert list(line.get_xdata()) == pytest.approx([0.0, 3.5, 7.0])
    assert drawn[0].get_xlabel() == "NME_box (×100)"
    figures.plt.close("all")


def test_fine_tune_curves_on_synthface_never_take_a_real_runs_label(run: Path) -> None:
    """The metrics are of an earlier evaluate on the real data (labelled AFLW-19, LaPa); the fine-tunes
    have since been rerun on SynthFace (evaluate then refuses the real label and stops): their test curves
    are SynthFace numbers and must say so, not borrow the real run's label. And the other way round."""
    metrics = json.loads((run / "metrics" / "evaluate.json").read_text())
    metrics["dataset"] = {"alignment": "AFLW-19", "parsing": "LaPa"}
    (run / "metrics" / "evaluate.json").write_text(json.dumps(metrics))
    params = run / "params.yaml"
    for task in ("alignment", "parsing"):
        (run / "synth" / task).mkdir(parents=True)
        (run / "synth" / task / "synthface_identities.csv").write_text("name,identity\na,0\n")
        params.write_text(params.read_text().replace(
            f"  live: metrics/finetune_{task}\n",
            f"  live: metrics/finetune_{task}\n  data:\n    root: synth/{task}\n"))
    html = build_report(run, out="report/index.html").read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", _sections(html)["curves"])
    for stage in ("finetune_alignment", "finetune_parsing"):
        caption = next(c for c in captions if c.startswith(f"{stage}:"))
        assert "SynthFace" in caption and "AFLW-19" not in caption and "LaPa" not in caption, caption
    # a real data root under the default SynthFace labels: its curves are not filed as SynthFace
    (run / "metrics" / "evaluate.json").write_text(json.dumps(_metrics()))
    for task in ("alignment", "parsing"):
        (run / "synth" / task / "synthface_identities.csv").unlink()
    html = build_report(run, out="report/index.html").read_text(encoding="utf-8")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", _sections(html)["curves"])
    for stage in ("finetune_alignment", "finetune_parsing"):
        caption = next(c for c in captions if c.startswith(f"{stage}:"))
        assert "SynthFace-" not in caption and "not SynthFace" in caption, caption


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the report's plot functions draw, kept open to be read instead of rendered."""
    from mcf.report import figures

    figs: list = []
    monkeypatch.setattr(figures, "to_png", lambda fig: figs.append(fig) or PNG_SIGNATURE)
    return figs


def test_curves_draw_one_panel_per_series_total_loss_first_and_schedules_last(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """One panel per series of any run (a series only one run logged too), the total loss first, then its
    parts and the test scores, then lr and momentum; each run drawn by name with the series' values (the
    file's last column, not its step), and no empty panel left in the grid."""
    from mcf.report import figures

    figs = _drawn(monkeypatch)

    def curve(name: str, values: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"step": [5, 10], name.rsplit("/", 1)[-1]: values})

    names = ["train/momentum", "lr/head", "train/loss_pixel", "train/lr", "test/nme", "train/loss_feature"]
    mcf = {name: curve(name, [float(i), float(i) / 2]) for i, name in enumerate(names)}
    runs = {"mcf": mcf | {"train/loss": curve("train/loss", [9.0, 8.0])},
            "scratch": {"train/loss": curve("train/loss", [7.0, 6.0])}}
    figures.curves_png(runs, "finetune_parsing: training curves, test scores on SynthFace-LaPa")
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["train/loss", "test/nme", "train/loss_feature",
                                                 "train/loss_pixel", "lr/head", "train/lr", "train/momentum"]
    assert fig.get_suptitle() == "finetune_parsing: training curves, test scores on SynthFace-LaPa"
    loss = panels[0]
    assert [line.get_label() for line in loss.get_lines()] == ["mcf", "scratch"]
    assert [list(line.get_ydata()) for line in loss.get_lines()] == [[9.0, 8.0], [7.0, 6.0]]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["mcf", "scratch"]
    assert [list(line.get_ydata()) for line in panels[-1].get_lines()] == [[0.0, 0.0]]
    figures.plt.close("all")


def test_ced_and_f1_figures_name_the_variant_and_dataset_of_every_curve_and_bar(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page shows SynthFace numbers beside the paper's AFLW-19 and LaPa ones: each curve and bar set
    says its variant and dataset, each figure its dataset, and each axis spans its quantity (a fraction,
    an F1 in %)."""
    from mcf.report import figures

    figs = _drawn(monkeypatch)
    figures.ced_png(pd.DataFrame({"threshold": [0.0, 0.07], "mcf": [0.0, 1.0]}), "SynthFace-AFLW19")
    figures.f1_png(pd.DataFrame({"class": ["skin"], "mcf": [85.0], "scratch": [80.0]}), "SynthFace-LaPa")
    ced, f1 = (fig.axes[0] for fig in figs)
    assert [t.get_text() for t in ced.get_legend().get_texts()] == ["mcf (SynthFace-AFLW19)"]
    assert "SynthFace-AFLW19" in ced.get_title() and ced.get_ylim() == (0, 1)
    assert [t.get_text() for t in f1.get_legend().get_texts()] == ["mcf (SynthFace-LaPa)",
                                                                  "scratch (SynthFace-LaPa)"]
    assert "SynthFace-LaPa" in f1.get_title() and f1.get_ylim() == (0, 100)
    figures.plt.close("all")


def test_f1_bars_sit_side_by_side_at_their_class_and_only_a_null_f1_reads_n_a(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each class's bars (one a variant) sit side by side, centred on its labelled tick and clear of the
    next class's; a null F1 is a zero bar marked "n/a", an F1 of 0 a zero bar alone."""
    from mcf.report import figures

    figs = _drawn(monkeypatch)
    table = pd.DataFrame({"class": ["skin", "hair"], "mcf": [85.0, None], "scratch": [80.0, 0.0]})
    figures.f1_png(table, "SynthFace-LaPa")
    ax = figs[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["skin", "hair"]
    assert list(ax.get_xticks()) == [0, 1]
    mcf, scratch = ([(bar.get_x(), bar.get_x() + bar.get_width()) for bar in c] for c in ax.containers)
    for tick, ((left, middle), (start, right)) in enumerate(zip(mcf, scratch, strict=True)):
        assert middle <= start + 1e-9 and (left + right) / 2 == pytest.approx(tick) and right - left < 1
    assert [[bar.get_height() for bar in c] for c in ax.containers] == [[85.0, 0.0], [80.0, 0.0]]
    marks = [(t.get_text(), t.get_position()[0]) for t in ax.texts]
    assert marks == [("n/a", pytest.approx(sum(mcf[1]) / 2))]
    figures.plt.close("all")


def test_report_figures_are_closed_once_drawn_and_take_dollars_as_text() -> None:
    """Each figure is closed once rendered (left open, every report drawn in one process keeps its
    figures); a "$" in the curves' title (a data root's path is quoted in it) is text, not mathtext that
    fails the page."""
    from mcf.report import figures

    before = figures.plt.get_fignums()
    curves = {"mcf": {"train/loss": pd.DataFrame({"step": [5, 10], "loss": [2.0, 1.0]})}}
    png = figures.curves_png(curves, "finetune_parsing: test scores on SynthFace data at /data/$\\foo$")
    assert png.startswith(PNG_SIGNATURE) and figures.plt.get_fignums() == before


def test_a_metrics_path_that_is_no_string_is_a_note(run: Path) -> None:
    """`evaluate.metrics: null` (hand-edited) joined None onto the checkout: a TypeError lost the summary."""
    params = run / "params.yaml"
    params.write_text(params.read_text().replace("metrics: metrics/evaluate.json", "metrics: null"))
    text = markdown_summary(run)
    assert "No metrics yet: params.yaml: `evaluate.metrics` is not a path: None." in text and "0.932" in text


@pytest.mark.parametrize(("damage", "message"), [
    (lambda path: path.mkdir(), "has not reached `evaluate`"),  # a folder where the file belongs
    (lambda path: path.write_text("[1, 2]"), "evaluate.json: expected a JSON object"),
])
def test_a_metrics_file_that_is_no_json_object_is_a_note(
    run: Path, damage: Callable[[Path], None], message: str
) -> None:
    """A folder at the metrics path (IsADirectoryError) or a JSON list (AttributeError on `.get`) ended
    the summary in a traceback; each is a note, the paper's rows kept."""
    path = run / "metrics" / "evaluate.json"
    path.unlink()
    damage(path)
    text = markdown_summary(run)
    assert message in text and "this run:" not in text and "0.932" in text


@pytest.mark.parametrize(("content", "message"), [
    ("step\tloss\n", "no dvclive series under"),  # a header alone: a run killed before its first step
    ("step\tloss\nfirst\t1.0\n", "column `step` holds text where dvclive writes numbers"),
])
def test_a_curve_file_with_no_rows_or_a_text_step_is_a_note(run: Path, content: str, message: str) -> None:
    """A series with no rows is no series (it was named "text where dvclive writes numbers", or drawn as an
    empty panel when it was the only one); a text step would be drawn as a categorical x axis."""
    tsv = run / "metrics" / "teacher" / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.write_text(content)
    curves = _sections(_page(run))["curves"]
    teacher = curves.split("<h3>pretrain</h3>")[0]
    assert message in teacher and "<figure>" not in teacher and "pretrain: training curves" in curves


def _write_metrics(run: Path, metrics: dict) -> None:
    (run / "metrics" / "evaluate.json").write_text(json.dumps(metrics))


def test_the_mcf_variant_comes_first_whatever_the_others_are_named(run: Path) -> None:
    """The `mcf` rows and F1 column lead, beside the paper's MCF row: sorting by name put a variant named
    "baseline" first (the scratch one sorts after mcf by chance)."""
    metrics = _metrics()
    metrics["alignment"]["baseline"] = metrics["alignment"]["scratch"]
    metrics["parsing"]["baseline"] = metrics["parsing"]["scratch"]
    _write_metrics(run, metrics)
    names = re.findall(r"^\| this run: (\w+) \|", markdown_summary(run), flags=re.M)
    assert names == ["mcf", "baseline", "scratch"]
    headers, _ = f1_comparison(metrics)
    assert headers[1:4] == [f"this run: {v} (SynthFace-LaPa)" for v in ("mcf", "baseline", "scratch")]


def test_a_best_epoch_for_parsing_alone_still_gets_its_row(run: Path) -> None:
    """FaRL's best-epoch selection scored for parsing only (alignment not fine-tuned with test_each_epoch)
    lost its row: both tasks' best epochs were read off the alignment part."""
    metrics = _metrics()
    del metrics["alignment"]["mcf"]["best_epoch_on_test"]
    _write_metrics(run, metrics)
    row = _row(markdown_summary(run), "this run, best epoch on test: mcf")
    assert row == "| this run, best epoch on test: mcf | SynthFace-AFLW19 | — | — | SynthFace-LaPa | 15.55 |"


def test_the_epoch_picked_on_validation_gets_its_row_after_farls(run: Path) -> None:
    """With val_each_epoch, evaluate records the epoch picked on the validation split and the test score
    after it: the honest pick stands in its own row, after FaRL's, with the test numbers; a metrics file
    whose pick is of the wrong kind is a note, as every other part of it."""
    metrics = _metrics()
    metrics["alignment"]["mcf"]["best_epoch_on_val"] = {"nme_diag_val": 4.9, "nme_diag_full": 5.2468,
                                                         "epoch": 1, "epochs": 3}
    _write_metrics(run, metrics)
    text = markdown_summary(run)
    row = _row(text, "this run, epoch picked on validation: mcf")
    assert row == ("| this run, epoch picked on validation: mcf | SynthFace-AFLW19 | 5.247 | — "
                   "| SynthFace-LaPa | — |")
    assert text.index("best epoch on test: mcf") < text.index("epoch picked on validation: mcf")
    metrics["parsing"]["mcf"]["best_epoch_on_val"] = [15.0]
    _write_metrics(run, metrics)
    assert "parsing.mcf.best_epoch_on_val" in markdown_summary(run)


def test_per_class_f1_without_parsing_results_is_missing_not_an_empty_column() -> None:
    """Metrics scored for alignment only: the F1 table would hold FaRL's column alone, as if compared."""
    with pytest.raises(Missing, match="the metrics have no parsing results"):
        f1_comparison({"dataset": {"parsing": "SynthFace-LaPa"}, "alignment": _metrics()["alignment"]})


def test_the_summary_table_has_one_delimiter_cell_per_column(run: Path) -> None:
    """GitHub-flavoured markdown renders a table only when its delimiter row has a cell per header cell:
    with fewer, Prefect's artifact showed the table as lines of text."""
    lines = [line for line in markdown_summary(run).splitlines() if line.startswith("|")]
    assert lines[1] == "| " + " | ".join(["---"] * 6) + " |" and lines[0].count(" | ") == 5


def test_an_empty_gate_results_folder_is_a_note(run: Path) -> None:
    """A results folder with no results (cleared by hand) drew an empty gate table that read as "no gate
    failed"; it is a note saying so."""
    for path in (run / ".mcf" / "validation").glob("*.json"):
        path.unlink()
    with pytest.raises(Missing, match="no data-gate results in .*validation"):
        read_gates(open_run(run))


def test_page_text_from_the_run_is_escaped_in_cells_notes_and_attributes(run: Path) -> None:
    """A dataset label and a teacher source are free text from the run's files: unescaped, a `<b>` in a
    table cell or a note became markup, and a quote ended an image's alt attribute early."""
    metrics = _metrics()
    metrics["dataset"]["alignment"] = 'Synth<b>"Face</b>'
    _write_metrics(run, metrics)
    params = run / "params.yaml"
    params.write_text(params.read_text().replace("source: train", "source: moco<v3>"))
    page = _page(run)
    label = "Synth&lt;b&gt;&quot;Face&lt;/b&gt;"
    assert f'alt="CED of NME_box on {label}"' in page
    assert ["this run: mcf", label, "5.432", "4.432", "SynthFace-LaPa", "14.81"] in _cells(
        _sections(page)["paper"])
    assert "teacher: loaded from &#x27;moco&lt;v3&gt;&#x27;, not trained" in _sections(page)["curves"]
    assert "<b>" not in page and "<v3>" not in page


def test_an_image_that_is_no_png_is_a_note_not_an_inlined_image(run: Path) -> None:
    """A confusion matrix that is not PNG bytes (cut short, or another format) was inlined as a broken
    image/png data URI; it is a note naming it."""
    (run / "outputs" / "evaluate" / "confusion_scratch.png").write_bytes(b"GIF89a not a png")
    f1 = _sections(_page(run))["f1"]
    assert "scratch: confusion matrix on SynthFace-LaPa: not a PNG image" in f1
    assert len(re.findall(r"<img ", f1)) == 2  # the F1 bars and mcf's confusion matrix


def test_a_fine_tune_data_root_not_here_keeps_evaluates_label(run: Path) -> None:
    """A data root named in params but absent here (a clone without the data) is no evidence of its kind:
    the curves keep evaluate's label rather than call the data "not SynthFace"."""
    params = run / "params.yaml"
    live = "  live: metrics/finetune_parsing\n"
    params.write_text(params.read_text().replace(live, f"{live}  data:\n    root: absent\n"))
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", _sections(_page(run))["curves"])
    assert "finetune_parsing: training curves, test scores on SynthFace-LaPa" in captions


def test_no_alignment_scores_or_no_overlay_images_are_notes(run: Path) -> None:
    """Metrics scored for parsing only drew an alignment table of headers alone, and an overlays folder
    with no images an empty section: each says what is missing."""
    from mcf.report import page

    metrics = _metrics()
    del metrics["alignment"]
    _write_metrics(run, metrics)
    assert '<p class="note">the metrics have no alignment scores</p>' in page.ced_section(open_run(run))
    _write_metrics(run, _metrics())  # with the outputs' own metrics: they are not another run's
    for png in (run / "outputs" / "evaluate" / "overlays").glob("*.png"):
        png.unlink()
    with pytest.raises(Missing, match="no overlay images in .*overlays"):
        page.overlays_section(open_run(run))


def test_contents_link_to_their_sections_and_overlays_are_thumbnails(page: str) -> None:
    """Each contents entry must jump to its section (an href that is no section id goes nowhere), and
    overlays are drawn at thumbnail size (a few pixels wide each, inlined at full width they fill pages)."""
    assert re.findall(r'<a href="#(\w+)">', page) == list(_sections(page))
    overlays = _sections(page)["overlays"]
    assert len(re.findall(r'<img class="thumb" ', overlays)) == 2 and "<img alt" not in overlays
