"""Device check of the teacher's fused GELU MLP (mcf.models.fused_mlp) at the paper's shapes, in bf16.

For one teacher MLP at batch 256 (x: [50432, 768], fc1 768→3072, fc2 3072→768) it prints each fused
kernel's error against a float64 reference (next to the unfused bf16 path's error against the same
reference) and its time against cuBLAS plus the separate GELU kernel; then it compiles a two-block
teacher with ``fullgraph=True`` (the fused path must trace without a graph break) and compares its
features and input gradient with the unfused teacher's. Run: ``python3 tools/gpu_fused_check.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.models.fused_mlp import linear_gelu, linear_gelu_pre, matmul_gelu_grad
from mcf.models.teacher import FeatureTeacher


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def kernels(m: int = 50432, c: int = 768, hidden: int = 3072) -> None:
    torch.manual_seed(0)
    x = torch.randn(m, c, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(hidden, c, device="cuda") / c**0.5).bfloat16()
    b1 = (0.1 * torch.randn(hidden, device="cuda")).bfloat16()
    w2 = (torch.randn(c, hidden, device="cuda") / hidden**0.5).bfloat16()
    g = torch.randn(m, c, device="cuda", dtype=torch.bfloat16)
    pre64 = x.double() @ w1.double().t() + b1.double()
    act, pre = linear_gelu_pre(x, w1, b1)
    unfused_pre = torch.addmm(b1, x, w1.t())
    print(f"fc1+gelu: fused rel. error {rel(act, F.gelu(pre64)):.2e} (unfused bf16 "
          f"{rel(F.gelu(unfused_pre), F.gelu(pre64)):.2e}); pre {rel(pre, pre64):.2e}")
    gelu_grad64 = torch.special.ndtr(pre64) + pre64 * torch.exp(-(pre64**2) / 2) / (2 * torch.pi) ** 0.5
    grad64 = (g.double() @ w2.double()) * gelu_grad64
    fused_grad = matmul_gelu_grad(g, w2, pre)
    unfused_grad = torch.ops.aten.gelu_backward(g @ w2, unfused_pre)
    print(f"fc2 dgrad x gelu': fused rel. error {rel(fused_grad, grad64):.2e} "
          f"(unfused {rel(unfused_grad, grad64):.2e})")
    flops = 2 * m * c * hidden
    runs = {
        "cuBLAS addmm + gelu": lambda: F.gelu(torch.addmm(b1, x, w1.t())),
        "fused fc1+gelu": lambda: linear_gelu(x, w1, b1),
        "fused fc1+gelu, keep pre": lambda: linear_gelu_pre(x, w1, b1),
        "cuBLAS mm + gelu_backward": lambda: torch.ops.aten.gelu_backward(g @ w2, pre),
        "fused dgrad x gelu'": lambda: matmul_gelu_grad(g, w2, pre),
        "cuBLAS addmm alone": lambda: torch.addmm(b1, x, w1.t()),
    }
    for name, fn in runs.items():
        ms = do_bench(fn, return_mode="median")
        print(f"{name:28s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.0f} TFLOP/s")


def compiled(batch: int = 64) -> None:
    torch.manual_seed(0)
    vit = create_backbone(BackboneConfig(depth=2)).cuda()
    fused = FeatureTeacher(vit)
    plain = FeatureTeacher(create_backbone(BackboneConfig(depth=2)), fused_mlp=False).cuda()
    plain.model.load_state_dict(vit.state_dict())
    imgs = torch.randn(batch, 3, 224, 224, device="cuda")
    outs = []
    for fn in (plain, torch.compile(fused, fullgraph=True)):
        x = imgs.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            feats = fn(x, [0, 1])
        sum(f.float().square().mean() for f in feats).backward()
        outs.append(([f.float() for f in feats], x.grad))
    (f0, g0), (f1, g1) = outs
    errs = [((a - b).norm() / b.norm()).item() for a, b in zip(f1, f0, strict=True)]
    print(f"compiled fused teacher (fullgraph) vs eager unfused: features {max(errs):.2e}, "
          f"input gradient {((g1 - g0).norm() / g0.norm()).item():.2e}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    kernels()
    compiled()
