"""Dense face heads on a timm ViT: the FaRL-style neck, a small UPerNet, and landmark decoding.

Shapes, for a ViT of patch ``p`` and width ``D`` on an ``S×S`` input (grid ``G = S/p``):

- four block outputs, patch tokens only, as maps ``[N, D, G, G]``;
- neck → a pyramid ``[N, D, 4G, 4G]``, ``[N, D, 2G, 2G]``, ``[N, D, G, G]``, ``[N, D, G/2, G/2]``;
- UPerNet → ``[N, C, 4G, 4G]``; a 1×1 classifier → ``[N, K, 4G, 4G]`` logits.

With the paper's patch 16 the logits are at ``S/4`` (112² for 448²); with patch 8 they are at ``S/2``.
Alignment reads ``K = 19`` heatmaps through :func:`soft_argmax`; parsing reads ``K = 11`` class logits.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mcf.params import ParamsError

Variant = Literal["mcf", "scratch"]


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """The UPerNet building block: conv (no bias), BatchNorm, ReLU."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Neck(nn.Module):
    """Four same-resolution ViT maps → a four-level pyramid (×4, ×2, ×1, ÷2), as in FaRL and BEiT."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scales = nn.ModuleList([
            nn.Sequential(
                nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                nn.ConvTranspose2d(dim, dim, 2, stride=2),
            ),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [scale(m) for scale, m in zip(self.scales, maps, strict=True)]


class PyramidPooling(nn.Module):
    """PPM: global context at several bin counts, concatenated with the input and fused."""

    def __init__(self, cin: int, channels: int, scales: tuple[int, ...]) -> None:
        super().__init__()
        # No BatchNorm on the pooled branches: a 1×1 pooled map with batch 1 has no batch statistics.
        self.branches = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(cin, channels, 1), nn.ReLU(inplace=True))
            for s in scales
        ])
        self.fuse = conv_bn_relu(cin + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(b(x), size=size, mode="bilinear", align_corners=False) for b in self.branches]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class UPerHead(nn.Module):
    """UPerNet: lateral 1×1 convs, PPM on the coarsest level, top-down fusion, 3×3 convs, concat + fuse."""

    def __init__(
        self, cin: int, channels: int, levels: int = 4, ppm_scales: tuple[int, ...] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([conv_bn_relu(cin, channels, 1) for _ in range(levels - 1)])
        self.ppm = PyramidPooling(cin, channels, ppm_scales)
        self.smooth = nn.ModuleList([conv_bn_relu(channels, channels, 3) for _ in range(levels - 1)])
        self.fuse = conv_bn_relu(levels * channels, channels, 3)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        """``pyramid`` finest first; returns ``[N, C, H0, W0]`` at the finest level's size."""
        maps = [lat(p) for lat, p in zip(self.lateral, pyramid[:-1], strict=True)] + [self.ppm(pyramid[-1])]
        for i in range(len(maps) - 1, 0, -1):  # top-down: each level adds the coarser one, upsampled
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[-2:], mode="bilinear")
        maps = [s(m) for s, m in zip(self.smooth, maps[:-1], strict=True)] + [maps[-1]]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear") for m in maps[1:]]
        return self.fuse(torch.cat(maps, dim=1))


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What the dense model adds on top of the backbone."""

    blocks: tuple[int, ...] = (3, 5, 7, 11)  # 0-based ViT blocks whose patch tokens feed the neck
    channels: int = 768  # UPerNet width
    num_outputs: int = 19  # 19 heatmaps (alignment) or 11 classes (parsing)
    dropout: float = 0.1  # Dropout2d before the classifier: FaRL's mmseg UPerHead (dropout_ratio 0.1)


class DenseFaceModel(nn.Module):
    """ViT backbone → neck → UPerNet → per-pixel logits ``[N, K, 4G, 4G]``."""

    def __init__(self, backbone: nn.Module, head: HeadConfig) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        blocks = list(head.blocks)
        # increasing: timm returns the blocks in depth order whatever order is asked, so any other order
        # would silently feed the neck's ×4 level the shallowest block, not the first one named
        if len(blocks) != 4 or blocks != sorted(set(blocks)) or not all(0 <= b < depth for b in blocks):
            raise ParamsError("blocks", f"must be 4 increasing indices in 0..{depth - 1} (the backbone's), "
                              f"got {blocks}")
        dim = backbone.embed_dim
        self.head_config = head
        self.backbone = backbone
        self.neck = Neck(dim)
        self.decode = UPerHead(dim, head.channels)
        self.dropout = nn.Dropout2d(head.dropout)  # no-op (and no random draw) at 0 or in eval mode
        self.classifier = nn.Conv2d(head.channels, head.num_outputs, 1)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Patch tokens of the chosen blocks as maps, ``4 × [N, D, G, G]``."""
        return self.backbone.forward_intermediates(
            x, indices=list(self.head_config.blocks), norm=False, output_fmt="NCHW", intermediates_only=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.decode(self.neck(self.forward_features(x)))))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for separate learning rates (backbone / neck / head)."""
        return {
            "backbone": list(self.backbone.parameters()),
            "neck": list(self.neck.parameters()),
            "head": [*self.decode.parameters(), *self.classifier.parameters()],
        }


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Heatmap logits ``[N, K, H, W]`` → points ``[N, K, 2]`` (x, y) in 0..1.

    Sigmoid, then the probability-weighted mean of the pixel centres ``(j + 0.5) / W``, so a point
    ``u`` in 0..1 sits at pixel coordinate ``u · W`` (pixel ``j`` spans ``[j, j + 1)``).
    """
    h, w = logits.shape[-2:]
    prob = torch.sigmoid(logits.float())
    xs = (torch.arange(w, dtype=prob.dtype, device=prob.device) + 0.5) / w
    ys = (torch.arange(h, dtype=prob.dtype, device=prob.device) + 0.5) / h
    mass = prob.sum(dim=(-2, -1)).clamp_min(1e-6)
    x = (prob.sum(dim=-2) * xs).sum(dim=-1) / mass
    y = (prob.sum(dim=-1) * ys).sum(dim=-1) / mass
    return torch.stack([x, y], dim=-1)


def gaussian_heatmaps(points: torch.Tensor, size: int, sigma: float, radius: float) -> torch.Tensor:
    """Targets ``[N, K, size, size]`` for points ``[N, K, 2]`` in 0..1 (:func:`soft_argmax`'s convention).

    ``exp(-d² / 2σ²)`` of the pixel-centre distance ``d`` (heatmap pixels), zero beyond ``radius``.
    """
    centres = torch.arange(size, dtype=points.dtype, device=points.device) + 0.5
    px = points * size  # [N, K, 2] in heatmap pixels
    dx2 = (centres.view(1, 1, 1, -1) - px[..., 0, None, None]) ** 2  # [N, K, 1, W]
    dy2 = (centres.view(1, 1, -1, 1) - px[..., 1, None, None]) ** 2  # [N, K, H, 1]
    d2 = dx2 + dy2
    return torch.exp(-d2 / (2 * sigma**2)) * (d2 <= radius**2)


def parsing_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class logits upsampled (bilinear) to the label size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
