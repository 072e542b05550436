"""FlashAttention-4 in timm's attention blocks, for the Hopper throughput bench (issue 8).

At 197 tokens, cuDNN's attention ran at about 105 TFLOP/s on an H200 and took 22 of a step's 123 ms.
FlashAttention-4 (the ``flash-attn-4`` wheel, CuTe DSL kernels) has forward and backward kernels for
sm90. It is reached through two custom ops, so ``torch.compile`` keeps every block in one graph:

- ``mcf::fa4_attention(q, k, v) -> (out, lse)``: q, k, v [B, T, H, D] as timm's qkv projection lays
  them out (no transposes, no copies), softmax scale 1/sqrt(D) as SDPA's; lse [B, H, T] in fp32;
- ``mcf::fa4_attention_backward(dout, q, k, v, out, lse) -> (dq, dk, dv)``.

On CUDA they call FlashAttention-4 (bf16 or fp16; fp32 attention keeps SDPA). On the CPU they run a
reference of the same kernels in fp32 (the forward, and FlashAttention's backward recurrence from the
saved logsumexp) with FlashAttention-4's contiguous outputs, so the tests pin the ops' layouts,
gradients and compilation where no GPU is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import Tensor, nn


@torch.library.custom_op("mcf::fa4_attention", mutates_args=(), device_types="cuda")
def fa4_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of [B, T, H, D] q, k, v: out [B, T, H, D] and logsumexp [B, H, T] (fp32)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, return_lse=True)
    return out.contiguous(), lse.contiguous()  # the layouts the fake kernel promises the compiler


@torch.library.custom_op("mcf::fa4_attention_backward", mutates_args=(), device_types="cuda")
def fa4_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fa4_attention`'s ``out`` with respect to q, k, v."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _scores(q: Tensor, k: Tensor) -> Tensor:
    """Scaled scores [B, H, T, T] in fp32."""
    return torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5


@fa4_attention.register_kernel("cpu")
def _fa4_attention_cpu(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    s = _scores(q, k)
    lse = s.logsumexp(dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (s - lse[..., None]).exp(), v.float())
    return out.to(q.dtype).contiguous(), lse


@fa4_attention_backward.register_kernel("cpu")
def _fa4_attention_backward_cpu(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention's backward: P from the saved lse, dS = P * (dP - rowsum(dO * O))."""
    p = (_scores(q, k) - lse[..., None]).exp()
    do = dout.float()
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v.float())
    delta = (do * out.float()).sum(dim=-1).transpose(1, 2)  # [B, H, T]
    ds = p * (dp - delta[..., None]) * q.shape[-1] ** -0.5
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.float())
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.float())
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


@fa4_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    b, t, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, t), dtype=torch.float32)


@fa4_attention_backward.register_fake
def _(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, ...]:
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_attention_backward(dout.contiguous(), q, k, v, out, lse)


fa4_attention.register_autograd(_backward, setup_context=_setup_context)


class FA4Attention(Attention):
    """timm's attention with its softmax attention in :func:`fa4_attention`: same weights, same function."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("FA4Attention takes no mask")
        n, length, _ = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # [N, T, H, D] each: views of qkv
        q, k = self.q_norm(q), self.k_norm(k)
        if qkv.is_cuda and qkv.dtype == torch.float32:  # FlashAttention-4 takes 16-bit inputs only
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        else:
            out = fa4_attention(q, k, v)[0]
        return self.proj_drop(self.proj(self.norm(out.reshape(n, length, -1))))


def use_fa4_attention(model: nn.Module) -> int:
    """Swap every timm attention of ``model`` (weights untouched) for :class:`FA4Attention`; how many.

    Refuses blocks whose function the swap would change: attention dropout or a gate.
    """
    found = [m for m in model.modules() if type(m) is Attention]
    for m in found:
        if m.attn_drop.p or getattr(m, "gate", None) is not None:
            raise ValueError("FA4Attention has no attention dropout or gate")
        m.__class__ = FA4Attention
    return len(found)
