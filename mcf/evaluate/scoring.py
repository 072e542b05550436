"""The protocol's numbers for one model: predictions mapped back to original-image pixels, then
NME / AUC / FR (AFLW-19) and per-class F1 (LaPa), ×100.

The evaluate stage reports them for the last epoch; the fine-tunes record the same numbers after each
epoch for the best-epoch selections (:func:`mcf.train.finetune.epoch_scorer`). One piece of code for
both, so the two agree, to float rounding: the fine-tunes score at their training batch size and
evaluate at its own, and a batch of another size may sum in another order (NME_diag 18.42084996 at
batch 4, 18.42084960 at batch 1, on one tiny model).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mcf.data.aflw19 import AFLW19, to_original
from mcf.data.lapa import LaPa, read_label, sample_params, warp_to_original
from mcf.errors import StageError
from mcf.evaluate import metrics as M
from mcf.evaluate import plots
from mcf.models.heads import DenseFaceModel, parsing_logits, soft_argmax

CLASSES = ("background", "skin", "left_brow", "right_brow", "left_eye", "right_eye", "nose",
           "upper_lip", "inner_mouth", "lower_lip", "hair")
THRESHOLD = 0.07


def in_order(dataset: Dataset, batch_size: int, desc: str) -> Iterable[dict[str, Any]]:
    """The dataset's batches in order. The loader has a generator of its own: iterating a DataLoader
    otherwise draws from torch's global one, which a fine-tune scoring each epoch must leave as it is."""
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
    return tqdm(loader, desc=desc, leave=False)


def finite(output: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``output`` of the batch of images ``names``, refused when not finite: NaN landmarks scored NaN and
    failed the metrics' JSON write with a traceback, and argmax reads a NaN logit as the largest."""
    bad = ~torch.isfinite(output.flatten(1)).all(dim=1)
    if bad.any():
        first = names[int(bad.nonzero()[0])]
        raise StageError(f"the model's output on {first} is not finite ({int(bad.sum())} of {len(names)} "
                         "images in its batch): its weights diverged, or the checkpoint is damaged")
    return output


@torch.no_grad()
def predict_landmarks(model: DenseFaceModel, dataset: AFLW19, batch_size: int) -> dict[str, Any]:
    """Original-image predictions ``[N, 19, 2]`` with the names, GT, boxes and visibility; the model
    runs on its own device, without autocast."""
    device = next(model.parameters()).device
    out: dict[str, list[Any]] = {"name": [], "pred": [], "gt": [], "box": [], "visible": []}
    for batch in in_order(dataset, batch_size, "alignment"):
        points = soft_argmax(finite(model(batch["image"].to(device)), batch["name"])).cpu()
        out["pred"].append(to_original(points, batch["matrix"], dataset.cfg.size))
        out["name"] += list(batch["name"])
        for key in ("gt", "box", "visible"):
            out[key].append(batch[key].double().numpy() if key != "visible" else batch[key].numpy())
    return {k: v if k == "name" else np.concatenate(v) for k, v in out.items()}


def alignment_scores(pred: np.ndarray, gt: np.ndarray, box: np.ndarray) -> dict[str, float]:
    """The protocol's alignment numbers (×100) for one set of images; only the count when it is empty
    (a small SynthFace test set may hold no frontal face)."""
    if len(pred) == 0:
        return {"images": 0}
    nme_box = M.nme(pred, gt, "box", box)
    auc, fr = M.auc_fr(nme_box, THRESHOLD)
    return {
        "nme_diag": 100 * float(M.nme(pred, gt, "diag", box).mean()),
        "nme_box": 100 * float(nme_box.mean()),
        "nme_inter_ocular": 100 * float(M.nme(pred, gt, "inter_ocular").mean()),
        "auc_box_0.07": 100 * auc,
        "fr_box_0.07": 100 * fr,
        "images": len(pred),
    }



@torch.no_grad()
def predict_parsing(
    model: DenseFaceModel, dataset: LaPa, batch_size: int, pred_dir: Path | None = None
) -> tuple[np.ndarray, list[str]]:
    """Argmax maps at the original size, written as PNGs under ``pred_dir`` when given; returns the
    summed confusion matrix and the names. The model runs on its own device, without autocast; the warp
    back to each original size on the CPU."""
    device = next(model.parameters()).device
    size = (dataset.cfg.label_size, dataset.cfg.label_size)
    conf = np.zeros((len(CLASSES), len(CLASSES)), dtype=np.int64)
    names: list[str] = []
    for batch in in_order(dataset, batch_size, "parsing"):
        logits = parsing_logits(finite(model(batch["image"].to(device)), batch["name"]), size).cpu()
        for i, name in enumerate(batch["name"]):
            orig = warp_to_original(logits[i], sample_params(batch["params"], i), batch["orig_size"][i])
            pred = orig.argmax(dim=0).numpy().astype(np.uint8)
            split, stem = name.split("/")
            conf += M.confusion_matrix(pred, read_label(dataset.dir / "labels" / f"{stem}.png"), len(CLASSES))
            if pred_dir is not None:
                (pred_dir / split).mkdir(parents=True, exist_ok=True)
                plots.write_png(pred_dir / f"{name}.png", pred)
            names.append(name)
    return conf, names


def _percent(value: float) -> float | None:
    """×100, with NaN (a class absent from both GT and predictions) as JSON ``null``."""
    return None if np.isnan(value) else 100 * float(value)


def parsing_scores(conf: np.ndarray) -> dict[str, Any]:
    """F1 per class and the mean over the 10 non-background classes (×100) from one confusion matrix."""
    f1 = M.f1_per_class(conf)
    return {
        "f1_mean": _percent(M.f1_mean(f1)),
        "f1": {c: _percent(v) for c, v in zip(CLASSES, f1, strict=True)},
        "pixels": int(conf.sum()),
    }
