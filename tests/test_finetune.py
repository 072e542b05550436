"""Fine-tuning on tiny SynthFace sets: params, losses, a short run that learns, checkpoints, determinism."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from mcf.data.aflw19 import AFLW19Config
from mcf.data.lapa import LaPaConfig
from mcf.errors import GateError, StageError
from mcf.models.backbone import BackboneConfig, create_backbone, save_backbone
from mcf.models.heads import DenseFaceModel, HeadConfig, gaussian_heatmaps
from mcf.params import Common, ParamsError, load
from mcf.synth import write_aflw19, write_lapa
from mcf.synth.config import AflwSynthConfig, LapaSynthConfig, SynthConfig
from mcf.train import finetune
from mcf.train.ema import EMA
from mcf.train.finetune import (
    AlignmentConfig,
    FinetuneConfig,
    ParsingConfig,
    alignment_loss,
    load_finetuned,
    lr_factor,
    main_alignment,
    main_parsing,
    make_optimizer,
    parsing_loss,
)

TINY = BackboneConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
SYNTH = SynthConfig(
    n_scenes=1, n_identities=6,
    aflw=AflwSynthConfig(n_train=16, n_test=6, image_size=64),
    lapa=LapaSynthConfig(n_train=8, n_val=1, n_test=3, image_size=64),
)


def write_fixture(root: Path) -> Path:
    """Tiny SynthFace AFLW-19 and LaPa trees plus a (random, non-default-seed) exported backbone."""
    write_aflw19(SYNTH, 0, root / "aflw19")
    write_lapa(SYNTH, 0, root / "lapa")
    torch.manual_seed(123)  # not the fine-tuning seed: "mcf" and "scratch" must start apart
    save_backbone(create_backbone(TINY), TINY, root / "backbone")
    save_backbone(create_backbone(TINY), TINY, root / "backbone_init")
    return root


def tiny_configs(root: Path, epochs: int = 1) -> tuple[AlignmentConfig, ParsingConfig]:
    """CPU-tiny fine-tuning configs on the fixture under ``root``."""
    common = {"backbone": str(root / "backbone"), "scratch_backbone": str(root / "backbone_init"),
              "blocks": [0, 1, 2, 3], "channels": 8, "epochs": epochs,
              "batch_size": 4}
    aflw = AFLW19Config(root=str(root / "aflw19"), n_train=16, size=32, crop_size=48)
    lapa = LaPaConfig(root=str(root / "lapa"), size=32, label_size=32, warp_size=64)
    return (
        AlignmentConfig(out=str(root / "ft_align"), live=str(root / "live_align"),
                        resume_dir=str(root / "resume_align"), data=aflw, **common),
        ParsingConfig(out=str(root / "ft_parse"), live=str(root / "live_parse"),
                      resume_dir=str(root / "resume_parse"), data=lapa, **common),
    )


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixture(tmp_path_factory.mktemp("synthface"))


def _losses(live: Path) -> list[float]:
    return pd.read_csv(live / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")["loss"].tolist()


def test_params_sections_build_from_yaml(tmp_path: Path) -> None:
    aflw = {"root": "x", "size": 64, "augment": {"rotation": 5.0}}
    data = {"finetune_alignment": {"epochs": 2, "data": aflw}, "finetune_parsing": {"lr_head": 0.01}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    _, cfg = load("finetune_alignment", tmp_path / "params.yaml")
    assert (cfg.epochs, cfg.data.size, cfg.data.augment.rotation, cfg.lr_neck) == (2, 64, 5.0, 1e-2)
    _, parsing = load("finetune_parsing", tmp_path / "params.yaml")
    assert (parsing.lr_neck, parsing.lr_head, parsing.out) == (1e-3, 0.01, "outputs/finetune_parsing")
    # the neck's levels are positional: blocks go in depth order; -1 would be timm's last block, out of it
    for blocks in ([1, 1, 2, 3], [5, 3, 2, 1], [-1, 0, 1, 2]):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"finetune_parsing": {"blocks": blocks}}))
        with pytest.raises(ParamsError, match="finetune_parsing.blocks"):
            load("finetune_parsing", tmp_path / "params.yaml")
    # AFLW-19 has no validation split but the training rows n_val holds out: none to score
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"finetune_alignment": {"val_each_epoch": True}}))
    with pytest.raises(ParamsError, match=r"finetune_alignment.val_each_epoch: needs data.n_val > 0"):
        load("finetune_alignment", tmp_path / "params.yaml")
    held_out = {"finetune_alignment": {"val_each_epoch": True, "data": {"n_val": 10}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(held_out))
    assert load("finetune_alignment", tmp_path / "params.yaml")[1].data.n_val == 10


@pytest.mark.parametrize("blocks", [[0, 1, 2, 9], [3, 2, 1, 0]])
def test_a_model_file_with_bad_head_blocks_is_refused_naming_it(tmp_path: Path, blocks: list[int]) -> None:
    """A model.pt whose blocks the dense model refuses (past the backbone's depth; out of depth order, as
    an earlier version wrote) is a bad file, not bad params: ``mcf evaluate`` and ``mcf predict`` printed
    'invalid params: ... <stage>.blocks' without the file."""
    torch.save({"task": "alignment", "backbone": {"model_name": "vit_base_patch16_224",
                                                  "kwargs": TINY.timm_kwargs()},
                "head": {"blocks": blocks, "channels": 8, "num_outputs": 19}, "state_dict": {}},
               tmp_path / "model.pt")
    with pytest.raises(StageError, match=r"model.pt: not a fine-tuned model.pt \(ParamsError: blocks"):
        load_finetuned(tmp_path / "model.pt")


@pytest.mark.parametrize("damage", ["no data", "data another version wrote", "data size 0",
                                    "test_by_epoch not a list", "val_by_epoch not a list"])
def test_a_model_file_whose_metadata_is_damaged_is_refused_naming_it(
    fixture_root: Path, tmp_path: Path, damage: str
) -> None:
    """``mcf evaluate`` and ``mcf predict`` rebuild the data config from a model.pt's ``data``, and evaluate
    reads its ``test_by_epoch`` and ``val_by_epoch``: a file without ``data``, with a key the task's data
    config lacks, or with a ``test_by_epoch`` that is no list loaded, then ended those commands in a
    KeyError or TypeError traceback; a size of 0 crashed predict in OpenCV. It is a bad file, refused on
    load naming it."""
    align, _ = tiny_configs(fixture_root)
    path = tmp_path / "model.pt"
    model = finetune.build_model("alignment", "mcf", align)
    scores = {"test": [0.5], "val": [0.4]}
    finetune.save_finetuned(EMA(model, 0.9), "alignment", "mcf", align, path, scores)
    ckpt = torch.load(path, weights_only=True)
    if damage == "no data":
        del ckpt["data"]
    elif damage == "data another version wrote":
        ckpt["data"]["n_identities"] = 5
    elif damage == "data size 0":
        ckpt["data"]["size"] = 0
    else:
        ckpt[damage.split()[0]] = 0.5
    torch.save(ckpt, path)
    why = {"no data": "KeyError", "test_by_epoch not a list": "TypeError",
           "val_by_epoch not a list": "TypeError",
           "data another version wrote": "ParamsError: data.n_identities: unknown key",
           "data size 0": "ParamsError: data.size: must be >= 8, got 0"}
    with pytest.raises(StageError, match=rf"model.pt: not a fine-tuned model.pt \({why[damage]}"):
        load_finetuned(path, "alignment")


def test_a_model_file_whose_weights_do_not_fit_its_backbone_names_the_whole_shape(
    fixture_root: Path, tmp_path: Path
) -> None:
    """A model.pt whose recorded input size does not match its weights: the message was cut at 200
    characters, mid-way through the first mismatched tensor's shapes."""
    align, _ = tiny_configs(fixture_root)
    path = tmp_path / "model.pt"
    finetune.save_finetuned(EMA(finetune.build_model("alignment", "mcf", align), 0.9), "alignment", "mcf",
                            align, path, {"test": [0.5]})
    ckpt = torch.load(path, weights_only=True)
    ckpt["backbone"]["kwargs"]["img_size"] *= 2
    torch.save(ckpt, path)
    with pytest.raises(StageError, match=r"size mismatch for \S*pos_embed: .* the shape in current model is "
                                         r"torch.Size\(\[1, \d+, \d+\]\)\."):
        load_finetuned(path, "alignment")

def test_default_optimiser_is_the_protocols() -> None:
    """PROTOCOL §3–4: AdamW at wd 1e-5 with lrs backbone / neck / head 1e-4 / 1e-2 / 1e-2 (AFLW-19) and
    1e-4 / 1e-3 / 1e-3 (LaPa). The YAML test sets LaPa's lr_head itself, so its default went unchecked."""
    align, parse = AlignmentConfig(), ParsingConfig()
    assert (align.lr_backbone, align.lr_neck, align.lr_head, align.weight_decay) == (1e-4, 1e-2, 1e-2, 1e-5)
    assert (parse.lr_backbone, parse.lr_neck, parse.lr_head, parse.weight_decay) == (1e-4, 1e-3, 1e-3, 1e-5)


def test_a_saved_model_reloads_at_its_own_input_size_in_eval_mode(fixture_root: Path, tmp_path: Path) -> None:
    """model.pt records the input size it was fine-tuned at (16 here; the export's ViT is 32: the pos_embed
    of the export's size no longer fits the weights), and its data config without the augmentation (what
    evaluate and predict rebuild, root included); load_finetuned returns the model in eval mode, so that
    scoring it applies no dropout and the BatchNorm's running statistics."""
    align, _ = tiny_configs(fixture_root)
    align = dataclasses.replace(align, data=dataclasses.replace(align.data, size=16))
    path = tmp_path / "model.pt"
    finetune.save_finetuned(EMA(finetune.build_model("alignment", "mcf", align), 0.9), "alignment", "mcf",
                            align, path, {"test": [0.5]})
    model, meta = load_finetuned(path, "alignment")
    assert not model.training and model(torch.zeros(1, 3, 16, 16)).shape == (1, 19, 8, 8)
    assert meta["data"] == {k: v for k, v in dataclasses.asdict(align.data).items() if k != "augment"}


def test_alignment_loss_is_small_at_the_target() -> None:
    cfg = AlignmentConfig()
    points = torch.rand(2, 19, 2) * 0.8 + 0.1
    target = gaussian_heatmaps(points, 32, 1.5, 5.0)
    good = alignment_loss(cfg)(torch.logit(target.clamp(1e-4, 1 - 1e-4)), {"landmarks": points})
    bad = alignment_loss(cfg)(torch.zeros(2, 19, 32, 32), {"landmarks": points})
    assert good["l1"] < 0.01 < bad["l1"] and good["loss"] < bad["loss"]


def test_alignment_l1_is_the_point_distance() -> None:
    """PROTOCOL §3: L1 of the point distance, not of each coordinate (a 3-4-5 offset costs 5, not 3.5)."""
    logits = torch.full((1, 19, 32, 32), -1e4)
    logits[..., 10, 20] = 1e4  # every heatmap decodes to the centre of pixel (x 20, y 10)
    peak = torch.tensor([20.5, 10.5]) / 32
    points = (peak + torch.tensor([3.0, 4.0]) / 32).expand(1, 19, 2)
    l1 = alignment_loss(AlignmentConfig())(logits, {"landmarks": points})["l1"]
    assert l1.item() == pytest.approx(5 / 32, rel=1e-5)


def test_heatmap_weight_scales_the_bce_alone() -> None:
    """loss = L1 + heatmap_weight × BCE: the protocol's weight is 1, so a dropped weight passed the pins."""
    torch.manual_seed(0)
    points, logits = torch.rand(2, 19, 2), torch.randn(2, 19, 16, 16)
    one = alignment_loss(AlignmentConfig())(logits, {"landmarks": points})
    quarter = alignment_loss(AlignmentConfig(heatmap_weight=0.25))(logits, {"landmarks": points})
    assert torch.equal(one["l1"], quarter["l1"]) and torch.equal(one["bce"], quarter["bce"])
    torch.testing.assert_close(quarter["loss"], one["l1"] + 0.25 * one["bce"])


def test_parsing_loss_is_the_mean_cross_entropy_of_the_upsampled_logits() -> None:
    """PROTOCOL §4: the 112² logits are upsampled (bilinear) to the label size, then per-pixel cross-entropy,
    averaged; labels shrunk to the logits, or a label smoothing, passed every test."""
    torch.manual_seed(0)
    logits, label = torch.randn(2, 11, 4, 4), torch.randint(0, 11, (2, 16, 16))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    want = -up.log_softmax(dim=1).gather(1, label[:, None]).mean()
    torch.testing.assert_close(parsing_loss(logits, {"label": label.to(torch.uint8)})["loss"], want)


def test_step_schedule_is_farls_epochwise_multistep() -> None:
    cfg = FinetuneConfig(epochs=300, schedule="step", milestones=[200], gamma=0.1)
    total = 300 * 7  # 7 steps per epoch
    assert [lr_factor(s, total, cfg) for s in (0, 199 * 7 + 6)] == [1.0, 1.0]
    assert lr_factor(200 * 7, total, cfg) == pytest.approx(0.1)
    assert lr_factor(total - 1, total, cfg) == pytest.approx(0.1)
    flat = FinetuneConfig(epochs=150, schedule="step", milestones=[200])  # FaRL's AFLW-19: never reached
    assert {lr_factor(s, 150 * 7, flat) for s in range(150 * 7)} == {1.0}


def test_step_schedule_matches_torchs_multisteplr_per_epoch() -> None:
    """Milestones compound (×gamma at each one passed) and a milestone 0 drops from the first epoch, as
    torch's MultiStepLR does; one drop at most, or a refused 0, passed the single-milestone test."""
    cfg = FinetuneConfig(epochs=6, schedule="step", milestones=[0, 2, 4], gamma=0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestones, cfg.gamma)
    for epoch in range(cfg.epochs):
        assert [lr_factor(3 * epoch + k, 18, cfg) for k in range(3)] == [optimizer.param_groups[0]["lr"]] * 3
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("milestones", [[-1], [100, -5]])
def test_a_negative_milestone_is_refused(milestones: list[int]) -> None:
    """``milestones: [-1]`` (read as "the last epoch", Python's index) dropped every lr ×gamma from the
    first step, silently: each epoch is >= -1. MultiStepLR, which `step` reproduces, never reaches it."""
    with pytest.raises(ParamsError, match=r"milestones: .*epochs >= 0"):
        FinetuneConfig(schedule="step", milestones=milestones)


def test_warm_up_then_cosine_over_the_steps_after_it() -> None:
    """The warm-up's first step already trains (1/warmup_steps, not 0), it ends at the full lr, and the
    half-cosine spans the steps after it, reaching 0 at the last."""
    cfg = FinetuneConfig(warmup_steps=4, schedule="cosine")
    factors = [lr_factor(s, 14, cfg) for s in (0, 1, 2, 3, 4, 9, 14)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.0])
    constant = FinetuneConfig(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, 10, constant) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_optimizer_step_k_trains_at_the_schedule_factor_of_step_k() -> None:
    """``train_epoch`` sets each group's lr for step k (counted across epochs) to its base lr ×
    ``lr_factor(k)`` before that step: the first step at the warm-up's start, not one step ahead."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    used: list[float] = []  # each group's lr as each step starts
    optimizer.register_step_pre_hook(lambda opt, *_: used.extend(g["lr"] for g in opt.param_groups))
    cfg, total = FinetuneConfig(epochs=2, warmup_steps=2, schedule="cosine"), 6
    lr_at = functools.partial(lr_factor, total=total, cfg=cfg)
    batches = [{"image": torch.randn(4, 2)} for _ in range(3)]

    def loss_fn(logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": logits.pow(2).mean()}

    step = 0
    for _ in range(cfg.epochs):
        _, step = finetune.train_epoch(model, batches, loss_fn, optimizer, EMA(model, 0.9), lr_at, step,
                                       total, torch.float32)
    factors = [lr_factor(k, total, cfg) for k in range(total)]
    assert factors[:2] == [0.5, 1.0] and step == total
    assert used == pytest.approx([lr * f for f in factors for lr in (0.1, 0.01)])

    def nan_at_fifth(logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        nan_at_fifth.calls += 1  # type: ignore[attr-defined]
        return {"loss": logits.pow(2).mean() * (math.nan if nan_at_fifth.calls == 5 else 1.0)}  # type: ignore

    nan_at_fifth.calls = 0  # type: ignore[attr-defined]
    step = 0
    with pytest.raises(StageError, match=r"non-finite loss nan at step 5 of 6 \(epoch 2 of 2\)"):
        for _ in range(cfg.epochs):  # counted from 1, as the pre-training loop's message counts them
            _, step = finetune.train_epoch(model, batches, nan_at_fifth, optimizer, EMA(model, 0.9), lr_at,
                                           step, total, torch.float32)


def test_each_step_follows_its_own_gradient_and_the_epoch_reports_mean_losses() -> None:
    """With ``loss = mean(w·x + b)`` over inputs of ones, every step's gradient is 1 per weight: three SGD
    steps at lr 0.1 move each weight by exactly 0.3 (without zeroing the gradients 0.6), the EMA is updated
    once a step, and the epoch's loss is the mean over its batches (not their sum, nor another count)."""
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.param_groups[0]["initial_lr"] = 0.1
    ema = EMA(model, 0.5, warmup=False)

    def loss_fn(logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": logits.mean(), "double": 2 * logits.mean()}

    lr_at = functools.partial(lr_factor, total=3, cfg=FinetuneConfig(schedule="constant"))
    batches = [{"image": torch.ones(4, 2)} for _ in range(3)]
    means, step = finetune.train_epoch(model, batches, loss_fn, optimizer, ema, lr_at, 0, 3, torch.float32)
    torch.testing.assert_close(model.weight, torch.full((1, 2), 0.7))
    torch.testing.assert_close(model.bias, torch.tensor([0.2]))
    assert step == 3 and ema.updates == 3
    assert means == pytest.approx({"loss": (2.5 + 2.2 + 1.9) / 3, "double": 2 * (2.5 + 2.2 + 1.9) / 3})


def test_train_shuffles_and_trains_a_set_smaller_than_a_batch(tmp_path: Path) -> None:
    """The loader shuffles (seeded), and drops a short last batch only when a full one exists: 3 images at
    batch 4 train one step, not none (an EMA never updated, published as the model). A frozen backbone
    runs in eval mode (build_model's "eval, no grad"), though each epoch opens with model.train()."""
    torch.manual_seed(0)
    model = DenseFaceModel(create_backbone(TINY, img_size=16), HeadConfig((0, 1, 2, 3), 4, 2))
    seen: list[tuple[list[int], bool]] = []

    def loss_fn(logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        seen.append((batch["index"].tolist(), model.backbone.training))
        return {"loss": logits.mean()}

    items = [{"image": torch.zeros(3, 16, 16), "index": torch.tensor(i)} for i in range(3)]
    cfg = FinetuneConfig(epochs=1, batch_size=4, freeze_backbone=True)
    ema, _ = finetune.train(model, items, loss_fn, cfg, tmp_path / "resume", seed=0, run_id="run")
    assert ema.updates == 1 and seen == [([2, 1, 0], False)]  # seed 0's order


def test_optimizer_groups_and_frozen_backbone(fixture_root: Path) -> None:
    from mcf.train.finetune import build_model

    align, _ = tiny_configs(fixture_root)
    opt = make_optimizer(build_model("alignment", "mcf", align), align)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"backbone": 1e-4, "neck": 1e-2, "head": 1e-2}
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["weight_decay"] == 1e-5
    frozen = dataclasses.replace(align, freeze_backbone=True)
    model = build_model("alignment", "mcf", frozen)
    assert [g["name"] for g in make_optimizer(model, frozen).param_groups] == ["neck", "head"]
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_heatmap_prior_is_one_over_the_logit_pixels(fixture_root: Path) -> None:
    """The classifier bias starts at -log(H·W) of the heatmaps it scores (4× the patch grid per side),
    so the initial heatmap mass is about 1 (AlignmentConfig.heatmap_prior)."""
    from mcf.train.finetune import build_model

    align, _ = tiny_configs(fixture_root)
    model = build_model("alignment", "mcf", align)
    with torch.no_grad():
        pixels = math.prod(model(torch.zeros(1, 3, 32, 32)).shape[-2:])
    torch.testing.assert_close(model.classifier.bias, torch.full((19,), -math.log(pixels)))


def test_an_input_size_off_the_patch_grid_is_refused(fixture_root: Path) -> None:
    """At 36 px a patch-8 ViT sees a 4×4 grid, 32 px: the last 4 px never reach the logits, which the
    soft-argmax, the heatmap targets and the parsing labels all read as spanning the whole input."""
    from mcf.train.finetune import build_model

    align, parse = tiny_configs(fixture_root)
    for task, cfg in (("alignment", align), ("parsing", parse)):
        off = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size=36))
        with pytest.raises(ParamsError, match=r"data\.size: .* multiple of the backbone.s patch size 8"):
            build_model(task, "scratch", off)


def test_an_input_of_one_patch_is_refused(fixture_root: Path) -> None:
    """At 8 px a patch-8 ViT sees a 1×1 grid, which the neck's ÷2 level pools to 0×0: the first training
    step failed in torch's max-pool ("Output size is too small"), after the gates; two patches train."""
    from mcf.train.finetune import build_model

    align, parse = tiny_configs(fixture_root)
    for task, cfg in (("alignment", align), ("parsing", parse)):
        one = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size=8))
        with pytest.raises(ParamsError, match=r"data\.size: must be at least two patches \(16\), got 8"):
            build_model(task, "scratch", one)
        two = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, size=16))
        assert build_model(task, "scratch", two)(torch.zeros(2, 3, 16, 16)).shape[-2:] == (8, 8)


def test_alignment_finetune_learns_and_writes_checkpoint(fixture_root: Path) -> None:
    align, _ = tiny_configs(fixture_root, epochs=3)
    align = dataclasses.replace(align, dropout=0.25)
    main_alignment(Common(seed=0), align, "mcf")
    out = Path(align.out) / "mcf"
    live = Path(align.live) / "mcf"
    losses = _losses(live)
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, meta = load_finetuned(out / "model.pt")
    assert (meta["task"], meta["variant"], meta["data"]["size"]) == ("alignment", "mcf", 32)
    assert meta["steps"] == 12  # 3 epochs × 16 images / batch 4
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 19, 16, 16)
    assert model.head_config.dropout == model.dropout.p == 0.25  # rebuilt as trained, for training on
    assert not list(out.parent.glob(".mcf.tmp-*"))  # the atomic temporary folder is gone
    assert json.loads((live / "metrics.json").read_text())["step"] == 2
    test_curve = pd.read_csv(live / "plots" / "metrics" / "test" / "nme_diag_full.tsv", sep="\t")
    assert test_curve["nme_diag_full"].tolist() == pytest.approx(meta["test_by_epoch"])  # one per epoch, 3
    lr_head = pd.read_csv(live / "plots" / "metrics" / "lr" / "head.tsv", sep="\t")["head"].tolist()
    assert lr_head == pytest.approx([1e-2 * lr_factor(4 * e + 3, 12, align) for e in range(3)])  # the head's
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]  # curves only at the committed path


def _whole_and_killed(align: AlignmentConfig, root: Path, tag: str) -> dict[str, AlignmentConfig]:
    """An uninterrupted and a killed run of ``align``, each with its own output, curves and resume folder."""
    return {name: dataclasses.replace(align, out=str(root / f"ft_{tag}{name}"),
                                      live=str(root / f"live_{tag}{name}"),
                                      resume_dir=str(root / f"resume_{tag}{name}"))
            for name in ("whole", "killed")}


def test_a_killed_finetune_resumes_at_its_last_epoch_exactly(
    fixture_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in epoch 2 of 3 (after its training rows were logged): the rerun redoes epochs 2 and 3 and
    writes what an uninterrupted run writes, curves included, though it publishes to another out and live;
    a changed config does not resume, nor does another ``num_workers``: the augmentation is drawn in the
    workers, so their count changes the model."""
    align, _ = tiny_configs(fixture_root, epochs=3)
    align = dataclasses.replace(align, val_each_epoch=True, data=dataclasses.replace(align.data, n_val=4))
    runs = _whole_and_killed(align, fixture_root, "")
    main_alignment(Common(seed=0), runs["whole"], "mcf")
    real, calls = finetune.epoch_scorer, []

    def killed_in_epoch_2(task: str, cfg: AlignmentConfig, scored: str) -> finetune.Scorer:
        name, score = real(task, cfg, scored)
        if scored == "val":
            return name, score

        def once(model: torch.nn.Module) -> float | None:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return score(model)

        return name, once

    with monkeypatch.context() as m:
        m.setattr(finetune, "epoch_scorer", killed_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            main_alignment(Common(seed=0), runs["killed"], "mcf")
    resume = Path(runs["killed"].resume_dir) / "mcf"
    assert torch.load(resume / "last.pt", weights_only=True)["epoch"] == 1
    assert not (Path(runs["killed"].out) / "mcf").exists()
    for changed in ({"lr_head": 0.5}, {"num_workers": 1}):
        with pytest.raises(StageError, match="belongs to a run with other params"):
            main_alignment(Common(seed=0), dataclasses.replace(runs["killed"], **changed), "mcf")
    built = finetune.build_model

    def other_heads(*args: object) -> torch.nn.Module:  # code pulled since the kill that builds other heads
        model = built(*args)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).add_(1.0)
        return model

    with monkeypatch.context() as m, pytest.raises(StageError, match="belongs to a run with other params"):
        m.setattr(finetune, "build_model", other_heads)
        main_alignment(Common(seed=0), runs["killed"], "mcf")
    rescored: list[int] = []

    def counted(task: str, cfg: AlignmentConfig, scored: str) -> finetune.Scorer:
        name, score = real(task, cfg, scored)
        if scored == "val":
            return name, score
        return name, lambda model: rescored.append(1) or score(model)

    # the rerun publishes elsewhere: out and live are not part of the run, so it still resumes
    runs["killed"] = dataclasses.replace(runs["killed"], out=str(fixture_root / "ft_moved"),
                                         live=str(fixture_root / "live_moved"))
    with monkeypatch.context() as m:  # a rerun from scratch gives the same model: count its epochs
        m.setattr(finetune, "epoch_scorer", counted)
        main_alignment(Common(seed=0), runs["killed"], "mcf")
    assert len(rescored) == 2  # epochs 2 and 3 alone: epoch 1 came back from last.pt
    whole, killed = (torch.load(Path(r.out) / "mcf" / "model.pt", weights_only=True) for r in runs.values())
    assert whole["test_by_epoch"] == killed["test_by_epoch"] and whole["steps"] == killed["steps"]
    assert whole["val_by_epoch"] == killed["val_by_epoch"] and len(killed["val_by_epoch"]) == 3
    assert all(torch.equal(v, killed["state_dict"][k]) for k, v in whole["state_dict"].items())
    curves = [pd.read_csv(Path(r.live) / "mcf" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
              for r in runs.values()]
    assert curves[0][["step", "loss"]].equals(curves[1][["step", "loss"]]) and len(curves[0]) == 3
    assert not resume.exists()


def test_a_kill_while_the_resume_folder_is_deleted_does_not_publish_partial_curves(
    fixture_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after publishing, while deleting the resume folder (in directory order: the curves may go
    before last.pt): the rerun resumed from the finished checkpoint and published the curves that were
    left, none. The checkpoint goes first, so a rerun trains afresh and writes whole curves."""
    align, _ = tiny_configs(fixture_root, epochs=2)
    runs = _whole_and_killed(align, fixture_root, "rm_")
    main_alignment(Common(seed=0), runs["whole"], "mcf")
    resume, real_rmtree = Path(runs["killed"].resume_dir) / "mcf", shutil.rmtree

    def killed_half_way(path: str | Path, *args: object, **kwargs: object) -> None:
        if Path(path) == resume:
            real_rmtree(resume / "live")
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed_half_way)
        with pytest.raises(KeyboardInterrupt):
            main_alignment(Common(seed=0), runs["killed"], "mcf")
    main_alignment(Common(seed=0), runs["killed"], "mcf")
    curves = [Path(r.live) / "mcf" / "plots" / "metrics" / "train" / "loss.tsv" for r in runs.values()]
    assert curves[1].is_file() and curves[0].read_text() == curves[1].read_text()
    assert not resume.exists()


def test_an_out_folder_of_other_files_is_refused_before_training(fixture_root: Path, tmp_path: Path) -> None:
    """``<out>/<variant>`` that holds no model.pt is not ours to replace: refused at once, as the curves'
    folder is, not after the whole fine-tune (no epoch ran: no resume state)."""
    align, _ = tiny_configs(fixture_root)
    cfg = dataclasses.replace(align, out=str(tmp_path / "out"), live=str(tmp_path / "live"),
                              resume_dir=str(tmp_path / "resume"))
    (tmp_path / "out" / "mcf").mkdir(parents=True)
    (tmp_path / "out" / "mcf" / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="holds no model.pt"):
        main_alignment(Common(seed=0), cfg, "mcf")
    assert not (tmp_path / "resume").exists()
    assert (tmp_path / "out" / "mcf" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("under", ["out", "live"])
def test_an_out_or_live_folder_under_a_file_is_refused_before_training(
    fixture_root: Path, tmp_path: Path, under: str
) -> None:
    """``out: notes.txt`` puts ``<out>/<variant>`` under a file: the folder can never be made, but only
    the rename after the whole fine-tune found it (`mcf finetune_alignment`: an hour of paper-scale
    training, then "cannot write notes.txt/mcf: Not a directory"). Refused at once (no resume state)."""
    align, _ = tiny_configs(fixture_root)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    paths = {"out": str(tmp_path / "out"), "live": str(tmp_path / "live"), under: str(mine)}
    cfg = dataclasses.replace(align, **paths, resume_dir=str(tmp_path / "resume"))
    with pytest.raises(StageError, match=f"cannot write {mine / 'mcf'}: {mine} is a file"):
        main_alignment(Common(seed=0), cfg, "mcf")
    assert not (tmp_path / "resume").exists() and mine.read_text() == "mine"


def test_weights_that_diverge_under_a_finite_loss_are_not_published(
    fixture_root: Path, tmp_path: Path
) -> None:
    """At lr 1e4 the last step's loss (4.9e7) is finite but its update leaves NaN weights: the loss guard
    looks at the next step's loss, which a one-epoch run never computes, so model.pt was published with
    NaN weights under curves of a finite loss (and, with more epochs, the epoch's checkpoint kept them)."""
    _, parse = tiny_configs(fixture_root)
    cfg = dataclasses.replace(parse, lr_backbone=1e4, lr_neck=1e4, lr_head=1e4, test_each_epoch=False,
                              out=str(tmp_path / "out"), live=str(tmp_path / "live"),
                              resume_dir=str(tmp_path / "resume"))
    with pytest.raises(StageError, match=r"non-finite weights after epoch 1 of 1 \(step 2\)"):
        main_parsing(Common(seed=0), cfg, "mcf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()
    assert not (tmp_path / "resume" / "mcf" / "last.pt").exists()


def test_a_warmup_longer_than_the_run_is_refused(fixture_root: Path, tmp_path: Path) -> None:
    """warmup_steps past the run's last step leaves the lr below its peak throughout: refused, as the
    pre-training loop refuses warmup_epochs > epochs, before an epoch runs."""
    _, parse = tiny_configs(fixture_root)
    cfg = dataclasses.replace(parse, warmup_steps=10**6, out=str(tmp_path / "out"),
                              live=str(tmp_path / "live"), resume_dir=str(tmp_path / "resume"))
    with pytest.raises(ParamsError, match=r"warmup_steps.*must be <= the run's \d+ steps"):
        main_parsing(Common(seed=0), cfg, "mcf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()


def test_a_damaged_test_split_fails_before_training(fixture_root: Path, tmp_path: Path) -> None:
    """The test split is scored after every epoch: a bad file there stops the run before its first epoch
    (an epoch of training lost on each rerun at the paper's scale), and only when it is scored."""
    copy = tmp_path / "lapa"
    shutil.copytree(fixture_root / "lapa", copy)
    _, parse = tiny_configs(fixture_root)
    parse = dataclasses.replace(parse, data=dataclasses.replace(parse.data, root=str(copy)),
                                out=str(tmp_path / "out"), live=str(tmp_path / "live"),
                                resume_dir=str(tmp_path / "resume"))
    bad = next((copy / "LaPa" / "test" / "landmarks").glob("*.txt"))
    bad.write_text("not landmarks\n")
    with pytest.raises(GateError, match="'lapa' failed"):
        main_parsing(Common(seed=0), parse, "scratch")
    assert not (tmp_path / "resume").exists()  # no epoch was trained
    main_parsing(Common(seed=0), dataclasses.replace(parse, test_each_epoch=False), "scratch")
    assert (tmp_path / "out" / "scratch" / "model.pt").is_file()


def test_parsing_finetune_is_deterministic(fixture_root: Path) -> None:
    _, parse = tiny_configs(fixture_root)
    parse = dataclasses.replace(parse, backbone=str(fixture_root / "nowhere"))  # scratch never reads mcf's
    states, scores = [], []
    # scoring the test or the validation split after each epoch changes nothing
    for out, test, val in (("a", True, False), ("b", False, False), ("c", False, True)):
        cfg = dataclasses.replace(parse, out=str(fixture_root / out), live=str(fixture_root / f"live_{out}"),
                                  test_each_epoch=test, val_each_epoch=val)
        main_parsing(Common(seed=3), cfg, "scratch")
        checkpoint = torch.load(fixture_root / out / "scratch" / "model.pt", weights_only=True)
        states.append(checkpoint["state_dict"])
        scores.append((checkpoint["test_by_epoch"], checkpoint["val_by_epoch"]))
    assert len(scores[0][0]) == parse.epochs and 0 <= scores[0][0][0] <= 100 and scores[0][1] == []
    assert scores[1] == ([], [])
    assert scores[2][0] == [] and len(scores[2][1]) == parse.epochs and 0 <= scores[2][1][0] <= 100
    curves = fixture_root / "live_c" / "scratch" / "plots" / "metrics"
    val_curve = pd.read_csv(curves / "val" / "f1_mean_val.tsv", sep="\t")
    assert val_curve["f1_mean_val"].tolist() == pytest.approx(scores[2][1])
    assert not (curves / "test").exists()
    states.pop(1)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert states[0]["classifier.weight"].shape[0] == 11


def test_bf16_autocast_trains_the_same_model_approximately(fixture_root: Path) -> None:
    """``precision: bf16`` (CUDA's ``auto``) runs the forward under autocast, here on the CPU: the first
    loss agrees with fp32's to bf16 precision, and the weights differ, so autocast really was on."""
    align, _ = tiny_configs(fixture_root)
    states, losses = [], []
    for precision in ("fp32", "bf16"):
        cfg = dataclasses.replace(align, out=str(fixture_root / f"ft_{precision}"), precision=precision,
                                  live=str(fixture_root / f"live_{precision}"), test_each_epoch=False)
        main_alignment(Common(seed=0), cfg, "mcf")
        states.append(torch.load(Path(cfg.out) / "mcf" / "model.pt", weights_only=True)["state_dict"])
        losses.append(_losses(Path(cfg.live) / "mcf")[0])
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert not torch.equal(states[0]["classifier.weight"], states[1]["classifier.weight"])
