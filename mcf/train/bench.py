"""``mcf bench pretrain``: training throughput of the MCF step, fast path against our eager baseline.

Times the optimizer step the pretrain loop takes (:func:`mcf.train.loop.accumulate`: the momentum
update, forward with masking, teacher feature loss, momentum keys, backward; then AdamW) on
synthetic images, twice in one run:

- **fast**: autocast at ``--precision`` (bf16 on CUDA), ``torch.compile`` with ``--compile``, fused
  AdamW on CUDA (:func:`mcf.train.loop.make_optimizer`, the loop's own);
- **baseline**: the same model eager at ``--baseline`` precision (fp32 by default), with the
  unfused AdamW; ``--baseline none`` skips it.

Each logs images/s, achieved TFLOP/s (FLOPs of one step counted with ``FlopCounterMode``) and, on
CUDA, peak memory. Before timing, an **equivalence check** runs both paths on one batch with the same
masks and weights and compares every loss term; the command exits 1 when a term differs by more than
``--rtol``. ``--shards DIR`` also times the data loader alone on real JPEG shards (the loop's
``CropDataset`` and ``EpochView``, decoded on access, ``--workers`` processes, pinned memory on CUDA).
``--profile N`` prints the fast path's N costliest kernels; ``--attention`` pins its SDPA kernel;
``--teacher-residual fp32`` times the teacher as plain autocast runs it (see FeatureTeacher).

``--model tiny`` is the CPU default of ``params.yaml``; ``base`` is the paper's ViT-B/16 at 224 with a
512×8 decoder and a ViT-B teacher read at blocks 2/5/8/11. The teacher is random: its weights do not
change the cost. Only torch, timm, numpy, Pillow, PyYAML and tqdm are imported, so the bench runs on a
GPU machine that has just the training stack.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from mcf.cli import describe
from mcf.data.pretrain_data import CropDataset, EpochView, index_shards
from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.teacher import FeatureTeacher
from mcf.params import ParamsError, load
from mcf.train.distributed import resolve_dtype
from mcf.train.loop import accumulate, compile_model, make_optimizer, param_groups

log = logging.getLogger(__name__)
# images the FLOP count's eager fp32 step takes (ViT-B: ~5 GiB; 82 GiB at batch 512, past an H100). A step's
# FLOPs are linear in its batch N but for the contrastive logits' N x N product: under 1e-5 of ViT-B's at 512
FLOP_BATCH = 32

PRECISIONS = ("fp32", "bf16", "fp16")
ATTENTION = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:  # else argparse names this function: "invalid _ratio value"
        value = float("nan")
    if not 0 < value < 1:  # at 0 no patch is hidden, and the losses average over the hidden ones
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1), got {text}")
    return value


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mcf bench pretrain", description=describe(__doc__),
        epilog="Exit status: 0 the equivalence check passed; 1 it failed (the timings are still printed) or "
        "the bench crashed; 2 a usage error or params rejected (--params, tiny's size); 130 interrupted.",
    )
    p.add_argument("--model", choices=("tiny", "base"), default="tiny", help="default: %(default)s")
    p.add_argument("--params", default="params.yaml", help="where tiny's size is read (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64,
                   help="images per step, 4 or more with the contrastive loss (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                   help="the fast path's autocast dtype; auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's model")
    p.add_argument("--baseline", choices=(*PRECISIONS, "none"), default="fp32",
                   help="eager baseline's precision, or none (default: %(default)s)")
    p.add_argument("--rtol", type=float, default=None,
                   help="equivalence tolerance per loss term (default: 1e-4 for fp32, 3e-2 for bf16/fp16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: %(default)s")
    p.add_argument("--attention", choices=("auto", *ATTENTION), default="auto",
                   help="the fast path's SDPA kernel (math where it does not apply); auto: torch's choice")
    p.add_argument("--teacher-residual", choices=("autocast", "fp32"), default="autocast",
                   help="the teacher's residual stream under autocast (default: %(default)s)")
    p.add_argument("--mask-ratio", type=_ratio, default=0.75, help="in (0, 1) (default: %(default)s)")
    p.add_argument("--shards", type=Path, default=None, help="time the data loader on these JPEG shards too")
    p.add_argument("--workers", type=int, default=8, help="data-loader processes (default: %(default)s)")
    p.add_argument("--loader-batches", type=int, default=50,
                   help="batches timed, rounded up to whole rounds of the workers (default: %(default)s)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile 2 fast steps and print the N costliest kernels (default: off)")
    args = p.parse_args(argv)
    for name, least in (("batch", 1), ("steps", 1), ("loader_batches", 1), ("warmup", 0), ("workers", 0),
                        ("profile", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}")
    if args.rtol is not None and not 0 < args.rtol < float("inf"):  # 0 failed every check, inf passed any
        p.error(f"--rtol must be a finite number above 0, got {args.rtol}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device on this machine (use --device cpu or auto)")
    if args.shards is not None and not list(args.shards.glob("crops-*.tar")):
        found = ("no such folder" if not args.shards.exists() else "a file, not a folder of shards"
                 if not args.shards.is_dir() else "no crops-*.tar shards in this folder")
        p.error(f"--shards {args.shards}: {found} (build some: tools/bench_shards.yaml)")
    if args.shards is not None and (crops := len(index_shards(args.shards)[1])) < args.batch:  # timed last
        p.error(f"--shards {args.shards}: {crops} crops are fewer than one batch of {args.batch}")
    return args


def configs(name: str, params: str) -> tuple[MCFConfig, BackboneConfig]:
    """The benchmarked model's config and its teacher's size: tiny's from ``params``, base's ViT-B."""
    if name == "tiny":
        return load("pretrain", params)[1].model, load("teacher", params)[1].backbone
    cfg = MCFConfig()
    return cfg, cfg.backbone


def build(cfg: MCFConfig, teacher_size: BackboneConfig) -> MCF:
    """The benchmarked model, with a random teacher."""
    teacher = FeatureTeacher(create_backbone(teacher_size)) if cfg.uses_teacher else None
    return MCF(cfg, teacher)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def losses(net: torch.nn.Module, imgs: Tensor, mask_ratio: float, dtype: torch.dtype,
           grad: bool = True) -> dict[str, float]:
    """Every loss term of one forward under autocast ``dtype``, its masks drawn from seed 0; ``grad``
    False keeps no activations for a backward (the same numbers)."""
    torch.manual_seed(0)
    autocast = torch.autocast(imgs.device.type, dtype, enabled=dtype != torch.float32)
    with torch.set_grad_enabled(grad), autocast:
        out = net(imgs, mask_ratio)
    return {k: float(v.detach()) for k, v in out.items()}


def generator_states(device: torch.device) -> list[Tensor]:
    """The states of the generators a forward on ``device`` draws its masks from (CPU's, and the GPU's)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def equivalence(model: MCF, fast: torch.nn.Module, imgs: Tensor, mask_ratio: float, fast_dtype: torch.dtype,
                rtol: float) -> tuple[bool, dict[str, tuple[float, float]]]:
    """Do the fast and the eager fp32 paths give the same losses on one batch, masks and weights?

    Both run in train mode, as the step does, and draw their masks as the step draws them
    (``torch.rand`` from one seed; a compiled model keeps eager's draws through ``fallback_random``), so
    the check covers the compiled path's masks and exercises the very graph the step runs. The losses
    alone cannot tell masks apart: at batch 32 or more other masks move each term by less than bf16's
    tolerance, so the generators' states after each forward must match too (a path that draws its masks
    otherwise, as inductor's own RNG does, fails). BatchNorm statistics and the RNG are put back after
    each, so neither run sees the other's update. The eager reference runs without grad: its fp32
    activations at the fast path's batch would not fit beside it (ViT-B at 512: some 80 GiB); the fast
    path keeps grad on, as a compiled model's training graph is not its inference one. Returns whether
    the draws match and every term is
    within ``rtol`` (relative), and each term's ``(eager, fast)`` pair. Use
    batches of 4 or more: with 2 images the projector's BatchNorm leaves each feature at ±1 and the
    contrastive term swings with any rounding (ViT-B, bf16: 23 % at batch 2, 0.6 % at 4, 0.04 % at 16).
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.random.fork_rng(devices=[imgs.device] if imgs.device.type == "cuda" else []):
        ref = losses(model, imgs, mask_ratio, torch.float32, grad=False)
        ref_draws = generator_states(imgs.device)
        model.load_state_dict(state)
        got = losses(fast, imgs, mask_ratio, fast_dtype)
        same_draws = all(map(torch.equal, ref_draws, generator_states(imgs.device)))
        model.load_state_dict(state)
    if not same_draws:
        log.warning("equivalence: the fast path drew other random numbers than the eager step: its masks "
                    "differ, whatever its losses")
    pairs = {k: (ref[k], got[k]) for k in ref}
    ok = same_draws and all(abs(b - a) <= rtol * max(abs(a), 1e-12) for a, b in pairs.values())
    return ok, pairs


def time_steps(
    step: Callable[[], None], device: torch.device, steps: int, warmup: int
) -> tuple[float, float]:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones, and CUDA's peak memory (GiB)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def make_step(model: MCF, net: torch.nn.Module, imgs: Tensor, mask_ratio: float, dtype: torch.dtype,
              optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One optimizer step as the pretrain loop takes it (one micro-batch)."""
    scaler = torch.amp.GradScaler(imgs.device.type, enabled=dtype == torch.float16)
    momentum = model.momentum_at(0, 1)  # the first step's, as the loop asks it; None: no momentum encoder

    def step() -> None:
        accumulate(net, model, [imgs], mask_ratio, momentum, dtype, scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_flops(model: MCF, imgs: Tensor, mask_ratio: float, optimizer: torch.optim.Optimizer) -> int:
    """FLOPs of one eager fp32 step, counted by ``FlopCounterMode`` (compiled kernels bypass its dispatcher).

    On the CPU attention runs on torch's math kernel here: the CPU's fused SDPA kernel has no FLOP
    formula, so the counter would leave attention out (6 % of the tiny step, 5 % of ViT-B's). The math
    kernel's backward takes four products where torch's formula for a fused CUDA kernel's counts five
    (QK^T again): ViT-B's step counts 174.1 GFLOP an image on the CPU, 175.2 on CUDA.
    """
    cpu_math = sdpa_kernel(SDPBackend.MATH) if imgs.device.type == "cpu" else contextlib.nullcontext()
    with cpu_math, FlopCounterMode(display=False) as counter:
        make_step(model, model, imgs, mask_ratio, torch.float32, optimizer)()
    return counter.get_total_flops()


def profile(step: Callable[[], None], device: torch.device, rows: int) -> str:
    """The ``rows`` costliest operators of two steps, by their own device (or CPU) time: where a step goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def loader_rate(shards: Path, img_size: int, batch: int, workers: int, batches: int,
                device: torch.device) -> float:
    """Images/s that the pretrain loop's data path delivers from JPEG shards (decoded on every access).

    One epoch's view of the crops is read round and round. The workers start together, so each one's
    first batch pays for its start and they land in one burst: the clock starts once every worker has
    delivered its first (the main process its first, with no workers), and runs over ``batches`` rounded
    up to whole rounds of the workers.
    """
    crops = CropDataset(shards, img_size, cache_mb=0)
    if len(crops) < batch:
        raise ValueError(f"{shards}: {len(crops)} crops are fewer than one batch of {batch}")
    view = EpochView(crops, 0, 0, 0, 1, len(crops), 0)
    warm = max(workers, 1)
    timed = -(-batches // warm) * warm
    order = [i % len(view) for i in range(batch * (warm + timed))]
    loader = DataLoader(view, batch_size=batch, sampler=order, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    start = 0.0
    for n, imgs in enumerate(loader, 1):
        imgs.to(device, non_blocking=True)
        if n == warm:
            _sync(device)
            start = time.perf_counter()
    _sync(device)
    return batch * timed / (time.perf_counter() - start)


def bench_pretrain(argv: list[str]) -> int:
    """Run the benchmark; log one line per figure. Exits 1 when the equivalence check fails."""
    args = parse(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    cpu = f"CPU, {torch.get_num_threads()} threads"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    cfg, teacher_size = configs(args.model, args.params)
    try:  # as the pretrain stage refuses it (a step on the class token alone), before building ViT-B
        cfg.check_mask_ratio(args.mask_ratio)
    except ParamsError as err:  # exit 2, as a usage error
        raise ParamsError("--mask-ratio", f"{err.message} of --model {args.model}") from None
    if cfg.uses_contrastive and args.batch < 4:  # see equivalence(); at 1 the BatchNorm raises outright
        raise ParamsError("--batch", f"{args.batch}: use 4 or more; with fewer images the contrastive "
                          "projector's BatchNorm leaves each feature near ±1 (at 2 exactly; at 1 it raises), "
                          "and the equivalence check fails on rounding")
    torch.manual_seed(0)
    model = build(cfg, teacher_size).to(device).train()
    dtype = resolve_dtype(args.precision, device)
    rtol = args.rtol if args.rtol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    size = model.cfg.backbone.img_size
    imgs = torch.randn(args.batch, 3, size, size, device=device)
    if model.cfg.uses_teacher:
        model.teacher.low_precision_residual = args.teacher_residual == "autocast"
    fast = compile_model(model) if args.compile else model
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("device: %s; torch %s", card, torch.__version__)
    log.info("model %s: %.1f M trainable params, img %d, batch %d, mask %.2f", args.model, params / 1e6, size,
             args.batch, args.mask_ratio)

    def attention() -> contextlib.AbstractContextManager:
        if args.attention == "auto":
            return contextlib.nullcontext()
        return sdpa_kernel([ATTENTION[args.attention], SDPBackend.MATH])

    with attention():
        ok, pairs = equivalence(model, fast, imgs, args.mask_ratio, dtype, rtol)
    for term, (ref, got) in pairs.items():
        log.info("equivalence %s: eager fp32 %.6g, fast %.6g (rel. diff %.2e)", term, ref, got,
                 abs(got - ref) / max(abs(ref), 1e-12))
    log.info("equivalence check: %s (rtol %.0e)", "passed" if ok else "FAILED", rtol)

    def baseline_optimizer() -> torch.optim.Optimizer:
        """torch's default AdamW (foreach on CUDA, not fused): the step as it ran before the fast path."""
        return torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))

    counted = min(args.batch, FLOP_BATCH)
    per_image = step_flops(model, imgs[:counted], args.mask_ratio, baseline_optimizer()) / counted
    flops = per_image * args.batch
    log.info("step FLOPs: %.1f GFLOP per image (counted on %d images)", per_image / 1e9, counted)

    # each path makes its optimizer as its turn comes and drops it after: its peak holds no other's moments
    fast_optimizer = functools.partial(make_optimizer, model, 0.05, 1e-4, (0.9, 0.95), device)
    runs = [("fast", fast, dtype, fast_optimizer, args.compile)]
    if args.baseline != "none":
        runs.append(("baseline", model, resolve_dtype(args.baseline, device), baseline_optimizer, False))
    rates = {}
    for name, net, run_dtype, new_optimizer, compiled in runs:
        optimizer = new_optimizer()
        step = make_step(model, net, imgs, args.mask_ratio, run_dtype, optimizer)
        with attention() if name == "fast" else contextlib.nullcontext():
            seconds, peak = time_steps(step, device, args.steps, args.warmup)
            report = profile(step, device, args.profile) if args.profile and name == "fast" else ""
        rates[name] = args.batch * args.steps / seconds
        fused = "fused" if optimizer.defaults.get("fused") else "unfused"
        how = f"{str(run_dtype).removeprefix('torch.')}, {'compiled' if compiled else 'eager'}, {fused} AdamW"
        how += f", {args.attention} attention" if name == "fast" and args.attention != "auto" else ""
        how += ", teacher residual fp32" if name == "fast" and args.teacher_residual == "fp32" else ""
        memory = f", peak memory {peak:.2f} GiB" if device.type == "cuda" else ""
        log.info("%s (%s): %.1f images/s, %.1f ms/step, %.3g TFLOP/s%s", name, how, rates[name],
                 1000 * seconds / args.steps, flops * args.steps / seconds / 1e12, memory)
        if report:
            log.info("profile of the fast path, 2 steps:\n%s", report)
        del step, optimizer
    if "baseline" in rates:
        log.info("speed-up over the eager baseline: %.2fx", rates["fast"] / rates["baseline"])
    if args.shards is not None:
        rate = loader_rate(args.shards, size, args.batch, args.workers, args.loader_batches, device)
        log.info("data loader (%s, %d workers, JPEG decode): %.1f images/s", args.shards, args.workers, rate)
    return 0 if ok else 1

