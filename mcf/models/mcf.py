"""The MCF pre-training model (PROTOCOL.md §1): masked reconstruction judged by a frozen teacher's
feature maps, plus a momentum-contrastive loss on the online encoder's CLS token.

Data flow for one batch ``imgs`` [N, 3, H, W] (ImageNet-normalised):

- ``forward_encoder``: MAE random masking per sample, the online encoder on the kept patches + CLS.
- ``forward_decoder``: MAE decoder to pixels per patch [N, L, p*p*3]; ``unpatchify`` → [N, 3, H, W].
- ``feature_loss``: the reconstruction is read in the *same normalised space as the input* (the
  release passes it to the teacher with ``norm=False``: no de-normalisation, no re-normalisation),
  so the teacher sees it exactly as it sees ``imgs``.
- ``contrastive_loss``: online CLS → projector → predictor against the momentum encoder's CLS on the
  same image under an independent mask → momentum projector; InfoNCE × 2T with keys from all ranks.
- objective ``pixel_mae``: the MAE baseline, pixel MSE on masked patches only.

The online encoder (``self.encoder``) is a timm ``VisionTransformer``: ``encoder.state_dict()`` is
the export. State-dict layout: ``encoder.*``, ``projector.*``, ``predictor.*``, ``momentum_encoder.*``,
``momentum_projector.*``, ``decoder_*``, ``mask_token``, ``teacher.model.*`` (each only when used).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.models.teacher import FeatureTeacher
from mcf.params import ParamsError, param
from mcf.train.distributed import INIT_KEY, concat_all_gather, derive_seed, get_rank


@dataclasses.dataclass(frozen=True)
class MCFConfig:
    """MCF model and loss settings; the defaults are the paper's / release's ViT-B/16 values."""

    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    decoder_dim: int = param(512, ge=4)
    decoder_depth: int = param(8, ge=1)
    decoder_heads: int = param(16, ge=1)
    objective: Literal["mcf", "pixel_mae"] = "mcf"
    feature_loss: bool = True  # ablation switch (objective mcf only)
    contrastive: bool = True  # ablation switch (objective mcf only)
    feature_layers: tuple[int, ...] = (2, 5, 8, 11)
    feature_norm_dim: int = param(1, ge=1, le=2)  # 1 = token axis (release quirk), 2 = channels
    feature_weight: float = param(1000.0, ge=0)
    contrastive_weight: float = param(1.0, ge=0)
    temperature: float = param(0.2, gt=0)
    proj_hidden: int = param(4096, ge=1)
    proj_dim: int = param(256, ge=1)
    pred_hidden: int = param(4096, ge=1)
    momentum: float = param(0.99, ge=0, le=1)
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    norm_pix_loss: bool = True  # pixel_mae only: per-patch normalised targets, as MAE

    def __post_init__(self) -> None:
        if self.decoder_dim % self.decoder_heads:
            raise ParamsError("decoder_dim", f"must be a multiple of decoder_heads {self.decoder_heads}")
        if self.decoder_dim % 4:
            raise ParamsError("decoder_dim", f"must be a multiple of 4 (2-D sin-cos), got {self.decoder_dim}")
        if self.backbone.embed_dim % 4:
            raise ParamsError("backbone.embed_dim", f"must be a multiple of 4, got {self.backbone.embed_dim}")
        if not self.feature_layers or min(self.feature_layers) < 0:
            raise ParamsError("feature_layers", f"need block indices >= 0, got {self.feature_layers}")
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ParamsError("feature_layers", f"repeated block index in {self.feature_layers}")
        if self.objective == "mcf" and not (self.feature_loss or self.contrastive):
            raise ParamsError("objective", "mcf needs feature_loss or contrastive on (or use pixel_mae)")

    def check_mask_ratio(self, mask_ratio: float) -> None:
        """At least one patch stays visible to the encoder (a keep count of 0 would train on nothing), and
        at least one is hidden: the losses average over the hidden patches, 0 of them gives NaN."""
        patches = (self.backbone.img_size // self.backbone.patch_size) ** 2
        keep = int(patches * (1 - mask_ratio))
        if keep < 1:
            raise ParamsError("mask_ratio", f"{mask_ratio} hides all {patches} patches from the encoder")
        if keep >= patches:
            raise ParamsError("mask_ratio", f"{mask_ratio} hides none of the {patches} patches (1 - "
                              f"{mask_ratio} rounds to 1): the losses average over the hidden ones")

    @property
    def uses_teacher(self) -> bool:
        return self.objective == "mcf" and self.feature_loss

    @property
    def uses_contrastive(self) -> bool:
        return self.objective == "mcf" and self.contrastive

    @property
    def uses_decoder(self) -> bool:
        return self.objective == "pixel_mae" or self.feature_loss


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[M] positions → [M, dim]: first half sin, second half cos, frequencies 1/10000^(i/(dim/2))."""
    freq = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angle = pos.to(torch.float64)[:, None] * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D position table [1, (1 +) grid*grid, dim], rows in patch (row-major) order.

    The first half of the channels encodes the column, the second half the row; CLS gets zeros.
    """
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def mlp_head(in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3 MLP (the release's key layout): Linear-BN-ReLU-Linear[-BN without affine], no biases."""
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False),
    ]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def xavier_linears(module: nn.Module, generator: torch.Generator) -> None:
    """Xavier-uniform weights and zero biases for every Linear in ``module``; unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MCF(nn.Module):
    """MCF pre-training model. ``teacher`` is required iff the feature loss is on (objective mcf)."""

    def __init__(
        self, cfg: MCFConfig, teacher: FeatureTeacher | None = None, seed: int | None = None
    ) -> None:
        """``seed`` fixes the initial weights (see ``_init_weights``); without it one is drawn from torch's
        stream before any part is built."""
        super().__init__()
        if cfg.uses_teacher != (teacher is not None):
            need = "needs a teacher" if cfg.uses_teacher else "takes no teacher"
            raise ValueError(f"objective {cfg.objective!r} with feature_loss={cfg.feature_loss} {need}")
        self.cfg = cfg
        seed = int(torch.randint(2**62, (), device="cpu")) if seed is None else seed
        bb = cfg.backbone
        self.patch_size, self.grid = bb.patch_size, bb.img_size // bb.patch_size
        self.encoder = create_backbone(bb)
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos
        if cfg.uses_decoder:
            self._build_decoder(cfg)
        if cfg.uses_contrastive:
            self.projector = mlp_head(bb.embed_dim, cfg.proj_hidden, cfg.proj_dim, last_bn=True)
            self.predictor = mlp_head(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, last_bn=False)
        self._init_weights(seed)
        if cfg.uses_contrastive:
            self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if teacher is not None:
            bad = [i for i in cfg.feature_layers if i >= teacher.depth]
            if bad:
                message = f"{bad} out of range for a teacher of depth {teacher.depth}"
                raise ParamsError("model.feature_layers", message)
            self.teacher = teacher

    def _build_decoder(self, cfg: MCFConfig) -> None:
        norm = partial(nn.LayerNorm, eps=1e-6)
        dim = cfg.decoder_dim
        self.decoder_embed = nn.Linear(cfg.backbone.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(dim, self.grid))
        self.decoder_blocks = nn.ModuleList(
            Block(dim, cfg.decoder_heads, cfg.backbone.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * 3)

    def _init_weights(self, seed: int) -> None:
        """MAE's recipe: xavier-uniform linears (patch embedding too), N(0, .02) tokens, sin-cos pos.

        The encoder, the decoder and the contrastive heads each draw from their own generator seeded
        from ``seed``, so an ablation that drops one part starts the parts it keeps where the full
        model starts them; one stream would shift with every part built before the init.
        """
        init = derive_seed(seed, INIT_KEY)  # not derive_seed(seed, i): rank i's masks come from that
        encoder, decoder, heads = (torch.Generator().manual_seed(derive_seed(init, i)) for i in range(3))
        xavier_linears(self.encoder, encoder)
        w, b = self.encoder.patch_embed.proj.weight, self.encoder.patch_embed.proj.bias
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1), generator=encoder)
        bound = 1 / math.sqrt(w[0].numel())  # torch's default for a convolution's bias, which MAE keeps
        nn.init.uniform_(b, -bound, bound, generator=encoder)
        nn.init.normal_(self.encoder.cls_token, std=0.02, generator=encoder)
        self.encoder.pos_embed.data.copy_(sincos_2d(self.cfg.backbone.embed_dim, self.grid))
        if self.cfg.uses_decoder:
            for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
                xavier_linears(part, decoder)
            nn.init.normal_(self.mask_token, std=0.02, generator=decoder)
        if self.cfg.uses_contrastive:
            xavier_linears(self.projector, heads)
            xavier_linears(self.predictor, heads)

    # ---------------------------------------------------------------- masking and encoding
    def random_masking(
        self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Keep the ``int(L * (1 - mask_ratio))`` patches of lowest noise, per sample.

        ``noise`` [N, L] defaults to ``torch.rand`` on ``x``'s device: masks follow the global RNG, so
        restoring the RNG state restores the masks. Returns kept tokens [N, K, D], the mask [N, L]
        (1 = removed) and the inverse permutation [N, L].
        """
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None, momentum: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the kept patches + CLS with the online (or momentum) encoder.

        Returns the normed latent [N, 1 + K, D], the mask [N, L] and ``ids_restore`` [N, L].
        """
        vit = self.momentum_encoder if momentum else self.encoder
        x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]  # [N, L, D]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = vit.blocks(torch.cat([cls, x], dim=1))
        return vit.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """MAE decoder: [N, 1 + K, D] latent → pixels per patch [N, L, p*p*3]."""
        x = self.decoder_embed(latent)  # [N, 1 + K, Dd]
        n, length = ids_restore.shape
        masked = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def patchify(self, imgs: Tensor) -> Tensor:
        """[N, 3, H, W] → [N, L, p*p*3], channels last within each patch (MAE's order)."""
        p, g = self.patch_size, self.grid
        x = imgs.reshape(imgs.shape[0], 3, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], g * g, p * p * 3)

    def unpatchify(self, x: Tensor) -> Tensor:
        """[N, L, p*p*3] → [N, 3, H, W], the inverse of :meth:`patchify`."""
        p, g = self.patch_size, self.grid
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], g, g, p, p, 3))
        return x.reshape(x.shape[0], 3, g * p, g * p)

    # ---------------------------------------------------------------- losses
    def feature_loss(self, recon: Tensor, imgs: Tensor) -> Tensor:
        """Σ over ``feature_layers`` of the MSE between L2-normalised teacher maps [N, T, C].

        Gradients reach ``recon`` through the (frozen) teacher; the target pass runs without grad.
        """
        layers, dim = self.cfg.feature_layers, self.cfg.feature_norm_dim
        with torch.no_grad():
            targets = self.teacher(imgs, layers)
        preds = self.teacher(recon, layers)
        return sum(
            F.mse_loss(F.normalize(p.float(), dim=dim), F.normalize(t.float(), dim=dim))
            for p, t in zip(preds, targets, strict=True)
        )

    def contrastive_logits(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [N, world*N] of local queries against all ranks' keys, and the positives' indices.

        In fp32 under autocast too: autocast runs the matmul in bf16, whose step near 1/T = 5 is 1/32.
        """
        with torch.autocast(q.device.type, enabled=False):
            q = F.normalize(q.float(), dim=1)
            k = concat_all_gather(F.normalize(k.float(), dim=1))
            logits = q @ k.t() / self.cfg.temperature
        labels = torch.arange(q.shape[0], device=q.device) + get_rank() * q.shape[0]
        return logits, labels

    def contrastive_loss(self, q: Tensor, k: Tensor) -> Tensor:
        """InfoNCE × 2T (MoCo v3), one direction: queries [N, d] vs gathered keys [N, d]."""
        logits, labels = self.contrastive_logits(q, k)
        return F.cross_entropy(logits, labels) * (2 * self.cfg.temperature)

    def momentum_keys(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None) -> Tensor:
        """Keys [N, proj_dim]: momentum encoder's CLS under an independent mask → momentum projector."""
        with torch.no_grad():
            latent, _, _ = self.forward_encoder(imgs, mask_ratio, noise, momentum=True)
            return self.momentum_projector(latent[:, 0])

    def pixel_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """MAE loss: per-patch MSE (optionally against normalised patches), mean over masked patches."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [N, L]
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None, key_noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Losses for one batch: ``loss`` (weighted total) plus each unweighted term that is on.

        Random draws, in order: the online mask, then the key mask (each [N, L] ``torch.rand``);
        ``noise``/``key_noise`` replace them (tests, exact replays).
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        out: dict[str, Tensor] = {}
        pred = self.forward_decoder(latent, ids_restore) if self.cfg.uses_decoder else None
        if self.cfg.objective == "pixel_mae":
            out["loss_pixel"] = self.pixel_loss(imgs, pred, mask)
            out["loss"] = out["loss_pixel"]
            return out
        total = imgs.new_zeros((), dtype=torch.float32)
        if self.cfg.uses_contrastive:
            q = self.predictor(self.projector(latent[:, 0]))
            k = self.momentum_keys(imgs, mask_ratio, key_noise)
            out["loss_contrastive"] = self.contrastive_loss(q, k)
            total = total + self.cfg.contrastive_weight * out["loss_contrastive"]
        if self.cfg.uses_teacher:
            out["loss_feature"] = self.feature_loss(self.unpatchify(pred), imgs)
            total = total + self.cfg.feature_weight * out["loss_feature"]
        out["loss"] = total
        return out

    # ---------------------------------------------------------------- momentum
    @torch.no_grad()
    def update_momentum(self, m: float | None) -> None:
        """EMA of the online encoder + projector parameters into the momentum copies (buffers not)."""
        if m is None:
            return
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        for p_o, p_m in zip(online, target, strict=True):
            p_m.lerp_(p_o.detach(), 1.0 - m)

    def momentum_at(self, step: int, total_steps: int) -> float | None:
        """The momentum for ``step``: constant (release) or MoCo v3's cosine ramp from m to 1; None
        without a momentum encoder (no contrastive branch), so that no curve shows an unused schedule."""
        if not self.cfg.uses_contrastive:
            return None
        m = self.cfg.momentum
        if self.cfg.momentum_schedule == "constant" or total_steps <= 0:
            return m
        return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)) * (1.0 - m)
