"""Pins each protocol component to its PROTOCOL.md literal; each test's docstring names the section.

The numbers are written out here on purpose: a test that imported the constant it checks would pass
whatever the constant became.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from mcf.data.aflw19 import AFLW19Config
from mcf.data.aflw19 import sample_augment as alignment_augment
from mcf.data.crop import CropConfig, face_transform
from mcf.data.detect import Face
from mcf.data.lapa import ALIGN_POINTS, LaPaConfig
from mcf.data.pretrain_data import EpochView
from mcf.data.transforms import to_tensor
from mcf.evaluate.metrics import auc_fr
from mcf.evaluate.scoring import CLASSES, THRESHOLD
from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.models.heads import DenseFaceModel, HeadConfig, Neck, UPerHead, soft_argmax
from mcf.models.mcf import MCF, MCFConfig, sincos_2d
from mcf.models.teacher import FeatureTeacher
from mcf.params import load, read_yaml
from mcf.report.runfiles import FARL_EP16_F1, PAPER
from mcf.train.finetune import AlignmentConfig, FinetuneConfig, alignment_loss, lr_factor
from mcf.train.loop import Run, TrainConfig, Trainer, make_optimizer, param_groups, resolve_dtype
from mcf.train.schedule import lr_at, scaled_lr

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def test_mcf_config_defaults() -> None:
    """§1: ViT-B/16 at 224; teacher blocks 2, 5, 8, 11 normalised over tokens; 1000 × feature loss;
    T 0.2; constant m 0.99; projector 4096 → 256, predictor 4096; MAE decoder 512 wide, 8 blocks, 16 heads."""
    cfg = MCFConfig()
    b = cfg.backbone
    assert (b.img_size, b.patch_size, b.embed_dim, b.depth) == (224, 16, 768, 12)
    assert cfg.feature_layers == (2, 5, 8, 11) and cfg.feature_norm_dim == 1
    assert (cfg.feature_weight, cfg.contrastive_weight) == (1000, 1)
    assert cfg.temperature == 0.2
    assert (cfg.momentum, cfg.momentum_schedule) == (0.99, "constant")
    assert (cfg.proj_hidden, cfg.proj_dim, cfg.pred_hidden) == (4096, 256, 4096)
    assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (512, 8, 16)


def test_paper_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """§1 recipe, model and MoCo v3 ViT-B/16 teacher, §2 LAION-Face 20M parts, §3–4 head blocks and
    AFLW-19 split, as the stages load params.paper.yaml."""
    path = ROOT / "params.paper.yaml"
    laion = read_yaml(path)["fetch"]["laion_face"]
    for name in laion["parquet"] + laion["detections"]:  # the fetch section checks its inputs exist
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    monkeypatch.chdir(tmp_path)

    common, pretrain = load("pretrain", path)
    assert common.mask_ratio == 0.75
    assert pretrain.model.feature_layers == (2, 5, 8, 11)
    train = pretrain.train
    assert train.effective_batch == 4096 == train.batch_size * train.accum_steps * train.processes
    assert train.blr == 1.5e-4 and scaled_lr(train.blr, train.effective_batch) == pytest.approx(2.4e-3)
    assert train.betas == (0.9, 0.95) and train.weight_decay == 0.05
    assert (train.epochs, train.warmup_epochs, train.min_lr) == (16, 1, 0)
    assert train.precision == "auto"  # mixed precision on: bf16 on CUDA
    assert not train.sync_bn  # the release's projector BatchNorms are per process (no SyncBatchNorm)
    model = pretrain.model  # the section restates every MCFConfig default, so each is pinned here too
    b = model.backbone
    assert (b.img_size, b.patch_size, b.embed_dim, b.depth, b.num_heads) == (224, 16, 768, 12, 12)
    assert (model.decoder_dim, model.decoder_depth, model.decoder_heads) == (512, 8, 16)
    assert (model.objective, model.feature_loss, model.contrastive) == ("mcf", True, True)
    assert model.feature_norm_dim == 1 and (model.feature_weight, model.contrastive_weight) == (1000, 1)
    assert (model.temperature, model.momentum, model.momentum_schedule) == (0.2, 0.99, "constant")
    assert (model.proj_hidden, model.proj_dim, model.pred_hidden) == (4096, 256, 4096)

    fetch = load("fetch", path)[1]
    parts = [0, 2, 5, 8, 13, 15, 17, 18, 21, 22, 24, 25, 28]
    assert fetch.source == "laion-face"
    assert [int(re.search(r"part_(\d+)\.parquet$", f)[1]) for f in fetch.laion_face.parquet] == parts
    assert [int(re.search(r"sample2detect_(\d+)\.pth$", f)[1]) for f in fetch.laion_face.detections] == parts

    alignment, parsing = (load(stage, path)[1] for stage in ("finetune_alignment", "finetune_parsing"))
    for cfg in (alignment, parsing):
        assert (cfg.blocks, cfg.channels, cfg.batch_size, cfg.ema_decay) == ([3, 5, 7, 11], 768, 40, 0.999)
    assert (alignment.epochs, parsing.epochs) == (150, 300)
    assert alignment.data.n_train == 20000

    crop = load("crop", path)[1]  # §2: RetinaFace faces above 128 px and 0.98, never an unscored Haar face
    assert (crop.detections, crop.min_score, crop.min_face_size, crop.size) == ("table", 0.98, 128, 224)

    teacher_source = read_yaml(path)["teacher"]["source"]  # §1: the frozen ViT-B/16 is MoCo v3's
    (tmp_path / teacher_source.split(":", 1)[1]).parent.mkdir(parents=True)
    (tmp_path / teacher_source.split(":", 1)[1]).touch()
    teacher = load("teacher", path)[1]
    t = teacher.backbone
    assert teacher.source.startswith("moco_v3:")
    assert (t.img_size, t.patch_size, t.embed_dim, t.depth, t.num_heads) == (224, 16, 768, 12, 12)


class _Crops:
    """The paper's 20M crops, as many as the trainer counts (it reads none before its first step)."""

    def __len__(self) -> int:
        return 20_000_000


def test_paper_schedule_in_optimizer_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """§1 as the paper profile's trainer counts it under its 8 processes: an epoch of 20M crops is
    20M / (64 × 8 × 8) = 4,882 optimizer steps (not micro-batches, not one process's share), 16 epochs
    of them; one warm-up epoch of those steps; lr 0 at the first, 2.4e-3 after the warm-up, about 0 at
    the last step (per-step half-cosine)."""
    monkeypatch.chdir(tmp_path)
    train = load("pretrain", ROOT / "params.paper.yaml")[1].train
    run = Run(0, 0.75, tmp_path / "resume", {}, world_size=train.processes)
    t = Trainer(nn.Linear(2, 2), _Crops(), train, run)
    assert (t.spe, t.total, t.warmup, t.effective_batch) == (4882, 16 * 4882, 4882, 4096)
    lrs = [lr_at(step, t.total, t.warmup, t.peak_lr, train.min_lr) for step in (0, 4882, t.total - 1)]
    assert lrs == pytest.approx([0.0, 2.4e-3, 0.0], rel=0, abs=1e-11)


def test_forward_contrastive_loss_by_hand() -> None:
    """§1: online CLS → projector → predictor against the momentum encoder's CLS under the independent
    key mask → momentum projector; InfoNCE at T = 0.2 with the positives on the diagonal (rank 0), × 2T."""
    torch.manual_seed(0)
    backbone = BackboneConfig(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    model = MCF(MCFConfig(backbone=backbone, feature_loss=False, proj_hidden=32, proj_dim=8, pred_hidden=32))
    with torch.no_grad():  # keys from other weights than the queries', the projector's too
        for p in [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    imgs, noise, key_noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16), torch.rand(4, 16)
    out = model(imgs, 0.75, noise=noise, key_noise=key_noise)

    latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
    key_latent, _, _ = model.forward_encoder(imgs, 0.75, key_noise, momentum=True)
    q = F.normalize(model.predictor(model.projector(latent[:, 0])), dim=1)
    k = F.normalize(model.momentum_projector(key_latent[:, 0]), dim=1)
    expected = F.cross_entropy(q @ k.T / 0.2, torch.arange(4)) * 2 * 0.2
    torch.testing.assert_close(out["loss_contrastive"], expected)
    torch.testing.assert_close(out["loss"], expected)


def test_forward_feature_loss_by_hand() -> None:
    """§1: the decoder's pixels for every patch, unpatchified and read as they are (the input's own
    ImageNet-normalised space, nothing pasted from the input), and the input itself go through the frozen
    teacher; its raw block outputs (CLS included) are L2-normalised over the token axis, and the loss is
    the sum over the blocks of the MSE, weighted 1000 in the total."""
    torch.manual_seed(0)
    backbone = BackboneConfig(img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2)
    teacher = FeatureTeacher(create_backbone(backbone))
    cfg = MCFConfig(backbone=backbone, contrastive=False, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                    feature_layers=(0, 2))
    model = MCF(cfg, teacher)
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    out = model(imgs, 0.75, noise=noise)

    latent, _, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    recon = model.unpatchify(model.forward_decoder(latent, ids_restore))

    def blocks(x: torch.Tensor) -> list[torch.Tensor]:
        vit = teacher.model
        h = torch.cat([vit.cls_token.expand(len(x), -1, -1), vit.patch_embed(x)], dim=1) + vit.pos_embed
        outputs = []
        for block in vit.blocks:
            h = block(h)
            outputs.append(h)
        return outputs

    pairs = zip(blocks(recon), blocks(imgs), strict=True)
    per_block = [((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).mean() for p, t in pairs]
    expected = per_block[0] + per_block[2]
    torch.testing.assert_close(out["loss_feature"], expected)
    torch.testing.assert_close(out["loss"], 1000 * expected)


SMALL = BackboneConfig(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)


def small_mcf(**changes: object) -> MCF:
    """§1's model at a size the CPU runs in milliseconds (4 × 4 patches), seeded."""
    cfg = MCFConfig(backbone=SMALL, decoder_dim=16, decoder_depth=1, decoder_heads=2, feature_layers=(0, 1),
                    proj_hidden=32, proj_dim=8, pred_hidden=32, **changes)
    return MCF(cfg, FeatureTeacher(create_backbone(SMALL)) if cfg.uses_teacher else None, seed=0)


def test_projector_and_predictor_layers() -> None:
    """§1: projector 768 → 4096 → 256 and predictor 256 → 4096 → 256, Linears without bias, BN + ReLU
    between the layers, an affine-free BN after the projector's last Linear and none after the
    predictor's; the momentum projector is the projector's twin. The release's key list shows the Linears
    and BNs, not the ReLUs."""

    def layers(mlp: nn.Module) -> list[tuple]:
        out: list[tuple] = []
        for m in mlp:
            if isinstance(m, nn.Linear):
                out.append(("linear", m.in_features, m.out_features, m.bias is not None))
            elif isinstance(m, nn.BatchNorm1d):
                out.append(("bn", m.num_features, m.affine))
            else:
                out.append((type(m).__name__,))
        return out

    with torch.device("meta"):
        model = MCF(MCFConfig(feature_loss=False))
    projector = [("linear", 768, 4096, False), ("bn", 4096, True), ("ReLU",), ("linear", 4096, 256, False),
                 ("bn", 256, False)]
    assert layers(model.projector) == layers(model.momentum_projector) == projector
    assert layers(model.predictor) == [("linear", 256, 4096, False), ("bn", 4096, True), ("ReLU",),
                                       ("linear", 4096, 256, False)]


def test_keys_are_a_stop_gradient_target_normalised_by_their_batch() -> None:
    """§1's key path in training: the momentum projector is in training mode, as the release's target
    ``fc`` is under ``model.train()``, so its affine-free last BN gives each key feature mean 0 and
    variance 1 over the batch (not running statistics); the keys carry no gradient and no gradient reaches
    the momentum encoder or projector, while the online encoder's CLS gets one through the queries."""
    model = small_mcf(feature_loss=False).train()
    imgs = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    keys = model.momentum_keys(imgs, 0.75)
    assert not keys.requires_grad
    torch.testing.assert_close(keys.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(keys.var(0, unbiased=False), torch.ones(8), atol=1e-2, rtol=0)
    model(imgs, 0.75)["loss"].backward()
    momentum = [*model.momentum_encoder.parameters(), *model.momentum_projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in momentum)
    assert model.encoder.cls_token.grad.abs().sum() > 0


def test_the_encoder_sees_only_the_kept_patches_and_cls() -> None:
    """§1: per sample, the 25% of patches of lowest noise (4 of 16), each with its own position row, go
    through the blocks and the final norm after CLS with its row; the 12 masked patches never do."""
    model = small_mcf(feature_loss=False)
    vit = model.encoder
    g = torch.Generator().manual_seed(2)
    imgs, noise = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 16, generator=g)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
        assert latent.shape == (2, 1 + 4, 16) and mask.sum(1).tolist() == [12, 12]
        for n in range(2):
            keep = noise[n].argsort()[:4]
            assert not mask[n, keep].any()
            patches = vit.patch_embed(imgs[n:n + 1])[0, keep] + vit.pos_embed[0, 1 + keep]
            tokens = torch.cat([vit.cls_token[0] + vit.pos_embed[0, :1], patches])
            torch.testing.assert_close(latent[n], vit.norm(vit.blocks(tokens[None]))[0])


def test_the_decoder_adds_a_fixed_sincos_position_table() -> None:
    """§1 (the MAE decoder): a fixed 2-D sin-cos table of the decoder's width, CLS row first, that no
    optimiser step moves (a buffer, not a parameter), as the encoder's own table is fixed."""
    model = small_mcf(contrastive=False)
    torch.testing.assert_close(model.decoder_pos_embed, sincos_2d(16, 4), rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "decoder_pos_embed" not in trainable and "encoder.pos_embed" not in trainable


def test_pretrain_weight_decay_groups_are_the_releases() -> None:
    """§1: the release builds AdamW's groups with timm's ``add_weight_decay`` over the whole model (today
    ``param_groups_weight_decay``): 1-D tensors and biases undecayed, every other trainable tensor (CLS
    and mask tokens too) decayed by 0.05, nothing frozen (teacher, momentum copies, position tables)."""
    model = small_mcf()

    def by_decay(groups: list[dict]) -> dict[float, set[int]]:
        return {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}

    ours = by_decay(param_groups(model, 0.05))
    assert ours == by_decay(param_groups_weight_decay(model, 0.05))
    assert id(model.mask_token) in ours[0.05] and id(model.projector[1].weight) in ours[0.0]

def test_auc_and_fr_at_0_07() -> None:
    """§3: FR_box@0.07 is the share with NME > 0.07 (0.07 itself is no failure); AUC_box@0.07 is
    Simpson's rule over the CED on 0, 1e-4, …, 0.07, divided by 0.07."""
    auc, fr = auc_fr(np.array([0.01234, 0.03456, 0.07, 0.0912]))
    assert THRESHOLD == 0.07 and fr == 0.25
    # 700 intervals of h = 1e-4: composite Simpson weights 1, 4, 2, 4, …, 2, 4, 1 on the 701 thresholds.
    # An image with NME v adds 1/4 to the CED from threshold index ceil(v / h) on: 124, 346, 700, never.
    weights = np.ones(701)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    expected = sum(weights[k:].sum() for k in (124, 346, 700)) / 4 * 1e-4 / 3 / 0.07
    assert auc == pytest.approx(expected, rel=0, abs=1e-9)


def test_lapa_classes_alignment_and_augmentation() -> None:
    """§4: label ids 0..10 in the protocol's order; landmarks 104, 105, 54, 84, 90 to the template;
    tanh warp 0.8 at 512², resized to 448; rotation N(0, 0.314 rad), scale N(1, 0.1), shift ±1%, gray,
    gamma, blur."""
    assert CLASSES == ("background", "skin", "left_brow", "right_brow", "left_eye", "right_eye", "nose",
                       "upper_lip", "inner_mouth", "lower_lip", "hair")
    assert ALIGN_POINTS == (104, 105, 54, 84, 90)
    cfg = LaPaConfig()
    assert (cfg.warp_size, cfg.warp_factor, cfg.size, cfg.label_size) == (512, 0.8, 448, 512)
    aug = cfg.augment
    assert (aug.rotation_std, aug.scale_std, aug.shift) == (0.314, 0.1, 0.01)
    assert min(aug.photometric.gray_p, aug.photometric.gamma_p, aug.photometric.blur_p) > 0


def test_imagenet_normalisation() -> None:
    """§1 (pre-training) and §3–4 (fine-tuning): ImageNet mean × 255 maps to 0, (mean + std) × 255 to 1."""
    rows = torch.stack([IMAGENET_MEAN, IMAGENET_MEAN + IMAGENET_STD]).double() * 255  # [2, 3]
    rgb = rows[:, None, :].expand(2, 5, 3)  # [H, W, 3], constant along W (flip-proof)
    expected = torch.tensor([0.0, 1.0])[None, :, None].expand(3, 2, 5)
    torch.testing.assert_close(to_tensor(rgb.numpy()), expected, atol=1e-5, rtol=0)
    crop = rgb.permute(2, 0, 1).float().contiguous()  # [3, H, W] float: a pixel can hold mean × 255
    view = EpochView([crop], seed=0, epoch=0, rank=0, world_size=1, length=1, start=0)
    torch.testing.assert_close(view[0], expected, atol=1e-5, rtol=0)


def test_pretrain_flip_is_horizontal() -> None:
    """§1: RandomHorizontalFlip only: each item is the normalised crop or its flip along the width."""
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8, generator=g) for _ in range(16)]
    view = EpochView(crops, seed=0, epoch=0, rank=0, world_size=1, length=16, start=0)
    flipped = []
    for i, index in enumerate(view.indices):
        plain = (crops[index].float() / 255 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
        out = view[i]
        assert torch.allclose(out, plain) or torch.allclose(out, plain.flip(-1))
        flipped.append(not torch.allclose(out, plain))
    assert any(flipped) and not all(flipped)


def test_pretrain_flips_half_the_crops() -> None:
    """§1: RandomHorizontalFlip at its default p = 0.5. Over 10,000 crops the flipped share is 0.5 ± 0.015
    (6 standard deviations); a few dozen crops, as the other tests draw, could not tell 0.4 from 0.5."""
    crops = [torch.zeros(3, 1, 1, dtype=torch.uint8)] * 10_000
    view = EpochView(crops, seed=0, epoch=0, rank=0, world_size=1, length=10_000, start=0)
    assert abs(view.flips.mean() - 0.5) < 0.015


def test_neck_ppm_and_blocks() -> None:
    """§3: blocks 3, 5, 7, 11 feed a neck giving ×4 (two transposed convs), ×2, ×1, ÷2 of the ViT grid;
    UPerNet with PPM bins 1, 2, 3, 6 and 768 channels."""
    assert HeadConfig().blocks == (3, 5, 7, 11) and HeadConfig().channels == 768
    neck = Neck(8)
    maps = neck([torch.randn(1, 8, 4, 4) for _ in range(4)])
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in neck.scales[0].modules()) == 2
    assert [branch[0].output_size for branch in UPerHead(8, 8).ppm.branches] == [1, 2, 3, 6]


def test_soft_argmax_closed_form() -> None:
    """§3: sigmoid, then the probability-weighted mean of the pixel centres ((j + ½) / W, (i + ½) / H)."""
    logits = torch.full((1, 1, 4, 8), -1e4)  # sigmoid 0
    logits[0, 0, 1, 2] = math.log(3)  # sigmoid ¾ at centre (2.5 / 8, 1.5 / 4)
    logits[0, 0, 3, 6] = 0.0  # sigmoid ½ at centre (6.5 / 8, 3.5 / 4)
    x = (0.75 * 2.5 / 8 + 0.5 * 6.5 / 8) / 1.25
    y = (0.75 * 1.5 / 4 + 0.5 * 3.5 / 4) / 1.25
    torch.testing.assert_close(soft_argmax(logits), torch.tensor([[[x, y]]]))


def test_alignment_loss_is_l1_plus_bce_on_gaussians() -> None:
    """§3: L1 of the point distance in 0..1 crop coordinates + 1 × BCE against Gaussians of σ 1.25 px cut
    at 5 px on a 128² heatmap, scaled here to the protocol's 112² logits."""
    torch.manual_seed(0)
    size, sigma, radius = 112, 1.25 * 112 / 128, 5 * 112 / 128
    z, points = torch.randn(2, 3, size, size, dtype=torch.float64), torch.rand(2, 3, 2, dtype=torch.float64)
    out = alignment_loss(AlignmentConfig())(z, {"landmarks": points})

    prob, centres = torch.sigmoid(z), torch.arange(size, dtype=torch.float64) + 0.5
    mass = prob.sum(dim=(-2, -1))
    pred = torch.stack([(prob * centres).sum(dim=(-2, -1)), (prob * centres[:, None]).sum(dim=(-2, -1))], -1)
    l1 = (pred / mass[..., None] / size - points).norm(dim=-1).mean()
    px = points * size
    d2 = (centres - px[..., 0, None, None]) ** 2 + (centres[:, None] - px[..., 1, None, None]) ** 2
    target = torch.exp(-d2 / (2 * sigma**2)) * (d2 <= radius**2)
    bce = (z.clamp_min(0) - z * target + torch.log1p(torch.exp(-z.abs()))).mean()
    torch.testing.assert_close(out["bce"], bce, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["l1"].double(), l1, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"].double(), l1 + bce, rtol=1e-5, atol=0)


def test_finetune_cosine_and_ema() -> None:
    """§3: the EMA decay is 0.999. §3 names no schedule (the paper profile runs FaRL's MultiStepLR); the
    default params' cosine is §1's per-step half-cosine (1, ½ mid-run, 0)."""
    cfg = FinetuneConfig(schedule="cosine", warmup_steps=0)
    assert [lr_factor(step, 100, cfg) for step in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    assert FinetuneConfig().ema_decay == 0.999


def test_pretrain_optimizer_and_precision() -> None:
    """§1: AdamW (0.9, 0.95), weight decay 0.05 on weights but not on norms and biases (MAE's groups);
    16 epochs, 1 warm-up, blr 1.5e-4; mixed precision (bf16) on CUDA, none on the CPU."""
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.warmup_epochs, cfg.blr) == (16, 1, 1.5e-4)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = make_optimizer(model, cfg.weight_decay, 1e-3, cfg.betas, torch.device("cpu"))
    decay = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    assert [decay[id(p)] for p in model.parameters()] == [0.05, 0.0, 0.0, 0.0]  # weight, bias, LN ×2
    assert all(group["betas"] == (0.9, 0.95) for group in opt.param_groups)
    assert cfg.precision == "auto"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("margin", [0.0, 0.25, 0.5])
def test_crop_longer_side_and_margin(margin: float) -> None:
    """§2 gives no crop margin, so this pins the code's documented rule (``crop.margin``: context on each
    side as a share of the box's longer side): a 60 × 100 box is scaled isotropically and centred, its
    longer side spanning exactly 1 / (1 + 2m) of the crop."""
    face = Face(face=0, box=(20.0, 10.0, 80.0, 110.0), landmarks=None, score=None, detector="table")
    m = face_transform(face, CropConfig(size=224, margin=margin))
    (x1, x2), (y1, y2) = m @ np.array([[20.0, 10.0, 1.0], [80.0, 110.0, 1.0]]).T
    np.testing.assert_allclose([x2 - x1, y2 - y1], np.array([60 * 224 / 100, 224]) / (1 + 2 * margin))
    np.testing.assert_allclose([(x1 + x2) / 2, (y1 + y2) / 2], [112, 112])


def test_vit_layernorm_eps_and_keep_count() -> None:
    """§1: every LayerNorm of the paper's MCF (encoder, momentum encoder, MAE decoder, teacher) has eps
    1e-6, with one CLS token; mask ratio 0.75 keeps 49 of ViT-B/16's 196 patches at 224 (25%)."""
    with torch.device("meta"):  # ViT-B shapes at no memory cost
        model = MCF(MCFConfig(), FeatureTeacher(create_backbone(BackboneConfig())))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 3 * (2 * 12 + 1) + (2 * 8 + 1) and all(m.eps == 1e-6 for m in norms)
    assert model.encoder.cls_token.shape == (1, 1, 768) and model.encoder.pos_embed.shape == (1, 197, 768)
    kept, mask, _ = model.random_masking(torch.zeros(2, 196, 1), 0.75)
    assert kept.shape == (2, 49, 1) and mask.sum(dim=1).tolist() == [147, 147]


def test_the_default_backbone_has_vit_b16s_12_heads() -> None:
    """§1: ViT-B/16 attends with 12 heads of 64 channels. Heads are not in the weights' shapes: a default of
    6 would load the release's file without a word and compute another attention."""
    with torch.device("meta"):
        vit = create_backbone(BackboneConfig())
    assert [(b.attn.num_heads, b.attn.head_dim) for b in vit.blocks] == [(12, 64)] * 12


def test_alignment_crop_and_augmentation_defaults() -> None:
    """§3: the box maps onto 512², resized to 448; training rows ra[:20000]; shift ±5%, rotation ±10°,
    scale 0.9–1.1, a black occlusion, noise, gray, gamma and blur, and no flip."""
    cfg = AFLW19Config()
    assert (cfg.crop_size, cfg.size, cfg.n_train, cfg.n_val) == (512, 448, 20000, 0)
    aug = cfg.augment
    assert (aug.shift, aug.rotation, aug.scale_min, aug.scale_max) == (0.05, 10.0, 0.9, 1.1)
    photometric = aug.photometric
    assert min(aug.occlusion_p, aug.noise_p, photometric.gray_p, photometric.gamma_p, photometric.blur_p) > 0
    assert not [f.name for f in dataclasses.fields(aug) if "flip" in f.name]


def test_paper_finetune_recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """§3–4 as the fine-tunes load params.paper.yaml: lrs backbone / neck / head 1e-4 / 1e-2 / 1e-2
    (alignment) and 1e-4 / 1e-3 / 1e-3 (parsing), wd 1e-5, a constant EMA 0.999, the backbone trained,
    FaRL's epoch-wise MultiStepLR (×0.1 at epoch 200, no warm-up; README, "The paper's scale"); the
    head's 0.1 dropout before its classifier; AFLW-19's 512² box crop at 448, its augmentation and
    heatmaps; LaPa's 512² warp at 0.8, 448 input, 512² labels and its augmentation."""
    monkeypatch.chdir(tmp_path)  # the stages' inputs are not checked for another stage's section
    alignment, parsing = (load(stage, ROOT / "params.paper.yaml")[1]
                          for stage in ("finetune_alignment", "finetune_parsing"))
    assert (alignment.lr_backbone, alignment.lr_neck, alignment.lr_head) == (1e-4, 1e-2, 1e-2)
    assert (parsing.lr_backbone, parsing.lr_neck, parsing.lr_head) == (1e-4, 1e-3, 1e-3)
    for cfg in (alignment, parsing):
        assert (cfg.weight_decay, cfg.ema_decay) == (1e-5, 0.999)
        assert not (cfg.ema_warmup or cfg.freeze_backbone)
        assert (cfg.schedule, cfg.milestones, cfg.gamma, cfg.warmup_steps) == ("step", [200], 0.1, 0)
        assert cfg.dropout == HeadConfig().dropout == 0.1  # FaRL's mmseg UPerHead, before its classifier
    data = alignment.data
    assert (data.crop_size, data.size, data.n_train, data.n_val) == (512, 448, 20000, 0)
    aug = data.augment
    assert (aug.shift, aug.rotation, aug.scale_min, aug.scale_max) == (0.05, 10.0, 0.9, 1.1)
    # FaRL's own augmenters: an occlusion on every crop, blend noise half the time, gray 0.1, gamma one
    # of square root / none / square, a box blur up to 1% of the side (its augmenters/train.yaml)
    assert (aug.occlusion_p, aug.occlusion, aug.occlusion_max) == (1.0, "clipped", 0.4)
    assert (aug.noise_p, aug.noise, aug.noise_alpha) == (0.5, "blend", 0.5)
    farl_colour = (0.1, 1.0, [0.5, 1.0, 2.0], 1.0, "box", 0.01)
    for photometric in (aug.photometric, parsing.data.augment.photometric):
        assert (photometric.gray_p, photometric.gamma_p, photometric.gamma_choices, photometric.blur_p,
                photometric.blur, photometric.blur_box) == farl_colour
    assert (alignment.heatmap_sigma, alignment.heatmap_radius, alignment.heatmap_weight) == (1.25, 5.0, 1.0)
    lapa = parsing.data
    assert (lapa.warp_size, lapa.warp_factor, lapa.size, lapa.label_size) == (512, 0.8, 448, 512)
    assert (lapa.augment.rotation_std, lapa.augment.scale_std, lapa.augment.shift) == (0.314, 0.1, 0.01)


class _Shares:
    """A stand-in for the generator whose ``uniform`` gives the queued shares of ``[low, high)``, in order."""

    def __init__(self, *shares: float) -> None:
        self.shares = list(shares)

    def uniform(self, low: float, high: float, size: int | None = None) -> float | np.ndarray:
        u = np.array([self.shares.pop(0) for _ in range(size or 1)])
        return low + (high - low) * (u if size else u[0])


def test_paper_alignment_augmentation_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """§3 as params.paper.yaml's AFLW-19 augmentation draws it on the 512² crop: rotation uniform in ±10
    degrees (FaRL's rot_sigma 0.174 rad, uniform), scale uniform in 0.9–1.1, shift uniform in ±5% of the
    crop's side per axis, about the crop's centre. The YAML's numbers alone are pinned above; a rotation
    read as radians, or a shift as pixels, would pass them."""
    monkeypatch.chdir(tmp_path)  # the stages' inputs are not checked for another stage's section
    data = load("finetune_alignment", ROOT / "params.paper.yaml")[1].data
    # shares of each range: rotation 0.75 → +5°, scale 0.25 → 0.95, shift (0.9, 0.2) → (+4%, -3%)
    m = alignment_augment(data.augment, data.crop_size, _Shares(0.75, 0.25, 0.9, 0.2))
    c, s = 0.95 * math.cos(math.radians(5)), 0.95 * math.sin(math.radians(5))
    np.testing.assert_allclose(m[:, :2], [[c, -s], [s, c]], rtol=0, atol=1e-12)
    centre = m @ [256.0, 256.0, 1.0]  # moved by the shift alone
    np.testing.assert_allclose(centre, [256 + 0.04 * 512, 256 - 0.03 * 512], rtol=0, atol=1e-9)


def test_heatmap_prior_is_on_in_both_params_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """§3: the classifier's −log(H·W) bias (ours, not FaRL's) is on in params.yaml and params.paper.yaml.
    Turned off in either, the soft-argmax would start pinned to the map's centre and that file's
    figures would no longer be the protocol's run."""
    monkeypatch.chdir(tmp_path)  # the stages' inputs are not checked for another stage's section
    for name in ("params.yaml", "params.paper.yaml"):
        assert load("finetune_alignment", ROOT / name)[1].heatmap_prior is True, name


def test_the_reports_paper_numbers_are_section_5s() -> None:
    """§5: every number `mcf report` sets a run beside, with its system and class. A digit slipped in one
    (0.923 for 0.932) or FaRL's per-class F1 shifted by one class would misstate the paper on the page."""
    assert [(r.system, r.nme_full, r.nme_frontal, r.f1_mean) for r in PAPER] == [
        ("MCF ViT-B/16, 16 ep (paper)", 0.932, None, 93.96),
        ("FaRL-B ep16 (paper)", 0.943, 0.821, 93.88),
        ("FaRL-B ep64 (paper)", 0.938, 0.818, 94.04),
    ]
    assert FARL_EP16_F1 == {
        "skin": 98.00, "left_brow": 92.70, "right_brow": 92.65, "left_eye": 93.97, "right_eye": 93.91,
        "nose": 97.92, "upper_lip": 90.15, "inner_mouth": 91.74, "lower_lip": 91.21, "hair": 96.52,
    }


def test_dense_model_reads_raw_blocks_and_gives_112_logits() -> None:
    """§3: the neck takes the patch tokens of blocks 3, 5, 7, 11 (0-based, before the final norm); a
    patch-16 ViT at 448 gives 19 heatmap logits at 112²."""
    torch.manual_seed(0)
    vit = create_backbone(BackboneConfig(img_size=448, patch_size=16, embed_dim=16, depth=12, num_heads=2))
    model = DenseFaceModel(vit, HeadConfig(channels=8)).eval()
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        tokens, maps = vit.norm_pre(vit._pos_embed(vit.patch_embed(x))), []
        for block in vit.blocks:
            tokens = block(tokens)
            maps.append(tokens[:, 1:].transpose(1, 2).reshape(1, 16, 28, 28))  # patches, row-major
        for got, i in zip(model.forward_features(x), (3, 5, 7, 11), strict=True):
            torch.testing.assert_close(got, maps[i])
        assert model(x).shape == (1, 19, 112, 112)
