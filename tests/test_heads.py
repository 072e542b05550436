"""The dense heads: output shapes, landmark decoding and heatmap targets, the EMA rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.models.heads import (
    DenseFaceModel,
    HeadConfig,
    Neck,
    PyramidPooling,
    UPerHead,
    conv_bn_relu,
    gaussian_heatmaps,
    parsing_logits,
    soft_argmax,
)
from mcf.train.ema import EMA

TINY = BackboneConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("outputs", [19, 11])
def test_dense_model_shapes(size: int, outputs: int) -> None:
    torch.manual_seed(0)
    model = DenseFaceModel(create_backbone(TINY, img_size=size), HeadConfig((0, 1, 2, 3), 16, outputs))
    logits = model(torch.randn(2, 3, size, size))
    grid = size // TINY.patch_size
    assert logits.shape == (2, outputs, 4 * grid, 4 * grid)
    groups = model.param_groups()
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


def test_the_classifier_sees_the_decoder_through_channel_dropout() -> None:
    """FaRL's UPerHead drops whole channels (p 0.1) before its 1×1 classifier, in training only; at 0 the
    forward draws nothing, so a run without it keeps its random stream. The training forward is pinned
    against the classifier on the dropped features under one seed: checks of the dropout module alone
    passed a forward that skipped it."""
    torch.manual_seed(0)
    model = DenseFaceModel(create_backbone(TINY), HeadConfig((0, 1, 2, 3), 16, 11, dropout=0.5))
    x = torch.randn(2, 3, 32, 32)
    features = model.decode(model.neck(model.forward_features(x)))
    kept = model.dropout(features).abs().sum(dim=(2, 3)) > 0  # [N, C]: whole channels go
    assert 0 < kept.float().mean() < 1
    torch.manual_seed(1)
    trained = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(trained, model.classifier(model.dropout(features)))
    assert not torch.allclose(trained, model.classifier(features))
    model.eval()
    plain = model.classifier(model.decode(model.neck(model.forward_features(x))))
    torch.testing.assert_close(model(x), plain)
    model.train()
    model.dropout.p = 0.0
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("blocks", [(0, 1, 2, 9), (0, 1, 2, 4), (3, 2, 1, 0), (0, 2, 1, 3), (0, 0, 1, 2),
                                    (0, 1, 2)])
def test_dense_model_rejects_bad_blocks(blocks: tuple[int, ...]) -> None:
    """Out of range (4 is one past a depth-4 backbone's last block), out of depth order, repeated, or not
    four: timm returns the blocks in depth order whatever order is asked, so (3, 2, 1, 0) would silently
    train the same model as (0, 1, 2, 3), and the neck's four levels need four distinct maps."""
    with pytest.raises(ValueError, match="blocks"):
        DenseFaceModel(create_backbone(TINY), HeadConfig(blocks, 16, 19))


def test_param_groups_are_the_backbone_the_neck_and_the_rest_with_the_head_last() -> None:
    """Each part trains at its own lr (PROTOCOL §3–4: backbone 1e-4, neck and head 1e-2 or 1e-3), and the
    fine-tune logs ``lr/head`` from the last group: a neck and head swapped kept every count right."""
    model = DenseFaceModel(create_backbone(TINY), HeadConfig((0, 1, 2, 3), 16, 19))
    groups = model.param_groups()
    ids = [{id(p) for p in groups[name]} for name in ("backbone", "neck", "head")]
    assert list(groups) == ["backbone", "neck", "head"]
    assert ids[0] == {id(p) for p in model.backbone.parameters()}
    assert ids[1] == {id(p) for p in model.neck.parameters()}
    assert ids[2] == {id(p) for p in model.parameters()} - ids[0] - ids[1]


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_bn_relu_keeps_the_size_without_a_conv_bias(kernel: int) -> None:
    """UPerNet's block as its docstring states: a bias-free conv (the BatchNorm's shift makes a bias
    redundant), BatchNorm, then ReLU, padded to keep the map's size. A conv bias or a dropped ReLU kept
    every shape right."""
    block = conv_bn_relu(4, 6, kernel)
    out = block(torch.randn(2, 4, 5, 7))
    assert out.shape == (2, 6, 5, 7) and block[0].bias is None and isinstance(block[1], nn.BatchNorm2d)
    assert out.min() == 0  # training-mode BatchNorm centres each channel: about half of it is clipped


def test_neck_levels_are_beits() -> None:
    """PROTOCOL §3 (FaRL's neck, BEiT's): ×4 = transposed conv, BatchNorm, GELU, transposed conv; ×2 one
    2×2 stride-2 transposed conv; ×1 the map itself; ÷2 a 2×2 max-pool. The shape pin passed an average
    pool, a dropped BatchNorm or GELU, and ×2 by plain upsampling."""
    torch.manual_seed(0)
    neck = Neck(4).eval()
    maps = [torch.randn(1, 4, 6, 6) for _ in range(4)]
    with torch.no_grad():
        _, x2, x1, half = neck(maps)
    x4 = [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert [type(m) for m in neck.scales[0]] == x4
    assert all(m.kernel_size == m.stride == (2, 2) for m in (neck.scales[0][0], neck.scales[0][3]))
    up = neck.scales[1]
    torch.testing.assert_close(x2, F.conv_transpose2d(maps[1], up.weight, up.bias, stride=2))
    assert torch.equal(x1, maps[2])
    torch.testing.assert_close(half, F.max_pool2d(maps[3], 2))


def test_pyramid_pooling_fuses_the_input_with_its_average_pooled_context() -> None:
    """PSPNet's PPM as FaRL's UPerHead runs it: each branch average-pools to s×s bins, then a 1×1 conv and
    ReLU with no BatchNorm (PROTOCOL §3), upsampled bilinearly (half-pixel centres); the input comes
    first, and a 3×3 block fuses them. Shapes alone passed max-pooling, a dropped ReLU, corner-aligned
    upsampling, the input last and a 1×1 fuse."""
    torch.manual_seed(0)
    scales = (1, 2, 3, 6)
    ppm = PyramidPooling(3, 5, scales).eval()
    x = torch.randn(2, 3, 12, 12)
    seen: list[torch.Tensor] = []
    branches = ppm.branches
    ppm.fuse.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        ppm(x)
        pooled = [F.relu(b[1](F.adaptive_avg_pool2d(x, s))) for s, b in zip(scales, branches, strict=True)]
        want = [x, *(F.interpolate(p, size=(12, 12), mode="bilinear", align_corners=False) for p in pooled)]
    torch.testing.assert_close(seen[0], torch.cat(want, dim=1))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ppm.branches.modules())
    assert ppm.fuse[0].kernel_size == (3, 3)


def test_uperhead_kernels() -> None:
    """UPerNet (mmseg's UPerHead, which FaRL runs): 1×1 lateral convs, 3×3 convs on the top-down maps,
    and a 3×3 conv fusing the concatenated levels. A 1×1 fuse kept every shape."""
    head = UPerHead(cin=4, channels=8)
    assert [block[0].kernel_size for block in head.lateral] == [(1, 1)] * 3
    assert [block[0].kernel_size for block in head.smooth] == [(3, 3)] * 3
    assert head.fuse[0].kernel_size == (3, 3)


def test_soft_argmax_finds_the_peak() -> None:
    logits = torch.full((1, 2, 16, 20), -30.0)
    logits[0, 0, 5, 7] = 30.0  # a single hot pixel: its centre is ((7 + .5) / 20, (5 + .5) / 16)
    logits[0, 1, 10:12, 2:4] = 30.0  # a 2×2 block: centre at pixel (3, 11)
    points = soft_argmax(logits)
    torch.testing.assert_close(points[0, 0], torch.tensor([7.5 / 20, 5.5 / 16]), atol=1e-4, rtol=0)
    torch.testing.assert_close(points[0, 1], torch.tensor([3 / 20, 11 / 16]), atol=1e-4, rtol=0)


def test_soft_argmax_weights_each_pixel_by_its_sigmoid() -> None:
    """Each heatmap pixel is an independent sigmoid (the Gaussian targets are per-pixel probabilities), not
    a softmax over the map: a one-hot peak reads the same under both. Logits (0, ln 3) on a 1×2 map weigh
    the centres 0.25 and 0.75 by sigmoid 1/2 and 3/4: x = (0.125 + 0.5625) / 1.25 = 0.55 (softmax's
    1/4, 3/4 give 0.625)."""
    points = soft_argmax(torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2))
    torch.testing.assert_close(points, torch.tensor([[[0.55, 0.5]]]))


def test_gaussian_target_peaks_at_the_landmark_and_decodes_back() -> None:
    points = torch.tensor([[[0.25, 0.75], [0.53, 0.31]]])
    maps = gaussian_heatmaps(points, size=32, sigma=1.5, radius=5.0)
    assert maps.shape == (1, 2, 32, 32)
    peak = maps[0, 0].flatten().argmax()
    assert divmod(int(peak), 32) in {(23, 7), (23, 8), (24, 7), (24, 8)}  # (y, x) around (8, 24) px
    assert maps[0, 0, 0, 0] == 0  # beyond the radius
    logits = torch.logit(maps.clamp(1e-6, 1 - 1e-6))
    torch.testing.assert_close(soft_argmax(logits), points, atol=2e-3, rtol=0)


def test_gaussian_target_keeps_the_radius_and_cuts_beyond_it() -> None:
    """``exp(-d² / 2σ²)``, zero only beyond ``radius`` (the docstring): a point on a pixel centre of a 16²
    map keeps the 29 pixels with d² <= 9 at radius 3 (``d < radius`` kept 25), each at its Gaussian
    value."""
    maps = gaussian_heatmaps(torch.tensor([[[4.5 / 16, 8.5 / 16]]]), 16, sigma=1.0, radius=3.0)
    assert int((maps > 0).sum()) == 29
    assert maps[0, 0, 8, 4] == 1 and maps[0, 0, 8, 7].item() == pytest.approx(math.exp(-4.5))
    assert maps[0, 0, 10, 6].item() == pytest.approx(math.exp(-4)) and maps[0, 0, 10, 7] == 0


def test_parsing_logits_upsample_bilinearly_on_pixel_centres() -> None:
    """Bilinear with half-pixel centres (align_corners False), the convention soft_argmax and the heatmaps
    use (pixel j spans [j, j + 1)): a 2-px row 0, 4 upsampled ×4 ramps between the two old centres and is
    flat beyond them. align_corners True shifts every class boundary toward the centre; nearest is
    blocky."""
    logits = torch.tensor([0.0, 4.0]).view(1, 1, 1, 2).expand(1, 3, 2, 2)
    up = parsing_logits(logits, (2, 8))
    assert up.shape == (1, 3, 2, 8)
    torch.testing.assert_close(up[0, :, 1], torch.tensor([0, 0, 0.5, 1.5, 2.5, 3.5, 4, 4]).expand(3, 8))


def test_ema_update_rule() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.model[0].weight, 0.9 * before + 0.1 * model[0].weight)
    assert int(ema.model[1].num_batches_tracked) == 7
    warm = EMA(model, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_ema_warm_up_decay_is_the_one_each_update_applies() -> None:
    """Update n (from 0) averages with min(d, (1 + n) / (10 + n)): 0.1 first, then rising until it meets
    d = 0.5 at n = 8 and stays there. Catches a count that never advances or advances before its update,
    a warm-up without its cap, or an update that applies d whatever the warm-up. Float64 weights are
    averaged too (only integer buffers are copied)."""
    model = nn.Linear(3, 2).double()
    ema = EMA(model, decay=0.5)
    for n in range(12):
        d = min(0.5, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        before = ema.model.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        torch.testing.assert_close(ema.model.weight, d * before + (1 - d) * model.weight)
    assert ema.updates == 12 and ema.current_decay() == 0.5


def test_ema_copy_is_in_eval_mode_and_decay_bounds() -> None:
    """The fine-tune scores the EMA copy after each epoch as it is (the scorer calls no ``eval()``): a copy
    in train mode would score with dropout on and BatchNorm on batch statistics. The model it copies stays
    as it was. Decay 0 (the copy follows the weights) is accepted, 1 (it never moves) refused."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Dropout(0.5)).train()
    ema = EMA(model, 0.0, warmup=False)
    assert not any(m.training for m in ema.model.modules())
    assert all(m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.model[0].weight, model[0].weight)
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.0"):
        EMA(model, 1.0)


def test_uperhead_fuses_every_level_bilinearly_upsampled() -> None:
    """UPerNet's data flow, pinned: top-down each level adds the coarser one bilinearly upsampled, and the
    final fuse reads all four levels at the finest size. Shapes alone cannot see a level zeroed before the
    fuse (its content still reaches level 0 top-down) or nearest in place of bilinear (blocky features)."""
    torch.manual_seed(0)
    head = UPerHead(cin=4, channels=8).eval()
    pyramid = [torch.randn(2, 4, s, s) for s in (24, 12, 6, 3)]  # ×4, ×2, ×1, ÷2 of a 6×6 grid
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, inputs: bool = False) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            seen[name] = (args[0] if inputs else out).detach().clone()
        return hook

    for k in range(3):
        head.lateral[k].register_forward_hook(keep(f"lateral{k}"))
        head.smooth[k].register_forward_hook(keep(f"smooth_in{k}", inputs=True))
        head.smooth[k].register_forward_hook(keep(f"smooth{k}"))
    head.ppm.register_forward_hook(keep("ppm"))
    head.fuse.register_forward_hook(keep("fuse_in", inputs=True))
    with torch.no_grad():
        head(pyramid)

    def up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    top = seen["ppm"]
    for k in (2, 1, 0):
        top = seen[f"lateral{k}"] + up(top, seen[f"lateral{k}"])
        torch.testing.assert_close(seen[f"smooth_in{k}"], top)
    finest = seen["smooth0"]
    coarser = [up(seen[name], finest) for name in ("smooth1", "smooth2", "ppm")]
    torch.testing.assert_close(seen["fuse_in"], torch.cat([finest, *coarser], dim=1))
