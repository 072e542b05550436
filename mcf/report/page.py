"""The report page: one HTML file with every plot and image inlined, so it renders offline.

Each section is built on its own; a piece the run lacks becomes a note in its section rather than
a failed report, because a report is most wanted when a run stopped early. All text is escaped.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable
from pathlib import Path

from mcf.io import PNG_SIGNATURE, atomic_file
from mcf.report import figures
from mcf.report.runfiles import (
    LABEL_NOTE,
    Missing,
    Run,
    comparison,
    dataset_label,
    existing,
    f1_comparison,
    fmt,
    live_dirs,
    load_metrics,
    pretrained_with,
    read_curves,
    read_gates,
    read_table,
    stale_outputs,
    variant_label,
)
from mcf.synth.writers import is_synthface, names_synthface

log = logging.getLogger(__name__)
TRAINING_STAGES = ("teacher", "pretrain", "finetune_alignment", "finetune_parsing")
FINETUNE_TASKS = {"finetune_alignment": "alignment", "finetune_parsing": "parsing"}
ALIGNMENT_KEYS = ("nme_diag", "nme_box", "nme_inter_ocular", "auc_box_0.07", "fr_box_0.07", "images")
ALIGNMENT_SPLITS = ("full", "frontal")  # the scored splits; best_epoch_on_test has its own row
# Each column's unit, as the paper's table names it: the metrics file holds them ×100 (AUC, FR: percent),
# while the CED curve's thresholds, and so the 0.07 in the names, are plain fractions of the box size.
ALIGNMENT_UNITS = {"nme_diag": " (×100)", "nme_box": " (×100)", "nme_inter_ocular": " (×100)",
                   "auc_box_0.07": " (×100)", "fr_box_0.07": " (%)", "images": ""}
STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { background: #fff6d6; border-left: 4px solid #e0b000; padding: 0.5em 0.8em; }
.fail { color: #b00000; font-weight: bold; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; }
img.thumb { width: 160px; image-rendering: pixelated; }
"""


def esc(text: object) -> str:
    """Escape any value for HTML text or an attribute."""
    return html.escape(str(text), quote=True)


def note(text: str) -> str:
    """A visible note standing in for a missing piece."""
    return f'<p class="note">{esc(text)}</p>'


def table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table of plain-text cells."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(png: bytes, alt: str, css: str = "") -> str:
    """An ``<img>`` with the PNG inlined as a data URI (no file or network needed to show it)."""
    if not png.startswith(PNG_SIGNATURE):
        return note(f"{alt}: not a PNG image")
    data = base64.b64encode(png).decode("ascii")
    klass = f' class="{esc(css)}"' if css else ""
    return f'<img{klass} alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def figure(png: bytes, caption: str, css: str = "") -> str:
    """An inlined image with its caption."""
    return f"<figure>{image(png, caption, css)}<figcaption>{esc(caption)}</figcaption></figure>"


# ---------------------------------------------------------------- sections


def params_section(run: Run) -> str:
    """The params file as the run read it."""
    return f"<p>{esc(run.params_file)}</p><pre>{esc(run.params_file.read_text())}</pre>"


def gates_section(run: Run) -> str:
    """The latest result of each data gate, failed expectations spelled out."""
    gates = read_gates(run)
    rows = [[g.suite, g.stage, g.time, "passed" if g.success else "FAILED", f"{g.passed} / {g.evaluated}"]
            for g in gates]
    parts = ["<p>The latest stored result of each suite, with the stage and time it ran.</p>",
             table(["suite", "stage", "time", "result", "expectations passed"], rows)]
    for g in (g for g in gates if g.failures):
        items = "".join(f"<li>{esc(f)}</li>" for f in g.failures)
        parts.append(f'<p class="fail">{esc(g.suite)} failed:</p><ul>{items}</ul>')
    return "".join(parts)


def _curves_title(run: Run, stage: str, curves: set[str]) -> str:
    """A fine-tune's curves hold its test scores (``test_each_epoch``), and its validation scores where
    ``curves`` has ``val/`` series (``val_each_epoch``): they name their data as the evaluate stage labels
    it, so a SynthFace score never reads as an AFLW-19 or LaPa one.

    evaluate's label is of the data it last scored, which need not be what the fine-tune has since read
    (fine-tunes rerun on SynthFace under a real run's "AFLW-19", evaluate then refusing that label). So
    the label stands only when the fine-tune's data root (params), where it is here, is of the same kind,
    SynthFace or not, by evaluate's own rule; else the curves name that root and what it is."""
    task = FINETUNE_TASKS.get(stage)
    if task is None:
        return f"{stage}: training curves"
    try:
        label = dataset_label(load_metrics(run), task)
    except Missing:
        label = dataset_label({}, task)
    root = run.path(f"{stage}.data.root") if run.has(f"{stage}.data.root") else None
    if root is not None and root.exists() and (synthetic := is_synthface(root)) != names_synthface(label):
        label = f"{'SynthFace' if synthetic else 'not SynthFace'} data at {root}"
    scores = "test and validation scores" if any(c.startswith("val/") for c in curves) else "test scores"
    return f"{stage}: training curves, {scores} on {label}"


def _stage_curves(run: Run, stage: str) -> str:
    """One stage's dvclive curves (every variant in one figure), or a note on what is absent."""
    if stage == "teacher":
        source = run.section("teacher").get("source", "train")
        if source != "train":
            return note(f"teacher: loaded from {source!r}, not trained, so it has no curves")
    found, gaps = {}, []
    pretrained = pretrained_with(run.params)  # a fine-tune's `mcf` curves hold test scores of the ablation
    for variant, folder in live_dirs(run, stage).items():
        label = variant_label(variant, pretrained)
        try:
            found[label] = read_curves(folder)
        except Missing as gap:
            gaps.append(f"{stage} ({label}): {gap}")
    title = _curves_title(run, stage, {name for series in found.values() for name in series})
    parts = [figure(figures.curves_png(found, title), title)] if found else []
    return "".join(parts + [note(g) for g in gaps])


def curves_section(run: Run) -> str:
    """Loss (and learning-rate) curves of every training stage, from its dvclive folder."""
    parts = []
    for stage in TRAINING_STAGES:
        try:
            parts.append(f"<h3>{esc(stage)}</h3>{_stage_curves(run, stage)}")
        except Missing as gap:
            parts.append(f"<h3>{esc(stage)}</h3>{note(str(gap))}")
    return "".join(parts)


def ced_section(run: Run) -> str:
    """The CED plot and the alignment numbers behind it, labelled with their dataset."""
    metrics = load_metrics(run)
    label = dataset_label(metrics, "alignment")
    pretrained = pretrained_with(run.params)  # an ablation's NME_diag here too, not under `mcf`
    rows = [[variant_label(variant, pretrained), split, label,
             *(fmt(scores.get(k), 0 if k == "images" else 3) for k in ALIGNMENT_KEYS)]
            for variant, result in (metrics.get("alignment") or {}).items()
            for split, scores in result.items() if split in ALIGNMENT_SPLITS]
    headers = ["variant", "split", "data", *(k + ALIGNMENT_UNITS[k] for k in ALIGNMENT_KEYS)]
    numbers = table(headers, rows) if rows else note("the metrics have no alignment scores")
    try:
        curve = read_table(run.path("evaluate.out") / "plots" / "ced.csv", "CED data", "threshold",
                           numeric_key=True)
    except Missing as gap:  # the metrics are committed, the outputs DVC-cached: a clone not yet pulled
        return note(str(gap)) + numbers
    if stale := stale_outputs(run, metrics):
        return note(stale) + numbers
    curve = curve.rename(columns=lambda c: c if c == "threshold" else variant_label(c, pretrained))
    return figure(figures.ced_png(curve, label), f"CED of NME_box on {label}") + numbers


def f1_section(run: Run) -> str:
    """Per-class F1 bars, the table against FaRL, and the confusion matrices."""
    metrics = load_metrics(run)
    label = dataset_label(metrics, "parsing")
    pretrained = pretrained_with(run.params)
    out = run.path("evaluate.out")
    stale = stale_outputs(run, metrics)
    try:
        if stale:
            raise Missing(stale)
        bars = read_table(out / "plots" / "f1.csv", "F1 data", "class")
        bars = bars.rename(columns=lambda c: c if c == "class" else variant_label(c, pretrained))
        parts = [figure(figures.f1_png(bars, label), f"Per-class F1 on {label}")]
    except Missing as gap:  # as in ced_section: the table below comes from the committed metrics
        parts = [note(str(gap))]
    try:
        parts.append(table(*f1_comparison(metrics, pretrained)))
    except Missing as gap:
        parts.append(note(str(gap)))
    for path in [] if stale else sorted(out.glob("confusion_*.png")):
        variant = variant_label(path.stem.removeprefix("confusion_"), pretrained)
        parts.append(figure(path.read_bytes(), f"{variant}: confusion matrix on {label}"))
    return "".join(parts)


def overlays_section(run: Run) -> str:
    """Prediction overlays written by ``evaluate`` (landmarks: red predicted, green ground truth)."""
    metrics = load_metrics(run)
    folder = existing(run.path("evaluate.out") / "overlays", "overlays")
    if stale := stale_outputs(run, metrics):
        raise Missing(stale)
    parts = []
    for task in ("alignment", "parsing"):
        paths = sorted(folder.glob(f"{task}_*.png"))
        if paths:
            label = dataset_label(metrics, task)
            parts.append(f"<h3>{esc(task)} ({esc(label)})</h3>")
            parts += [figure(p.read_bytes(), f"{p.stem} ({label})", "thumb") for p in paths]
    if not parts:
        raise Missing(f"no overlay images in {folder}")
    legend = "<p>Alignment: predicted points red, ground truth green. Parsing: predicted classes.</p>"
    return legend + "".join(parts)


def paper_section(run: Run) -> str:
    """This run's headline numbers beside the paper's, each row labelled with its dataset."""
    try:
        metrics = load_metrics(run)
        gap = ""
    except Missing as err:
        metrics, gap = None, note(str(err))
    pretrained = pretrained_with(run.params)
    parts = [gap, table(*comparison(metrics, pretrained)), f"<p>{esc(LABEL_NOTE)}</p>"]
    probes = (metrics or {}).get("probe") or {}
    if probes:  # the mcf backbone named by its objective here too, right below the paper's MCF row
        label = dataset_label(metrics or {}, "alignment")
        rows = [[variant_label(v, pretrained), label, fmt(p.get("nme_diag"), 3),
                 fmt(p.get("identity_accuracy"), 2)]
                for v, p in probes.items()]
        parts += ["<h3>Frozen-backbone probes</h3>",
                  table(["backbone", "data", "NME_diag (×100)", "identity accuracy (%)"], rows)]
    return "".join(parts)


SECTIONS: tuple[tuple[str, str, Callable[[Run], str]], ...] = (
    ("params", "Params", params_section),
    ("gates", "Data gates", gates_section),
    ("curves", "Training curves", curves_section),
    ("ced", "CED curve", ced_section),
    ("f1", "Per-class F1", f1_section),
    ("overlays", "Overlays", overlays_section),
    ("paper", "This run against the paper", paper_section),
)


def render(run: Run) -> str:
    """The whole page; a section whose inputs are absent shows a note instead."""
    body = []
    for key, title, build in SECTIONS:
        try:
            content = build(run)
        except Missing as gap:
            log.info("report: %s: %s", key, gap)
            content = note(str(gap))
        except (OSError, ValueError, KeyError) as err:  # a damaged file (pandas and json raise ValueError)
            log.warning("report: %s: %s", key, err)
            content = note(f"could not read this part of the run: {err}")
        body.append(f'<section id="{key}"><h2>{esc(title)}</h2>{content}</section>')
    contents = "".join(f'<li><a href="#{key}">{esc(title)}</a></li>' for key, title, _ in SECTIONS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>mcf run report</title><style>{STYLE}</style></head><body>"
        f"<h1>mcf run report</h1><p>Run described by {esc(run.params_file)}.</p>"
        f"<ul>{contents}</ul>{''.join(body)}</body></html>\n"
    )


def write(run: Run, out: Path) -> Path:
    """Write the page atomically (a half-written report never replaces a complete one)."""
    with atomic_file(out) as tmp:
        tmp.write_text(render(run), encoding="utf-8")
    return out
