"""Official release layout ↔ MCF: every key of the release's ViT-B/16 file maps, and exports load in timm."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch

from mcf.errors import StageError, WeightsError
from mcf.models.backbone import (
    BackboneConfig,
    create_backbone,
    load_backbone,
    read_weights,
    save_backbone,
    save_export,
)
from mcf.models.export import cli
from mcf.models.mcf import MCF, MCFConfig
from mcf.models.release import (
    export_backbone,
    infer_backbone_config,
    load_release_state_dict,
    to_release_state_dict,
)
from mcf.models.teacher import FeatureTeacher, load_teacher
from mcf.params import ParamsError
from mcf.train.finetune import load_finetuned

# Every key and shape of the public release's ViT-B/16 model (a copy of the team's reference list).
TSV = Path(__file__).parent / "data" / "mcf_release_vit_b16_state_dict_keys.tsv"
TINY = BackboneConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def release_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in TSV.read_text().splitlines() if line and not line.startswith("#")]
    return [(key, tuple(ast.literal_eval(shape))) for key, shape in rows]


@pytest.fixture(scope="module")
def release_sd() -> dict[str, torch.Tensor]:
    """A state dict with the release's names and shapes; tensor i holds only the value i, so placement
    shows. Each is a broadcast view of one number: ViT-B sizes at no memory (or disk) cost."""
    sd = {}
    for i, (key, shape) in enumerate(release_keys()):
        dtype = torch.long if key.endswith("num_batches_tracked") else torch.float32
        sd[key] = torch.tensor(i, dtype=dtype).expand(shape)
    return sd


def meta_vit_b_mcf() -> MCF:
    """The paper's MCF built on the meta device (shapes only), with a ViT-B teacher holding a head."""
    with torch.device("meta"):
        teacher = FeatureTeacher(timm.create_model("vit_base_patch16_224", num_classes=0))
        return MCF(MCFConfig(), teacher)


def test_release_file_loads_without_missing_or_unexpected_keys(release_sd: dict, tmp_path: Path) -> None:
    assert len(release_sd) == 583
    model = meta_vit_b_mcf()
    report = load_release_state_dict(model, {"model": release_sd, "optimizer": {}}, assign=True)
    assert report.missing == [] and report.unexpected == []
    assert report.dropped == ["perceptual_loss.model.head.weight", "perceptual_loss.model.head.bias"]
    back = to_release_state_dict(model)
    assert back.keys() == release_sd.keys() - set(report.dropped)
    assert all(torch.equal(back[k], release_sd[k]) for k in back)
    fc2_bias = release_sd["online_encoder.blocks.11.mlp.fc2.bias"]
    assert torch.equal(model.encoder.blocks[11].mlp.fc2.bias, fc2_bias)
    assert torch.equal(model.projector[4].running_var, release_sd["online_encoder.fc.4.running_var"])
    assert torch.equal(model.momentum_projector[0].weight, release_sd["target_encoder.fc.0.weight"])

    export_backbone(model, tmp_path / "ours")
    export_backbone({"model": release_sd}, tmp_path / "release")
    for folder in ("ours", "release"):
        state = torch.load(tmp_path / folder / "backbone.pth", weights_only=True)
        with torch.device("meta"):
            vit = timm.create_model("vit_base_patch16_224", num_classes=0)
        assert state.keys() == vit.state_dict().keys()
        vit.load_state_dict(state, strict=True, assign=True)
        qkv = release_sd["online_encoder.blocks.3.attn.qkv.weight"]
        assert torch.equal(state["blocks.3.attn.qkv.weight"], qkv)


def test_backbone_mismatch_fails(release_sd: dict) -> None:
    broken = {k: v for k, v in release_sd.items() if k != "online_encoder.blocks.4.norm1.weight"}
    with pytest.raises(ValueError, match="encoder.blocks.4.norm1.weight"):
        load_release_state_dict(meta_vit_b_mcf(), broken, assign=True)
    with pytest.raises(ValueError, match="does not fit"):
        load_release_state_dict(meta_vit_b_mcf(), {"online_encoder.cls_token": torch.zeros(1, 1, 64)})


def test_a_backbone_weight_the_model_lacks_fails(release_sd: dict) -> None:
    """A release file whose online encoder holds a weight this ViT has no place for (a 13th block, a
    classifier head) is another backbone: loading the rest and reporting the weight as merely unexpected
    would train from a silently truncated encoder."""
    deeper = release_sd | {"online_encoder.blocks.12.norm1.weight": torch.zeros(768)}
    with pytest.raises(ValueError, match=r"does not match the model: \['online_encoder.blocks.12.norm1"):
        load_release_state_dict(meta_vit_b_mcf(), deeper, assign=True)


class _Exploit:
    def __reduce__(self) -> tuple:
        return (print, ("a checkpoint ran code",))


def test_weights_files_load_safely(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An MAE-style training checkpoint (its argparse.Namespace included) loads; a pickle that would
    call a function, a damaged file and an empty one are refused with the path named."""
    state = {"encoder.cls_token": torch.zeros(1, 1, 8)}
    torch.save({"model": state, "epoch": 15, "args": argparse.Namespace(blr=1.5e-4)}, tmp_path / "mae.pth")
    obj = read_weights(tmp_path / "mae.pth")
    assert torch.equal(obj["model"]["encoder.cls_token"], state["encoder.cls_token"])
    assert obj["args"].blr == 1.5e-4
    torch.save({"model": state, "x": _Exploit()}, tmp_path / "exploit.pth")
    (tmp_path / "damaged.pth").write_bytes((tmp_path / "mae.pth").read_bytes()[:300])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="exploit.pth: not a weights-only PyTorch checkpoint"):
        read_weights(tmp_path / "exploit.pth")
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (tmp_path / "notes.pt").write_text("# not a checkpoint\n")
    for name in ("damaged.pth", "empty.pth", "damaged.safetensors", "notes.pt"):  # stage errors: no traceback
        with pytest.raises(WeightsError, match=f"{name}: cannot be read as a PyTorch checkpoint .*cut short"):
            read_weights(tmp_path / name)
    # torch's reason, not its advice to load the file with full unpickling (cut off mid-sentence before)
    reason = r"\(UnpicklingError: Unsupported operand \d+\): cut short"
    with pytest.raises(WeightsError, match=reason) as caught:
        read_weights(tmp_path / "notes.pt")
    assert "weights_only" not in str(caught.value)
    with pytest.raises(WeightsError, match=r"empty.pth: cannot be read as a PyTorch checkpoint \(EOFError\)"):
        read_weights(tmp_path / "empty.pth")
    assert "ran code" not in capsys.readouterr().out


def test_a_folder_given_as_weights_is_named_a_folder(tmp_path: Path) -> None:
    """``mcf export --checkpoint outputs/pretrain`` (the stage's folder, not its checkpoint.pt) said "weights
    file not found" of a folder that is there; it now says it is a folder and names the weights inside."""
    out = tmp_path / "pretrain"
    (out / "backbone").mkdir(parents=True)
    torch.save({"model": {}}, out / "checkpoint.pt")
    folder = r"pretrain is a folder, not a weights file \(it holds checkpoint.pt\)"
    with pytest.raises(StageError, match=folder):
        cli(["--checkpoint", str(out), "--out", str(tmp_path / "never")])
    with pytest.raises(WeightsError, match="backbone is a folder, not a weights file$"):
        read_weights(out / "backbone")
    with pytest.raises(WeightsError, match="weights file not found"):
        read_weights(tmp_path / "nope.pt")


def test_a_download_folder_given_as_weights_names_the_moco_and_timm_files_inside(tmp_path: Path) -> None:
    """MoCo v3 saves ``checkpoint_0299.pth.tar`` and timm ``model.safetensors``: given the folder they were
    downloaded to, the hint names those files (and not the readme beside them)."""
    for name in ("readme.txt", "model.safetensors", "checkpoint_0299.pth.tar"):
        (tmp_path / name).touch()
    holds = r"is a folder, not a weights file \(it holds checkpoint_0299.pth.tar, model.safetensors\)$"
    with pytest.raises(WeightsError, match=holds):
        read_weights(tmp_path)


def test_safetensors_weights_are_read_as_such(tmp_path: Path) -> None:
    """timm's hub weights come as ``model.safetensors``: read as weights (not refused as a damaged pickle),
    every tensor arrives exactly."""
    from safetensors.torch import save_file

    state = create_backbone(TINY).state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    read = read_weights(tmp_path / "model.safetensors")
    assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())


def test_a_checkpoint_that_is_no_mapping_is_refused_naming_it(tmp_path: Path) -> None:
    """A file holding a bare tensor or list (a torch.save of the wrong object) is no checkpoint: refused in
    one line naming it, not an AttributeError traceback at the first ``.get`` or ``.items()``."""
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list.pt: expected a dict checkpoint, got list"):
        read_weights(tmp_path / "list.pt")


class _BlockedModule:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())  # harmless, but from os (posix), a module torch's weights-only loader blocks


def test_a_pickle_calling_into_a_blocked_module_is_named_as_such(tmp_path: Path) -> None:
    """torch words a global of a module it blocks (os, sys, subprocess ...) as "unsupported GLOBAL posix.x
    whose module posix is blocked": that payload, the likeliest of a malicious file, read as "cut short,
    damaged, or another format"."""
    torch.save({"model": {}, "x": _BlockedModule()}, tmp_path / "exploit.pth")
    with pytest.raises(WeightsError, match=r"exploit.pth: not a weights-only PyTorch checkpoint \(.*posix"):
        read_weights(tmp_path / "exploit.pth")


def test_export_whose_json_and_weights_disagree_is_refused_naming_it(tmp_path: Path) -> None:
    """A backbone.json from one export beside the backbone.pth of another, or a damaged backbone.json:
    a WeightsError naming the folder (one line from a stage), not torch's or json's traceback."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "tiny")
    save_backbone(create_backbone(dataclasses.replace(TINY, embed_dim=32)),
                  dataclasses.replace(TINY, embed_dim=32), tmp_path / "mixed")
    shutil.copy(tmp_path / "tiny" / "backbone.json", tmp_path / "mixed" / "backbone.json")
    with pytest.raises(WeightsError, match=r"mixed: backbone.pth does not fit backbone.json .*size mismatch"):
        load_backbone(tmp_path / "mixed")
    (tmp_path / "tiny" / "backbone.json").write_text('{"model_name": "vit')
    with pytest.raises(WeightsError, match=r"tiny/backbone.json: not a backbone spec \(JSONDecodeError"):
        load_backbone(tmp_path / "tiny")


def test_an_export_missing_a_weight_is_refused_naming_it(tmp_path: Path) -> None:
    """A backbone.pth lacking a weight (cut down by hand, or another model's) loads strictly: the weight
    would otherwise keep its random init inside a fine-tuned or teacher backbone, without a word."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    state = torch.load(tmp_path / "export" / "backbone.pth", weights_only=True)
    del state["norm.weight"]
    torch.save(state, tmp_path / "export" / "backbone.pth")
    with pytest.raises(WeightsError, match=r"export: backbone.pth does not fit backbone.json .*norm.weight"):
        load_backbone(tmp_path / "export")


def test_a_folder_that_holds_exports_names_them(tmp_path: Path) -> None:
    """``mcf:outputs/pretrain`` (the stage's folder, not its ``backbone/`` export): the error names the
    exports inside, where a folder with none says which stage writes one."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "pretrain" / "backbone")
    save_backbone(create_backbone(TINY), TINY, tmp_path / "pretrain" / "backbone_init")
    exports = f"{tmp_path}/pretrain/backbone, {tmp_path}/pretrain/backbone_init"
    with pytest.raises(WeightsError, match=rf"pretrain/backbone.json \(the exports inside are {exports}\)$"):
        load_backbone(tmp_path / "pretrain")
    with pytest.raises(WeightsError, match=r"empty/backbone.json \(run the stage that writes it first\)$"):
        load_backbone(tmp_path / "empty")


@pytest.mark.parametrize(
    ("model_name", "kwargs", "why"),
    [
        ("resnet18", {"num_classes": 0}, "TypeError: resnet18 builds a ResNet"),
        ("vit_base_patch16_224", {**TINY.timm_kwargs(), "embed_dims": 64}, "TypeError: .*embed_dims"),
        ("vit_base_patch16_224", [64, 2], "TypeError"),
        ("vit_base_patch16_224", {**TINY.timm_kwargs(), "num_heads": 3}, "AssertionError"),
    ],
)
def test_an_export_whose_json_builds_no_vit_is_refused_naming_it(
    tmp_path: Path, model_name: str, kwargs: object, why: str
) -> None:
    """A backbone.json naming a timm model that is no ViT, or with kwargs the ViT does not take (a typo, a
    hand edit, a newer timm's): timm's TypeError (an AssertionError for heads that do not divide the width)
    reached the teacher and fine-tune stages as a traceback; it is a WeightsError naming the file."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    spec = tmp_path / "export" / "backbone.json"
    spec.write_text(json.dumps({"model_name": model_name, "kwargs": kwargs}))
    with pytest.raises(WeightsError, match=rf"export/backbone.json: {model_name} is not a ViT .*\({why}"):
        load_backbone(tmp_path / "export")


def test_a_backbone_json_that_is_binary_or_incomplete_is_refused_naming_it(tmp_path: Path) -> None:
    """A backbone.json overwritten with binary data, holding a JSON list or lacking its kwargs is a
    WeightsError naming the file (exit 1 in one line), not a UnicodeDecodeError, AttributeError or KeyError
    traceback."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    spec = tmp_path / "export" / "backbone.json"
    for content, why in ((b"\xff\xfe\x00\x81", "UnicodeDecodeError"),
                         (b'["model_name", "kwargs"]', "expected keys"),
                         (b'{"model_name": "vit_base_patch16_224"}', "expected keys")):
        spec.write_bytes(content)
        with pytest.raises(WeightsError, match=rf"export/backbone.json: not a backbone spec \({why}"):
            load_backbone(tmp_path / "export")


def test_an_export_whose_model_name_is_no_text_is_refused_naming_it(tmp_path: Path) -> None:
    """A hand-edited backbone.json's ``"model_name": null`` (or a number) is refused as no timm name, in one
    line naming the file, not as a TypeError traceback from looking for a ':' in it."""
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    spec = tmp_path / "export" / "backbone.json"
    for name in (None, 123):
        spec.write_text(json.dumps({"model_name": name, "kwargs": TINY.timm_kwargs()}))
        with pytest.raises(WeightsError, match=rf"export/backbone.json: {name} is not a timm model name"):
            load_backbone(tmp_path / "export")


@pytest.mark.parametrize("name", ["hf-hub:someone/vit_tiny", "local-dir:/somewhere"])
def test_a_model_name_from_a_file_never_fetches_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The model name of an export's backbone.json and of a fine-tuned model.pt (``mcf predict`` loads one
    handed over by anyone) went to ``timm.create_model``, which fetches an ``hf-hub:`` model's config from
    the Hugging Face hub (or reads a ``local-dir:`` folder's): builds never download, and fail naming the
    file instead."""
    from timm.models import _factory

    fetched = []

    def fetch(*args: object, **kwargs: object) -> None:
        fetched.append(args)
        raise OSError("offline")

    monkeypatch.setattr(_factory, "load_model_config_from_hf", fetch)
    monkeypatch.setattr(_factory, "load_model_config_from_path", fetch)
    save_backbone(create_backbone(TINY), TINY, tmp_path / "export")
    spec = tmp_path / "export" / "backbone.json"
    spec.write_text(spec.read_text().replace('"vit_base_patch16_224"', f'"{name}"'))
    with pytest.raises(WeightsError, match=r"export/backbone.json: .* is not a timm model name"):
        load_backbone(tmp_path / "export")
    torch.save({"task": "alignment", "backbone": {"model_name": name, "kwargs": TINY.timm_kwargs()},
                "head": {"blocks": [0, 1], "channels": 8, "num_outputs": 19}, "state_dict": {}},
               tmp_path / "model.pt")
    with pytest.raises(StageError, match=r"model.pt: not a fine-tuned model.pt .* is not a timm model name"):
        load_finetuned(tmp_path / "model.pt")
    assert fetched == []


def tiny_model(seed: int, **changes: object) -> MCF:
    torch.manual_seed(seed)
    cfg = MCFConfig(backbone=TINY, decoder_dim=32, decoder_depth=1, decoder_heads=2, feature_layers=(0, 1),
                    proj_hidden=32, proj_dim=16, pred_hidden=32, **changes)
    return MCF(cfg, load_teacher("random", TINY) if cfg.uses_teacher else None)


def test_round_trip_between_models_and_partial_models() -> None:
    source, target = tiny_model(0), tiny_model(1)
    report = load_release_state_dict(target, to_release_state_dict(source))
    assert report.missing == report.unexpected == []
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    pixel = tiny_model(2, objective="pixel_mae")
    report = load_release_state_dict(pixel, to_release_state_dict(source))
    assert report.missing == []
    absent = ("online_encoder.fc.", "target_encoder.", "perceptual_loss.model.", "predictor.")
    assert {next(p for p in absent if k.startswith(p)) for k in report.unexpected} == set(absent)
    assert _same_encoder(pixel, source)  # loaded, though the file holds weights it has no place for


def _same_encoder(a: MCF, b: MCF) -> bool:
    """Every encoder weight of ``a`` is ``b``'s: the fixed sin-cos ``pos_embed`` alone is equal in any two
    models, loaded or not."""
    theirs = b.encoder.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in a.encoder.state_dict().items())


def test_a_weight_without_a_release_name_is_refused() -> None:
    """The release layout has no place for a weight outside its table: writing it under a key of None
    (or dropping it) would give a file that silently loads without it."""
    model = tiny_model(0, objective="pixel_mae")
    model.add_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="extra.weight: no release name for this weight"):
        to_release_state_dict(model)


def test_module_prefix_is_stripped_only_when_every_key_has_it() -> None:
    """A DDP wrapper prefixes every key with ``module.``; where only some keys carry it, it is a name,
    not a wrapper: nothing is cut (cutting 7 characters off every key would lose the backbone)."""
    source, target = tiny_model(0), tiny_model(1)
    release = to_release_state_dict(source)
    wrapped = load_release_state_dict(target, {"model": {f"module.{k}": v for k, v in release.items()}})
    assert wrapped.missing == wrapped.unexpected == [] and _same_encoder(target, source)
    target = tiny_model(1)
    mixed = load_release_state_dict(target, {"model": release | {"module.ema.w": torch.zeros(1)}})
    assert mixed.missing == [] and mixed.unexpected == ["module.ema.w"]
    assert _same_encoder(target, source)


def test_export_cli_reads_our_checkpoint_and_the_release_layout(tmp_path: Path) -> None:
    model = tiny_model(3)
    ours = {"model": model.state_dict(), "backbone": dataclasses.asdict(TINY), "step": 10}
    torch.save(ours, tmp_path / "last.pt")
    torch.save({"model": to_release_state_dict(model)}, tmp_path / "release.pth")
    # the release layout does not record the head count: 64 channels per head unless told
    for name, extra in (("last.pt", []), ("release.pth", ["--num-heads", "2"])):
        out = tmp_path / f"export-{name}"
        assert cli(["--checkpoint", str(tmp_path / name), "--out", str(out), *extra]) == 0
        exported = load_backbone(out)
        assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in exported.state_dict().items())
        assert exported.blocks[0].attn.num_heads == 2
    assert cli(["--checkpoint", str(tmp_path / "last.pt"), "--out", str(out)]) == 0  # an export: replaced
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"mine")
    with pytest.raises(StageError, match="holds no backbone.json"):  # nothing of ours: left alone
        cli(["--checkpoint", str(tmp_path / "last.pt"), "--out", str(tmp_path / "photos")])
    with pytest.raises(StageError, match="cannot export"):  # a failed export writes nothing
        cli(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    torch.save(ours | {"backbone": dataclasses.asdict(TINY) | {"heads": 2}}, tmp_path / "foreign.pt")
    unknown = r"backbone entry is not a ViT size \(backbone\.heads: unknown key \(valid keys: depth, "
    with pytest.raises(StageError, match=unknown):  # not a TypeError
        cli(["--checkpoint", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "never")])
    with pytest.raises(StageError, match="cannot write .*last.pt/out: Not a directory"):  # one line, exit 1
        cli(["--checkpoint", str(tmp_path / "last.pt"), "--out", str(tmp_path / "last.pt" / "out")])
    with pytest.raises(StageError, match="3 attention heads do not divide the embedding width 64"):
        cli(["--checkpoint", str(tmp_path / "release.pth"), "--out", str(tmp_path / "bad"),
             "--num-heads", "3"])
    for heads in ("-2", "0"):  # a usage error (exit 2), before the checkpoint is read
        with pytest.raises(SystemExit) as exit_:
            cli(["--checkpoint", str(tmp_path / "release.pth"), "--out", str(tmp_path / "bad"),
                 "--num-heads", heads])
        assert exit_.value.code == 2
    assert not (tmp_path / "bad").exists()


def test_export_cli_logs_the_folder_it_wrote_not_its_temporary_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The export is written beside --out and renamed into place: the temporary name means nothing to the
    user, and is gone once the command ends."""
    torch.save({"model": tiny_model(3).state_dict(), "backbone": dataclasses.asdict(TINY)}, tmp_path / "c.pt")
    with caplog.at_level(logging.INFO, logger="mcf"):
        assert cli(["--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "out")]) == 0
    written = [record.getMessage() for record in caplog.records]
    assert any(f"wrote {tmp_path / 'out'} (ViT" in line for line in written), written
    assert not any(".tmp" in line for line in written), written


def test_export_into_the_folder_holding_its_checkpoint_is_refused(tmp_path: Path) -> None:
    """An earlier export's folder is replaced whole: a checkpoint kept in it was deleted with it."""
    out = tmp_path / "export"
    out.mkdir()
    torch.save({"model": tiny_model(0).state_dict(), "backbone": dataclasses.asdict(TINY)}, out / "last.pt")
    assert cli(["--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "first")]) == 0
    (tmp_path / "first" / "last.pt").write_bytes((out / "last.pt").read_bytes())
    for folder in (tmp_path / "first", tmp_path):
        with pytest.raises(SystemExit) as exit_:
            cli(["--checkpoint", str(tmp_path / "first" / "last.pt"), "--out", str(folder)])
        assert exit_.value.code == 2
    assert (tmp_path / "first" / "last.pt").is_file() and (tmp_path / "first" / "backbone.json").is_file()


def test_the_checkpoints_folder_is_refused_however_the_paths_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check compares resolved paths: a relative --out or --checkpoint, or an --out through a symlink,
    naming the folder that holds the checkpoint passed a plain comparison, and the export then replaced
    that folder, checkpoint and all."""
    first = tmp_path / "first"
    save_backbone(create_backbone(TINY), TINY, first)  # an earlier export: atomic_dir would replace it
    torch.save({"model": tiny_model(0).state_dict(), "backbone": dataclasses.asdict(TINY)}, first / "last.pt")
    (tmp_path / "link").symlink_to(first)
    monkeypatch.chdir(tmp_path)
    for checkpoint, out in (("first/last.pt", str(first)), (str(first / "last.pt"), "first"),
                            (str(first / "last.pt"), "link")):
        with pytest.raises(SystemExit) as exit_:
            cli(["--checkpoint", checkpoint, "--out", out])
        assert exit_.value.code == 2
    assert (first / "last.pt").is_file()


def test_export_cli_takes_a_single_head_and_needs_both_paths(tmp_path: Path) -> None:
    """One head is a valid count (only 0 and below are usage errors), and it overrides the width's usual 2;
    a missing --checkpoint or --out is a usage error (exit 2), not a TypeError from Path(None)."""
    wide = dataclasses.replace(TINY, embed_dim=128)
    torch.save(create_backbone(wide).state_dict(), tmp_path / "w.pth")
    argv = ["--checkpoint", str(tmp_path / "w.pth"), "--out", str(tmp_path / "one")]
    assert cli([*argv, "--num-heads", "1"]) == 0
    assert load_backbone(tmp_path / "one").blocks[0].attn.num_heads == 1
    for argv in (["--out", str(tmp_path / "x")], ["--checkpoint", str(tmp_path / "w.pth")]):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2


@pytest.mark.parametrize("flag", ["--checkpoint", "--out"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_a_usage_error_naming_its_flag(
    flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--checkpoint "$CKPT"`` with the variable unset read the working folder: exit 1, "cannot export :
    . is a folder"; an empty --out was "--out  holds --checkpoint". Each is argparse's exit 2 naming the
    flag."""
    paths = {"--checkpoint": str(tmp_path / "w.pth"), "--out": str(tmp_path / "out"), flag: value}
    with pytest.raises(SystemExit) as exit_:
        cli([arg for pair in paths.items() for arg in pair])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: argument {flag}: an empty value (an unset variable?)\n")
    assert not (tmp_path / "out").exists()


def test_export_to_a_symlink_loop_is_one_clear_error(tmp_path: Path) -> None:
    """``--out loop`` (a link to itself) was Python 3.11's ``RuntimeError: Symlink loop`` traceback from the
    check that --out does not hold --checkpoint; it is refused as an output, naming the link."""
    torch.save(create_backbone(TINY).state_dict(), tmp_path / "w.pth")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(StageError, match="loop is a symbolic link that leads back to itself"):
        cli(["--checkpoint", str(tmp_path / "w.pth"), "--out", str(tmp_path / "loop")])


def test_export_of_non_finite_weights_is_refused(tmp_path: Path) -> None:
    """A diverged run's checkpoint (the release's script has no guard against it) exported with exit 0, and
    fine-tuning or evaluating the export was where it failed. Refused here, naming the first bad tensor,
    with no export written and an earlier one kept."""
    state = create_backbone(TINY).state_dict()
    cli(["--checkpoint", str(_save(tmp_path / "good.pth", state)), "--out", str(tmp_path / "out")])
    before = (tmp_path / "out" / "backbone.pth").read_bytes()
    state["blocks.1.mlp.fc2.weight"][0, 0] = float("nan")
    with pytest.raises(StageError, match=r"bad.pth: 1 tensors hold NaN or infinite weights, e\.g\. "
                       r"\['blocks\.1\.mlp\.fc2\.weight'\]"):
        cli(["--checkpoint", str(_save(tmp_path / "bad.pth", state)), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "backbone.pth").read_bytes() == before


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


def test_export_to_a_mount_point_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out /out`` where a volume is mounted (``docker run -v $PWD/out:/out``): the export was written
    beside it, then renaming the mount point aside failed, an OSError EBUSY traceback. It is refused before
    the checkpoint is read, in one line, and nothing is left beside it."""
    from mcf import cli as mcf_cli

    torch.save(create_backbone(TINY).state_dict(), tmp_path / "w.pth")
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mount)
    assert mcf_cli.main(["export", "--checkpoint", str(tmp_path / "w.pth"), "--out", str(mount)]) == 1
    refused = f"mcf export: {mount} is a mount point, which no rename can replace; name a folder inside it\n"
    assert capsys.readouterr().err == refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt", "w.pth"] and not any(mount.iterdir())


def test_export_of_a_plain_pickle_says_one_line_without_torchs_warning(
    tmp_path: Path, recwarn: pytest.WarningsRecorder, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pickle that is no torch file (``pickle.dump``'s protocol 4 and up) is refused by the weights-only
    loader in one line, but torch first warned "Detected pickle protocol 4 ... please file an issue", two
    more lines on stderr (the second a line of torch's source) ahead of the refusal."""
    import pickle

    from mcf import cli as mcf_cli

    (tmp_path / "notes.pkl").write_bytes(pickle.dumps({"lr": 0.1, "steps": [1, 2]}, protocol=4))
    argv = ["export", "--checkpoint", str(tmp_path / "notes.pkl"), "--out", str(tmp_path / "o")]
    assert mcf_cli.main(argv) == 1
    assert "cannot be read as a PyTorch checkpoint" in capsys.readouterr().err
    assert [str(w.message) for w in recwarn if "pickle protocol" in str(w.message)] == []
    assert not (tmp_path / "o").exists()


def test_export_help_names_what_it_reads_and_what_it_does_to_an_existing_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--help said "pretrain checkpoint or release state dict (.pth)", where pretrain writes checkpoint.pt
    and the command reads MoCo v3, MAE and timm files too; and not that an --out holding an earlier export
    is replaced whole while any other non-empty folder is refused."""
    with pytest.raises(SystemExit):
        cli(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "pretrain's checkpoint.pt (e.g. outputs/pretrain/checkpoint.pt), the release's .pth" in text
    assert "MoCo v3, MAE or timm ViT checkpoint (.safetensors too)" in text
    assert "an earlier export there is replaced whole; a file, or a folder holding other files, is refused" \
        in text


def test_export_of_a_moco_v3_vit_small_keeps_its_12_heads(tmp_path: Path) -> None:
    """MoCo v3 names its ViT in ``arch``; its ViT-S has 12 heads at width 384 (64 channels a head would
    give 6), so the exported backbone computes the trained attention, not another one."""
    size = BackboneConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=12)
    vit = create_backbone(size, num_classes=4)
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    for arch, heads in (("vit_small", 12), ("resnet50", 1)):  # unknown arch: 48 // 64 channels, at least 1
        torch.save({"arch": arch, "state_dict": state}, tmp_path / f"{arch}.pth.tar")
        assert cli(["--checkpoint", str(tmp_path / f"{arch}.pth.tar"), "--out", str(tmp_path / arch)]) == 0
        assert load_backbone(tmp_path / arch).blocks[0].attn.num_heads == heads
    assert cli(["--checkpoint", str(tmp_path / "vit_small.pth.tar"), "--out", str(tmp_path / "told"),
                "--num-heads", "4"]) == 0  # --num-heads still wins
    assert load_backbone(tmp_path / "told").blocks[0].attn.num_heads == 4


def test_re_exporting_an_export_keeps_its_heads(tmp_path: Path) -> None:
    """An export's backbone.pth holds no head count: re-exported, it took the width's usual count (32
    channels with 2 heads came back with 1), loaded without complaint and computed another attention.
    The backbone.json beside it says; --num-heads still wins."""
    size = dataclasses.replace(TINY, embed_dim=32, num_heads=2)
    save_backbone(create_backbone(size), size, tmp_path / "first")
    first = str(tmp_path / "first" / "backbone.pth")
    assert cli(["--checkpoint", first, "--out", str(tmp_path / "again")]) == 0
    assert load_backbone(tmp_path / "again").blocks[0].attn.num_heads == 2
    shutil.copy(tmp_path / "first" / "backbone.pth", tmp_path / "alone.pth")  # no json beside it: the guess
    assert cli(["--checkpoint", str(tmp_path / "alone.pth"), "--out", str(tmp_path / "guessed")]) == 0
    assert load_backbone(tmp_path / "guessed").blocks[0].attn.num_heads == 1
    assert cli(["--checkpoint", first, "--out", str(tmp_path / "told"), "--num-heads", "4"]) == 0
    assert load_backbone(tmp_path / "told").blocks[0].attn.num_heads == 4


def test_only_an_exports_backbone_pth_takes_its_heads_from_the_json_beside_it(tmp_path: Path) -> None:
    """Heads come from backbone.json only for the backbone.pth it describes, and only as an integer: a
    release file kept in an export folder (or a hand-edited ``"num_heads": true``) took the folder's
    count, and exported another attention than its own width's without a word."""
    wide = dataclasses.replace(TINY, embed_dim=128, num_heads=4)
    save_backbone(create_backbone(wide), wide, tmp_path / "first")
    shutil.copy(tmp_path / "first" / "backbone.pth", tmp_path / "first" / "release.pth")
    assert cli(["--checkpoint", str(tmp_path / "first" / "release.pth"), "--out", str(tmp_path / "a")]) == 0
    assert load_backbone(tmp_path / "a").blocks[0].attn.num_heads == 2  # the width's, not the folder's 4
    spec = json.loads((tmp_path / "first" / "backbone.json").read_text())
    spec["kwargs"]["num_heads"] = True
    (tmp_path / "first" / "backbone.json").write_text(json.dumps(spec))
    assert cli(["--checkpoint", str(tmp_path / "first" / "backbone.pth"), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "backbone.json").read_text())["kwargs"]["num_heads"] == 2


def test_an_mae_training_checkpoint_exports_and_loads_as_a_teacher(tmp_path: Path) -> None:
    """MAE's training script saves its whole model under ``model`` (the encoder under timm names beside
    ``decoder_*`` and ``mask_token``) with its ``args`` Namespace, which read_weights admits for it: the
    export and every teacher spec refused it as "unexpected ['mask_token', 'decoder_embed.weight', ...]".
    The decoder is set aside as a classifier head is, and the encoder's weights arrive exactly."""
    vit = create_backbone(TINY)
    mae = dict(vit.state_dict())
    mae |= {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 64),
            "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
            "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.zeros(192, 16)}
    opt = torch.optim.AdamW(vit.parameters())
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)
    torch.save({"model": mae, "optimizer": opt.state_dict(), "epoch": 399, "scaler": {"scale": 65536.0},
                "args": args}, tmp_path / "mae.pth")
    assert cli(["--checkpoint", str(tmp_path / "mae.pth"), "--out", str(tmp_path / "out"),
                "--num-heads", "2"]) == 0
    exported = load_backbone(tmp_path / "out").state_dict()
    assert exported.keys() == vit.state_dict().keys()
    assert all(torch.equal(v, exported[k]) for k, v in vit.state_dict().items())
    for spec in (f"timm:{tmp_path / 'mae.pth'}", f"mcf:{tmp_path / 'mae.pth'}"):
        teacher = load_teacher(spec, TINY).model.state_dict()
        assert all(torch.equal(v, teacher[k]) for k, v in vit.state_dict().items())


def test_export_of_a_backbone_missing_weights_is_refused_in_one_line(tmp_path: Path) -> None:
    """A checkpoint whose encoder lacks a weight or holds a classifier head: a StageError naming the key
    (exit 1, one line), not the RuntimeError traceback of ``load_state_dict``; nothing is written."""
    state = create_backbone(TINY).state_dict()
    partial = {f"encoder.{k}": v for k, v in state.items() if k != "norm.weight"}
    headed = {f"online_encoder.{k}": v for k, v in create_backbone(TINY, num_classes=3).state_dict().items()}
    for name, model, key in (("partial.pth", partial, "Missing key.*norm.weight"),
                             ("headed.pth", headed, "Unexpected key.*head.weight")):
        torch.save({"model": model}, tmp_path / name)
        with pytest.raises(StageError, match=f"cannot export .*{name}: .*{key}"):
            cli(["--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_backbone_size_timm_cannot_build_is_a_params_error() -> None:
    """An image that is no whole number of patches, or a width the heads do not divide: timm would drop the
    border pixels or assert deep in its constructor, so the size is refused up front, naming the key."""
    with pytest.raises(ParamsError, match="img_size.*must be a multiple of patch_size 16"):
        BackboneConfig(img_size=100)
    with pytest.raises(ParamsError, match="embed_dim.*must be a multiple of num_heads 5"):
        BackboneConfig(num_heads=5)


def test_heads_default_to_64_channels_each() -> None:
    """A checkpoint without a backbone entry, arch or --num-heads: timm's and MAE's ViTs' 64 per head."""
    from mcf.models.release import infer_backbone_config

    wide = dataclasses.replace(TINY, embed_dim=128, num_heads=2)
    assert infer_backbone_config(create_backbone(wide).state_dict()) == wide


def test_a_hidden_width_that_float_division_rounds_down_still_exports(tmp_path: Path) -> None:
    """timm builds ``int(width * mlp_ratio)`` hidden units: a ratio read as 488 / 224 builds 487, and the
    export of such a ViT failed with a size mismatch for blocks.0.mlp.fc1.weight."""
    size = BackboneConfig(img_size=32, patch_size=8, embed_dim=224, depth=1, num_heads=4,
                          mlp_ratio=488.5 / 224)
    vit = create_backbone(size)
    assert vit.blocks[0].mlp.fc1.out_features == 488
    cfg = export_backbone(vit.state_dict(), tmp_path / "out", num_heads=4)
    assert cfg.mlp_ratio == pytest.approx(488 / 224)
    assert load_backbone(tmp_path / "out").blocks[0].mlp.fc1.out_features == 488
    mlp = dataclasses.replace(TINY, mlp_ratio=2.5)  # a fractional ratio read as such, not floored
    assert infer_backbone_config(create_backbone(mlp).state_dict()) == dataclasses.replace(mlp, num_heads=1)


@pytest.mark.parametrize(("width", "heads"), [
    (384, 6), (768, 12), (1024, 16), (1280, 16), (1408, 16), (1664, 16),
])
def test_heads_of_the_published_vits_of_each_width(width: int, heads: int) -> None:
    """ViT-H (MAE's mae_pretrain_vit_huge, timm's vit_huge_*) has 16 heads of 80 channels, not 20 of 64;
    ViT-g (1408) and ViT-G (1664, timm's vit_gigantic_*) have 16 too, not 22 or 26."""
    shapes = {"patch_embed.proj.weight": (width, 3, 14, 14), "pos_embed": (1, 257, width),
              "blocks.0.mlp.fc1.weight": (4 * width, width)}
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    assert infer_backbone_config(state).num_heads == heads


def test_a_head_count_below_one_is_a_value_error() -> None:
    """An explicit count of 0 (the API does not go through --num-heads' check) was a ZeroDivisionError
    traceback from ``embed % heads``; a negative one divides the width and built a ViT of -2 heads."""
    state = create_backbone(TINY).state_dict()
    for heads in (0, -2):
        with pytest.raises(ValueError, match=f"{heads} attention heads do not divide the embedding width 64"):
            infer_backbone_config(state, heads)


def test_metadata_beside_a_top_level_state_dict_is_left_out(tmp_path: Path) -> None:
    """A state dict saved at the top level may carry an epoch or arch beside its tensors: only tensors are
    weights, else the export refuses 'epoch' as an unexpected key, and the DDP prefix of every weight
    is kept because 'epoch' lacks it."""
    vit = create_backbone(TINY)
    plain = dict(vit.state_dict())
    wrapped = {f"module.{k}": v for k, v in plain.items()}
    for state in (plain, wrapped):
        cfg = export_backbone(state | {"epoch": 300, "arch": "vit_tiny"}, tmp_path / "out")
        assert cfg == dataclasses.replace(TINY, num_heads=1)
        exported = load_backbone(tmp_path / "out").state_dict()
        assert all(torch.equal(v, exported[k]) for k, v in plain.items())


def test_a_backbone_loaded_at_another_size_resamples_only_the_patch_positions(tmp_path: Path) -> None:
    """Fine-tuning and the probes load the export at the data size: the position table grows to the
    new grid and the CLS row, outside the grid, is kept as it is."""
    torch.manual_seed(0)
    vit = create_backbone(TINY)
    with torch.no_grad():
        vit.pos_embed.normal_()
    save_backbone(vit, TINY, tmp_path / "export")
    big = load_backbone(tmp_path / "export", img_size=64)
    assert big.pos_embed.shape == (1, 1 + 8 * 8, 64) and tuple(big.patch_embed.img_size) == (64, 64)
    torch.testing.assert_close(big.pos_embed[:, :1], vit.pos_embed[:, :1])
    assert big.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)


@pytest.mark.parametrize("img_size, grid_size", [(64, (8, 8)), ((32, 64), (4, 8))])
def test_the_position_grid_is_resampled_with_farls_plain_bicubic(
    tmp_path: Path, img_size: int | tuple[int, int], grid_size: tuple[int, int]
) -> None:
    """FaRL grows its 224-px table to 448 px with plain bicubic (align_corners False, no antialias);
    timm's default antialiased bicubic is another kernel (PIL's a = -0.5, not -0.75). A size of 32 x 64 px
    takes the 4 x 4 grid to 4 rows of 8 columns: read the other way round, the table has as many rows, and
    loads without a word as the transposed grid."""
    torch.manual_seed(0)
    vit = create_backbone(TINY)
    with torch.no_grad():
        vit.pos_embed.normal_()
    save_backbone(vit, TINY, tmp_path / "export")
    grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    plain = torch.nn.functional.interpolate(grid, size=grid_size, mode="bicubic", align_corners=False)
    expect = plain.permute(0, 2, 3, 1).reshape(1, grid_size[0] * grid_size[1], -1)
    torch.testing.assert_close(load_backbone(tmp_path / "export", img_size=img_size).pos_embed[:, 1:], expect)


@pytest.mark.parametrize("kwargs", [
    {"class_token": False, "global_pool": "avg"},  # as SigLIP's ViTs: no row ahead of the grid
    {"reg_tokens": 4, "no_embed_class": True},  # as DINOv2's with registers: prefix tokens, no rows for them
    {"reg_tokens": 4},  # class and register rows, all ahead of the grid
])
def test_an_export_of_another_timm_vit_resamples_its_own_grid(tmp_path: Path, kwargs: dict) -> None:
    """The teacher stage exports any timm ViT by name; fine-tuning it at the data size read one class
    row ahead of every table, which failed with a reshape traceback (or, with registers, resampled
    register rows as patches)."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 0, "img_size": 64, **kwargs}
    vit = timm.create_model("test_vit", **kwargs)
    with torch.no_grad():
        vit.pos_embed.normal_()
    (tmp_path / "export").mkdir()
    save_export(vit, {"model_name": "test_vit", "kwargs": kwargs}, tmp_path / "export")
    big = load_backbone(tmp_path / "export", img_size=128)
    rows = vit.pos_embed.shape[1] - 16  # a 4 x 4 grid at 64 px, patch 16
    torch.testing.assert_close(big.pos_embed[:, :rows], vit.pos_embed[:, :rows])
    grid = vit.pos_embed[:, rows:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    plain = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(big.pos_embed[:, rows:], plain.permute(0, 2, 3, 1).reshape(1, 64, -1))


def test_a_position_table_without_a_class_token_slot_is_named_so() -> None:
    """A timm model without class token (vit_medium_patch16_gap_256: 16 x 16 positions) was reported as
    '255 patch tokens, not a square grid', which sent the user looking for a damaged file."""
    state = timm.create_model("test_vit", num_classes=0).state_dict()
    state["pos_embed"] = state["pos_embed"][:, 1:]
    with pytest.raises(ValueError, match="pos_embed has 100 positions, a square grid with no class-token"):
        infer_backbone_config(state)
    state["pos_embed"] = state["pos_embed"][:, 1:]
    with pytest.raises(ValueError, match="99 positions, not a class-token slot"):
        infer_backbone_config(state)


@pytest.mark.parametrize(("key", "damage", "message"), [
    ("pos_embed", lambda v: v[0], r"'pos_embed' has shape \(\d+, \d+\), not 3 dimensions"),
    ("patch_embed.proj.weight", lambda v: v.flatten(1), r"'patch_embed.proj.weight' has shape .*, not 4"),
    ("blocks.x.norm1.weight", lambda v: v, r"blocks.x.\* is no numbered block"),
])
def test_weights_of_another_shape_are_named_not_a_traceback(
    key: str, damage: Callable[[torch.Tensor], torch.Tensor], message: str
) -> None:
    """A hand-edited or foreign checkpoint: a 2-D pos_embed was an IndexError traceback, a 2-D patch
    embedding 'not enough values to unpack', a block not numbered "invalid literal for int()"."""
    state = timm.create_model("test_vit", num_classes=0).state_dict()
    state[key] = damage(state.get(key, state["blocks.0.norm1.weight"]))
    with pytest.raises(ValueError, match=f"cannot size the ViT: .*{message}"):
        infer_backbone_config(state)


@pytest.mark.parametrize(("change", "message"), [
    ({"img_size": "32"}, r"backbone\.img_size: expected an integer, got str '32'"),
    ({"num_heads": "2"}, r"backbone\.num_heads: expected an integer, got str '2'"),
    ({"depth": 2.0}, r"backbone\.depth: expected an integer, got float 2\.0"),
    ({"patch_size": 0}, r"backbone\.patch_size: must be >= 1, got 0"),
    ({"num_heads": 0}, r"backbone\.num_heads: must be >= 1, got 0"),
])
def test_a_checkpoint_backbone_entry_of_the_wrong_type_names_its_key(
    change: dict[str, object], message: str, tmp_path: Path
) -> None:
    """A hand-edited checkpoint's ``backbone`` entry (params.yaml's sizes are checked by build()): a size as
    text was 'not all arguments converted during string formatting' or "unsupported operand type(s) for
    %", a float depth timm's TypeError traceback, a patch or head count of 0 a ZeroDivisionError one. Each
    is now checked as params.yaml's sizes are, naming the key; `mcf export` exits 1 on one line."""
    model = MCF(MCFConfig(backbone=TINY, objective="pixel_mae"))
    path = tmp_path / "hand-edited.pt"
    torch.save({"model": model.state_dict(), "backbone": dataclasses.asdict(TINY) | change}, path)
    entry = "the checkpoint's backbone entry is not a ViT size"
    with pytest.raises(StageError, match=f"cannot export .*: {entry} \\({message}\\)$"):
        cli(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
