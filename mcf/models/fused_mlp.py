"""The frozen teacher's MLP (fc1 → exact GELU → fc2) with the GELU folded into the matrix products.

Why: in the compiled bf16 pre-training step of the paper's ViT-B/16 on an H200, the teacher's GELU
passes were separate memory-bound kernels (about 9 ms of a 129 ms step at batch 256: two forward
passes over a [50432, 3072] activation, and one backward). cuBLASLt's GELU epilogue is the tanh
approximation, which is another function; these kernels keep the exact (erf) GELU.

- forward: one Triton kernel computes ``a = gelu(x W1ᵀ + b1)`` in float32 from the products'
  accumulator, and writes ``h = x W1ᵀ + b1`` too when a gradient will need it; fc2 stays cuBLAS;
- backward, for the input only (the teacher's weights are frozen): one kernel computes
  ``(g W2) ⊙ gelu'(h)``; the product with W1 stays cuBLAS.

:class:`FrozenGeluMlp` takes this path on CUDA under bf16/fp16 autocast with frozen weights, and is
timm's ``fc2(gelu(fc1(x)))`` everywhere else. Importing this module needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from timm.layers import Mlp
from torch import Tensor, nn


@triton.jit
def _matmul_gelu_kernel(
    a_ptr, b_ptr, out_ptr, bias_ptr, pre_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    GRAD: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``acc = A @ B`` in float32, then the epilogue:

    - ``GRAD`` false: ``h = acc + bias``; ``out = gelu(h)`` (exact); ``pre = h`` if ``STORE_PRE``;
    - ``GRAD`` true: ``out = acc * gelu'(pre)``, ``pre`` read from memory.
    """
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)  # tiles grouped along M so that B's columns stay in L2
    first_m = group * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % rows
    pid_n = (pid % (GROUP_M * grid_n)) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    safe_m, safe_n = offs_m % M, offs_n % N  # wrap rather than mask the loads; the stores are masked
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + safe_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if GRAD:
        h = tl.load(pre_ptr + out_offs, mask=inside, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))  # 1/sqrt(2)
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1/sqrt(2 pi)
        out = acc * (cdf + h * pdf)
    else:
        h = acc + tl.load(bias_ptr + safe_n).to(tl.float32)[None, :]
        if STORE_PRE:
            tl.store(pre_ptr + out_offs, h.to(pre_ptr.dtype.element_ty), mask=inside)
        out = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=inside)


_CONFIGS = [  # Hopper-sized tiles; the autotuner keeps the fastest per shape
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
]
_tuned_kernel = triton.autotune(_CONFIGS, key=["M", "N", "K", "GRAD", "STORE_PRE"])(_matmul_gelu_kernel)
SMALL = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}  # Triton's CPU interpreter (tests)


def _launch(a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None, pre: Tensor | None, grad: bool) -> None:
    m, k = a.shape
    n = b.shape[1]
    args = (a, b, out, bias if bias is not None else out, pre if pre is not None else out, m, n, k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    flags = {"GRAD": grad, "STORE_PRE": pre is not None and not grad}
    if a.is_cuda:
        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _tuned_kernel[grid](*args, **flags)
    else:
        grid = (triton.cdiv(m, SMALL["BLOCK_M"]) * triton.cdiv(n, SMALL["BLOCK_N"]),)
        _matmul_gelu_kernel[grid](*args, **flags, **SMALL)


# Custom operators: torch.compile treats each as one opaque call (never traces into the launch), and a
# CUDA graph records it like any other kernel.
@torch.library.custom_op("mcf::linear_gelu", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> Tensor")
def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x Wᵀ + b)`` for 2-D ``x`` [M, K] and ``weight`` [N, K]."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    _launch(x, weight.t(), out, bias, None, grad=False)
    return out


@torch.library.custom_op("mcf::linear_gelu_pre", mutates_args=(),
                         schema="(Tensor x, Tensor weight, Tensor bias) -> (Tensor, Tensor)")
def linear_gelu_pre(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``gelu(x Wᵀ + b)`` and ``x Wᵀ + b``, which the backward reads."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    pre = torch.empty_like(out)
    _launch(x, weight.t(), out, bias, pre, grad=False)
    return out, pre


@torch.library.custom_op("mcf::matmul_gelu_grad", mutates_args=(),
                         schema="(Tensor grad, Tensor weight, Tensor pre) -> Tensor")
def matmul_gelu_grad(grad: Tensor, weight: Tensor, pre: Tensor) -> Tensor:
    """``(grad W) ⊙ gelu'(pre)``: fc1's output gradient from fc2's (``weight``: fc2's, [K, N])."""
    out = torch.empty_like(pre)
    _launch(grad, weight, out, None, pre, grad=True)
    return out


@linear_gelu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@linear_gelu_pre.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])


@matmul_gelu_grad.register_fake
def _(grad: Tensor, weight: Tensor, pre: Tensor) -> Tensor:
    return torch.empty_like(pre)


class _FrozenGeluMlpFn(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` with frozen weights: the gradient reaches ``x`` only."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        act, pre = linear_gelu_pre(x, w1, b1)
        ctx.save_for_backward(w1, w2, pre)
        return torch.addmm(b2, act, w2.t())

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        w1, w2, pre = ctx.saved_tensors
        grad_pre = matmul_gelu_grad(grad_out.contiguous(), w2, pre)
        return grad_pre @ w1, None, None, None, None


def frozen_gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The fused MLP on 2-D ``x``, all operands in one dtype; differentiable in ``x`` only."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenGeluMlpFn.apply(x, w1, b1, w2, b2)
    return torch.addmm(b2, linear_gelu(x, w1, b1), w2.t())


class FrozenGeluMlp(nn.Module):
    """timm's ``Mlp`` (same ``fc1``/``fc2`` and state-dict keys) for a frozen teacher: the fused kernels
    on CUDA under bf16/fp16 autocast when its weights are frozen, timm's computation otherwise."""

    def __init__(self, mlp: Mlp) -> None:
        super().__init__()
        if not fusable(mlp):
            raise ValueError(f"not an exact-GELU MLP without dropout or norm: {mlp}")
        self.fc1, self.act, self.fc2 = mlp.fc1, mlp.act, mlp.fc2

    def forward(self, x: Tensor) -> Tensor:
        frozen = not (self.fc1.weight.requires_grad or self.fc2.weight.requires_grad)
        if not (x.is_cuda and frozen and torch.is_autocast_enabled("cuda")):
            return self.fc2(self.act(self.fc1(x)))
        dtype = torch.get_autocast_dtype("cuda")
        fc1, fc2 = self.fc1, self.fc2
        w1, b1, w2, b2 = (t.to(dtype) for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias))
        flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        return frozen_gelu_mlp(flat, w1, b1, w2, b2).reshape(*x.shape[:-1], w2.shape[0])


def fusable(mlp: nn.Module) -> bool:
    """Is ``mlp`` timm's ``fc1 → exact GELU → fc2`` with biases, no dropout and no hidden norm?"""
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        return False
    no_drop = all(isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and d.p == 0)
                  for d in (mlp.drop1, mlp.drop2))
    exact_gelu = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
    biases = mlp.fc1.bias is not None and mlp.fc2.bias is not None
    return no_drop and exact_gelu and biases and isinstance(mlp.norm, nn.Identity)
