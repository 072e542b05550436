"""The FlashAttention-4 ops and block swap (``mcf/models/fa4.py``) on the CPU: their reference kernels
against timm's attention, the ops' registrations, one compiled graph per block, and the bench's refusal
where no FlashAttention-4 can run. The CUDA kernels themselves are checked on a GPU by the bench's
equivalence check (tools/gpu_bench_fa4.sh)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_bench import _model
from timm.models.vision_transformer import Block

from mcf.models.fa4 import FA4Attention, fa4_attention, fa4_attention_backward, use_fa4_attention
from mcf.train.bench import parse


def _qkv(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, T, H, D] as timm's projection lays them out: strided views of one qkv tensor."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 3, 4, 8, dtype=dtype, requires_grad=True)
    return qkv.unbind(2)


def test_the_ops_are_softmax_attention_and_its_gradients() -> None:
    q, k, v = _qkv()
    out, lse = fa4_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-6)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-6)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref.transpose(1, 2), (q, k, v), dout)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_ops_registrations_hold() -> None:
    """torch.library's own checks: schema, fake (meta) kernels, autograd registration, compile tracing."""
    q, k, v = _qkv()
    torch.library.opcheck(fa4_attention, (q, k, v))
    with torch.no_grad():
        out, lse = fa4_attention(q, k, v)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse)
    torch.library.opcheck(fa4_attention_backward, args)


def test_the_swap_keeps_the_blocks_function_and_compiles_as_one_graph() -> None:
    torch.manual_seed(0)
    block = Block(32, 4, qkv_bias=True)
    swapped = copy.deepcopy(block)
    assert use_fa4_attention(swapped) == 1 and type(swapped.attn) is FA4Attention
    x = torch.randn(2, 9, 32, requires_grad=True)
    compiled = torch.compile(swapped, backend="aot_eager", fullgraph=True)  # a graph break raises
    for net in (swapped, compiled):
        ref, got = block(x), net(x)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        dout = torch.randn_like(ref)
        params = [p for _, p in sorted(block.named_parameters())]
        ours = [p for _, p in sorted(swapped.named_parameters())]
        want = torch.autograd.grad(ref, [x, *params], dout)
        got_grads = torch.autograd.grad(got, [x, *ours], dout)
        for g, w in zip(got_grads, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_the_mcf_model_swaps_every_attention_and_keeps_its_losses() -> None:
    model, imgs = _model(), torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    with torch.no_grad():
        ref = model(imgs, 0.75)
    assert use_fa4_attention(model) == 2 * 2 + 1 + 2  # encoder, momentum encoder, decoder, teacher
    torch.manual_seed(1)
    with torch.no_grad():
        got = model(imgs, 0.75)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


def test_a_block_the_swap_would_change_is_refused() -> None:
    with pytest.raises(ValueError, match="no attention dropout"):
        use_fa4_attention(Block(32, 4, attn_drop=0.1))


def test_the_bench_refuses_fa4_where_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--attention", "fa4", "--device", "cpu"])
    assert "--attention fa4: needs a CUDA device" in capsys.readouterr().err
