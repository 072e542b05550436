"""Stages ``finetune_alignment`` and ``finetune_parsing``: the FaRL downstream protocol (PROTOCOL.md §3–4).

The same loop serves both tasks and both variants (``mcf``: the pre-trained export; ``scratch``: the same
ViT as pre-training initialised it, before any step), so the only difference between the variants is
what pre-training did to the backbone's weights.

Output folder ``<out>/<variant>/``:

- ``model.pt``: the EMA weights and everything needed to rebuild the model (:func:`load_finetuned`):
  ``{"task", "variant", "data" (the dataset config without augmentation: root, size, ...), "backbone":
  {"model_name", "kwargs"}, "head" (HeadConfig fields), "state_dict", "epochs", "steps",
  "test_by_epoch", "val_by_epoch"}`` (with ``test_each_epoch``, the :data:`TEST_SCORE` after each epoch,
  from which the evaluate stage picks ``best_epoch_on_test``; with ``val_each_epoch``, the
  :data:`VAL_SCORE`, from which it picks ``best_epoch_on_val``; each empty without its switch), with no
  wall time or date, so that equal weights give equal bytes (and DVC skips what depends on them);

and ``<live>/<variant>/``: dvclive curves per epoch (``train/loss`` and its parts, ``lr/head`` and, with
the switches, ``test/<TEST_SCORE>`` and ``val/<VAL_SCORE>``), a committed path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mcf.data import aflw19, lapa
from mcf.data.aflw19 import AFLW19, AFLW19Config
from mcf.data.lapa import LaPa, LaPaConfig
from mcf.errors import StageError
from mcf.evaluate.scoring import alignment_scores, parsing_scores, predict_landmarks, predict_parsing
from mcf.io import LIVE_SIGN, atomic_dir, atomic_file, check_output, file_sha256, save_tensors
from mcf.models.backbone import build_vit, load_backbone, read_spec, read_weights
from mcf.models.heads import DenseFaceModel, HeadConfig, Variant, parsing_logits, soft_argmax
from mcf.models.heads import gaussian_heatmaps as heatmap_targets
from mcf.params import Common, ParamsError, build, param, require_path
from mcf.train.checkpoint import (
    check_resume_dir,
    discard_resume,
    load_checkpoint,
    nonfinite,
    rng_state,
    run_hash,
    save_checkpoint,
    set_rng_state,
    truncate_live,
    weights_digest,
)
from mcf.train.distributed import default_device, resolve_dtype
from mcf.train.ema import EMA
from mcf.validate.gate import run_gate

log = logging.getLogger(__name__)
Task = Literal["alignment", "parsing"]
NUM_OUTPUTS: dict[str, int] = {"alignment": 19, "parsing": 11}  # heatmaps / LaPa classes
LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What both fine-tuning stages share. Defaults: the paper's optimiser, a CPU-sized model."""

    backbone: str = "outputs/pretrain/backbone"  # the `mcf` variant's export (architecture, weights)
    scratch_backbone: str = "outputs/pretrain/backbone_init"  # `scratch`: pre-training's initial weights
    out: str = "outputs/finetune_alignment"  # the variant is a subfolder
    live: str = "metrics/finetune_alignment"  # dvclive curves per variant: committed, uncached
    resume_dir: str = "outputs/.resume/finetune_alignment"  # a checkpoint per epoch, per variant
    blocks: list[int] = param([1, 2, 3, 5])  # ViT blocks (0-based) feeding the neck; paper [3, 5, 7, 11]
    channels: int = param(64, ge=1)  # UPerNet width; paper 768
    dropout: float = param(0.1, ge=0, lt=1)  # Dropout2d before the classifier (FaRL's UPerHead: 0.1)
    epochs: int = param(3, ge=1)
    batch_size: int = param(16, ge=2)
    lr_backbone: float = param(1e-4, ge=0)
    lr_neck: float = param(1e-2, gt=0)
    lr_head: float = param(1e-2, gt=0)
    weight_decay: float = param(1e-5, ge=0)
    schedule: Literal["constant", "cosine", "step"] = "cosine"  # after the warm-up
    milestones: list[int] = param([200])  # `step`: epochs where the lr drops ×gamma (FaRL: [200], 0.1)
    gamma: float = param(0.1, gt=0, le=1)
    warmup_steps: int = param(0, ge=0)  # linear warm-up; 0 = none
    freeze_backbone: bool = False
    ema_decay: float = param(0.999, ge=0, lt=1)
    ema_warmup: bool = True  # decay min(d, (1+n)/(10+n)): short runs are not stuck near the init
    num_workers: int = param(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # autocast in training; auto: bf16 on CUDA
    # FaRL picks its epoch on the test set: score the EMA model there after each epoch, so evaluate can
    # report that optimistic number beside the last epoch's, labelled (PROTOCOL §3); training is unchanged
    test_each_epoch: bool = True
    # score the validation split after each epoch too (AFLW-19: data.n_val rows held out of training; LaPa:
    # val/), so evaluate can report the epoch picked without the test set: PROTOCOL §3's honest alternative
    val_each_epoch: bool = False

    def __post_init__(self) -> None:
        if len(self.blocks) != 4 or self.blocks != sorted(set(self.blocks)) or self.blocks[0] < 0:
            # the neck's levels are positional (first ×4, last ÷2), and the blocks come back in depth order
            raise ParamsError("blocks", f"expected 4 increasing block indices >= 0, got {self.blocks}")
        if any(m < 0 for m in self.milestones):  # each epoch is >= -1: the lr would drop from the first step
            raise ParamsError("milestones", f"expected epochs >= 0, got {self.milestones}")


@dataclasses.dataclass(frozen=True)
class AlignmentConfig(FinetuneConfig):
    """AFLW-19: 19 heatmaps; loss = L1 on soft-argmax points + weight × BCE against Gaussians."""

    data: AFLW19Config = dataclasses.field(default_factory=AFLW19Config)
    heatmap_sigma: float = param(1.25, gt=0)  # pixels on a 128² heatmap, scaled to the real size
    heatmap_radius: float = param(5.0, gt=0)  # cut-off, pixels on a 128² heatmap, scaled likewise
    heatmap_weight: float = param(1.0, ge=0)
    heatmap_prior: bool = True  # classifier bias starts at -log(H·W): initial heatmap mass ~1, not H·W/2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.val_each_epoch and self.data.n_val == 0:  # AFLW-19 has no validation split of its own
            raise ParamsError("val_each_epoch", "needs data.n_val > 0: the training rows held out to score")


@dataclasses.dataclass(frozen=True)
class ParsingConfig(FinetuneConfig):
    """LaPa: 11 classes, per-pixel cross-entropy at the label size."""

    data: LaPaConfig = dataclasses.field(default_factory=LaPaConfig)
    out: str = "outputs/finetune_parsing"
    live: str = "metrics/finetune_parsing"
    resume_dir: str = "outputs/.resume/finetune_parsing"
    lr_neck: float = param(1e-3, gt=0)
    lr_head: float = param(1e-3, gt=0)


def alignment_loss(cfg: AlignmentConfig) -> LossFn:
    """``loss(logits, batch)`` for AFLW-19; ``batch["landmarks"]`` is ``[N, 19, 2]`` in 0..1."""

    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size = logits.shape[-1]
        sigma, radius = (v * size / 128 for v in (cfg.heatmap_sigma, cfg.heatmap_radius))
        target = heatmap_targets(batch["landmarks"], size, sigma, radius)
        l1 = (soft_argmax(logits) - batch["landmarks"]).norm(dim=-1).mean()  # L1 of the point distance
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return {"loss": l1 + cfg.heatmap_weight * bce, "l1": l1, "bce": bce}

    return loss


def parsing_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-pixel cross-entropy at the label size; ``batch["label"]`` is ``[N, S, S]`` class ids."""
    ce = F.cross_entropy(parsing_logits(logits, batch["label"].shape[-2:]), batch["label"].long())
    return {"loss": ce}


def make_optimizer(model: DenseFaceModel, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) with one learning rate per part; a frozen backbone gets no group at all."""
    lrs = {"backbone": cfg.lr_backbone, "neck": cfg.lr_neck, "head": cfg.lr_head}
    groups = [
        {"params": params, "lr": lrs[name], "name": name}
        for name, params in model.param_groups().items()
        if not (name == "backbone" and cfg.freeze_backbone)
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Multiplier on every group's lr at ``step``: linear warm-up, then constant, half-cosine to 0 (per
    step), or ×gamma at each milestone epoch passed (FaRL's epoch-wise MultiStepLR)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        epoch = step * cfg.epochs // max(total, 1)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def export_dir(variant: Variant, cfg: FinetuneConfig) -> str:
    """The backbone export a variant starts from."""
    return cfg.backbone if variant == "mcf" else cfg.scratch_backbone


def build_model(task: Task, variant: Variant, cfg: AlignmentConfig | ParsingConfig) -> DenseFaceModel:
    """The dense model on the chosen backbone; the backbone is frozen (eval, no grad) if asked."""
    backbone = load_backbone(export_dir(variant, cfg), img_size=cfg.data.size)
    patch = backbone.patch_embed.patch_size[0]
    if cfg.data.size % patch:  # the patch grid would drop the last pixels, which the logits are read over
        raise ParamsError("data.size", f"must be a multiple of the backbone's patch size {patch}, got "
                          f"{cfg.data.size}")
    if cfg.data.size < 2 * patch:  # the neck's ÷2 level max-pools the patch grid: a 1×1 grid pools to 0×0
        raise ParamsError("data.size", f"must be at least two patches ({2 * patch}), got {cfg.data.size}")
    head = HeadConfig(tuple(cfg.blocks), cfg.channels, NUM_OUTPUTS[task], cfg.dropout)
    model = DenseFaceModel(backbone, head)
    if isinstance(cfg, AlignmentConfig) and cfg.heatmap_prior:
        # Prior-probability init (as RetinaNet's): sigmoid(bias) = 1 / pixels, so the soft-argmax
        # is not dominated by the background from the first step.
        pixels = math.prod(4 * g for g in model.backbone.patch_embed.grid_size)
        nn.init.constant_(model.classifier.bias, -math.log(pixels))
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    return model


def _collate_tensors(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack the tensor fields of dataset items; names, boxes and other metadata are dropped."""
    keys = [k for k, v in batch[0].items() if isinstance(v, torch.Tensor)]
    return {k: torch.stack([item[k] for item in batch]) for k in keys}


def train_epoch(
    model: DenseFaceModel, loader: DataLoader, loss_fn: LossFn, optimizer: torch.optim.Optimizer, ema: EMA,
    lr_at: Callable[[int], float], step: int, total: int, dtype: torch.dtype,
) -> tuple[dict[str, float], int]:
    """One pass over ``loader`` on the model's device, the forward under autocast unless ``dtype`` is
    fp32 (the loss always in fp32); returns the mean of each loss part and the next step index (of
    ``total``, counted from 0)."""
    device = next(model.parameters()).device
    base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    sums: dict[str, float] = {}
    bar = tqdm(loader, desc="fine-tune", leave=False)
    for batch in bar:
        for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = lr * lr_at(step)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            logits = model(batch["image"])
        parts = loss_fn(logits.float(), batch)
        if not torch.isfinite(parts["loss"]):
            raise StageError(f"non-finite loss {parts['loss'].item()} at step {step + 1} of {total} (epoch "
                             f"{step // len(loader) + 1} of {total // len(loader)})")
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        ema.update(model)
        step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        bar.set_postfix(loss=f"{parts['loss'].item():.4f}")
    return {k: v / len(loader) for k, v in sums.items()}, step


TEST_SCORE: dict[str, str] = {"alignment": "nme_diag_full", "parsing": "f1_mean"}  # what FaRL selects by
VAL_SCORE: dict[str, str] = {"alignment": "nme_diag_val", "parsing": "f1_mean_val"}  # the same, on val
Scored = Literal["test", "val"]  # the splits scored after each epoch, by their switches' names
SPLIT: dict[Scored, dict[str, str]] = {"test": {"alignment": "full", "parsing": "test"},
                                       "val": {"alignment": "val", "parsing": "val"}}
Scorer = tuple[str, Callable[[DenseFaceModel], float | None]]


def epoch_scorer(task: Task, cfg: AlignmentConfig | ParsingConfig, scored: Scored) -> Scorer:
    """The number FaRL selects its epoch by (NME_diag on AFLW-19 or LaPa's F1 mean, both ×100) on the
    test or validation split, and its name (:data:`TEST_SCORE`, :data:`VAL_SCORE`).

    Computed with the evaluate stage's own functions (:mod:`mcf.evaluate.scoring`); it reads the model
    and no random state, so the run trains exactly as without it.
    """
    name, split = (TEST_SCORE if scored == "test" else VAL_SCORE)[task], SPLIT[scored][task]
    if task == "alignment":
        aflw = AFLW19(cfg.data, split)

        def nme_diag(model: DenseFaceModel) -> float:
            p = predict_landmarks(model, aflw, cfg.batch_size)
            return alignment_scores(p["pred"], p["gt"], p["box"])["nme_diag"]

        return name, nme_diag
    data = LaPa(cfg.data, split)

    def f1_mean(model: DenseFaceModel) -> float | None:
        return parsing_scores(predict_parsing(model, data, cfg.batch_size)[0])["f1_mean"]

    return name, f1_mean


def train(
    model: DenseFaceModel, dataset: Dataset, loss_fn: LossFn, cfg: FinetuneConfig, resume_dir: Path,
    seed: int, run_id: str, scorers: dict[Scored, Scorer] | None = None,
) -> tuple[EMA, dict[Scored, list[float | None]]]:
    """The fine-tuning loop, on the model's device; returns the EMA whose weights are evaluated, and each
    of ``scorers``' scores of the EMA model after each epoch, logged as ``<split>/<name>``.
    Deterministic for ``seed`` (bit for bit on the CPU).

    After each epoch the whole state (weights, EMA, optimizer, data order, RNGs, scores) goes to
    ``resume_dir/last.pt`` and the curves to ``resume_dir/live``: a killed run resumes at its last
    finished epoch, exactly, when ``run_id`` (the hash of what defines the run) is unchanged.
    """
    device = next(model.parameters()).device
    dtype = resolve_dtype(cfg.precision, device)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) > cfg.batch_size,
        num_workers=cfg.num_workers, generator=generator, collate_fn=_collate_tensors,
        pin_memory=device.type == "cuda",
    )
    optimizer = make_optimizer(model, cfg)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
    total, step, first = cfg.epochs * len(loader), 0, 0
    if cfg.warmup_steps > total:  # the lr would never reach its peak
        raise ParamsError("warmup_steps", f"must be <= the run's {total} steps ({cfg.epochs} epochs of "
                          f"{len(loader)}), got {cfg.warmup_steps}")
    lr_at = functools.partial(lr_factor, total=total, cfg=cfg)
    scorers = scorers or {}
    scores: dict[Scored, list[float | None]] = {split: [] for split in scorers}
    state = load_checkpoint(resume_dir, run_id)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        if state["data_rng"] is not None:  # augmentation draws in this process (num_workers 0)
            dataset.rng().bit_generator.state = state["data_rng"]
        first, step, scores = state["epoch"], state["step"], {k: list(v) for k, v in state["scores"].items()}
        truncate_live(resume_dir / "live", first - 1)  # rows of an epoch the kill cut short go
    from dvclive import Live  # imported here: it is slow to import and only this loop needs it

    with Live(dir=str(resume_dir / "live"), resume=first > 0, dvcyaml=None, save_dvc_exp=False) as live:
        live.step = first  # one dvclive step per epoch
        for epoch in range(first, cfg.epochs):
            model.train()
            if cfg.freeze_backbone:
                model.backbone.eval()
            means, step = train_epoch(model, loader, loss_fn, optimizer, ema, lr_at, step, total, dtype)
            bad = nonfinite(model.state_dict()) + [f"ema.{k}" for k in nonfinite(ema.model.state_dict())]
            if bad:  # the loss guard sees a diverged update a step later: the epoch's last one, never
                raise StageError(f"non-finite weights after epoch {epoch + 1} of {cfg.epochs} (step {step}), "
                                 f"though its losses were finite: {len(bad)} tensors, {bad[:3]}")
            for k, v in means.items():
                live.log_metric(f"train/{k}", v)
            live.log_metric("lr/head", optimizer.param_groups[-1]["lr"])
            for split, (name, score) in scorers.items():
                scores[split].append(score(ema.model))
                if scores[split][-1] is not None:
                    live.log_metric(f"{split}/{name}", scores[split][-1])
                means = {**means, f"{split} {name}": scores[split][-1]}
            live.next_step()
            save_checkpoint({
                "run_hash": run_id, "epoch": epoch + 1, "step": step, "scores": scores,
                "model": model.state_dict(), "ema": ema.model.state_dict(), "ema_updates": ema.updates,
                "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
                "data_rng": dataset.rng().bit_generator.state if hasattr(dataset, "rng") else None,
            }, resume_dir)
            parts = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a" for k, v in means.items())
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, parts)
    return ema, scores


def save_finetuned(
    ema: EMA, task: Task, variant: Variant, cfg: AlignmentConfig | ParsingConfig, path: Path,
    scores: dict[Scored, list[float | None]],
) -> None:
    """Write the EMA weights with the architecture that rebuilds them (atomically), and the test and
    validation scores after each epoch (:func:`epoch_scorer`)."""
    spec = read_spec(export_dir(variant, cfg))
    kwargs = {**spec["kwargs"], "img_size": cfg.data.size}
    checkpoint = {
        "task": task,
        "variant": variant,
        "data": {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "augment"},
        "backbone": {"model_name": spec["model_name"], "kwargs": kwargs},
        "head": dataclasses.asdict(ema.model.head_config),
        "state_dict": {k: v.detach().cpu() for k, v in ema.model.state_dict().items()},
        "epochs": cfg.epochs,
        "steps": ema.updates,
        "test_by_epoch": scores.get("test", []),  # TEST_SCORE[task] after each epoch
        "val_by_epoch": scores.get("val", []),  # VAL_SCORE[task] after each epoch
    }
    with atomic_file(path) as tmp:
        save_tensors(checkpoint, tmp)


def load_finetuned(path: str | Path, task: Task | None = None) -> tuple[DenseFaceModel, dict[str, Any]]:
    """Rebuild a fine-tuned model from ``model.pt`` (eval mode) and return it with its metadata.

    With ``task``, a model fine-tuned for the other task is refused; every failure names the file.
    """
    ckpt = read_weights(path)
    try:
        spec, head = ckpt["backbone"], ckpt["head"]
        head_cfg = HeadConfig(**{**head, "blocks": tuple(head["blocks"])})  # its dropout too, for training on
        model = DenseFaceModel(build_vit(spec["model_name"], **spec["kwargs"]), head_cfg)
        model.load_state_dict(ckpt["state_dict"], strict=True)
        # what evaluate and predict read next: the data config, checked as params are (a size of 0 crashed
        # in OpenCV), and the per-epoch scores
        build({"alignment": AFLW19Config, "parsing": LaPaConfig}[ckpt["task"]], ckpt["data"], "data")
        for key in ("test_by_epoch", "val_by_epoch"):
            if not isinstance(ckpt.get(key, []), list):
                raise TypeError(f"{key} is a {type(ckpt[key]).__name__}, not a list")
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # ValueError: the head's blocks refused
        # load_state_dict's lines, one a mismatched tensor: the first whole (a shape cut short told nothing)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()][:2]
        why = f"{type(err).__name__}: {' '.join(lines)[:1000]}"
        raise StageError(f"{path}: not a fine-tuned model.pt ({why})") from None
    if task is not None and ckpt.get("task") != task:
        raise StageError(f"{path}: this model was fine-tuned for {ckpt.get('task')!r}, not {task!r}")
    if bad := nonfinite(ckpt["state_dict"]):  # evaluate would score NaN, predict write NaN landmarks
        raise StageError(f"{path}: {len(bad)} tensors hold NaN or infinite weights, e.g. {bad[:3]}")
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}


def finetune(task: Task, common: Common, cfg: AlignmentConfig | ParsingConfig, variant: Variant) -> None:
    """Gate the training data (and the test split scored after each epoch), fine-tune, and write
    ``<out>/<variant>/`` atomically."""
    stage = f"finetune_{task}"
    key = "backbone" if variant == "mcf" else "scratch_backbone"
    check_resume_dir(Path(cfg.resume_dir) / variant, f"{stage}.resume_dir")
    require_path(export_dir(variant, cfg), f"{stage}.{key}", made_by="pretrain")
    require_path(cfg.data.root, f"{stage}.data.root")
    check_output(Path(cfg.out) / variant, "model.pt")  # before training, not after it
    check_output(Path(cfg.live) / variant, LIVE_SIGN)
    torch.manual_seed(common.seed)  # the same head initialisation and data order for both variants
    device = default_device()  # initialised on the CPU, then moved: the same start on any device
    model = build_model(task, variant, cfg).to(device)  # before the gate: a bad `blocks` fails at once
    reader, suite = (aflw19, "aflw19") if task == "alignment" else (lapa, "lapa")
    table = reader.table(cfg.data, "train")
    run_gate(table, suite, stage=stage)
    scored: list[Scored] = [s for s, on in (("test", cfg.test_each_epoch), ("val", cfg.val_each_epoch)) if on]
    for split in scored:  # scored after every epoch: a damaged (or empty) split fails now, not an epoch in
        run_gate(reader.table(cfg.data, SPLIT[split][task]), suite, stage=stage)
    if task == "alignment":
        dataset, loss_fn = AFLW19(cfg.data, "train", augment=True), alignment_loss(cfg)
    else:
        dataset, loss_fn = LaPa(cfg.data, "train", augment=True), parsing_loss
    dtype = resolve_dtype(cfg.precision, device)
    log.info("%s/%s: %d training images, %d steps, on %s in %s", stage, variant, len(dataset),
             cfg.epochs * max(len(dataset) // cfg.batch_size, 1), device, str(dtype).removeprefix("torch."))
    start = time.perf_counter()
    resume_dir = Path(cfg.resume_dir) / variant
    # what defines the run: a checkpoint of another is refused, not resumed. num_workers belongs to it:
    # each worker draws the augmentation from a seed of its own, so the worker count changes the model
    where = {"out", "live", "resume_dir"}
    run_id = run_hash({
        "stage": stage, "variant": variant, "seed": common.seed, "dtype": str(dtype),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in where},
        "backbone": file_sha256(Path(export_dir(variant, cfg)) / "backbone.pth"),
        "data": int(pd.util.hash_pandas_object(table, index=False).sum()),
        "init": weights_digest(model),  # the heads as this code builds them: pulled code may draw others
    })
    scorers = {split: epoch_scorer(task, cfg, split) for split in scored}
    ema, scores = train(model, dataset, loss_fn, cfg, resume_dir, common.seed, run_id, scorers)
    with atomic_dir(Path(cfg.out) / variant, sign="model.pt") as tmp:
        save_finetuned(ema, task, variant, cfg, tmp / "model.pt", scores)
        # before the model: no model, no stale curves
        with atomic_dir(Path(cfg.live) / variant, LIVE_SIGN) as live:
            shutil.copytree(resume_dir / "live", live, dirs_exist_ok=True)
    discard_resume(resume_dir)  # published: the next run starts afresh
    seconds = time.perf_counter() - start
    log.info("%s/%s: done in %.1f s -> %s", stage, variant, seconds, Path(cfg.out) / variant)


def main_alignment(common: Common, cfg: AlignmentConfig, variant: Variant = "mcf") -> None:
    """Stage ``finetune_alignment``."""
    finetune("alignment", common, cfg, variant)


def main_parsing(common: Common, cfg: ParsingConfig, variant: Variant = "mcf") -> None:
    """Stage ``finetune_parsing``."""
    finetune("parsing", common, cfg, variant)
