"""MCF model: each loss term against an independent computation, masking, momentum, switches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mcf.models.backbone import BackboneConfig
from mcf.models.mcf import MCF, MCFConfig, sincos_2d
from mcf.models.teacher import load_teacher
from mcf.params import ParamsError, build
from mcf.train.loop import seed_process

TINY = BackboneConfig(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)


def tiny_cfg(**changes: object) -> MCFConfig:
    base = MCFConfig(
        backbone=TINY, decoder_dim=32, decoder_depth=1, decoder_heads=2, feature_layers=(0, 2),
        proj_hidden=48, proj_dim=16, pred_hidden=48,
    )
    return dataclasses.replace(base, **changes)


def tiny_model(seed: int = 0, **changes: object) -> MCF:
    torch.manual_seed(seed)
    cfg = tiny_cfg(**changes)
    teacher = load_teacher("random", cfg.backbone) if cfg.uses_teacher else None
    return MCF(cfg, teacher)


def imgs(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_features(model: MCF, x: torch.Tensor) -> list[torch.Tensor]:
    """Block outputs through timm's own intermediate API: CLS + patches, before the final norm."""
    layers = list(model.cfg.feature_layers)
    outs = model.teacher.model.forward_intermediates(
        x, indices=layers, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    return [torch.cat([prefix, patches], dim=1) for patches, prefix in outs]


def test_config_validation_names_keys() -> None:
    cfg = build(MCFConfig, {"backbone": {"depth": 6}, "decoder_dim": 128, "decoder_heads": 4})
    assert (cfg.backbone.depth, cfg.decoder_dim) == (6, 128)
    with pytest.raises(ParamsError, match="pretrain.model.decoder_dim"):
        build(MCFConfig, {"decoder_dim": 100, "decoder_heads": 16}, "pretrain.model")
    with pytest.raises(ParamsError, match="objective"):
        build(MCFConfig, {"feature_loss": False, "contrastive": False})
    with pytest.raises(ParamsError, match="feature_layers"):
        build(MCFConfig, {"feature_layers": [2, 2]})
    with pytest.raises(ValueError, match="out of range"):
        MCF(tiny_cfg(feature_layers=(0, 3)), load_teacher("random", TINY))


def test_config_bounds_are_the_documented_ones() -> None:
    """``decoder_dim`` need only be a multiple of 4 (the 2-D sin-cos splits it in four), not of 8; a
    negative teacher block is refused, where Python would silently read block -1 as the last one."""
    assert MCF(tiny_cfg(objective="pixel_mae", decoder_dim=20)).decoder_pos_embed.shape == (1, 17, 20)
    with pytest.raises(ParamsError, match="decoder_dim"):
        tiny_cfg(decoder_dim=18)
    with pytest.raises(ParamsError, match="feature_layers"):
        tiny_cfg(feature_layers=(-1, 2))


def test_mask_ratio_must_keep_one_patch_and_hide_one() -> None:
    """``check_mask_ratio`` against ``random_masking``'s keep count ``int(L (1 - r))`` on 16 patches:
    keeping 1 or 15 passes; keeping 0 (0.95 rounds 0.8 down) leaves the encoder CLS alone, keeping all
    16 leaves the losses nothing to average over (NaN). A bound off by one, or a check that rounds where
    the masking truncates, lets such a ratio through to a run that fails hours later."""
    cfg, model = tiny_cfg(), tiny_model(feature_loss=False)
    for ratio, keep in ((0.9375, 1), (0.0625, 15)):
        cfg.check_mask_ratio(ratio)
        assert model.random_masking(torch.zeros(1, 16, 1), ratio)[0].shape[1] == keep
    for ratio in (0.95, 1.0):
        with pytest.raises(ParamsError, match="hides all 16"):
            cfg.check_mask_ratio(ratio)
    with pytest.raises(ParamsError, match="hides none"):
        cfg.check_mask_ratio(0.0)


def test_sincos_table() -> None:
    table = sincos_2d(8, 3)  # [1, 1 + 9, 8]
    assert table.shape == (1, 10, 8) and not table[0, 0].any()
    row, col = 1, 2  # patch index 1 * 3 + 2 = 5
    freqs = [1.0, 0.01]  # 1 / 10000 ** (i / 2) for a 4-channel half
    expect = [math.sin(col * f) for f in freqs] + [math.cos(col * f) for f in freqs]
    expect += [math.sin(row * f) for f in freqs] + [math.cos(row * f) for f in freqs]
    torch.testing.assert_close(table[0, 6], torch.tensor(expect))
    model = tiny_model(feature_loss=False)
    assert not model.encoder.pos_embed.requires_grad
    torch.testing.assert_close(model.encoder.pos_embed, sincos_2d(64, 4))


def test_random_masking_follows_noise_and_rng() -> None:
    model = tiny_model(feature_loss=False)
    x = torch.arange(2 * 16 * 1, dtype=torch.float32).reshape(2, 16, 1)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    kept, mask, ids_restore = model.random_masking(x, 0.75, noise)
    assert kept.shape == (2, 4, 1) and mask.sum(1).tolist() == [12, 12]
    for n in range(2):
        lowest = noise[n].argsort()[:4]
        assert kept[n, :, 0].tolist() == x[n, lowest, 0].tolist()
        assert mask[n, lowest].sum() == 0
    torch.manual_seed(7)
    _, mask_a, _ = model.random_masking(x, 0.75)
    torch.manual_seed(7)
    _, mask_b, _ = model.random_masking(x, 0.75)
    assert torch.equal(mask_a, mask_b)


def test_noise_of_another_shape_is_refused() -> None:
    """``noise`` must be [N, L]: a [1, L] row would mask (and keep) one sample of the batch only, and an
    [N, L + 1] one would index past the patches; both are refused up front with the expected shape."""
    model = tiny_model(feature_loss=False)
    for shape in ((1, 16), (2, 17)):
        with pytest.raises(ValueError, match=r"noise must have shape \(2, 16\)"):
            model.random_masking(torch.zeros(2, 16, 1), 0.75, torch.rand(shape))


def test_patchify_round_trip_and_pixel_loss() -> None:
    model = tiny_model(objective="pixel_mae")
    x = imgs(2)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    pred = torch.randn(2, 16, 8 * 8 * 3, generator=torch.Generator().manual_seed(4))
    mask = (torch.arange(16) % 3 == 0).float().expand(2, 16)
    total, count = 0.0, 0
    for n in range(2):
        for i in range(16):
            r, c = divmod(i, 4)
            patch = x[n, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8].permute(1, 2, 0).reshape(-1)
            target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            if mask[n, i]:
                total, count = total + ((pred[n, i] - target) ** 2).mean(), count + 1
    torch.testing.assert_close(model.pixel_loss(x, pred, mask), total / count)


@pytest.mark.parametrize("norm_dim", [1, 2])
def test_feature_loss_matches_independent_computation(norm_dim: int) -> None:
    model = tiny_model(contrastive=False, feature_norm_dim=norm_dim)
    recon, x = imgs(3, seed=5), imgs(3, seed=6)
    expect = 0.0
    for p, t in zip(reference_features(model, recon), reference_features(model, x), strict=True):
        p_n = p / p.norm(dim=norm_dim, keepdim=True)
        t_n = t / t.norm(dim=norm_dim, keepdim=True)
        expect = expect + ((p_n - t_n) ** 2).mean()
    torch.testing.assert_close(model.feature_loss(recon, x), expect)


def test_token_axis_is_the_default() -> None:
    assert MCFConfig().feature_norm_dim == 1
    token, channel = tiny_model(contrastive=False), tiny_model(contrastive=False, feature_norm_dim=2)
    recon, x = imgs(2, seed=5), imgs(2, seed=6)
    assert not torch.allclose(token.feature_loss(recon, x), channel.feature_loss(recon, x))


def test_contrastive_loss_matches_infonce() -> None:
    model = tiny_model(feature_loss=False, temperature=0.2)
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = qn @ kn.t() / 0.2
    expect = -(logits.diag() - logits.logsumexp(dim=1)).mean() * 0.4
    torch.testing.assert_close(model.contrastive_loss(q, k), expect)
    _, labels = model.contrastive_logits(q, k)
    assert labels.tolist() == [0, 1, 2, 3, 4]


def test_contrastive_logits_stay_fp32_under_autocast() -> None:
    """The logits q·kᵀ/T are formed in fp32 under bf16 autocast too: autocast would round the matmul to
    bf16, whose step near 1/T = 5 is 1/32, so the loss would differ from the fp32 one in the third digit."""
    model = tiny_model(feature_loss=False)
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        logits, _ = model.contrastive_logits(q, k)
        loss = model.contrastive_loss(q, k)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.contrastive_logits(q, k)[0], rtol=0, atol=0)
    torch.testing.assert_close(loss, model.contrastive_loss(q, k), rtol=0, atol=0)


def test_total_is_the_weighted_sum_and_replays_from_the_rng() -> None:
    model = tiny_model(feature_weight=10.0, contrastive_weight=0.5)
    x = imgs()
    torch.manual_seed(11)
    out = model(x, 0.75)
    assert set(out) == {"loss", "loss_feature", "loss_contrastive"}
    torch.testing.assert_close(out["loss"], 10.0 * out["loss_feature"] + 0.5 * out["loss_contrastive"])
    model.eval()  # the projector BN stats moved; compare two eval replays instead
    torch.manual_seed(11)
    first = model(x, 0.75)
    torch.manual_seed(11)
    second = model(x, 0.75)
    assert all(torch.equal(first[k], second[k]) for k in first)
    g = torch.Generator().manual_seed(2)
    noise, key_noise = torch.rand(4, 16, generator=g), torch.rand(4, 16, generator=g)
    replay = model(x, 0.75, noise, key_noise)["loss"]
    torch.testing.assert_close(model(x, 0.75, noise, key_noise)["loss"], replay)


@pytest.mark.parametrize(
    ("changes", "terms", "modules"),
    [
        ({}, {"loss_feature", "loss_contrastive"},
         {"decoder_pred", "teacher", "projector", "predictor", "momentum_encoder"}),
        ({"contrastive": False}, {"loss_feature"}, {"decoder_pred", "teacher"}),
        ({"feature_loss": False}, {"loss_contrastive"}, {"projector", "predictor", "momentum_encoder"}),
        ({"objective": "pixel_mae"}, {"loss_pixel"}, {"decoder_pred"}),
    ],
)
def test_ablation_switches(changes: dict, terms: set[str], modules: set[str]) -> None:
    model = tiny_model(**changes)
    out = model(imgs(), 0.75)
    assert set(out) == terms | {"loss"}
    present = {n for n in ("decoder_pred", "teacher", "projector", "predictor", "momentum_encoder")
               if hasattr(model, n)}
    assert present == modules
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_seed_fixes_every_initial_weight_whatever_the_stream() -> None:
    """pretrain and the teacher stage pass their seed: then nothing a caller drew before may leak in."""
    cfg = tiny_cfg(feature_loss=False)
    torch.manual_seed(0)
    a = MCF(cfg, seed=5).state_dict()
    torch.manual_seed(1)
    b = MCF(cfg, seed=5).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(MCF(cfg, seed=6).encoder.cls_token, b["encoder.cls_token"])


@pytest.mark.parametrize(
    "changes", [{"contrastive": False}, {"feature_loss": False}, {"objective": "pixel_mae"}]
)
def test_an_ablation_starts_every_part_it_keeps_where_the_full_model_starts(changes: dict) -> None:
    """An ablation changes one thing: dropping the decoder, the heads or the teacher must not move the
    encoder's (or another kept part's) initial weights, or the comparison also compares two inits."""
    full, ablated = tiny_model().state_dict(), tiny_model(**changes).state_dict()
    kept = [name for name in ablated if name in full]
    assert any(name.startswith("encoder.") for name in kept)
    for name in kept:
        assert torch.equal(ablated[name], full[name]), name


def test_teacher_required_iff_feature_loss() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        MCF(tiny_cfg(), None)
    with pytest.raises(ValueError, match="takes no teacher"):
        MCF(tiny_cfg(objective="pixel_mae"), load_teacher("random", TINY))


def test_momentum_update_and_schedule() -> None:
    model = tiny_model(feature_loss=False)
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    pairs = zip(model.encoder.parameters(), model.momentum_encoder.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_projector.parameters()]
    model.update_momentum(0.99)
    triples = zip(before, model.momentum_projector.parameters(), model.projector.parameters(), strict=True)
    for b, p_m, p_o in triples:
        torch.testing.assert_close(p_m, 0.99 * b + 0.01 * p_o)
    # buffers are not averaged (as the release): the momentum BatchNorms keep the statistics of the keys
    # they normalise, which the online ones' (of the queries) would replace step by step
    buffers = [(b, b.clone()) for b in model.momentum_projector.buffers() if b.is_floating_point()]
    assert buffers
    with torch.no_grad():
        for b in model.projector.buffers():
            b.add_(1)
    model.update_momentum(0.5)
    assert all(torch.equal(b, kept) for b, kept in buffers)
    assert model.momentum_at(500, 1000) == 0.99  # the release: constant
    cosine = tiny_model(feature_loss=False, momentum_schedule="cosine")
    assert cosine.momentum_at(0, 100) == pytest.approx(0.99)
    assert cosine.momentum_at(50, 100) == pytest.approx(0.995)
    assert cosine.momentum_at(100, 100) == pytest.approx(1.0)
    assert tiny_model(contrastive=False).momentum_at(0, 100) is None  # no momentum encoder to step


def test_cosine_momentum_stays_at_one_past_the_end_and_an_empty_run_gets_m() -> None:
    """MoCo v3's ramp ends at 1 and stays there: a step past ``total_steps`` must not swing back down the
    cosine (0.995 at 1.5 × total unclamped); a run of 0 steps gets m, not a division by zero."""
    cosine = tiny_model(feature_loss=False, momentum_schedule="cosine")
    assert cosine.momentum_at(150, 100) == 1.0
    assert cosine.momentum_at(0, 0) == 0.99


def test_the_momentum_update_pairs_the_same_parameters_after_sync_bn() -> None:
    """``train.sync_bn`` swaps the projectors' BatchNorms for SyncBatchNorm (on CUDA, so no test trains
    it here) before the first momentum update, which pairs the online and momentum parameters by their
    order: the swap must leave both sides in the same order, names and shapes."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tiny_model(feature_loss=False))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.momentum_projector.modules())
    online = [*model.encoder.named_parameters(), *model.projector.named_parameters()]
    target = [*model.momentum_encoder.named_parameters(), *model.momentum_projector.named_parameters()]
    assert [(n, p.shape) for n, p in online] == [(n, p.shape) for n, p in target]
    with torch.no_grad():
        for _, p in online:
            p.add_(1.0)
    before = [p.clone() for _, p in target]
    model.update_momentum(0.9)
    for b, (_, p_m), (_, p_o) in zip(before, target, online, strict=True):
        torch.testing.assert_close(p_m, 0.9 * b + 0.1 * p_o)


def test_keys_use_an_independent_mask() -> None:
    model = tiny_model(feature_loss=False).eval()
    x = imgs()
    g = torch.Generator().manual_seed(9)
    noise, other = torch.rand(4, 16, generator=g), torch.rand(4, 16, generator=g)
    k_same = model.momentum_keys(x, 0.75, noise)
    assert not torch.allclose(k_same, model.momentum_keys(x, 0.75, other))
    torch.manual_seed(5)
    online = torch.rand(4, 16)
    key = torch.rand(4, 16)  # the forward draws the online mask first, then the key mask
    torch.manual_seed(5)
    torch.testing.assert_close(model(x, 0.75)["loss"], model(x, 0.75, online, key)["loss"])


def test_keys_come_from_the_momentum_encoder_and_projector() -> None:
    """§1's key path: unmasked and in patch order, a key is the momentum projector on the CLS of the
    momentum encoder's own forward. Keys from the online encoder (set apart from the momentum one here)
    would leave the momentum encoder unused and the contrastive target moving with every step."""
    model = tiny_model(feature_loss=False).eval()
    x = imgs(2)
    with torch.no_grad():
        for p in model.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(13)))
        expect = model.momentum_projector(model.momentum_encoder.forward_features(x)[:, 0])
    torch.testing.assert_close(model.momentum_keys(x, 0.0, torch.arange(16.0).expand(2, 16)), expect)


def test_linear_patch_embedding_is_timm_convolution() -> None:
    """The backbone's patch embedding is a matrix product over patches: same weights, same function."""
    import timm

    from mcf.models.backbone import LinearPatchEmbed, create_backbone

    cfg = BackboneConfig(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    ours = create_backbone(cfg).double()
    conv = timm.create_model("vit_base_patch16_224", pretrained=False, **cfg.timm_kwargs()).double()
    conv.load_state_dict(ours.state_dict())  # the same keys and shapes: exports and checkpoints unchanged
    assert isinstance(ours.patch_embed, LinearPatchEmbed)
    assert type(conv.patch_embed) is not LinearPatchEmbed
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ours.patch_embed(x), conv.patch_embed(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(x), conv(x), rtol=1e-12, atol=1e-12)
    x.requires_grad_(True)
    (ours.patch_embed(x) ** 2).sum().backward()
    grad, x.grad = x.grad, None
    (conv.patch_embed(x) ** 2).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(AssertionError, match="doesn't match model"):  # timm's own check still applies
        ours.patch_embed(torch.randn(1, 3, 40, 40, dtype=torch.float64))


def test_linear_patch_embedding_keeps_timms_embedding_norm() -> None:
    """A timm ViT built with ``embed_norm_layer`` (a teacher or an export's kwargs may ask for it) normalises
    each patch embedding: the linear form must too, or the teacher computes another network."""
    import timm

    from mcf.models.backbone import create_backbone

    cfg = BackboneConfig(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=2)
    ours = create_backbone(cfg, embed_norm_layer="layernorm")
    conv = timm.create_model("vit_base_patch16_224", pretrained=False, embed_norm_layer="layernorm",
                             **cfg.timm_kwargs())
    conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.patch_embed(x), conv.patch_embed(x))


def test_the_init_draws_nothing_a_rank_draws_later() -> None:
    """pretrain seeds its model and its ranks' streams from one seed: an init stream keyed like a rank
    would make that rank's masks a rescaling of the initial weights."""
    model = MCF(tiny_cfg(feature_loss=False), seed=0)
    weights = [model.encoder.blocks[0].attn.qkv.weight, model.projector[0].weight]
    for rank in range(3):
        seed_process(0, rank)
        noise = torch.rand(64)
        for w in weights:
            bound = math.sqrt(6 / sum(w.shape))  # xavier-uniform's: the weights are U(-bound, bound)
            assert not torch.allclose(noise, (w.detach().flatten()[:64] + bound) / (2 * bound), atol=1e-6)


def test_encoder_with_nothing_masked_is_the_vits_own_forward() -> None:
    """Unmasked and in patch order, the encoder is timm's ``forward_features``: each patch gets its own
    position row (row 0 is CLS's) and CLS gets its own; the CLS row is perturbed from the sin-cos zeros,
    as a loaded or other position table may have it."""
    model = tiny_model(feature_loss=False).eval()
    with torch.no_grad():
        model.encoder.pos_embed.add_(torch.randn(model.encoder.pos_embed.shape))
        x = imgs(2)
        latent, mask, _ = model.forward_encoder(x, 0.0, torch.arange(16.0).expand(2, 16))
        assert not mask.any()
        torch.testing.assert_close(latent, model.encoder.forward_features(x))


def test_decoder_row_j_predicts_patch_j() -> None:
    """With every decoder block an identity (residual branches zeroed), row ``j`` of the prediction is
    the decoder head on patch ``j``'s token (its latent where kept, the mask token where masked) plus
    position row ``1 + j``: no CLS row among the outputs, no patch dropped, no patch out of place."""
    model = tiny_model(contrastive=False)
    with torch.no_grad():
        for block in model.decoder_blocks:
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(11))
    _, mask, ids_restore = model.random_masking(torch.zeros(2, 16, 1), 0.5, noise)
    latent = torch.randn(2, 1 + 8, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        pred = model.forward_decoder(latent, ids_restore)
        assert pred.shape == (2, 16, 8 * 8 * 3)
        for n in range(2):
            kept = noise[n].argsort()[:8].tolist()
            for j in range(16):
                assert bool(mask[n, j]) == (j not in kept)
                token = model.decoder_embed(latent[n, 1 + kept.index(j)]) if j in kept else model.mask_token
                expect = model.decoder_pred(model.decoder_norm(token + model.decoder_pos_embed[0, 1 + j]))
                torch.testing.assert_close(pred[n, j], expect.reshape(-1))


def test_patch_embedding_bias_is_torchs_convolution_default() -> None:
    """MAE keeps the convolution's default bias, uniform in ±1/√fan_in; 64 draws reach past half of it."""
    model = tiny_model(feature_loss=False)
    bias, bound = model.encoder.patch_embed.proj.bias, 1 / math.sqrt(3 * 8 * 8)
    assert bias.abs().max() <= bound and bias.abs().max() > bound / 2


def test_init_is_maes_recipe_part_by_part() -> None:
    """``_init_weights``' recipe: every Linear (encoder, decoder, heads) and the patch embedding read as a
    [D, 3·p·p] matrix are xavier-uniform, their |w| reaching into the top 5% of ±√(6 / (fan_in + fan_out))
    and not past it; Linear biases 0; LayerNorms 1 and 0; CLS and mask tokens N(0, 0.02). Catches a part
    left at torch's or timm's init, a convolution's fans for the patch embedding (a bound 4× smaller
    here), a bias left as drawn, a mask token left at 0 or a token drawn at another scale."""
    model = tiny_model()
    w = model.encoder.patch_embed.proj.weight
    matrices = [("patch_embed", w.reshape(w.shape[0], -1))]
    for name, m in model.named_modules():
        if name.startswith("teacher"):
            continue
        if isinstance(m, torch.nn.Linear):
            matrices.append((name, m.weight))
            assert m.bias is None or not m.bias.any(), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.any(), name
    assert len(matrices) > 10
    for name, weight in matrices:
        bound = math.sqrt(6 / sum(weight.shape))
        assert 0.95 * bound < weight.abs().max() <= bound, name
    for token in (model.encoder.cls_token, model.mask_token):
        assert 0.015 < token.std() < 0.025 and abs(token.mean()) < 0.01
