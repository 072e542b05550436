"""Stage ``evaluate``: score the fine-tuned models (last epoch, EMA weights) by the FaRL protocol.

Every variant's checkpoint (``<alignment>/<variant>/model.pt``, ``<parsing>/<variant>/model.pt``)
is scored on its dataset's test split, rebuilt from the data config saved in the checkpoint: the
last epoch, no epoch picked on the test set. Beside it, labelled ``best_epoch_on_test``, the FaRL-style
number PROTOCOL §3 asks for: the best of the test scores the fine-tune recorded after each epoch
(optimistic, as the epoch is chosen on the test set; the paper's numbers are of this kind). With
``val_each_epoch``, ``best_epoch_on_val``: the epoch chosen on the validation split instead, and the
test score the fine-tune recorded after it (PROTOCOL §3's honest alternative to the last epoch).

Outputs:

- ``metrics`` (JSON, committed, for ``dvc metrics``), values ×100::

    {"dataset": {"alignment": "SynthFace-AFLW19", "parsing": "SynthFace-LaPa"},
     "alignment": {"<variant>": {"full": {"nme_diag", "nme_box", "nme_inter_ocular", "auc_box_0.07",
                                          "fr_box_0.07", "images"}, "frontal": {...},
                                 "best_epoch_on_test": {"nme_diag_full", "epoch", "epochs"},
                                 "best_epoch_on_val": {"nme_diag_val", "nme_diag_full", "epoch", "epochs"}}},
     "parsing": {"<variant>": {"f1_mean", "f1": {"<class>": ...}, "pixels",
                               "best_epoch_on_test": {"f1_mean", "epoch", "epochs"},
                               "best_epoch_on_val": {"f1_mean_val", "f1_mean", "epoch", "epochs"}}},
     "probe": {"<variant>": {"nme_diag", "identity_accuracy"}}}

- ``out``/: ``plots/ced.csv`` (threshold, one column per variant; full split), ``plots/f1.csv`` (class,
  one column per variant), ``ced.png``, ``confusion_<variant>.png``, ``overlays/*.png``, and the
  per-image predictions in original-image coordinates, for anyone to re-score:
  ``predictions/alignment_<variant>.csv`` (name, the image's NME_diag ×100, frontal, x0..x18, y0..y18;
  pixels: the metric traced to each image) and
  ``predictions/parsing_<variant>/<split>/<stem>.png`` (class ids 0..10, original size).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pandas as pd

from mcf.data import aflw19, lapa
from mcf.data.aflw19 import AFLW19, AFLW19Config, read_rgb
from mcf.data.lapa import LaPa, LaPaConfig
from mcf.errors import StageError
from mcf.evaluate import metrics as M
from mcf.evaluate import plots
from mcf.evaluate.probe import ProbeConfig, probe_inputs, run_probes
from mcf.evaluate.scoring import (
    CLASSES,
    THRESHOLD,
    alignment_scores,
    parsing_scores,
    predict_landmarks,
    predict_parsing,
)
from mcf.io import atomic_dir, atomic_file, resolved, unwritable
from mcf.models.heads import DenseFaceModel
from mcf.params import Common, ParamsError, param, require_path
from mcf.synth.writers import is_synthface, names_synthface
from mcf.train.distributed import default_device
from mcf.train.finetune import TEST_SCORE, VAL_SCORE, Task, load_finetuned
from mcf.validate.gate import run_gate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Where the fine-tuned models are, where results go, and how results are labelled."""

    alignment: str = "outputs/finetune_alignment"  # holds <variant>/model.pt
    parsing: str = "outputs/finetune_parsing"
    backbone: str = "outputs/pretrain/backbone"  # the exports the probes read: mcf (pre-trained) ...
    scratch_backbone: str = "outputs/pretrain/backbone_init"  # ... and scratch (pre-training's init)
    out: str = "outputs/evaluate"
    metrics: str = "metrics/evaluate.json"
    variants: list[str] = param(["mcf", "scratch"])
    alignment_label: str = "SynthFace-AFLW19"  # the dataset name written beside the numbers
    parsing_label: str = "SynthFace-LaPa"
    batch_size: int = param(50, ge=1)
    overlays: int = param(4, ge=0)  # example images drawn per task and variant
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in ("mcf", "scratch")]
        if bad or not self.variants or len(set(self.variants)) != len(self.variants):
            raise ParamsError("variants", f"expected distinct names of mcf, scratch; got {self.variants}")
        # checked before scoring: the JSON is written last, and replacing ``out`` deletes what is inside it
        metrics, out = resolved(self.metrics), resolved(self.out)
        if Path(self.metrics).is_dir() or not Path(self.metrics).name:
            raise ParamsError("metrics", f"{self.metrics!r} is a folder: name the JSON file to write")
        if metrics == out or out in metrics.parents:
            raise ParamsError("metrics", f"{self.metrics} is inside evaluate.out {self.out}, which each run "
                              "replaces whole: name a file outside it (metrics/evaluate.json)")


def check_label(label: str, key: str, synthetic: bool) -> None:
    """A label names the data it was measured on: a SynthFace number must never pass as AFLW-19/LaPa,
    and a number on the real data must not be filed as SynthFace (params.yaml's default label)."""
    if not label.strip():
        raise ParamsError(f"evaluate.{key}", "is empty: name the dataset the numbers are measured on")
    if synthetic != names_synthface(label):
        data, need = ("SynthFace", "must") if synthetic else ("not SynthFace", "must not")
        message = f"the data is {data}, so the label {need} contain 'SynthFace', got {label!r}"
        raise ParamsError(f"evaluate.{key}", message)


def require_data(root: str, task: Task) -> None:
    """The data root the models of ``task`` were fine-tuned on (their model.pt names it; dvc.yaml lists it
    as an input) must still be there: a missing one is an input missing (exit 2), not real data whose
    label would then be refused."""
    if not Path(root).exists():
        raise ParamsError(f"evaluate.{task}", f"its models were fine-tuned on {root}, which does not exist "
                          f"(finetune_{task}.data.root when they ran; `mcf fetch` writes it)")


Loaded = dict[str, tuple[DenseFaceModel, dict[str, Any]]]


def _checkpoints(folder: str, variants: list[str], key: Task) -> Loaded:
    """Load ``<folder>/<variant>/model.pt`` for each variant, fine-tuned for ``key`` (the task) as that
    variant (a model copied into another variant's folder would be filed as it), onto the GPU when there
    is one; all must share one data config."""
    loaded = {}
    for variant in variants:
        path = Path(folder) / variant / "model.pt"
        model, meta = load_finetuned(path, key)
        if meta.get("variant") != variant:
            raise StageError(f"{path}: this model was fine-tuned as variant {meta.get('variant')!r}, "
                             f"not {variant!r}")
        loaded[variant] = model.to(default_device()), meta
    datas = {json.dumps(meta["data"], sort_keys=True) for _, meta in loaded.values()}
    if len(datas) != 1:
        raise StageError(f"{folder}: the variants were trained on different data configs: {sorted(datas)}")
    return loaded


def best_epochs(meta: dict[str, Any], best: Callable[..., Any]) -> dict[str, Any]:
    """The epochs picked by the scores the fine-tune recorded after each one (PROTOCOL §3).

    ``best_epoch_on_test``, FaRL's number: the best test score. The epoch is chosen on the test set
    itself, so it is optimistic; the honest number is the last epoch's, which this stage scores itself.
    ``best_epoch_on_val``: the epoch with the best validation score, and the test score after it (when
    both were recorded), an honest pick too. Each entry is left out when its scores were not recorded
    (``test_each_epoch``, ``val_each_epoch``); ``best`` is ``min`` or ``max``, the earliest epoch of a tie.
    """
    task, test = meta["task"], meta.get("test_by_epoch") or []
    picked = {}
    for key, name, scores in (("best_epoch_on_test", TEST_SCORE[task], test),
                              ("best_epoch_on_val", VAL_SCORE[task], meta.get("val_by_epoch") or [])):
        scored = [(v, epoch) for epoch, v in enumerate(scores, 1) if v is not None]
        if scored:
            value, epoch = best(scored, key=lambda pair: pair[0])
            picked[key] = {name: value, "epoch": epoch, "epochs": len(scores)}
    val = picked.get("best_epoch_on_val")
    if val and val["epoch"] <= len(test) and test[val["epoch"] - 1] is not None:
        val[TEST_SCORE[task]] = test[val["epoch"] - 1]
    return picked


# ---------------------------------------------------------------- alignment


def landmark_table(names: list[str], pred: np.ndarray) -> pd.DataFrame:
    """Per-image predictions keyed by image name: columns name, x0..x18, y0..y18 (pixels)."""
    k = pred.shape[1]
    cols = {f"x{i}": pred[:, i, 0] for i in range(k)} | {f"y{i}": pred[:, i, 1] for i in range(k)}
    return pd.DataFrame({"name": names, **cols})


def alignment_inputs(cfg: EvaluateConfig) -> tuple[Loaded, AFLW19]:
    """The alignment models and their test split, checked (data root, label, data gate) without scoring."""
    models = _checkpoints(cfg.alignment, cfg.variants, "alignment")
    data = AFLW19Config(**next(iter(models.values()))[1]["data"])
    require_data(data.root, "alignment")
    table = aflw19.table(data, "full")  # a root that is no AFLW-19 tree is named here, not taken for real
    check_label(cfg.alignment_label, "alignment_label", is_synthface(data.root))
    run_gate(table, "aflw19", stage="evaluate")
    return models, AFLW19(data, "full")


def evaluate_alignment(cfg: EvaluateConfig, out: Path, models: Loaded, dataset: AFLW19) -> dict[str, Any]:
    """Score every alignment variant; write predictions, the CED data and plot, and overlays."""
    results, ced = {}, {}
    for variant, (model, meta) in models.items():
        p = predict_landmarks(model, dataset, cfg.batch_size)
        frontal = p["visible"].all(axis=1)
        results[variant] = {
            "full": alignment_scores(p["pred"], p["gt"], p["box"]),
            "frontal": alignment_scores(p["pred"][frontal], p["gt"][frontal], p["box"][frontal]),
            **best_epochs(meta, min),
        }
        table = landmark_table(p["name"], p["pred"])
        table.insert(1, "nme_diag", 100 * M.nme(p["pred"], p["gt"], "diag", p["box"]))  # ×100, as reported
        table.insert(2, "frontal", frontal)
        table.to_csv(out / "predictions" / f"alignment_{variant}.csv", index=False)
        ced[variant] = M.ced_curve(M.nme(p["pred"], p["gt"], "box", p["box"]), THRESHOLD)
        for i in range(min(cfg.overlays, len(dataset))):
            image = plots.draw_landmarks(read_rgb(dataset.image_path(i)), p["pred"][i], p["gt"][i])
            plots.write_png(out / "overlays" / f"alignment_{variant}_{i}.png", image)
        log.info("alignment %s: %s", variant, results[variant])
    thresholds = next(iter(ced.values()))[0]
    pd.DataFrame({"threshold": thresholds, **{v: f for v, (_, f) in ced.items()}}).to_csv(
        out / "plots" / "ced.csv", index=False)
    plots.plot_ced(ced, out / "ced.png", f"CED, {cfg.alignment_label} full test")
    return results


# ---------------------------------------------------------------- parsing


def parsing_inputs(cfg: EvaluateConfig) -> tuple[Loaded, LaPa]:
    """The parsing models and their test split, checked as :func:`alignment_inputs` checks its own."""
    models = _checkpoints(cfg.parsing, cfg.variants, "parsing")
    data = LaPaConfig(**next(iter(models.values()))[1]["data"])
    require_data(data.root, "parsing")
    table = lapa.table(data, "test")  # as in alignment_inputs: a root that is no LaPa tree is named here
    check_label(cfg.parsing_label, "parsing_label", is_synthface(data.root))
    run_gate(table, "lapa", stage="evaluate")
    return models, LaPa(data, "test")


def evaluate_parsing(cfg: EvaluateConfig, out: Path, models: Loaded, dataset: LaPa) -> dict[str, Any]:
    """Score every parsing variant; write predicted maps, the F1 data, confusion plots and overlays."""
    results = {}
    for variant, (model, meta) in models.items():
        pred_dir = out / "predictions" / f"parsing_{variant}"
        conf, names = predict_parsing(model, dataset, cfg.batch_size, pred_dir)
        results[variant] = {**parsing_scores(conf), **best_epochs(meta, max)}
        plots.plot_confusion(conf, CLASSES, out / f"confusion_{variant}.png",
                             f"{cfg.parsing_label} test, {variant}")
        for i, name in enumerate(names[: cfg.overlays]):
            image = read_rgb(dataset.dir / "images" / f"{name.split('/')[1]}.jpg")
            blended = plots.blend_labels(image, plots.read_png(pred_dir / f"{name}.png"))
            plots.write_png(out / "overlays" / f"parsing_{variant}_{i}.png", blended)
        absent = [c for c, v in results[variant]["f1"].items() if v is None]
        if absent:
            log.warning("parsing %s: %s absent from the test labels and predictions, so out of the F1 mean",
                        variant, ", ".join(absent))
        log.info("parsing %s: F1 mean %s", variant, results[variant]["f1_mean"])
    columns = {v: [r["f1"][c] for c in CLASSES[1:]] for v, r in results.items()}
    pd.DataFrame({"class": CLASSES[1:], **columns}).to_csv(out / "plots" / "f1.csv", index=False)
    return results


# ---------------------------------------------------------------- stage


EXPORT_KEYS = {"mcf": "backbone", "scratch": "scratch_backbone"}  # each variant's pre-training export


def main(common: Common, cfg: EvaluateConfig) -> None:
    """Stage ``evaluate``: alignment, parsing and probes for every variant; outputs written atomically."""
    for task in get_args(Task):  # every input is there before anything is written
        for variant in cfg.variants:
            path = Path(getattr(cfg, task)) / variant / "model.pt"
            require_path(path, f"evaluate.{task}", made_by=f"finetune_{task} --variant {variant}")
    if cfg.probe.enabled:  # the probes read the pre-training exports too
        for variant in cfg.variants:
            key = EXPORT_KEYS[variant]
            require_path(getattr(cfg, key), f"evaluate.{key}", made_by="pretrain")
    # the JSON is written last, after all the scoring (long at paper scale): a bad path is named now
    if (why := unwritable(Path(cfg.metrics).parent)) is not None:
        raise StageError(f"cannot write evaluate.metrics {cfg.metrics}: {why}")
    with atomic_dir(cfg.out, sign="plots") as out:
        # both tasks' models and test data, and the probes' data, checked before anything is scored: a bad
        # parsing or probe input (a data root gone, a label, a lost identity) was found only after the
        # scoring before it. The probes use the data the alignment models were fine-tuned on.
        alignment, parsing = alignment_inputs(cfg), parsing_inputs(cfg)
        probe = probe_inputs(alignment[1].cfg) if cfg.probe.enabled else None
        for sub in ("predictions", "plots", "overlays"):
            (out / sub).mkdir()
        results = {
            "dataset": {"alignment": cfg.alignment_label, "parsing": cfg.parsing_label},
            "alignment": evaluate_alignment(cfg, out, *alignment),
            "parsing": evaluate_parsing(cfg, out, *parsing),
        }
        if probe is not None:
            exports = {v: getattr(cfg, EXPORT_KEYS[v]) for v in cfg.variants}
            results["probe"] = run_probes(exports, probe, cfg.probe, cfg.batch_size)
        with atomic_file(cfg.metrics) as tmp:
            tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    log.info("evaluate: metrics -> %s, outputs -> %s", cfg.metrics, cfg.out)
