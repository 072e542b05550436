"""The dense heads: output shapes, landmark decoding and heatmap targets, the EMA rule."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.models.heads import DenseFaceModel, HeadConfig, UPerHead, gaussian_heatmaps, soft_argmax
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
    forward draws nothing, so a run without it keeps its random stream."""
    torch.manual_seed(0)
    model = DenseFaceModel(create_backbone(TINY), HeadConfig((0, 1, 2, 3), 16, 11, dropout=0.5))
    x = torch.randn(2, 3, 32, 32)
    features = model.decode(model.neck(model.forward_features(x)))
    kept = model.dropout(features).abs().sum(dim=(2, 3)) > 0  # [N, C]: whole channels go
    assert 0 < kept.float().mean() < 1
    model.eval()
    plain = model.classifier(model.decode(model.neck(model.forward_features(x))))
    torch.testing.assert_close(model(x), plain)
    model.train()
    model.dropout.p = 0.0
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("blocks", [(0, 1, 2, 9), (3, 2, 1, 0), (0, 2, 1, 3)])
def test_dense_model_rejects_bad_blocks(blocks: tuple[int, ...]) -> None:
    """Out of range, or out of depth order: timm returns the blocks in depth order whatever order is
    asked, so (3, 2, 1, 0) would silently train the same model as (0, 1, 2, 3)."""
    with pytest.raises(ValueError, match="blocks"):
        DenseFaceModel(create_backbone(TINY), HeadConfig(blocks, 16, 19))


def test_soft_argmax_finds_the_peak() -> None:
    logits = torch.full((1, 2, 16, 20), -30.0)
    logits[0, 0, 5, 7] = 30.0  # a single hot pixel: its centre is ((7 + .5) / 20, (5 + .5) / 16)
    logits[0, 1, 10:12, 2:4] = 30.0  # a 2×2 block: centre at pixel (3, 11)
    points = soft_argmax(logits)
    torch.testing.assert_close(points[0, 0], torch.tensor([7.5 / 20, 5.5 / 16]), atol=1e-4, rtol=0)
    torch.testing.assert_close(points[0, 1], torch.tensor([3 / 20, 11 / 16]), atol=1e-4, rtol=0)


def test_gaussian_target_peaks_at_the_landmark_and_decodes_back() -> None:
    points = torch.tensor([[[0.25, 0.75], [0.53, 0.31]]])
    maps = gaussian_heatmaps(points, size=32, sigma=1.5, radius=5.0)
    assert maps.shape == (1, 2, 32, 32)
    peak = maps[0, 0].flatten().argmax()
    assert divmod(int(peak), 32) in {(23, 7), (23, 8), (24, 7), (24, 8)}  # (y, x) around (8, 24) px
    assert maps[0, 0, 0, 0] == 0  # beyond the radius
    logits = torch.logit(maps.clamp(1e-6, 1 - 1e-6))
    torch.testing.assert_close(soft_argmax(logits), points, atol=2e-3, rtol=0)


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
