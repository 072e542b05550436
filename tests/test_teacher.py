"""Teacher loading: MoCo v3 / timm / mcf / random specs, exact weights, frozen, gradients pass through."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml

from mcf.errors import StageError
from mcf.models.backbone import BackboneConfig, create_backbone, load_backbone, read_spec, save_backbone
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.teacher import FeatureTeacher, load_teacher, validate_teacher_spec, weights_path
from mcf.params import Common, ParamsError, load
from mcf.train import teacher as stage
from mcf.train.loop import Run
from mcf.train.teacher import TeacherConfig

TINY = BackboneConfig(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2)


def assert_same_weights(teacher: FeatureTeacher, reference: torch.nn.Module) -> None:
    ours, theirs = teacher.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_moco_v3_checkpoint_loads_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = create_backbone(TINY, num_classes=10)  # a head, as MoCo v3's base encoder has
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in vit.state_dict().items()}
    state["module.predictor.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_tiny", "state_dict": state}, path)
    teacher = load_teacher(f"moco_v3:{path}", TINY)
    vit.reset_classifier(0)
    assert_same_weights(teacher, vit)
    assert teacher.depth == 3 and teacher.img_size == (32, 32)
    torch.save({"state_dict": vit.state_dict()}, tmp_path / "plain.pth")
    torch.save({"state_dict": torch.zeros(3)}, tmp_path / "tensor.pth")  # was an AttributeError traceback
    for name in ("plain.pth", "tensor.pth"):
        with pytest.raises(ValueError, match="not a MoCo v3 checkpoint"):
            load_teacher(f"moco_v3:{tmp_path / name}", TINY)


def test_moco_v3_vit_small_keeps_its_12_heads(tmp_path: Path) -> None:
    """MoCo v3's ViT-S has 12 heads at width 384 (timm's has 6): its ``arch`` says so, since the
    weights' shapes do not; 6 heads would load the same weights and compute another attention."""
    torch.manual_seed(0)
    size = BackboneConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=12)
    vit = create_backbone(size).eval()
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    path = tmp_path / "moco_vits.pth.tar"
    torch.save({"arch": "vit_small", "state_dict": state}, path)
    teacher = load_teacher(f"moco_v3:{path}", dataclasses.replace(size, num_heads=3))
    assert all(block.attn.num_heads == 12 for block in teacher.model.blocks)
    x = torch.randn(2, 3, 32, 32)
    expected = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))  # both blocks, before the norm
    torch.testing.assert_close(teacher(x, [1])[0], expected)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("moco:x.pth", "moco_v3:<path>"),
        ("teacher.pth", "random"),
        ("timm:", "is not valid"),
        ("timm:vit_tiny_patch16_224", "needs weights"),
        ("timm:vit_tiny_patch16_224:", "needs weights"),
        ("timm:no_such_model_xyz:w.pth", "no model"),
    ],
)
def test_bad_specs_fail_early(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        validate_teacher_spec(spec)


def test_a_misspelt_timm_name_fails_every_stage_not_only_teacher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only ``timm:<weights file>`` waits for the teacher stage (its file may not exist yet): a name with
    weights that timm does not have is a typo, caught by the first stage run, not by teacher after fetch
    and crop have run for hours."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["teacher"] |= {"source": "timm:vit_tiny_patch16_2244:data/w.pth", "data": "data/w.pth"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="timm has no model 'vit_tiny_patch16_2244'"):
        load("crop", tmp_path / "params.yaml", every_section=True)


def test_random_must_be_explicit() -> None:
    validate_teacher_spec("random")
    validate_teacher_spec("timm:vit_tiny_patch16_224:random")
    assert load_teacher("random", TINY).depth == 3
    with pytest.raises(ValueError, match="needs weights"):
        load_teacher("timm:vit_tiny_patch16_224", TINY)
    with pytest.raises(ValueError, match="not found"):
        load_teacher("mcf:/nonexistent/teacher.pth", TINY)


def test_the_stage_input_is_the_specs_weights(tmp_path: Path) -> None:
    """dvc.yaml's teacher dep is ``teacher.data``: it must be the file a spec reads, or a replaced
    checkpoint would leave the old teacher in place as up to date."""
    (tmp_path / "w.pth").touch()
    expected = {
        "random": None, "timm:vit_tiny_patch16_224:random": None,
        "moco_v3:data/teacher/m.pth": "data/teacher/m.pth",
        "mcf:outputs/run/backbone": "outputs/run/backbone",
        "timm:vit_tiny_patch16_224:data/w.pth": "data/w.pth",
        f"timm:{tmp_path / 'w.pth'}": str(tmp_path / "w.pth"),
    }
    assert {spec: weights_path(spec) for spec in expected} == expected
    TeacherConfig(source="moco_v3:data/teacher/m.pth", data="data/teacher/m.pth")
    TeacherConfig(source="moco_v3:data/teacher/m.pth", data="./data/teacher/m.pth")
    TeacherConfig(source="random", data="outputs/subset")
    wrong = r"data: must name the weights .* 'data/teacher/m.pth' \(not 'outputs/subset'"
    with pytest.raises(ParamsError, match=wrong):
        TeacherConfig(source="moco_v3:data/teacher/m.pth", data="outputs/subset")


def test_timm_name_with_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    torch.save(vit.state_dict(), tmp_path / "w.pth")
    teacher = load_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'w.pth'}", TINY)
    vit.reset_classifier(0)
    assert_same_weights(teacher, vit)
    assert teacher.img_size == (224, 224)
    assert [f.shape for f in teacher(torch.randn(1, 3, 32, 32), [1, 2])] == [(1, 197, 192)] * 2


def test_timm_name_with_weights_of_another_width_is_a_value_error(tmp_path: Path) -> None:
    """Same keys, other shapes: torch raises RuntimeError, which reached the user as a traceback; the
    stage turns a ValueError into one line naming teacher.source."""
    torch.save(create_backbone(TINY).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w.pth do not fit VisionTransformer: size mismatch for cls_token"):
        load_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'w.pth'}", TINY)


def test_weights_without_a_vit_are_a_value_error(tmp_path: Path) -> None:
    """A state dict with ``encoder.*`` keys that hold no timm ViT (a Hugging Face ViT's, say): the loaders
    size the ViT from the weights and say which one is missing, as a ValueError the teacher stage reports
    in one line; reading the patch embedding's width to pick the head count raised a bare KeyError."""
    hf = {"embeddings.cls_token": torch.zeros(1, 1, 8), "encoder.layer.0.output.dense.weight": torch.zeros(8)}
    torch.save(hf, tmp_path / "hf.pth")
    for spec in (f"timm:{tmp_path / 'hf.pth'}", f"mcf:{tmp_path / 'hf.pth'}"):
        with pytest.raises(ValueError, match="cannot size the ViT: weight 'patch_embed.proj.weight'"):
            load_teacher(spec, TINY)


def test_mcf_folder_and_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(2)
    vit = create_backbone(TINY)
    save_backbone(vit, TINY, tmp_path / "export")
    assert_same_weights(load_teacher(f"mcf:{tmp_path / 'export'}", TINY), vit)
    ckpt = {"model": {f"encoder.{k}": v for k, v in vit.state_dict().items()},
            "backbone": dataclasses.asdict(TINY)}
    torch.save(ckpt, tmp_path / "last.pt")
    assert_same_weights(load_teacher(f"mcf:{tmp_path / 'last.pt'}", TINY), vit)


@pytest.mark.parametrize("spec", ["mcf", "random"])
def test_loading_a_teacher_leaves_the_callers_random_stream(tmp_path: Path, spec: str) -> None:
    """The student is initialised after its teacher is loaded: a load that drew from the stream would
    give a run with a teacher another student init than the same run without one."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    spec = f"mcf:{tmp_path / 'export'}" if spec == "mcf" else spec
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_teacher(spec, TINY)
    assert torch.equal(torch.rand(3), expected)


def test_features_are_raw_block_outputs() -> None:
    teacher = load_teacher("random", TINY)
    x = torch.randn(2, 3, 32, 32)
    vit = teacher.model
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(x)], dim=1) + vit.pos_embed
    expect = []
    for block in vit.blocks:
        tokens = block(tokens)
        expect.append(tokens)
    got = teacher(x, [2, 0])
    torch.testing.assert_close(got[0], expect[2])
    torch.testing.assert_close(got[1], expect[0])


def test_teacher_frozen_but_gradients_reach_the_decoder() -> None:
    cfg = MCFConfig(backbone=TINY, decoder_dim=32, decoder_depth=1, decoder_heads=2, feature_layers=(0, 2),
                    contrastive=False)
    torch.manual_seed(3)
    model = MCF(cfg, load_teacher("random", TINY)).train()
    assert not model.teacher.training and not model.teacher.model.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    model(torch.randn(2, 3, 32, 32), 0.75)["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.decoder_pred.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_under_autocast_the_residual_stream_is_carried_in_its_dtype() -> None:
    """The frozen teacher's blocks pass bf16 under bf16 autocast (fp32 position embeddings would lift every
    block to fp32); the maps stay within bf16 rounding of fp32, and without autocast nothing changes."""
    torch.manual_seed(0)
    teacher = load_teacher("random", TINY)
    x = torch.randn(4, 3, 32, 32)
    exact = teacher(x, [0, 2])
    assert all(t.dtype == torch.float32 for t in exact)
    with torch.autocast("cpu", torch.bfloat16):
        low = teacher(x, [0, 2])
        teacher.low_precision_residual = False
        wide = teacher(x, [0, 2])
    assert all(t.dtype == torch.bfloat16 for t in low) and all(t.dtype == torch.float32 for t in wide)
    for a, b in zip(low, exact, strict=True):
        assert (a.float() - b).norm() / b.norm() < 2e-2


def test_under_float16_autocast_the_residual_stream_is_float16() -> None:
    """The stream takes autocast's own dtype, not a fixed bf16: under fp16 autocast, bf16 tokens added to the
    blocks' fp16 outputs promote to fp32, so the stream would run at full width after all."""
    teacher = load_teacher("random", TINY)
    with torch.autocast("cpu", torch.float16):
        assert all(t.dtype == torch.float16 for t in teacher(torch.randn(2, 3, 32, 32), [0, 2]))


def test_a_pre_norm_teachers_maps_follow_its_pre_norm() -> None:
    """CLIP-style ViTs (timm's ``pre_norm``) normalise the embedded tokens before the first block: without
    it every map is of another network. The last map, through the final norm, is timm's forward_features."""
    model = timm.create_model("test_vit", pre_norm=True, num_classes=0, img_size=32, depth=2)
    teacher = FeatureTeacher(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.norm(teacher(x, [1])[0]), model.forward_features(x))


def test_a_timm_name_whose_weights_expect_other_normalisation_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """timm's vit_tiny_patch16_224 weights expect mean = std = 0.5; the teacher sees ImageNet-normalised
    crops, so a teacher trained so would judge every image off its input range, silently."""
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict(), tmp_path / "w.pth")
    load_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'w.pth'}", TINY)
    assert "expect inputs normalised with mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in caplog.text
    caplog.clear()
    torch.save(timm.create_model("vit_small_patch16_224", num_classes=0).state_dict(), tmp_path / "w.pth")
    load_teacher(f"timm:vit_small_patch16_224.dino:{tmp_path / 'w.pth'}", TINY)
    assert "normalised" not in caplog.text


def test_a_timm_weights_file_missing_a_weight_is_refused(tmp_path: Path) -> None:
    """A weight absent from the file would keep its random init inside an otherwise loaded teacher."""
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    del state["blocks.1.attn.qkv.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"missing \['blocks.1.attn.qkv.weight'\]"):
        load_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'w.pth'}", TINY)


def test_a_timm_weights_file_with_an_extra_weight_is_refused(tmp_path: Path) -> None:
    """A weight the named model has no place for (a deeper or another model's file) means the name and the
    file disagree: loaded regardless, the teacher would compute something the file was never trained as,
    and looked up in the model's own weights it was a KeyError traceback."""
    state = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict()
    state["blocks.12.norm1.weight"] = torch.ones(192)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['blocks.12.norm1.weight'\]"):
        load_teacher(f"timm:vit_tiny_patch16_224:{tmp_path / 'w.pth'}", TINY)


def test_a_teacher_of_another_width_takes_64_channel_heads_not_the_students(tmp_path: Path) -> None:
    """The student's head count is borrowed only when the widths match: a 192-wide teacher (timm's
    ViT-Ti, 3 heads) beside the 64-wide, 2-head student would otherwise run with 2 heads, which divide
    192 too, and give other features from the same weights."""
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "ti.pth")
    assert load_teacher(f"timm:{tmp_path / 'ti.pth'}", TINY).model.blocks[0].attn.num_heads == 3
    ckpt = {"model": {f"encoder.{k}": v for k, v in create_backbone(TINY).state_dict().items()}}
    torch.save(ckpt, tmp_path / "same.pt")  # no backbone entry: the heads come from the student's size
    assert load_teacher(f"mcf:{tmp_path / 'same.pt'}", TINY).model.blocks[0].attn.num_heads == 2


def test_inputs_of_another_size_are_resized_nearest() -> None:
    """The release's ``F.interpolate`` default: halving the size keeps every other pixel."""
    teacher = load_teacher("random", TINY)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(teacher(x, [1])[0], teacher(x[..., ::2, ::2], [1])[0])


@pytest.mark.parametrize("weights", ["file", "random"])
def test_a_timm_named_teacher_of_another_architecture_survives_the_teacher_stage(
    tmp_path: Path, weights: str
) -> None:
    """timm's test_vit2 (no class token, a register token, layer scale, average pool) stands for the
    architectures a name builds and the weights do not record, such as CLIP's pre-norm or a ViT without
    qkv bias: the stage re-saved it as the plain ViT its shapes suggest, so it ended in a 'does not
    fit' error naming its temporary folder. Its export now names the timm model and computes the same."""
    from mcf.train.teacher import import_teacher

    torch.save(timm.create_model("test_vit2", num_classes=0).state_dict(), tmp_path / "w.pth")
    spec = f"timm:test_vit2:{tmp_path / 'w.pth' if weights == 'file' else 'random'}"
    torch.manual_seed(0)
    import_teacher(spec, TINY, tmp_path / "out")
    torch.manual_seed(0)
    given = load_teacher(spec, TINY)
    exported = load_teacher(f"mcf:{tmp_path / 'out'}", TINY)
    assert_same_weights(exported, given.model)
    x = torch.randn(2, 3, *given.img_size)
    torch.testing.assert_close(exported(x, [0, 1]), given(x, [0, 1]))


def test_a_timm_hybrid_vit_teacher_survives_the_teacher_stage(tmp_path: Path) -> None:
    """timm's hybrid ViTs (a ResNet stem as patch embedding, HybridEmbed) load as teachers, but every
    rebuild from an export forced the linear patch embedding in place of the stem, so the teacher stage
    failed with "backbone.pth does not fit backbone.json" naming its temporary folder. The linear form now
    replaces only timm's plain PatchEmbed, and the export computes what the given teacher does."""
    from mcf.train.teacher import import_teacher

    name = "vit_tiny_r_s16_p8_224"
    torch.save(timm.create_model(name, num_classes=0).state_dict(), tmp_path / "w.pth")
    import_teacher(f"timm:{name}:{tmp_path / 'w.pth'}", TINY, tmp_path / "out")
    given, exported = (load_teacher(spec, TINY) for spec in (f"timm:{name}:{tmp_path / 'w.pth'}",
                                                              f"mcf:{tmp_path / 'out'}"))
    assert type(exported.model.patch_embed) is type(given.model.patch_embed)
    assert_same_weights(exported, given.model)
    x = torch.randn(1, 3, *given.img_size)
    assert all(torch.equal(a, b) for a, b in zip(exported(x, [0, 1]), given(x, [0, 1]), strict=True))


def test_a_teacher_export_of_another_architecture_is_re_imported_as_it_is(tmp_path: Path) -> None:
    """``mcf:<folder>`` names an export, whose backbone.json says which timm model it is: the stage re-saved
    it as the plain ViT its shapes suggest, so a teacher stage's own export of a timm-named teacher (here
    timm's test_vit2: no class token, layer scale) failed to load back, in an error naming a temporary
    folder. The re-save now keeps the export's model and computes the same."""
    from mcf.train.teacher import import_teacher

    torch.save(timm.create_model("test_vit2", num_classes=0).state_dict(), tmp_path / "w.pth")
    import_teacher(f"timm:test_vit2:{tmp_path / 'w.pth'}", TINY, tmp_path / "first")
    import_teacher(f"mcf:{tmp_path / 'first'}", TINY, tmp_path / "again")
    assert read_spec(tmp_path / "again") == read_spec(tmp_path / "first")
    first, again = (load_teacher(f"mcf:{tmp_path / d}", TINY) for d in ("first", "again"))
    assert_same_weights(again, first.model)
    x = torch.randn(2, 3, *first.img_size)
    assert all(torch.equal(a, b) for a, b in zip(again(x, [0, 1]), first(x, [0, 1]), strict=True))


def test_a_teacher_export_whose_weights_are_of_another_input_size_is_refused(tmp_path: Path) -> None:
    """backbone.pth of a 32 px export beside the backbone.json of a 64 px one: load_backbone resampled the
    position grid whenever its shape differed, which is meant for a size the caller asks for, so the mixed
    pair loaded as a teacher (and fine-tuned at another size) as if it were one export."""
    import shutil

    from mcf.errors import WeightsError
    from mcf.models.backbone import load_backbone

    big = dataclasses.replace(TINY, img_size=64)
    save_backbone(create_backbone(TINY), TINY, tmp_path / "small")
    save_backbone(create_backbone(big), big, tmp_path / "mixed")
    shutil.copy(tmp_path / "small" / "backbone.pth", tmp_path / "mixed" / "backbone.pth")
    with pytest.raises(WeightsError, match=r"mixed: backbone.pth does not fit backbone.json .*pos_embed"):
        load_teacher(f"mcf:{tmp_path / 'mixed'}", big)
    with pytest.raises(WeightsError, match=r"mixed: backbone.pth does not fit backbone.json .*pos_embed"):
        load_backbone(tmp_path / "mixed", img_size=96)
    assert load_backbone(tmp_path / "small", img_size=64).pos_embed.shape == (1, 65, 64)  # asked for


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_rope_224"])
def test_a_timm_model_that_is_not_a_vision_transformer_is_refused_by_the_teacher_stage(
    tmp_path: Path, name: str
) -> None:
    """timm's Eva (EVA-02, and the ``vit_*_rope`` names) has the four attributes FeatureTeacher looked for,
    but its ``_pos_embed`` returns a pair and its ``patch_drop`` may be None: the teacher stage exported it,
    and pretrain's first step failed with "'NoneType' object is not callable". The stage now refuses it."""
    from mcf.train.teacher import import_teacher

    with pytest.raises(ValueError, match=rf"teacher must be a timm VisionTransformer, not Eva \({name}\)"):
        import_teacher(f"timm:{name}:random", TINY, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_teacher_run_identity_holds_its_own_mask_ratio_and_the_mae(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher's MAE masks at teacher.mask_ratio, not the top-level one (pretrain's): its run hash
    must hold that ratio and the MAE's config, or a resume after `-S teacher.mask_ratio=...` or a decoder
    change would go on from weights that the old settings trained."""
    (tmp_path / "subset" / "shards").mkdir(parents=True)
    runs: list[Run] = []
    monkeypatch.setattr(stage, "train_and_export", lambda build, data, cfg, run, *a: runs.append(run))
    cfg = TeacherConfig(data=str(tmp_path / "subset"), out=str(tmp_path / "out"), backbone=TINY,
                        resume_dir=str(tmp_path / "resume"), decoder_dim=16, mask_ratio=0.625)
    stage.main(Common(seed=3, mask_ratio=0.5), cfg)
    assert runs[0].mask_ratio == 0.625 and runs[0].identity == {
        "stage": "teacher", "seed": 3, "mask_ratio": 0.625, "model": dataclasses.asdict(cfg.mae_config()),
        "train": cfg.train.identity(),
    }


def test_the_teacher_stage_checks_its_inputs_and_resume_folder_before_it_starts(tmp_path: Path) -> None:
    """`mcf` runs check_inputs before torchrun starts: a data folder without the subset's shards/ would
    fail in every worker only after they started, and a resume_dir holding other files would be deleted
    with them when the run finishes."""
    (tmp_path / "subset" / "shards").mkdir(parents=True)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "keep.txt").touch()
    cfg = TeacherConfig(data=str(tmp_path / "subset"), resume_dir=str(tmp_path / "resume"))
    stage.check_inputs(cfg)
    with pytest.raises(ParamsError, match="teacher.resume_dir: "):
        stage.check_inputs(dataclasses.replace(cfg, resume_dir=str(tmp_path / "outputs")))
    with pytest.raises(ParamsError, match=r"teacher.data: .*\(run `mcf subset` first\)"):
        stage.check_inputs(dataclasses.replace(cfg, data=str(tmp_path)))


def test_a_random_teacher_is_the_seeds_whatever_ran_before_and_drops_stale_resume_state(
    tmp_path: Path,
) -> None:
    """`random` is reproducible from params.yaml's seed (dvc repro twice gives one teacher, one pretrain
    run), not from whatever the process drew before, and another seed is another teacher (a fixed seed
    would pass for reproducible); an imported teacher publishes like a trained one, so a trained run's
    resume state left in resume_dir goes."""
    exports = []
    for before, seed in ((1, 5), (2, 5), (1, 6)):
        torch.manual_seed(before)
        resume = tmp_path / f"resume{len(exports)}"
        resume.mkdir()
        (resume / "last.pt").touch()
        out = tmp_path / f"out{len(exports)}"
        cfg = TeacherConfig(source="random", data="unused", out=str(out), backbone=TINY,
                            resume_dir=str(resume), decoder_dim=16)
        stage.main(Common(seed=seed), cfg)
        exports.append((out / "backbone.pth").read_bytes())
        assert not (resume / "last.pt").exists()
    assert exports[0] == exports[1] != exports[2]


def test_the_mae_takes_the_teacher_sections_decoder_and_loss_and_masks_as_maes_defaults() -> None:
    """mae_config builds the teacher's MAE from the section's keys (a key passed over trains another
    teacher than params.yaml names); the defaults are MAE's (PROTOCOL.md §1: 512 wide, 8 blocks, 16 heads,
    mask ratio 0.75)."""
    cfg = TeacherConfig(backbone=TINY, decoder_dim=16, decoder_depth=2, decoder_heads=4, norm_pix_loss=False)
    mae = cfg.mae_config()
    assert (mae.backbone, mae.decoder_dim, mae.decoder_depth, mae.decoder_heads) == (TINY, 16, 2, 4)
    assert (mae.objective, mae.norm_pix_loss, mae.uses_teacher) == ("pixel_mae", False, False)
    default = TeacherConfig()
    assert (default.decoder_dim, default.decoder_depth, default.decoder_heads, default.mask_ratio) == (
        512, 8, 16, 0.75)


def test_a_damaged_teacher_file_is_a_stage_error_naming_the_source(tmp_path: Path) -> None:
    """A weights file that is not a checkpoint is the user's input: one line naming teacher.source (a
    StageError, exit 1 without a traceback), not a ValueError from deep inside the loader."""
    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    spec = f"moco_v3:{tmp_path / 'w.pth'}"
    cfg = TeacherConfig(source=spec, data=str(tmp_path / "w.pth"), out=str(tmp_path / "out"), backbone=TINY,
                        resume_dir=str(tmp_path / "resume"), decoder_dim=16)
    with pytest.raises(StageError, match=re.escape(f"teacher.source {spec!r}: ")):
        stage.main(Common(), cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["train", "random"])
def test_the_teacher_stage_replaces_only_its_own_output(tmp_path: Path, source: str) -> None:
    """Only a folder holding teacher.json is an earlier teacher output: a mistyped out naming another
    writer's export (backbone.pth and backbone.json, as `mcf export` writes) must be refused and kept,
    whether the stage trains its MAE or re-saves a given teacher."""
    (tmp_path / "subset" / "shards").mkdir(parents=True)
    mine = tmp_path / "mine"
    save_backbone(create_backbone(TINY), TINY, mine)
    before = sorted(p.name for p in mine.iterdir())
    cfg = TeacherConfig(source=source, data=str(tmp_path / "subset"), out=str(mine), backbone=TINY,
                        resume_dir=str(tmp_path / "resume"), decoder_dim=16)
    with pytest.raises(StageError, match="holds no teacher.json"):
        stage.main(Common(seed=0), cfg)
    assert sorted(p.name for p in mine.iterdir()) == before


def test_a_re_saved_teacher_keeps_its_head_count(tmp_path: Path) -> None:
    """Heads are not in the weights' shapes: a teacher re-saved with heads guessed from its width (64 wide:
    one head of 64) would load without a word as another attention than the 2-head model it was."""
    cfg = TeacherConfig(source="random", out=str(tmp_path / "out"), backbone=TINY,
                        resume_dir=str(tmp_path / "resume"))
    stage.main(Common(seed=0), cfg)
    assert read_spec(tmp_path / "out")["kwargs"]["num_heads"] == 2


def test_a_teacher_checkpoint_of_another_size_than_teacher_backbone_is_refused(tmp_path: Path) -> None:
    """The paper's params name the teacher ViT-B/16; a MoCo v3 ViT-S file in its place was re-saved as the
    teacher with an info line, and days of pre-training ran against another teacher than the params said.
    The checkpoint's size must be the section's: a params error (exit 2) naming what differs, no output.
    A checkpoint of the section's size is re-saved as before."""
    torch.manual_seed(0)
    small = dataclasses.replace(TINY, embed_dim=48, depth=2)
    for size, name in ((small, "small.pth"), (TINY, "tiny.pth")):
        state = {f"module.base_encoder.{k}": v for k, v in create_backbone(size).state_dict().items()}
        torch.save({"state_dict": state}, tmp_path / name)

    def cfg(name: str) -> TeacherConfig:
        return TeacherConfig(source=f"moco_v3:{tmp_path / name}", data=str(tmp_path / name), backbone=TINY,
                             out=str(tmp_path / "out"), resume_dir=str(tmp_path / "resume"), decoder_dim=16)

    with pytest.raises(ParamsError) as err:
        stage.main(Common(), cfg("small.pth"))
    assert err.value.key == "backbone"
    assert f"moco_v3:{tmp_path / 'small.pth'} holds a ViT of embed_dim 48, depth 2" in str(err.value)
    assert "not this section's embed_dim 64, depth 3" in str(err.value)
    assert not (tmp_path / "out").exists()
    stage.main(Common(), cfg("tiny.pth"))
    assert read_spec(tmp_path / "out")["kwargs"]["embed_dim"] == 64


def test_a_random_teacher_of_an_mlp_ratio_the_weights_round_is_of_its_own_size(tmp_path: Path) -> None:
    """Width 48 × MLP ratio 4.1 builds a hidden width of 196, which the weights read back as ratio 4.083:
    the same ViT, so the size check must pass it."""
    size = dataclasses.replace(TINY, embed_dim=48, mlp_ratio=4.1)
    stage.import_teacher("random", size, tmp_path / "out")
    assert load_backbone(tmp_path / "out").blocks[0].mlp.fc1.out_features == 196
