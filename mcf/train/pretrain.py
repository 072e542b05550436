"""Stage ``pretrain``: the MCF objective (PROTOCOL.md §1) on the subset's crops.

Reads ``<data>/shards`` (the subset stage) and the frozen teacher exported by the teacher stage,
trains with :mod:`mcf.train.loop` and writes, in one rename, ``<out>/``:

- ``checkpoint.pt``: ``{"model": MCF state dict without the teacher, "backbone": BackboneConfig
  fields, "config": MCFConfig fields}`` (``mcf export`` and ``release.py`` read it);
- ``backbone/``: the online encoder via ``save_backbone`` (what fine-tuning loads);
- ``backbone_init/``: the same encoder as pre-training initialised it (same seed, MAE's init), the
  ``scratch`` baseline's weights: MCF against scratch then measures what pre-training added;

and the dvclive metrics and plots to ``live`` (committed, so ``dvc exp show`` and ``dvc metrics diff``
read them on a clone without the cache).

Resumable state lives in ``resume_dir``, outside the DVC output: DVC deletes a stage's outputs
before running it, which would otherwise throw away the checkpoint of a killed run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import torch
from torch import nn

from mcf.io import file_sha256, save_tensors
from mcf.models.backbone import create_backbone, save_backbone
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.teacher import load_teacher
from mcf.params import Common, ParamsError, require_path
from mcf.train.checkpoint import check_resume_dir
from mcf.train.loop import Run, TrainConfig, model_state, train_and_export

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of params.yaml. ``mask_ratio`` and ``seed`` are top-level keys."""

    data: str = "outputs/subset"  # the subset stage's output; crops are read from <data>/shards
    teacher: str = "outputs/teacher"  # the teacher stage's output (an exported backbone folder)
    out: str = "outputs/pretrain"
    live: str = "metrics/pretrain"  # dvclive folder: a committed, uncached DVC metrics/plots path
    resume_dir: str = "outputs/.resume/pretrain"  # not a DVC output: survives DVC's cleanup
    model: MCFConfig = dataclasses.field(default_factory=MCFConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.uses_contrastive and self.train.batch_size < 2:
            raise ParamsError("train.batch_size", "the contrastive projector's BatchNorm needs at least 2 "
                              f"images per step, got {self.train.batch_size}")

    def check_common(self, common: Common) -> None:
        """The top-level mask ratio leaves a patch visible at this model's size; :func:`mcf.params.load`
        calls it for every stage, so ``mcf fetch`` refuses what would fail only here, hours later."""
        self.model.check_mask_ratio(common.mask_ratio)


def export(model: MCF, out: Path, initial: dict[str, torch.Tensor]) -> None:
    """Write ``checkpoint.pt``, ``backbone/`` and ``backbone_init/`` into the temporary output folder."""
    save_tensors(
        {
            "model": model_state(model),
            "backbone": dataclasses.asdict(model.cfg.backbone),
            "config": dataclasses.asdict(model.cfg),
        },
        out / "checkpoint.pt",
    )
    save_backbone(model.encoder, model.cfg.backbone, out / "backbone")
    start = create_backbone(model.cfg.backbone)
    start.load_state_dict(initial)
    save_backbone(start, model.cfg.backbone, out / "backbone_init")


def check_inputs(cfg: PretrainConfig) -> None:
    """The subset and the teacher export exist (exit 2 otherwise); `mcf` checks before torchrun starts."""
    check_resume_dir(cfg.resume_dir, "pretrain.resume_dir")
    require_path(Path(cfg.data) / "shards", "pretrain.data", made_by="subset")
    if cfg.model.uses_teacher:
        require_path(Path(cfg.teacher) / "backbone.pth", "pretrain.teacher", made_by="teacher")


def teacher_identity(teacher_dir: str | Path) -> list[str | None]:
    """The sha256 of the teacher export's weights and of its ``backbone.json``: the same weights under
    another head count compute other features (a seeded random teacher's weights do not depend on it),
    so a resume must not take them for the teacher its checkpoint was trained against."""
    files = [Path(teacher_dir) / name for name in ("backbone.pth", "backbone.json")]
    return [file_sha256(f) if f.is_file() else None for f in files]


def main(common: Common, cfg: PretrainConfig) -> None:
    """Pre-train with the MCF objective; resume from ``resume_dir`` when a matching checkpoint exists."""
    check_inputs(cfg)
    cfg.check_common(common)  # for a caller that did not load it with mcf.params.load
    identity = {
        "stage": "pretrain", "seed": common.seed, "mask_ratio": common.mask_ratio,
        "model": dataclasses.asdict(cfg.model), "train": cfg.train.identity(),
    }
    if cfg.model.uses_teacher:
        identity["teacher"] = teacher_identity(cfg.teacher)

    initial: dict[str, torch.Tensor] = {}

    def build() -> nn.Module:
        teacher = load_teacher(f"mcf:{cfg.teacher}", cfg.model.backbone) if cfg.model.uses_teacher else None
        model = MCF(cfg.model, teacher, common.seed)  # a resumed run loads its state later
        initial.update({k: v.clone() for k, v in model.encoder.state_dict().items()})
        return model

    run = Run(common.seed, common.mask_ratio, Path(cfg.resume_dir), identity)
    write = functools.partial(export, initial=initial)
    train_and_export(build, cfg.data, cfg.train, run, cfg.out, write, "checkpoint.pt", cfg.live)
    log.info("pretrain: wrote %s", cfg.out)
