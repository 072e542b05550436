"""Linear probes on frozen backbone features: how much face structure the pre-training put in them.

Features are pooled once per image, ``[mean of the patch tokens, CLS]`` after the final norm
(``[N, 2D]``), standardised on the training set, then

- a scikit-learn ``Ridge`` regresses the 19 AFLW-19 landmarks (normalised crop coordinates), scored as
  NME_diag in original-image coordinates;
- a ``LogisticRegression`` predicts the SynthFace identity (when the identities file is present),
  scored as accuracy on the test images whose identity occurs in training.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mcf.data.aflw19 import AFLW19, AFLW19Config, identities_table, to_original
from mcf.errors import StageError
from mcf.evaluate.metrics import nme
from mcf.models.backbone import load_backbone
from mcf.params import param
from mcf.synth.writers import IDENTITIES_CSV  # SynthFace's name → identity table
from mcf.train.distributed import default_device

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Linear probes on the frozen backbones (the ``evaluate.probe`` params)."""

    enabled: bool = True
    ridge_alpha: float = param(10.0, gt=0)
    logreg_c: float = param(1.0, gt=0)
    logreg_max_iter: int = param(100, ge=1)  # SynthFace: 20 steps score as 100 (±0.5 points), 10× faster


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, dataset: Dataset, batch_size: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """``[N, 2D]`` float64 features (mean patch token, CLS; after the final norm) and the items' other
    fields, batched (tensors as NumPy arrays, names as a list). A ViT without a class token gives the
    ``[N, D]`` mean alone: its token 0 is a patch (or register) token, not a CLS."""
    backbone.eval()
    device = next(backbone.parameters()).device
    feats, rest = [], {}
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    cls = getattr(backbone, "has_class_token", True)
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="probe features", leave=False):
        tokens = backbone.forward_features(batch.pop("image").to(device))  # [N, 1 + L, D]
        pooled = [tokens[:, prefix:].mean(dim=1), *([tokens[:, 0]] if cls else [])]
        feats.append(torch.cat(pooled, dim=1).double().cpu().numpy())
        for k, v in batch.items():
            rest.setdefault(k, []).append(v.numpy() if isinstance(v, torch.Tensor) else list(v))
    merged = {k: np.concatenate(v) if isinstance(v[0], np.ndarray) else sum(v, []) for k, v in rest.items()}
    return np.concatenate(feats), merged


def require_finite(x: np.ndarray, names: list[str], export_dir: str) -> None:
    """Refuse an export whose features ``x`` (of the images ``names``) are not finite: scikit-learn's
    NaN error came after every model was scored, named neither export nor image, and advised another
    estimator."""
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise StageError(f"{export_dir}: its features are not finite on {int(bad.sum())} of {len(x)} images, "
                         f"e.g. {names[int(np.argmax(bad))]!r}: its weights diverged or are damaged")


def fit_landmarks(
    train_x: np.ndarray, train_points: np.ndarray, test_x: np.ndarray, alpha: float
) -> np.ndarray:
    """Ridge from features to ``[N, K, 2]`` points; returns the test predictions ``[M, K, 2]``."""
    scaler = StandardScaler().fit(train_x)
    ridge = Ridge(alpha=alpha).fit(scaler.transform(train_x), train_points.reshape(len(train_points), -1))
    return ridge.predict(scaler.transform(test_x)).reshape(len(test_x), *train_points.shape[1:])


def identity_accuracy(
    train_x: np.ndarray, train_ids: np.ndarray, test_x: np.ndarray, test_ids: np.ndarray, c: float,
    max_iter: int = 100,
) -> float | None:
    """Accuracy of a logistic regression on identity over the test images of identities seen in training.

    ``None`` when no test identity occurs in training or training has a single identity.
    """
    seen = np.isin(test_ids, train_ids)
    if not seen.any() or len(np.unique(train_ids)) < 2:  # the metrics then hold null: say why
        why = "no test image has a training identity" if not seen.any() else "training holds one identity"
        log.warning("identity probe not scored: %s", why)
        return None
    scaler = StandardScaler().fit(train_x)
    with warnings.catch_warnings():  # stopping at max_iter is the chosen budget, not a failure
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(train_x), train_ids)
    pred = clf.predict(scaler.transform(test_x[seen]))
    log.info("identity probe: %d of %d test images have a training identity", seen.sum(), len(test_ids))
    return float((pred == test_ids[seen]).mean())


def read_identities(root: str | Path) -> dict[str, int] | None:
    """SynthFace's ``name → identity`` table beside the .mat, or ``None`` when the data has none."""
    path = Path(root) / IDENTITIES_CSV
    if not path.is_file():
        return None
    df = identities_table(root, ["name", "identity"])
    if not pd.api.types.is_integer_dtype(df["identity"]):  # a text or missing identity
        raise StageError(f"{path}: an identity that is not a whole number; rerun `mcf fetch`")
    return dict(zip(df["name"].astype(str), df["identity"], strict=True))


class ProbeData(NamedTuple):
    """What the probes read besides the backbones: AFLW-19 train and full test, and SynthFace's
    identities (``None`` when the data has none)."""

    train: AFLW19
    test: AFLW19
    identities: dict[str, int] | None


def probe_inputs(data: AFLW19Config) -> ProbeData:
    """The probes' data, checked without scoring: every image must have an identity (a lost row was a
    KeyError after all the features), so evaluate can refuse it before anything is scored."""
    train, test = AFLW19(data, "train"), AFLW19(data, "full")
    identities = read_identities(data.root)
    if identities is not None:
        names = [d.ann.names[i] for d in (train, test) for i in d.indices]
        if missing := [n for n in names if n not in identities]:
            raise StageError(f"{Path(data.root) / IDENTITIES_CSV}: no identity for {len(missing)} of the "
                             f"{len(names)} AFLW-19 images, e.g. {missing[0]!r}; rerun `mcf fetch`")
    return ProbeData(train, test, identities)


def run_probes(
    exports: dict[str, str], inputs: ProbeData, cfg: ProbeConfig, batch_size: int
) -> dict[str, dict[str, float | None]]:
    """Probe each variant's frozen backbone (``{variant: export dir}``) on AFLW-19 train → full test.

    Returns ``{variant: {"nme_diag": ×100, "identity_accuracy": ×100 or None}}``.
    """
    train, test, identities = inputs
    size = train.cfg.size
    results: dict[str, dict[str, float | None]] = {}
    for variant, export_dir in exports.items():
        backbone = load_backbone(export_dir, img_size=size).to(default_device())
        x_train, tr = pooled_features(backbone, train, batch_size)
        x_test, te = pooled_features(backbone, test, batch_size)
        require_finite(x_train, tr["name"], export_dir)
        require_finite(x_test, te["name"], export_dir)
        points = fit_landmarks(x_train, tr["landmarks"], x_test, cfg.ridge_alpha)
        pred = to_original(points, te["matrix"], size)
        results[variant] = {"nme_diag": 100 * float(nme(pred, te["gt"], "diag", te["box"]).mean())}
        accuracy = None
        if identities is not None:
            ids_train = np.array([identities[n] for n in tr["name"]])
            ids_test = np.array([identities[n] for n in te["name"]])
            accuracy = identity_accuracy(
                x_train, ids_train, x_test, ids_test, cfg.logreg_c, cfg.logreg_max_iter
            )
        results[variant]["identity_accuracy"] = None if accuracy is None else 100 * accuracy
        log.info("probe %s: %s", variant, results[variant])
    return results
