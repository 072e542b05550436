"""Find and read one run's files through its params file, and set its numbers beside the paper's.

Every path comes from the params file (``evaluate.metrics``, ``evaluate.out``, ``<stage>.live``), so
the report reads exactly what the pipeline wrote. A piece that is absent (a run stopped before
``evaluate``, a teacher that was loaded rather than trained) raises :class:`Missing`, which the
report shows as a note in place of that section.

Labels: numbers measured by this run carry the dataset label written by ``evaluate`` (on SynthFace,
``SynthFace-AFLW19`` / ``SynthFace-LaPa``); the paper's numbers carry AFLW-19 / LaPa. A run's number is
never shown under the paper's dataset name.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mcf.params import read_yaml

VARIANTS = ("mcf", "scratch")
PAPER_DATASET = {"alignment": "AFLW-19", "parsing": "LaPa"}
F1_CLASSES = ("skin", "left_brow", "right_brow", "left_eye", "right_eye", "nose",
              "upper_lip", "inner_mouth", "lower_lip", "hair")
MISSING = "—"


@dataclass(frozen=True)
class PaperRow:
    """One published system: NME_diag ×100 on AFLW-19 (full, frontal) and F1 mean on LaPa."""

    system: str
    nme_full: float | None
    nme_frontal: float | None
    f1_mean: float | None


# MCF paper (arXiv 2309.03575) and FaRL, as gathered in the project's protocol notes.
PAPER: tuple[PaperRow, ...] = (
    PaperRow("MCF ViT-B/16, 16 ep (paper)", 0.932, None, 93.96),
    PaperRow("FaRL-B ep16 (paper)", 0.943, 0.821, 93.88),
    PaperRow("FaRL-B ep64 (paper)", 0.938, 0.818, 94.04),
)
# FaRL ep16 per-class F1 on LaPa.
FARL_EP16_F1 = dict(zip(F1_CLASSES, (98.00, 92.70, 92.65, 93.97, 93.91, 97.92, 90.15, 91.74, 91.21, 96.52),
                        strict=True))


class Missing(Exception):
    """A piece of the run that is not there; the message is the note the report shows instead."""


@dataclass(frozen=True)
class Run:
    """A run's checkout folder and its parsed params file."""

    root: Path
    params_file: Path
    params: dict[str, Any]

    def path(self, dotted: str) -> Path:
        """The params value at ``dotted`` as a path under the checkout (absolute paths kept)."""
        value: Any = self.params
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                raise Missing(f"{self.params_file.name} has no `{dotted}`")
            value = value[part]
        if not isinstance(value, str):
            raise Missing(f"{self.params_file.name}: `{dotted}` is not a path: {value!r}")
        return self.root / value

    def has(self, dotted: str) -> bool:
        """Whether the params file sets ``dotted``."""
        try:
            self.path(dotted)
        except Missing:
            return False
        return True

    def section(self, name: str) -> dict[str, Any]:
        """The params file's section ``name``; empty when absent or not a mapping (hand-edited), so each
        path read from it is a note (:meth:`path`), not an AttributeError."""
        found = self.params.get(name)
        return found if isinstance(found, dict) else {}

    def variants(self) -> list[str]:
        """The fine-tuned variants the evaluate stage scores."""
        found = self.section("evaluate").get("variants")
        return [str(v) for v in found] if isinstance(found, list) else list(VARIANTS)


def open_run(root: Path, params_file: str | Path = "params.yaml") -> Run:
    """Read the params file (relative to ``root``); a missing file is a :class:`ParamsError`."""
    path = root / params_file
    return Run(root, path, read_yaml(path if str(params_file) else ""))  # "" is empty, not root's folder


def existing(path: Path, what: str) -> Path:
    """``path`` if it exists, else :class:`Missing` saying what was expected there."""
    if not path.exists():
        raise Missing(f"no {what} at {path}")
    return path


# A JSON part's kinds, the first named in the note on a part of another kind.
Shape = tuple[tuple[str, tuple[type, ...]], ...]
OBJECT, LIST, COUNT, NULL = (dict,), (list,), (int,), type(None)
KIND_NAMES = {dict: "a JSON object", list: "a JSON list", int: "a whole number"}
# The parts of the metrics file the report reads as objects, each after its parent; `*` is every key. The
# page reads an absent or null top-level part as empty.
METRICS_SHAPE: Shape = (
    *((key, (dict, NULL)) for key in ("dataset", "alignment", "parsing", "probe")),
    *((key, OBJECT) for key in ("alignment.*", "parsing.*", "probe.*", "alignment.*.full",
                                "alignment.*.frontal", "parsing.*.f1",
                                *(f"{task}.*.best_epoch_on_{split}" for task in ("alignment", "parsing")
                                  for split in ("test", "val")))),
)


def _at(doc: Any, parts: list[str], where: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of each part of ``doc`` that ``parts`` names (``*``: every key or item)."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    found = [(f"{where}{key}", value) for key, value in items if parts[0] in ("*", str(key))]
    if len(parts) == 1:
        return found
    return [hit for key, value in found for hit in _at(value, parts[1:], f"{key}.")]


def misshapen(doc: Any, shape: Shape) -> str | None:
    """What first in ``doc`` is not of its kind in ``shape`` (absent parts are not checked), or None.

    Checked where a file is read, so a hand-edited file is a note and not an AttributeError in the page.
    """
    for dotted, kinds in shape:
        for where, value in _at(doc, dotted.split(".")):
            if not isinstance(value, kinds):
                return f"`{where}` is not {KIND_NAMES[kinds[0]]}"
    return None


def load_metrics(run: Run) -> dict[str, Any]:
    """The evaluate stage's metrics JSON (values ×100, with its ``dataset`` labels)."""
    path = run.path("evaluate.metrics")
    if not path.is_file():
        raise Missing(f"no metrics file at {path}: the run has not reached `evaluate`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # half-written, or not text at all
        raise Missing(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise Missing(f"{path}: expected a JSON object")
    problem = misshapen(data, METRICS_SHAPE)
    if problem:
        raise Missing(f"{path}: {problem}, as `evaluate` writes it")
    return data


def dataset_label(metrics: dict[str, Any], task: str) -> str:
    """The dataset label ``evaluate`` wrote for ``task``; never defaults to the paper's dataset."""
    label = (metrics.get("dataset") or {}).get(task)
    return str(label) if label else "unlabelled data"


def live_dirs(run: Run, stage: str) -> dict[str, Path]:
    """``{run label: dvclive folder}`` for a training stage (fine-tunes: one folder per variant).

    ``<stage>.live`` when the stage has one; the teacher keeps its curves in ``<out>/live``.
    """
    if not run.has(f"{stage}.live"):
        return {stage: run.path(f"{stage}.out") / "live"}
    base = run.path(f"{stage}.live")
    return {v: base / v for v in run.variants()} if stage.startswith("finetune_") else {stage: base}


def read_curves(live: Path) -> dict[str, pd.DataFrame]:
    """Every dvclive series under ``live``: ``{"train/loss": DataFrame(step, value)}``."""
    folder = existing(live / "plots" / "metrics", "dvclive curves")
    curves = {}
    for tsv in sorted(folder.rglob("*.tsv")):
        if not tsv.is_file():  # a folder so named is no series (reading it raised IsADirectoryError)
            continue
        try:
            df = pd.read_csv(tsv, sep="\t")
        except ValueError as err:  # e.g. left empty by a run killed as it began: a note for this run only
            raise Missing(f"{tsv} is unreadable: {err}") from None
        if "step" in df.columns and len(df.columns) >= 2 and len(df):
            text = [c for c in ("step", df.columns[-1]) if not pd.api.types.is_numeric_dtype(df[c])]
            if text:  # drawn as a categorical axis, or a TypeError (text beside a gap) that lost the page
                raise Missing(f"{tsv}: column `{text[0]}` holds text where dvclive writes numbers")
            curves[tsv.relative_to(folder).with_suffix("").as_posix()] = df
    if not curves:
        raise Missing(f"no dvclive series under {folder}")
    return curves


def read_table(path: Path, what: str, key: str, numeric_key: bool = False) -> pd.DataFrame:
    """A CSV written by ``evaluate`` (``plots/ced.csv``, ``plots/f1.csv``): its ``key`` column (numbers
    too with ``numeric_key``: CED thresholds), then one number column per variant.

    One that cannot be read as such is :class:`Missing`, so only its plot becomes a note: the numbers
    beside it come from the metrics file, and a text cell would be drawn as a categorical axis.
    """
    try:
        table = pd.read_csv(existing(path, what))
    except ValueError as err:  # empty or malformed (pandas' EmptyDataError and ParserError)
        raise Missing(f"{path} is unreadable: {err}") from None
    if key not in table.columns:
        raise Missing(f"{path} has no `{key}` column, as `evaluate` writes it")
    numbers = table.columns if numeric_key else table.columns.drop(key)
    text = [c for c in numbers if not pd.api.types.is_numeric_dtype(table[c])]
    if text:
        raise Missing(f"{path}: column `{text[0]}` holds text where `evaluate` writes numbers")
    return table


def stale_outputs(run: Run, metrics: dict[str, Any]) -> str | None:
    """Why ``evaluate.out`` is not from the run that wrote the metrics, or None where nothing says so.

    The metrics file is committed and ``evaluate.out`` DVC-cached: a ``git pull`` or ``git checkout``
    without ``dvc pull`` / ``dvc checkout`` leaves another run's plots, confusion matrices and overlays
    beside these numbers. ``evaluate`` writes both at once, and its CSVs repeat what the metrics hold: the
    CED's share at 0.07 is 1 - FR@0.07, the F1 bars the per-class F1. A CSV that cannot be read tells
    nothing here (its own section notes it).
    """
    def numbers(scores: dict[str, Any]) -> pd.DataFrame:
        return pd.DataFrame(scores).apply(pd.to_numeric, errors="coerce")

    fr = numbers({v: {0.07: (a.get("full") or {}).get("fr_box_0.07")}
                  for v, a in (metrics.get("alignment") or {}).items()})
    f1 = numbers({v: p.get("f1") or {} for v, p in (metrics.get("parsing") or {}).items()})
    plots = run.path("evaluate.out") / "plots"
    for name, what, key, want in (("ced.csv", "CED data", "threshold", 1 - fr / 100),
                                  ("f1.csv", "F1 data", "class", f1)):
        try:
            found = read_table(plots / name, what, key, numeric_key=key == "threshold").set_index(key)
        except Missing:
            continue
        if key == "threshold":
            found = found[np.isclose(found.index, 0.07)].iloc[:1].rename(lambda _: 0.07)
        if sorted(found.columns) != sorted(want.columns) or not np.allclose(
                found.to_numpy(float), want.reindex(index=found.index, columns=found.columns).to_numpy(float),
                atol=1e-6, equal_nan=True):
            return (f"{plots.parent} is not from the run that wrote {run.path('evaluate.metrics')}: its "
                    f"{name} disagrees with the metrics (a `git pull` or `git checkout` without `dvc pull` "
                    "or `dvc checkout`?), so its plots and images are left out")
    return None


# ---------------------------------------------------------------- tables


def fmt(value: Any, digits: int) -> str:
    """A number to ``digits`` decimals; absent or null values as a dash."""
    return MISSING if not isinstance(value, int | float) or isinstance(value, bool) else f"{value:.{digits}f}"


def pretrained_with(params: dict[str, Any]) -> str | None:
    """The pre-training objective when the params switch MCF's off (README's ablations), else None: the
    ``mcf`` variant is whatever pretrain exported, and an MAE baseline must not read as MCF beside the
    paper's MCF row."""
    pretrain = params.get("pretrain")
    model = pretrain.get("model") if isinstance(pretrain, dict) else None
    if not isinstance(model, dict):
        return None
    if model.get("objective") == "pixel_mae":
        return "pixel_mae"
    off = [switch for switch in ("feature_loss", "contrastive") if model.get(switch) is False]
    return f"mcf, {' and '.join(off)} off" if off else None


def variant_label(variant: str, pretrained: str | None) -> str:
    """A variant's name in the tables, with the objective its backbone was pre-trained with if not MCF's."""
    return f"{variant} (pre-trained with {pretrained})" if pretrained and variant == "mcf" else variant


def comparison(
    metrics: dict[str, Any] | None, pretrained: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: this run's variants (their own dataset labels, the ``mcf`` one its objective when
    ``pretrained`` names an ablation), then the paper's systems."""
    headers = ["system", "alignment data", "NME_diag full (×100, lower is better)",
               "NME_diag frontal (×100, lower is better)", "parsing data", "F1 mean (%, higher is better)"]
    rows = []
    if metrics is not None:
        align, parse = metrics.get("alignment") or {}, metrics.get("parsing") or {}
        for variant in sorted(set(align) | set(parse), key=lambda v: (v != "mcf", v)):
            a, p = align.get(variant) or {}, parse.get(variant) or {}
            full, frontal = a.get("full") or {}, a.get("frontal") or {}
            name = variant_label(variant, pretrained)
            rows.append([
                f"this run: {name}", dataset_label(metrics, "alignment"),
                fmt(full.get("nme_diag"), 3), fmt(frontal.get("nme_diag"), 3),
                dataset_label(metrics, "parsing"), fmt(p.get("f1_mean"), 2),
            ])
            # FaRL's selection, as the paper's rows make it; then the epoch picked on validation, at which
            # the test scores stand (when the fine-tune recorded both)
            for split, why in (("test", "best epoch on test"), ("val", "epoch picked on validation")):
                best_a, best_p = a.get(f"best_epoch_on_{split}") or {}, p.get(f"best_epoch_on_{split}") or {}
                if best_a or best_p:
                    rows.append([
                        f"this run, {why}: {name}", dataset_label(metrics, "alignment"),
                        fmt(best_a.get("nme_diag_full"), 3), MISSING,
                        dataset_label(metrics, "parsing"), fmt(best_p.get("f1_mean"), 2),
                    ])
    for row in PAPER:
        rows.append([row.system, PAPER_DATASET["alignment"], fmt(row.nme_full, 3), fmt(row.nme_frontal, 3),
                     PAPER_DATASET["parsing"], fmt(row.f1_mean, 2)])
    return headers, rows


def f1_comparison(
    metrics: dict[str, Any], pretrained: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Per-class F1: one column per variant of this run, then FaRL ep16, each headed by its dataset
    (and ``mcf`` by its objective, as in :func:`comparison`)."""
    parse = metrics.get("parsing") or {}
    if not parse:
        raise Missing("the metrics have no parsing results")
    label = dataset_label(metrics, "parsing")
    variants = sorted(parse, key=lambda v: (v != "mcf", v))
    headers = ["class"] + [f"this run: {variant_label(v, pretrained)} ({label})" for v in variants]
    headers.append(f"FaRL-B ep16 ({PAPER_DATASET['parsing']})")
    rows = [[c] + [fmt((parse[v].get("f1") or {}).get(c), 2) for v in variants] + [fmt(FARL_EP16_F1[c], 2)]
            for c in F1_CLASSES]
    return headers, rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table. Cells may hold free text (a params file's dataset label): HTML
    is escaped and line breaks become spaces, so a cell stays one cell and shows as written."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(" ".join(html.escape(c, quote=False).replace("|", "\\|").split())
                                 for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


LABEL_NOTE = ("Numbers from this run are labelled with the data they were measured on (SynthFace when the "
              "run used SynthFace); the paper's numbers are on AFLW-19 and LaPa. The two are shown side "
              "by side for scale, not as a like-for-like comparison. The paper's numbers take the best "
              "epoch on the test set (FaRL's protocol); this run's 'best epoch on test' rows make the same "
              "optimistic choice, its plain rows are the last epoch.")


def markdown_summary(root: Path, params_file: str = "params.yaml", evaluated: bool = True) -> str:
    """A short markdown summary of a run (metrics against the paper, with dataset labels).

    The Prefect flow publishes it as an artifact, with ``evaluated`` false when its run did not get
    through ``evaluate``: the checkout's metrics file (committed, or left by an earlier run) is then
    not this run's. ``mcf report`` holds the full picture.
    """
    run = open_run(Path(root), params_file)
    lines = ["# mcf run summary", ""]
    try:
        if not evaluated:
            raise Missing("this run did not get through `evaluate`: the checkout's metrics are not its own")
        metrics: dict[str, Any] | None = load_metrics(run)
        labels = f"{dataset_label(metrics, 'alignment')}, {dataset_label(metrics, 'parsing')}"
        lines += [f"Measured on: {labels}.", ""]
    except Missing as gap:
        metrics = None
        lines += [f"No metrics yet: {gap}.", ""]
    lines += [markdown_table(*comparison(metrics, pretrained_with(run.params))), "", LABEL_NOTE]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- data gates


@dataclass(frozen=True)
class GateResult:
    """The latest stored result of one data-gate suite."""

    suite: str
    stage: str
    time: str
    success: bool
    evaluated: int
    passed: int
    failures: list[str]


# The parts of a stored gate result that the report reads (GX's to_json_dict), each after its parent.
GATE_SHAPE: Shape = (
    ("statistics", (dict, NULL)), ("statistics.evaluated_expectations", COUNT),
    ("statistics.successful_expectations", COUNT), ("meta", (dict, NULL)), ("meta.run_id", (dict, NULL)),
    ("results", LIST), ("results.*", OBJECT), ("results.*.expectation_config", (dict, NULL)),
    ("results.*.expectation_config.kwargs", (dict, NULL)), ("results.*.exception_info", (dict, NULL)),
    ("results.*.result", (dict, NULL)), ("results.*.result.partial_unexpected_list", LIST),
    ("results.*.result.unexpected_index_column_names", (list, NULL)),
    ("results.*.result.partial_unexpected_index_list", (list, NULL)),
    # a row's id columns, or its integer index when the table lacks the suite's id column (gate.validate)
    ("results.*.result.partial_unexpected_index_list.*", (dict, int)),
)


def read_gates(run: Run) -> list[GateResult]:
    """Each suite's latest result, as :func:`mcf.validate.gate.run_gate` stores it in the checkout."""
    from mcf.validate.gate import RESULTS_DIR, describe

    folder = existing(run.root / RESULTS_DIR, "data-gate results (no stage has run a gate here)")
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # cut short, or not text: json's message alone names no file
            raise ValueError(f"{path}: not a data-gate result ({err})") from None
        if not isinstance(doc, dict):  # the page notes a ValueError; an AttributeError crashed it
            raise ValueError(f"{path}: not a data-gate result (a JSON object)")
        problem = misshapen(doc, GATE_SHAPE)
        if problem:
            raise ValueError(f"{path}: not a data-gate result as `mcf` stores it ({problem})")
        stats, when = doc.get("statistics") or {}, (doc.get("meta") or {}).get("run_id") or {}
        results.append(GateResult(
            suite=str(doc.get("suite_name") or path.stem), stage=str(when.get("run_name") or "?"),
            time=str(when.get("run_time") or "?"), success=bool(doc.get("success")),
            evaluated=int(stats.get("evaluated_expectations", 0)),
            passed=int(stats.get("successful_expectations", 0)),
            failures=[describe(r) for r in doc.get("results", []) if not r.get("success")],
        ))
    if not results:
        raise Missing(f"no data-gate results in {folder}")
    return results
