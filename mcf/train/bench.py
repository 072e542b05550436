"""``mcf bench pretrain``: training throughput of the MCF step on synthetic images.

Times the same optimizer step the pretrain loop takes (forward with masking, teacher feature loss,
momentum keys, backward, AdamW, momentum update) and logs images/s, the achieved TFLOP/s (FLOPs
of one step counted with ``FlopCounterMode``) and, on CUDA, the peak memory. ``--model tiny`` is the
CPU default of ``params.yaml`` (pretrain's model, the teacher stage's backbone); ``base`` is the
paper's ViT-B/16 at 224 with a 512×8 decoder and a ViT-B teacher read at blocks 2/5/8/11. The
teacher is random: its weights do not change the cost.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from mcf.models.backbone import create_backbone
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.teacher import FeatureTeacher
from mcf.params import load
from mcf.train.loop import accumulate, param_groups, resolve_dtype

log = logging.getLogger(__name__)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mcf bench pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "base"), default="tiny", help="default: %(default)s")
    p.add_argument("--params", default="params.yaml", help="where tiny's size is read (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast dtype; auto: bf16 on CUDA, fp32 on the CPU (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: %(default)s")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="default: %(default)s")
    return p.parse_args(argv)


def build(name: str, params: str) -> MCF:
    """The benchmarked model with a random teacher: tiny's as the teacher stage trains it, base's ViT-B."""
    if name == "tiny":
        cfg, teacher_size = load("pretrain", params)[1].model, load("teacher", params)[1].backbone
    else:
        cfg = MCFConfig()
        teacher_size = cfg.backbone
    teacher = FeatureTeacher(create_backbone(teacher_size)) if cfg.uses_teacher else None
    return MCF(cfg, teacher)


def bench_pretrain(argv: list[str]) -> int:
    """Run the benchmark; log one line per figure."""
    args = parse(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    model = build(args.model, args.params).to(device).train()
    net = torch.compile(model) if args.compile else model
    dtype = resolve_dtype(args.precision, device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    size = model.cfg.backbone.img_size
    imgs = torch.randn(args.batch, 3, size, size, device=device)

    def step(module: torch.nn.Module = net) -> None:
        accumulate(module, [imgs], args.mask_ratio, dtype, scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        model.update_momentum(model.cfg.momentum)

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step(model)  # eager: compiled kernels bypass the dispatcher that counts
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    flops = counter.get_total_flops()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compiled = ", compiled" if args.compile else ""
    log.info(
        "model %s: %.1f M trainable params, img %d, batch %d, %s, %s%s, %d threads", args.model,
        params / 1e6, size, args.batch, dtype, device, compiled, torch.get_num_threads(),
    )
    log.info("images/s: %.1f", args.batch * args.steps / seconds)
    log.info("step: %.1f ms, %.2f GFLOP/step", 1000 * seconds / args.steps, flops / 1e9)
    log.info("achieved TFLOP/s: %.3f", flops * args.steps / seconds / 1e12)
    if device.type == "cuda":
        log.info("peak memory: %.2f GiB", torch.cuda.max_memory_allocated() / 2**30)
    return 0
