"""The training loop shared by the ``teacher`` and ``pretrain`` stages.

AdamW (MAE's no-decay groups), lr scaled by the effective batch, per-iteration warm-up and
half-cosine, gradient accumulation, momentum-encoder updates, mixed precision, a non-finite-loss
guard, dvclive logging, DDP, and checkpoints from which a killed run resumes bit for bit.

A model is any module whose ``forward(imgs, mask_ratio)`` returns a dict of scalar ``loss*`` terms
with ``"loss"`` the one to minimise, and which has ``momentum_at(step, total)`` (None: no momentum
encoder) and ``update_momentum(m)`` (``MCF`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mcf.data.pretrain_data import CropDataset, EpochView, raised_as_in_workers, steps_per_epoch
from mcf.errors import StageError
from mcf.io import LIVE_SIGN, atomic_dir, check_output, file_sha256
from mcf.params import ParamsError, param
from mcf.train.checkpoint import (
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
from mcf.train.distributed import (
    barrier,
    cleanup,
    derive_seed,
    init_distributed,
    is_initialized,
    resolve_dtype,
)
from mcf.train.schedule import lr_at, scaled_lr, set_lr

if TYPE_CHECKING:
    from dvclive import Live

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe. Defaults are the paper's (PROTOCOL.md §1) except the sizes."""

    epochs: int = param(16, ge=1)
    warmup_epochs: float = param(1.0, ge=0)
    batch_size: int = param(64, ge=1)  # per process
    accum_steps: int = param(1, ge=1)
    blr: float = param(1.5e-4, gt=0)  # lr = blr × batch_size × accum_steps × world_size / 256
    min_lr: float = param(0.0, ge=0)
    weight_decay: float = param(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the step's model (`mcf bench pretrain --compile` says if it pays)
    sync_bn: bool = False  # SyncBatchNorm in the projectors (CUDA only); the release keeps per-process BN
    num_workers: int = param(0, ge=0)
    cache_mb: int = param(1024, ge=0)  # decode the subset once into RAM when it fits in this budget
    ckpt_every: int = param(100, ge=1)  # optimizer steps between resumable checkpoints
    log_every: int = param(10, ge=1)  # optimizer steps between dvclive rows
    effective_batch: int | None = param(None, ge=1)  # when set, the run must reach it (check_processes)
    processes: int = param(1, ge=1)  # above 1, the stage starts itself under torchrun (one per GPU)

    def identity(self) -> dict[str, Any]:
        """The fields that change what is computed (not where, how often it is saved, or how fast).
        ``precision`` is left to the :class:`Trainer`, which hashes the dtype it resolves to: ``auto`` and
        the dtype it names on this device compute the same run."""
        skip = {"ckpt_every", "log_every", "num_workers", "cache_mb", "compile", "effective_batch",
                "processes", "precision"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def check_processes(self, world_size: int) -> None:
        """Refuse ``world_size`` processes when they miss ``effective_batch``: a recipe's lr and schedule
        assume its batch, and the paper's 64 × 8 × 8 GPUs run as one process would be another recipe."""
        got = self.batch_size * self.accum_steps * world_size
        if self.effective_batch is None or got == self.effective_batch:
            return
        per_step = self.batch_size * world_size
        fix = (f"accum_steps: {self.effective_batch // per_step} reaches it with {world_size} process(es)"
               if self.effective_batch % per_step == 0 else "pick a batch_size and accum_steps that reach it")
        raise ParamsError(
            "train.effective_batch",
            f"{self.effective_batch} asked, but batch_size {self.batch_size} × accum_steps "
            f"{self.accum_steps} × {world_size} process(es) is {got}: {fix}, or set train.processes (or "
            "start the stage under torchrun)",
        )

    def check_min_lr(self, effective_batch: int, key: str = "train.min_lr") -> None:
        """Refuse a ``min_lr`` above the peak lr at ``effective_batch``: the "decay" would raise the lr."""
        peak = scaled_lr(self.blr, effective_batch)
        if self.min_lr > peak:
            raise ParamsError(key, f"{self.min_lr:g} is above the peak lr {peak:g} (blr {self.blr:g} × "
                              f"effective batch {effective_batch} / 256)")

    def check_device(self, device: torch.device) -> None:
        """Refuse what ``device`` cannot run: SyncBatchNorm is CUDA's (NCCL) alone."""
        if self.sync_bn and device.type != "cuda":
            raise ParamsError("train.sync_bn", "true needs CUDA; this run is on the CPU")

    def __post_init__(self) -> None:
        if self.warmup_epochs > self.epochs:
            raise ParamsError("warmup_epochs", f"must be <= epochs ({self.epochs}), got {self.warmup_epochs}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ParamsError("betas", f"each must be in [0, 1), got {list(self.betas)}")
        if self.effective_batch is not None:  # every run reaches it (check_processes): the peak lr is known
            self.check_min_lr(self.effective_batch, "min_lr")


@dataclasses.dataclass(frozen=True)
class Run:
    """Where and under which identity a training run lives (not params: derived by the stage)."""

    seed: int
    mask_ratio: float
    resume_dir: Path
    identity: dict[str, Any]  # everything that defines the run; its hash guards resumption
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: undecayed norms and biases; everything else decayed, the cls
    and mask tokens included, as the release and MAE do (timm's ``add_weight_decay``, no skip list)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, weight_decay: float, lr: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; on CUDA the fused kernel (one launch for all parameters)."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, fused=device.type == "cuda" or None
    )


def compile_model(net: nn.Module) -> nn.Module:
    """``torch.compile`` that keeps eager's random numbers: inductor's own would draw other masks, so
    a compiled run would train on different samples than the eager one (``fallback_random``)."""
    return torch.compile(net, options={"fallback_random": True})


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state without the frozen teacher (rebuilt from the teacher stage's export)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}


def accumulate(
    net: nn.Module,
    model: nn.Module,
    batches: list[torch.Tensor],
    mask_ratio: float,
    momentum: float | None,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler,
) -> dict[str, torch.Tensor]:
    """Forward and backward over the micro-batches of one optimizer step; the mean of each loss term.

    Before each micro-batch the momentum encoder steps towards the online one, as the release does in
    every forward: ``accum_steps`` micro-batches make ``accum_steps`` momentum updates per optimizer step.
    ``net`` is the module the step calls (DDP or compiled around ``model``, or ``model`` itself).
    Under DDP gradients are all-reduced on the last micro-batch only. The batches move to the
    model's device here; autocast is on unless ``dtype`` is fp32.
    """
    device = next(net.parameters()).device
    terms: dict[str, torch.Tensor] = {}
    for i, imgs in enumerate(batches):
        last = i == len(batches) - 1
        model.update_momentum(momentum)
        sync = contextlib.nullcontext() if last or not is_initialized() else net.no_sync()
        with sync:
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                out = net(imgs.to(device, non_blocking=True), mask_ratio)
            scaler.scale(out["loss"] / len(batches)).backward()
        for k, v in out.items():
            terms[k] = terms.get(k, 0) + v.detach().float() / len(batches)
    return terms


class Trainer:
    """One training run: builds the optimizer and data, restores a checkpoint, steps, checkpoints."""

    def __init__(self, model: nn.Module, crops: CropDataset, cfg: TrainConfig, run: Run) -> None:
        self.cfg, self.run, self.crops = cfg, run, crops
        self.spe = steps_per_epoch(len(crops), cfg.batch_size, cfg.accum_steps, run.world_size)
        if self.spe == 0:
            raise StageError(
                f"{len(crops)} crops are too few for one step of batch_size {cfg.batch_size} × accum_steps "
                f"{cfg.accum_steps} × {run.world_size} processes"
            )
        self.total = self.spe * cfg.epochs
        self.warmup = cfg.warmup_epochs * self.spe  # in steps, fractional as the release's (per epoch)
        self.effective_batch = cfg.batch_size * cfg.accum_steps * run.world_size
        self.peak_lr = scaled_lr(cfg.blr, self.effective_batch)
        cfg.check_min_lr(self.effective_batch)  # up front too where the params fix the batch
        self.dtype = resolve_dtype(cfg.precision, run.device)
        self.model = model.to(run.device)
        cfg.check_device(run.device)
        if cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = make_optimizer(self.model, cfg.weight_decay, self.peak_lr, cfg.betas, run.device)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=self.dtype == torch.float16)
        self.hash = run_hash({**run.identity, "world_size": run.world_size, "num_crops": len(crops),
                              "dtype": str(self.dtype)})
        self.step, self.momentum = 0, float("nan")
        self._restore()
        self.net = self._wrap()
        log.info(
            "%d steps (%d epochs × %d), effective batch %d, peak lr %.3g, warm-up %g steps, %s",
            self.total, cfg.epochs, self.spe, self.effective_batch, self.peak_lr, self.warmup, self.dtype,
        )

    def _wrap(self) -> nn.Module:
        """The module the step calls: DDP around the model when distributed, compiled when asked."""
        net = self.model
        if is_initialized():
            ids = [self.run.device.index] if self.run.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids, find_unused_parameters=False)
        return compile_model(net) if self.cfg.compile else net

    def _restore(self) -> None:
        state = load_checkpoint(self.run.resume_dir, self.hash, self.run.world_size)
        self._check_ranks_agree(None if state is None else state["step"])
        if state is None:
            return
        result = self.model.load_state_dict(state["model"], strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("teacher.")]
        if missing or result.unexpected_keys:
            raise StageError(f"checkpoint does not fit the model: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.momentum = state["step"], state["momentum"]
        if (state["epoch"], state["index"]) != divmod(self.step, self.spe):
            raise StageError(f"checkpoint data position {state['epoch'], state['index']} != step {self.step}")
        set_rng_state(state["rng"][self.run.rank])

    def _check_ranks_agree(self, step: int | None) -> None:
        """Refuse to train unless every rank has the same run hash and resumes from the same step.

        Each rank reads ``resume_dir`` itself: on disks local to each node, the other nodes find no
        checkpoint (or an old one) and would train from another step, with another lr, optimizer state
        and step count; DDP does not re-sync the weights, so the replicas drift apart, and the ranks
        that finish first leave the others waiting in a collective.
        """
        if not is_initialized():
            return
        found: list[Any] = [None] * self.run.world_size
        dist.all_gather_object(found, (self.hash, step))
        if len(set(found)) > 1:
            raise StageError(
                f"the ranks disagree on where to start (rank: (run hash, checkpoint step)): "
                f"{dict(enumerate(found))}; resume_dir {self.run.resume_dir} and the data must be the "
                "same for every rank (shared storage across nodes)"
            )

    def _checkpoint(self) -> None:
        """Gather every rank's RNG state; rank 0 writes the checkpoint, unless a rank's weights went
        non-finite: then every rank stops, and the last checkpoint (and any earlier export) stays."""
        state = model_state(self.model)
        mine: Any = (rng_state(), nonfinite(state))
        gathered = [mine]
        if is_initialized():
            gathered = [None] * self.run.world_size
            dist.all_gather_object(gathered, mine)
        states, bad = [g[0] for g in gathered], [g[1] for g in gathered]
        if any(bad):
            names = next(b for b in bad if b)
            raise StageError(
                f"non-finite weights after step {self.step} of {self.total} (epoch "
                f"{(self.step - 1) // self.spe + 1} of {self.cfg.epochs}), though its loss was finite: "
                f"{len(names)} tensors, {names[:3]}; the last checkpoint in {self.run.resume_dir} is kept"
            )
        if self.run.rank != 0:
            return
        epoch, index = divmod(self.step, self.spe)
        save_checkpoint(
            {
                "run_hash": self.hash, "world_size": self.run.world_size, "step": self.step,
                "epoch": epoch, "index": index, "momentum": self.momentum, "live_step": self.step,
                "rng": states,
                "model": state, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
            },
            self.run.resume_dir,
        )

    def _loader(self, epoch: int, start_step: int) -> DataLoader:
        """Batches of ``epoch`` from optimizer step ``start_step`` on; no global RNG is drawn."""
        cfg, run = self.cfg, self.run
        per_step = cfg.batch_size * cfg.accum_steps
        view = EpochView(
            self.crops, run.seed, epoch, run.rank, run.world_size, self.spe * per_step, start_step * per_step
        )
        return DataLoader(
            view, batch_size=cfg.batch_size, shuffle=False, drop_last=True, num_workers=cfg.num_workers,
            pin_memory=run.device.type == "cuda", generator=torch.Generator().manual_seed(run.seed + epoch),
        )

    def _train_step(self, batches: list[torch.Tensor]) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns the rank-averaged loss terms."""
        lr = lr_at(self.step, self.total, self.warmup, self.peak_lr, self.cfg.min_lr)
        set_lr(self.optimizer, lr)
        self.momentum = self.model.momentum_at(self.step, self.total)
        terms = accumulate(
            self.net, self.model, batches, self.run.mask_ratio, self.momentum, self.dtype, self.scaler
        )
        names = sorted(terms)
        values = torch.stack([terms[k] for k in names])
        if is_initialized():
            dist.all_reduce(values)
            values /= self.run.world_size
        logged = dict(zip(names, values.tolist(), strict=True))
        if not all(torch.isfinite(values).tolist()):
            raise StageError(f"non-finite loss at step {self.step + 1} of {self.total}: {logged}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**logged, "lr": lr} | ({} if self.momentum is None else {"momentum": self.momentum})

    def fit(self) -> nn.Module:
        """Train to the last step (from the checkpoint, if any); returns the unwrapped model."""
        live = self._live()
        self.model.train()
        quiet = {"disable": True} if self.run.rank else {}  # rank 0 alone; TQDM_DISABLE still applies
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", **quiet)
        while self.step < self.total:
            epoch, index = divmod(self.step, self.spe)
            batches: list[torch.Tensor] = []
            for imgs in raised_as_in_workers(self._loader(epoch, index)):
                batches.append(imgs)
                if len(batches) < self.cfg.accum_steps:
                    continue
                metrics, batches = self._train_step(batches), []
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.2e}")
                if live is not None and (self.step % self.cfg.log_every == 0 or self.step == self.total):
                    live.step = self.step
                    for name, value in metrics.items():
                        live.log_metric(f"train/{name}", value)
                    live.sync()
                if self.step % self.cfg.ckpt_every == 0 or self.step == self.total:
                    self._checkpoint()
        bar.close()
        if live is not None:
            live.end()
        return self.model

    def _live(self) -> Live | None:
        """Rank 0's dvclive logger in the resume folder; rows past the checkpoint are dropped on resume."""
        if self.run.rank != 0:
            return None
        from dvclive import Live  # here: the step itself (and `mcf bench`) runs without dvclive
        live_dir = Path(self.run.resume_dir) / "live"
        if self.step:
            truncate_live(live_dir, self.step)
        return Live(dir=str(live_dir), resume=self.step > 0, dvcyaml=None, save_dvc_exp=False, report=None)


def seed_process(seed: int, rank: int) -> None:
    """Seed torch, NumPy and Python per rank, so ranks draw different masks from the same seed."""
    derived = derive_seed(seed, rank)
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)


def data_identity(data_dir: str | Path) -> dict[str, Any]:
    """What names the training data in the run hash, so a resume on other crops is refused: the shards'
    names and sizes (sizes alone repeat: tar pads to 10 KiB blocks) and the sha256 of the manifest
    beside them (each crop's id, perceptual hash and pixel statistics)."""
    shards = [(p.name, p.stat().st_size) for p in sorted((Path(data_dir) / "shards").glob("crops-*.tar"))]
    manifest = Path(data_dir) / "manifest.parquet"
    return {"shards": shards, "manifest": file_sha256(manifest) if manifest.is_file() else None}


def train_and_export(
    build_model: Callable[[], nn.Module],
    data_dir: str | Path,
    cfg: TrainConfig,
    run: Run,
    out: str | Path,
    export: Callable[[nn.Module, Path], None],
    sign: str,
    live_out: str | Path | None = None,
) -> None:
    """Train on ``<data_dir>/shards`` (alone or under torchrun), then rank 0 writes ``out`` atomically.

    ``run``'s rank, world size and device are filled in here from the process group. ``export``
    writes the trained model into the temporary output folder, and ``sign`` is a file it always
    writes (an existing ``out`` without it is refused before training). The dvclive folder goes to
    ``live_out`` (a committed metrics path) or, without one, joins the output as ``live/``. The
    resume folder is removed once both exist, so the next run starts afresh.
    """
    check_output(out, sign)
    if live_out is not None:
        check_output(live_out, LIVE_SIGN)
    rank, world_size, _, device = init_distributed()
    try:
        cfg.check_processes(world_size)
        torch.manual_seed(run.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's)
        model = build_model()
        shard_dir = Path(data_dir) / "shards"
        crops = CropDataset(shard_dir, model.cfg.backbone.img_size, cfg.cache_mb)
        run = dataclasses.replace(
            run, rank=rank, world_size=world_size, device=device,
            identity={**run.identity, **data_identity(data_dir), "init": weights_digest(model)},
        )
        seed_process(run.seed, rank)
        model = Trainer(model, crops, cfg, run).fit()
        if rank == 0:
            live = Path(run.resume_dir) / "live"
            if live_out is not None and live.is_dir():
                with atomic_dir(live_out, LIVE_SIGN) as tmp:
                    shutil.copytree(live, tmp, dirs_exist_ok=True)
            with atomic_dir(out, sign) as tmp:
                export(model, tmp)
                if live_out is None and live.is_dir():
                    shutil.copytree(live, tmp / "live")
            discard_resume(run.resume_dir)
        barrier()
    finally:
        cleanup()
