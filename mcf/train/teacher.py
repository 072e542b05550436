"""Stage ``teacher``: the frozen feature teacher that pretrain's feature loss reads, in one format.

``source`` decides where it comes from:

- ``train`` (when ``source`` is not given): pre-train a ViT with the MAE objective (``pixel_mae``) on
  the subset, with the same loop as pretrain;
- a teacher spec (``moco_v3:<path>``, ``timm:...``, ``mcf:<path>``; see :mod:`mcf.models.teacher`):
  load it and re-save it in our export format. ``data`` then names the spec's weights file: it is the
  stage's DVC dependency, and DVC cannot read a path out of the spec string;
- ``random``: a seeded random ViT of ``backbone``'s size, only when asked for by name, as params.yaml's
  CPU default does (a teacher MAE-trained for the steps that budget allows was worse; see params.yaml).

Either way ``<out>/`` is an exported backbone (``backbone.pth`` + ``backbone.json``), plus
``teacher.json`` (``{"source": ...}``) and, when trained, ``live/`` (dvclive), so pretrain always
loads ``mcf:<out>``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch

from mcf.errors import StageError
from mcf.io import atomic_dir
from mcf.models.backbone import (
    MODEL_NAME,
    BackboneConfig,
    load_backbone,
    read_spec,
    save_backbone,
    save_export,
)
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.release import infer_backbone_config
from mcf.models.teacher import load_teacher, timm_name, validate_teacher_spec, weights_path
from mcf.params import Common, ParamsError, param, require_path
from mcf.train.checkpoint import check_resume_dir, discard_resume
from mcf.train.distributed import MAE_INIT_KEY, barrier, cleanup, derive_seed, init_distributed
from mcf.train.loop import Run, TrainConfig, train_and_export

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The ``teacher`` section of params.yaml (its own mask ratio: the top-level one is pretrain's)."""

    source: str = "train"  # train | random (params.yaml's) | moco_v3:<path> | timm:... | mcf:<path>
    data: str = "outputs/subset"  # the stage's DVC input: the subset (train) or the spec's weights
    out: str = "outputs/teacher"
    resume_dir: str = "outputs/.resume/teacher"  # not a DVC output: survives DVC's cleanup
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    decoder_dim: int = param(512, ge=4)
    decoder_depth: int = param(8, ge=1)
    decoder_heads: int = param(16, ge=1)
    norm_pix_loss: bool = True
    mask_ratio: float = param(0.75, gt=0.0, lt=1.0)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.source != "train":
            try:
                validate_teacher_spec(self.source)
            except ValueError as err:
                raise ParamsError("source", f"{err} (or 'train' to pre-train one with MAE)") from None
            weights = weights_path(self.source)
            if weights is not None and Path(weights) != Path(self.data):
                raise ParamsError(
                    "data", f"must name the weights that source {self.source!r} reads, {weights!r} "
                    f"(not {self.data!r}): dvc.yaml watches teacher.data, so a new checkpoint reruns teacher",
                )
        self.mae_config().check_mask_ratio(self.mask_ratio)  # and the decoder size checks

    def mae_config(self) -> MCFConfig:
        """The MAE model that trains the teacher: pixel loss, no teacher, no contrastive branch."""
        return MCFConfig(
            backbone=self.backbone, decoder_dim=self.decoder_dim, decoder_depth=self.decoder_depth,
            decoder_heads=self.decoder_heads, objective="pixel_mae", norm_pix_loss=self.norm_pix_loss,
        )


def build_mae(cfg: TeacherConfig, seed: int) -> MCF:
    """The MAE that ``train`` trains, initialised from a seed keyed apart from ``seed``: pretrain
    initialises its student from ``seed`` itself, and a teacher trained from the student's own starting
    weights would couple the two."""
    return MCF(cfg.mae_config(), seed=derive_seed(seed, MAE_INIT_KEY))


def export_trained(model: MCF, out: Path) -> None:
    """Write the MAE-trained encoder as the teacher export."""
    save_backbone(model.encoder, model.cfg.backbone, out)
    (out / "teacher.json").write_text(json.dumps({"source": "train"}))


def check_size(spec: str, size: BackboneConfig, backbone: BackboneConfig) -> None:
    """A plain ViT teacher must be of ``teacher.backbone``'s size, which the paper's params name ViT-B/16:
    the weights size the model, so a MoCo v3 ViT-S file in the ViT-B's place would otherwise become the
    teacher of days of pre-training with one info line."""
    def shape(cfg: BackboneConfig) -> dict[str, float]:  # an MLP ratio as the hidden width it builds
        return dataclasses.asdict(cfg) | {"mlp_ratio": int(cfg.embed_dim * cfg.mlp_ratio)}

    differ = [key for key, value in shape(size).items() if value != shape(backbone)[key]]
    if differ:
        def say(cfg: BackboneConfig) -> str:
            return ", ".join(f"{key} {getattr(cfg, key):g}" for key in differ)

        message = f"{spec} holds a ViT of {say(size)}, not this section's {say(backbone)}"
        raise ParamsError("backbone", f"{message}: set teacher.backbone to the checkpoint's size")


def import_teacher(spec: str, backbone: BackboneConfig, out: str | Path) -> None:
    """Load a given teacher and re-save it; the export is read back before the rename."""
    model = load_teacher(spec, backbone).model
    name, weights = timm_name(spec), weights_path(spec)
    size = functools.partial(infer_backbone_config, model.state_dict(), model.blocks[0].attn.num_heads)
    if name is not None:  # the name rebuilds timm's architecture, which the weights' shapes alone do not tell
        export = {"model_name": name, "kwargs": {"num_classes": 0}}
    elif spec.startswith("mcf:") and Path(weights).is_dir():  # an export already names its architecture
        export = read_spec(weights)
    else:
        export = {"model_name": MODEL_NAME, "kwargs": size().timm_kwargs()}
    if export["model_name"] == MODEL_NAME:  # a plain ViT, which teacher.backbone describes
        check_size(spec, size(), backbone)
    with atomic_dir(out, sign="teacher.json") as tmp:
        save_export(model, export, tmp)
        reloaded = load_backbone(tmp)
        for key, value in model.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise ValueError(f"teacher {spec}: weight {key} does not survive the export")
        (tmp / "teacher.json").write_text(json.dumps({"source": spec}))
    log.info("teacher: %s re-saved to %s as %s", spec, out, export)


def check_inputs(cfg: TeacherConfig) -> None:
    """The subset, or the checkpoint a spec names, exists (exit 2 otherwise); `mcf` checks before
    torchrun starts."""
    check_resume_dir(cfg.resume_dir, "teacher.resume_dir")
    if cfg.source == "train":
        require_path(Path(cfg.data) / "shards", "teacher.data", made_by="subset")
    elif weights_path(cfg.source) is not None:  # a file or folder you supply (data.dvc), = teacher.data
        require_path(cfg.data, "teacher.data")


def main(common: Common, cfg: TeacherConfig) -> None:
    """Produce ``<out>/`` from ``cfg.source``."""
    check_inputs(cfg)
    if cfg.source != "train":
        rank = init_distributed()[0]
        try:
            if rank == 0:  # under torchrun, one process writes
                torch.manual_seed(common.seed)  # a `random` teacher is reproducible
                try:
                    import_teacher(cfg.source, cfg.backbone, cfg.out)
                except ParamsError:  # a checkpoint of another size than teacher.backbone's
                    raise
                except ValueError as err:  # a missing, damaged or ill-fitting weights file
                    raise StageError(f"teacher.source {cfg.source!r}: {err}") from None
                discard_resume(cfg.resume_dir)
            barrier()
        finally:
            cleanup()
        return
    identity = {
        "stage": "teacher", "seed": common.seed, "mask_ratio": cfg.mask_ratio,
        "model": dataclasses.asdict(cfg.mae_config()), "train": cfg.train.identity(),
    }

    run = Run(common.seed, cfg.mask_ratio, Path(cfg.resume_dir), identity)
    build = functools.partial(build_mae, cfg, common.seed)
    train_and_export(build, cfg.data, cfg.train, run, cfg.out, export_trained, "teacher.json")
    log.info("teacher: trained with MAE, wrote %s", cfg.out)
