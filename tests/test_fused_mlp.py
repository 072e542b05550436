"""The teacher's fused GELU MLP (:mod:`mcf.models.fused_mlp`): the Triton kernels against float64
references in Triton's CPU interpreter, and the module's fallback against timm's MLP.

The interpreter must be on before Triton compiles anything, so the kernel checks run in a fresh
process. It reads float32 (its bfloat16 loads are not reliable), which checks the kernels' indexing,
tails and epilogues; their bf16 speed and rounding are the device bench's business (``--no-fused-mlp``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch

pytest.importorskip("triton")

from mcf.models.fused_mlp import FrozenGeluMlp, fusable  # noqa: E402
from mcf.models.teacher import FeatureTeacher  # noqa: E402

KERNELS = r"""
import torch
import torch.nn.functional as F
from mcf.models import fused_mlp as fm

def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()

torch.manual_seed(0)
for m, k, n in [(70, 40, 50), (64, 32, 96), (5, 100, 33)]:  # tails in every dimension, and none
    x, g = torch.randn(m, k), torch.randn(m, k)
    w1, b1 = torch.randn(n, k) / k**0.5, torch.randn(n)
    w2, b2 = torch.randn(k, n) / n**0.5, torch.randn(k)
    act, pre = fm.linear_gelu_pre(x, w1, b1)
    ref_pre = x.double() @ w1.double().t() + b1.double()
    assert rel(pre, ref_pre) < 1e-6 and rel(act, F.gelu(ref_pre)) < 1e-6, (m, k, n)
    assert torch.equal(fm.linear_gelu(x, w1, b1), act)
    leaf = ref_pre.clone().requires_grad_()
    F.gelu(leaf).backward(g.double() @ w2.double())
    assert rel(fm.matmul_gelu_grad(g, w2, pre), leaf.grad) < 1e-6, (m, k, n)

    xr = x.double().requires_grad_()
    ref = F.linear(F.gelu(F.linear(xr, w1.double(), b1.double())), w2.double(), b2.double())
    ref.backward(g.double())
    xf = x.clone().requires_grad_()
    out = fm.frozen_gelu_mlp(xf, w1, b1, w2, b2)
    out.backward(g)
    assert rel(out, ref) < 1e-6 and rel(xf.grad, xr.grad) < 1e-6, (m, k, n)
    with torch.no_grad():
        assert torch.equal(fm.frozen_gelu_mlp(x, w1, b1, w2, b2), out.detach())
print("ok")
"""


def test_kernels_match_float64_in_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNELS], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_teacher_mlps_keep_their_weights_and_function_off_cuda() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, depth=2)
    keys = set(vit.state_dict())
    plain = FeatureTeacher(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                                             img_size=32, depth=2), fused_mlp=False)
    plain.model.load_state_dict(vit.state_dict())
    fused = FeatureTeacher(vit)
    assert all(isinstance(b.mlp, FrozenGeluMlp) for b in fused.model.blocks)
    assert not any(isinstance(b.mlp, FrozenGeluMlp) for b in plain.model.blocks)
    assert set(fused.model.state_dict()) == keys  # checkpoints and exports load as before
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    got, want = fused(x, [0, 1]), plain(x, [0, 1])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # the CPU takes timm's path
    got[1].sum().backward()
    assert x.grad is not None and all(p.grad is None for p in fused.parameters())


def test_only_exact_gelu_mlps_without_dropout_fuse() -> None:
    from timm.layers import Mlp

    assert fusable(Mlp(8, 32))
    assert not fusable(Mlp(8, 32, act_layer=lambda: torch.nn.GELU(approximate="tanh")))
    assert not fusable(Mlp(8, 32, drop=0.1))
    assert not fusable(Mlp(8, 32, bias=False))
    assert not fusable(Mlp(8, 32, norm_layer=torch.nn.LayerNorm))
    with pytest.raises(ValueError, match="exact-GELU"):
        FrozenGeluMlp(Mlp(8, 32, drop=0.1))
