"""params.yaml validation: bad values fail before any work, with one line naming the key."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mcf.errors import StageError
from mcf.io import check_output
from mcf.params import SECTIONS, Common, ParamsError, build, load, param, read_yaml


@dataclasses.dataclass(frozen=True)
class Inner:
    size: int = param(8, ge=1)
    kind: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class Outer:
    rate: float = param(0.5, gt=0, lt=1)
    inner: Inner = dataclasses.field(default_factory=Inner)
    layers: tuple[int, ...] = (2, 5)
    scale: float = 1.0


def test_build_defaults_and_types() -> None:
    cfg = build(Outer, {"rate": 0.25, "inner": {"size": 3}, "layers": [1, 2, 3]})
    assert cfg == Outer(rate=0.25, inner=Inner(size=3), layers=(1, 2, 3))
    scale = build(Outer, {"scale": 2}).scale  # an int is a valid float, and becomes one
    assert (scale, type(scale)) == (2.0, float)


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [
        ({"rate": 1.5}, "outer.rate", "must be < 1"),
        ({"rate": "fast"}, "outer.rate", "expected a number"),
        ({"inner": {"size": 0}}, "outer.inner.size", "must be >= 1"),
        ({"inner": {"kind": "c"}}, "outer.inner.kind", "must be one of"),
        ({"inner": {"sise": 2}}, "outer.inner.sise", "unknown key"),
        ({"layers": [1, "x"]}, "outer.layers[1]", "expected an integer"),
        ({"scale": float("inf")}, "outer.scale", "expected a finite number, got inf"),  # unbounded: passed
        ({"scale": float("nan")}, "outer.scale", "expected a finite number, got nan"),
    ],
)
def test_build_errors_name_the_key(data: dict, key: str, fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        build(Outer, data, "outer")
    assert err.value.key == key
    assert fragment in str(err.value)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    for stage, target in SECTIONS.items():
        common, cfg = load(stage, root / "params.yaml")
        assert type(cfg).__name__ == target.split(":")[1]
    assert (common.seed, common.mask_ratio) == (0, 0.75)  # the default profile's: the paper's ratio


@pytest.mark.parametrize("ratio", [1.5, 1.0, 0.0, "high"])
def test_mask_ratio_out_of_range(tmp_path: Path, ratio: object) -> None:
    with pytest.raises(ParamsError, match="mask_ratio"):
        load(None, _write(tmp_path, {"seed": 0, "mask_ratio": ratio}))


@pytest.mark.parametrize(
    ("digits", "message"),
    [
        (400, "mask_ratio: expected a finite number, got an integer of 400 digits"),
        (5000, "not valid YAML at line 1, column 13: an integer of 5000 digits is too long to read"),
    ],
)
def test_an_integer_too_large_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], digits: int, message: str
) -> None:
    """A float key given an integer past 1.8e308 was an OverflowError traceback from math.isfinite, and
    one past Python's 4300-digit limit a ValueError traceback from the loader; each is exit 2 now."""
    from mcf import cli

    (tmp_path / "p.yaml").write_text(f"mask_ratio: {'9' * digits}\n")
    assert cli.main(["crop", "--params", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err == f"mcf: invalid params: {tmp_path / 'p.yaml'}: {message}\n"


def test_a_seed_torch_cannot_take_is_refused_before_any_stage(tmp_path: Path) -> None:
    """torch seeds are 64-bit: ``seed: 18446744073709551616`` passed fetch, crop and subset (NumPy takes
    any integer), then the teacher stage died in torch.manual_seed with a traceback. Training seeds
    ``seed + epoch`` too, so the bound leaves room for that."""
    with pytest.raises(ParamsError, match=r"seed: must be <= 9223372036854775807"):
        load(None, _write(tmp_path, {"seed": 2**64, "mask_ratio": 0.75}))
    assert load(None, _write(tmp_path, {"seed": 2**63 - 1, "mask_ratio": 0.75}))[0].seed == 2**63 - 1


@pytest.mark.parametrize(
    ("metrics", "fragment"),
    [("metrics", "is a folder"), ("", r"an empty value \(an unset variable\?\)"),
     ("outputs/evaluate/m.json", "inside evaluate.out")],
)
def test_evaluate_metrics_must_be_a_file_outside_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: str, fragment: str
) -> None:
    """``metrics`` naming a folder (or ``""``, the working folder) was taken, and evaluate died writing the
    JSON after scoring everything, with a traceback (IsADirectoryError, ValueError); one inside ``out``
    was written into the folder that replacing ``out`` then deleted, silently."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    path = _write(tmp_path, {"evaluate": {"metrics": metrics}})
    with pytest.raises(ParamsError, match=rf"evaluate.metrics: .*{fragment}"):
        load("fetch", path, every_section=True)


@pytest.mark.parametrize(
    ("outs", "fragment"),
    [({"finetune_parsing": "outputs/finetune_alignment"}, "finetune_parsing.out: is finetune_alignment.out"),
     ({"evaluate": "outputs/fetch/"}, "evaluate.out: is fetch.out"),
     ({"fetch": "outputs"}, "crop.out: is inside fetch.out (outputs)"),
     ({"subset": "outputs/teacher/subset"}, "subset.out: is inside teacher.out (outputs/teacher)")],
)
def test_two_stages_cannot_share_an_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outs: dict[str, str], fragment: str
) -> None:
    """finetune_parsing.out set to finetune_alignment's had `mcf finetune_parsing` replace the alignment
    model.pt with a parsing one, silently (both hold model.pt, the sign of an earlier output); an out
    inside another stage's was deleted when that stage replaced its own. DVC refuses such a dvc.yaml, but
    `mcf <stage>` ran."""
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {stage: {"out": out} for stage, out in outs.items()})
    with pytest.raises(ParamsError, match=re.escape(fragment)):
        load("fetch", path, every_section=True)
    load("fetch", path)  # the section alone does not know the others


@pytest.mark.parametrize(("out", "fragment"), [
    ("", "pretrain.out: an empty value (an unset variable?): give one (default 'outputs/pretrain')"),
    (".", "pretrain.out: '.' holds the working folder"),
    ("..", "pretrain.out: '..' holds the working folder"),
])
def test_an_out_that_is_the_working_folder_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, fragment: str
) -> None:
    """`pretrain.out: ''` was reported as `fetch.out: is inside pretrain.out ()`: the error named another
    stage's key, and the empty value as ``()``."""
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {"pretrain": {"out": out}})
    with pytest.raises(ParamsError, match=re.escape(fragment)):
        load("fetch", path, every_section=True)


@pytest.mark.parametrize("key", ["crop.input", "fetch.local.root", "pretrain.live", "evaluate.out",
                                 "fetch.laion_face.url_col", "evaluate.alignment_label"])
def test_an_empty_path_or_name_is_refused_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    """An empty string where a path or a column name goes (an unset variable in a generated params file)
    passed, or failed naming another key: `crop.input: ''` as 'path does not exist: manifest.parquet',
    `fetch.local.root: ''` as fetch.out being inside it, `evaluate.out: ''` under evaluate.metrics, and
    `pretrain.live: ''` only once pretrain ran. Keys whose default is '' (fetch.s3.prefix) still take it."""
    monkeypatch.chdir(tmp_path)
    *sections, name = key.split(".")
    params: dict[str, Any] = {name: ""}
    for section in reversed(sections):
        params = {section: params}
    with pytest.raises(ParamsError, match=re.escape(f"{key}: an empty value (an unset variable?)")):
        load("fetch", _write(tmp_path, params), every_section=True)
    load("fetch", _write(tmp_path, {"fetch": {"s3": {"prefix": ""}}}), every_section=True)


def test_a_symlink_loop_in_a_path_is_a_params_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link to itself (``ln -s loop loop``) as fetch's root or data, or as any section's out, ended every
    command in Python 3.11's ``RuntimeError: Symlink loop`` traceback from ``Path.resolve()``, exit 1."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to("loop")
    local = _write(tmp_path, {"fetch": {"source": "local", "data": "loop", "local": {"root": "loop"}}})
    with pytest.raises(ParamsError, match=re.escape("fetch.local.root: path does not exist: loop")):
        load("fetch", local, every_section=True)
    load("fetch", _write(tmp_path, {"pretrain": {"out": "loop"}}), every_section=True)  # refused as it writes


def test_an_out_that_is_a_symlink_loop_is_refused_before_the_work(tmp_path: Path) -> None:
    """A looped link stays a link however far it is followed: the final rename of the output onto it
    failed (ENOTDIR) after all the work. Refused by the check made before it."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(StageError, match=f"{loop} is a symbolic link that leads back to itself"):
        check_output(loop, "model.pt")


def test_unknown_top_level_key_lists_every_valid_one(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"pretrian: unknown top-level key \(valid: seed, mask_ratio, fet"):
        load(None, _write(tmp_path, {"seed": 0, "mask_ratio": 0.75, "pretrian": {}}))


@pytest.mark.parametrize("text", ["seed: 0\n1: a\nsede: 0\n", "seed: 0\ncrop:\n  64: 1\n  sise: 64\n"])
def test_unknown_keys_of_mixed_types_are_one_clear_error(tmp_path: Path, text: str) -> None:
    """A number key beside a misspelt one (``64: 1``, a slip of the colon) is a params error naming a key,
    not a TypeError from comparing an int with a str."""
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"1: unknown (top-level )?key|64: unknown key"):
        load("crop", tmp_path / "params.yaml")


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("seed: 0\nmask_ratio: [0.75\nfetch: {}\n")
    with pytest.raises(ParamsError, match=r"bad.yaml: not valid YAML at line 3, column 6: expected ','"):
        read_yaml(tmp_path / "bad.yaml")


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000])
def test_yaml_nested_past_the_recursion_limit_is_one_clear_error(tmp_path: Path, value: str) -> None:
    """PyYAML composes a node's children recursively: thousands of brackets deep was a RecursionError
    traceback from every stage command and from `mcf report`."""
    (tmp_path / "deep.yaml").write_text(f"seed: {value}\n")
    with pytest.raises(ParamsError, match=r"deep.yaml: not valid YAML: nested too deeply to read"):
        read_yaml(tmp_path / "deep.yaml")


def test_binary_params_file_is_one_clear_error(tmp_path: Path) -> None:
    """An image or other binary file passed as --params is refused by name, not a UnicodeDecodeError."""
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)))
    with pytest.raises(ParamsError, match=r"photo.jpg: not a UTF-8 text file"):
        read_yaml(tmp_path / "photo.jpg")


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    """``dvc exp run -S finetune_alignment.weight_decay=1e-5`` writes ``1e-05``: DVC (YAML 1.2) reads a
    number there, PyYAML's YAML 1.1 a string, which the stage then refused as 'expected a number'."""
    (tmp_path / "p.yaml").write_text("a: 1e-05\nb: 1e-4\nc: -2E+3\nd: 1.5e-3\ne: 10\nf: '1e-05'\ng: .5\n")
    assert read_yaml(tmp_path / "p.yaml") == {
        "a": 1e-05, "b": 1e-4, "c": -2000.0, "d": 1.5e-3, "e": 10, "f": "1e-05", "g": 0.5,
    }
    assert isinstance(read_yaml(tmp_path / "p.yaml")["e"], int)


SCALARS = ["010", "-007", "1_000", "0x1F", "0o17", "0b101", "yes", "off", "NO", "y", "True", "FALSE", "1:30",
           "1e-05", ".5", "1.", "~", "'010'"]


@pytest.mark.parametrize("scalar", SCALARS)
def test_scalars_read_as_dvc_reads_them(tmp_path: Path, scalar: str) -> None:
    """``seed: 010`` trained with seed 8 (YAML 1.1's octal) while dvc.lock recorded 10; ``yes`` became
    True where DVC keeps the string. Each scalar must come out as DVC's own parser gives it."""
    from dvc.utils.serialize import parse_yaml

    text = f"a: {scalar}\n"
    (tmp_path / "p.yaml").write_text(text)
    want, got = parse_yaml(text, "p.yaml")["a"], read_yaml(tmp_path / "p.yaml")["a"]
    assert (got, type(got)) == (want, type(want))


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    """A section given twice (a second ``crop:`` pasted at the end) silently replaced the first; DVC
    refuses such a file, so ``mcf crop`` by hand ran settings that ``dvc repro`` never would."""
    (tmp_path / "p.yaml").write_text("seed: 0\ncrop:\n  size: 64\n  margin: 0.1\ncrop:\n  size: 32\n")
    with pytest.raises(ParamsError, match=r"p.yaml: not valid YAML at line 5, column 1: duplicate key 'cr"):
        read_yaml(tmp_path / "p.yaml")
    (tmp_path / "merge.yaml").write_text("base: &b {size: 64, margin: 0.1}\ncrop:\n  <<: *b\n  size: 32\n")
    assert read_yaml(tmp_path / "merge.yaml")["crop"] == {"size": 32, "margin": 0.1}  # a merge key overrides


def test_cli_reports_one_clear_line(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    data = read_yaml(root / "params.yaml") | {"mask_ratio": 1.5}
    path = _write(tmp_path, data)
    proc = subprocess.run(
        [sys.executable, "-m", "mcf.cli", "fetch", "--params", str(path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "mask_ratio" in lines[0] and "1.5" in lines[0]


def test_a_stage_command_checks_every_section(tmp_path: Path) -> None:
    """A typo in evaluate's section stops `mcf fetch` before any work, not the last stage."""
    root = Path(__file__).resolve().parents[1]
    data = read_yaml(root / "params.yaml")
    data["evaluate"] = {**data["evaluate"], "batchsize": 8}
    path = _write(tmp_path, data)
    with pytest.raises(ParamsError, match="evaluate.batchsize: unknown key"):
        load("fetch", path, every_section=True)
    assert load("fetch", path)[1] is not None  # the stage's own section alone is fine
    proc = subprocess.run(
        [sys.executable, "-m", "mcf.cli", "fetch", "--params", str(path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2 and "evaluate.batchsize: unknown key" in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("argv", "key", "made_by"),
    [
        (["crop"], "crop.input", "fetch"),
        (["subset"], "subset.input", "crop"),
        (["pretrain"], "pretrain.data", "subset"),
        (["finetune_parsing", "--variant", "scratch"], "finetune_parsing.scratch_backbone", "pretrain"),
        (["evaluate"], "evaluate.alignment", "finetune_alignment --variant mcf"),
    ],
)
def test_a_missing_upstream_output_is_exit_2_naming_its_stage(
    argv: list[str], key: str, made_by: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every stage run before its input exists says which key and which stage, with one exit status."""
    from mcf.cli import main as cli_main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # a checkout with nothing run yet
    assert cli_main([*argv, "--params", str(root / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{key}: path does not exist" in err and f"(run `mcf {made_by}` first)" in err, err
    assert not (tmp_path / "outputs").exists()


def test_a_torchrun_stage_is_checked_once_before_its_workers_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """train.processes > 1: a missing input or a missed effective batch is one exit 2, not a traceback
    per worker (and one from torchrun, exit 1) after every worker has started."""
    from mcf import cli

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["pretrain"]["train"].update(processes=2, effective_batch=64)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mcf.train.distributed.launch", lambda *_: pytest.fail("torchrun started"))
    assert cli.main(["pretrain", "--params", "p.yaml"]) == 2
    assert "p.yaml: pretrain.data: path does not exist" in capsys.readouterr().err
    Path(params["pretrain"]["data"], "shards").mkdir(parents=True)
    Path(params["pretrain"]["teacher"]).mkdir(parents=True)
    Path(params["pretrain"]["teacher"], "backbone.pth").touch()
    assert cli.main(["pretrain", "--params", "p.yaml"]) == 2
    assert "p.yaml: pretrain.train.effective_batch: 64 asked" in capsys.readouterr().err


def test_a_mask_ratio_that_hides_every_patch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Refused by the up-front check of every stage, as teacher.mask_ratio is: `mcf fetch` (and crop,
    subset, teacher) ran to completion before pretrain found it."""
    from mcf import cli

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["mask_ratio"] = 0.999  # 64 patches at the CPU size: int(64 × 0.001) = 0 kept
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mcf.data.fetch.main", lambda *_: pytest.fail("fetch ran"))
    assert cli.main(["fetch", "--params", "p.yaml"]) == 2
    assert "p.yaml: mask_ratio: 0.999 hides all 64 patches from the encoder" in capsys.readouterr().err
    with pytest.raises(ParamsError, match="p.yaml: mask_ratio: 0.999 hides all 64 patches"):
        load("evaluate", "p.yaml", every_section=True)
    load("evaluate", "p.yaml")  # a stage's own section alone does not read the top-level mask_ratio
    (tmp_path / params["pretrain"]["data"] / "shards").mkdir(parents=True)  # inputs present: the
    (tmp_path / params["pretrain"]["teacher"]).mkdir(parents=True)  # mask ratio is what is refused
    (tmp_path / params["pretrain"]["teacher"] / "backbone.pth").touch()
    assert cli.main(["pretrain", "--params", "p.yaml"]) == 2
    assert "p.yaml: mask_ratio: 0.999 hides all 64 patches from the encoder" in capsys.readouterr().err
    from mcf.train.teacher import TeacherConfig

    with pytest.raises(ParamsError, match="teacher.mask_ratio: 0.999 hides all 64 patches"):
        build(TeacherConfig, {**params["teacher"], "mask_ratio": 0.999}, "teacher")


def test_a_mask_ratio_that_hides_no_patch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """1 - 1e-17 is 1.0 in floating point, so every patch stayed visible and the losses, averaged over
    the hidden patches, divided 0 by 0: pretrain's first step was NaN."""
    from mcf import cli

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["mask_ratio"] = 1e-17
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mcf.data.fetch.main", lambda *_: pytest.fail("fetch ran"))
    assert cli.main(["fetch", "--params", "p.yaml"]) == 2
    assert "p.yaml: mask_ratio: 1e-17 hides none of the 64 patches" in capsys.readouterr().err
    params["mask_ratio"] = 1e-15  # 64 × (1 - 1e-15) is just under 64: one patch hidden, accepted
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    load("evaluate", "p.yaml", every_section=True)


def test_the_contrastive_branch_needs_two_images_per_step() -> None:
    from mcf.train.pretrain import PretrainConfig

    with pytest.raises(ParamsError, match="pretrain.train.batch_size: the contrastive projector's BatchNorm"):
        build(PretrainConfig, {"train": {"batch_size": 1}}, "pretrain")
    build(PretrainConfig, {"train": {"batch_size": 1}, "model": {"contrastive": False}}, "pretrain")


def test_other_sections_inputs_are_the_running_stages_business(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper's teacher runs before LAION-Face's parquet files matter: only its own inputs count,
    and a missing teacher checkpoint is one line (exit 2, an input missing), not a traceback."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # no data/ here
    load("teacher", root / "params.paper.yaml", every_section=True)
    with pytest.raises(ParamsError, match="fetch.laion_face.parquet"):
        load("fetch", root / "params.paper.yaml", every_section=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mcf.cli", "teacher", "--params", str(root / "params.paper.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    missing = "teacher.data: path does not exist: data/teacher/mocov3_vit_base.pth"
    assert proc.returncode == 2 and missing in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_timm_teacher_file_is_the_teacher_stages_input_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``timm:<weights file>`` is a teacher input like moco_v3's: a missing file does not stop the stages
    that never read it, and stops teacher itself with exit 2."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["teacher"] |= {"source": "timm:data/w.pth", "data": "data/w.pth"}
    monkeypatch.chdir(tmp_path)  # no data/ here
    path = _write(tmp_path, params)
    load("crop", path, every_section=True)
    with pytest.raises(ParamsError, match="teacher.source: teacher spec 'timm:data/w.pth': timm has no"):
        load("teacher", path, every_section=True)


def test_profiles_write_to_different_places() -> None:
    """A default run after a paper run in one checkout must not replace the paper's outputs (fetch's
    folder persists for resuming downloads, and atomic outputs replace whatever holds the same files)."""
    root = Path(__file__).resolve().parents[1]
    default, paper = (read_yaml(root / name) for name in ("params.yaml", "params.paper.yaml"))
    keys = ("out", "live", "resume_dir", "metrics")
    for section in default:
        if isinstance(default[section], dict):
            for key in keys:
                if key in default[section]:
                    assert default[section][key] != paper[section][key], f"{section}.{key}"


def test_paper_params_valid_once_data_is_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[1]
    paper = read_yaml(root / "params.paper.yaml")
    for name in paper["fetch"]["laion_face"]["parquet"] + paper["fetch"]["laion_face"]["detections"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (tmp_path / paper["teacher"]["source"].split(":", 1)[1]).parent.mkdir(parents=True)
    (tmp_path / paper["teacher"]["source"].split(":", 1)[1]).touch()
    (tmp_path / "data" / "AFLW").mkdir()
    (tmp_path / "data" / "LaPa").mkdir()
    monkeypatch.chdir(tmp_path)
    for stage in SECTIONS:
        common, cfg = load(stage, root / "params.paper.yaml")
        assert cfg is not None
    assert cfg.alignment_label == "AFLW-19" and cfg.parsing_label == "LaPa"
    assert "SynthFace" not in json.dumps(paper["evaluate"])
    assert read_yaml(root / "params.paper.yaml").keys() == read_yaml(root / "params.yaml").keys()


@pytest.mark.parametrize("switch", [{"feature_loss": False}, {"objective": "pixel_mae"}])
def test_a_paper_ablation_without_the_teacher_runs_with_a_random_teacher(
    switch: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README: dvc.yaml's pretrain depends on the teacher's output whatever the objective, so at the
    paper's scale an ablation that reads no teacher still runs the teacher stage, which needs the MoCo v3
    checkpoint; README's two extra overrides make that stage a seeded random ViT that reads no file, and
    every file path the teacher and pretrain stages depend on in dvc.yaml exists with the subset alone."""
    from mcf import cli

    root = Path(__file__).resolve().parents[1]
    paper = read_yaml(root / "params.paper.yaml")
    paper["pretrain"]["model"].update(switch)
    (tmp_path / paper["subset"]["out"] / "shards").mkdir(parents=True)  # what the earlier stages wrote
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, paper)
    assert cli.main(["teacher"]) == 2  # the switch alone: the checkpoint is still the teacher's input
    assert "teacher.data: path does not exist: data/teacher/mocov3_vit_base.pth" in capsys.readouterr().err
    overrides = "-S teacher.source=random -S teacher.data=outputs/paper/subset"
    assert overrides in (root / "README.md").read_text()
    paper["teacher"].update(source="random", data=paper["subset"]["out"])
    assert paper["teacher"]["data"] == "outputs/paper/subset"
    # a small teacher: a 330 MB ViT-B export would only slow the test
    paper["teacher"]["backbone"] = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    _write(tmp_path, paper)
    assert cli.main(["teacher"]) == 0
    assert (tmp_path / paper["pretrain"]["teacher"] / "backbone.pth").is_file()
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for stage in ("teacher", "pretrain"):
        for dep in stages[stage]["deps"]:
            if dep.startswith("${"):
                section, key = dep[2:-1].split(".")
                assert Path(paper[section][key]).exists(), dep
    assert load("pretrain")[1].model.uses_teacher is False  # pretrain reads none of it


def test_params_error_survives_pickling() -> None:
    """A ParamsError raised in a Dask worker process reaches the client pickled: rebuilt from its message
    alone, it raised a TypeError that hid the params error."""
    err = pickle.loads(pickle.dumps(ParamsError("crop.size", "must be >= 8", "params.yaml")))
    assert (err.key, err.message, err.file, str(err)) == ("crop.size", "must be >= 8", "params.yaml",
                                                         "params.yaml: crop.size: must be >= 8")


@dataclasses.dataclass(frozen=True)
class Kinds:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "URL"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"count": True}, "kinds.count: expected an integer, got bool True"),
        ({"name": 5}, "kinds.name: expected a string, got int 5"),
        ({"name": None}, "kinds.name: expected a string, got NoneType None"),
        ({"rate": False}, "kinds.rate: expected a number, got bool False"),
        ({"flag": 1}, "kinds.flag: expected true or false, got 1"),
        ({"flag": 0.0}, "kinds.flag: expected true or false, got 0.0"),
    ],
)
def test_a_bool_and_a_number_do_not_pass_for_each_other(data: dict, fragment: str) -> None:
    """Python's bool is an int: unchecked, ``seed: true`` would train with seed 1 and ``flag: 1`` pass
    as on, where DVC records a bool and a number."""
    with pytest.raises(ParamsError, match=re.escape(fragment)):
        build(Kinds, data, "kinds")


def test_a_pair_given_one_value_is_a_params_error() -> None:
    """``betas: [0.9]`` is one line naming the key, not a ValueError from zip(strict=True)."""
    from mcf.train.loop import TrainConfig

    with pytest.raises(ParamsError, match=r"^pretrain\.train\.betas: expected 2 values, got 1$"):
        build(TrainConfig, {"betas": [0.9]}, "pretrain.train")
    with pytest.raises(ParamsError, match="expected 2 values, got 3"):
        build(TrainConfig, {"betas": [0.9, 0.95, 0.99]}, "pretrain.train")


def test_a_single_value_where_a_list_belongs_is_refused() -> None:
    """A string is iterable: unchecked, ``disallowed_header_directives: noai`` would become the four
    directives n, o, a and i (every real one silently off), and ``layers: 5`` a TypeError traceback."""
    from mcf.data.sources.laion import LaionFaceConfig

    key = r"fetch\.laion_face\.disallowed_header_directives"
    with pytest.raises(ParamsError, match=rf"^{key}: expected a list, got str 'noai'$"):
        build(LaionFaceConfig, {"disallowed_header_directives": "noai"}, "fetch.laion_face")
    with pytest.raises(ParamsError, match=r"^outer\.layers: expected a list, got int 5$"):
        build(Outer, {"layers": 5}, "outer")


@pytest.mark.parametrize(("text", "message"), [
    ("crop: 64\n", "crop: expected a mapping, got int 64"),
    ("crop:\n  detector: haar\n", "crop.detector: expected a mapping, got str 'haar'"),
])
def test_a_section_given_as_a_single_value_is_one_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    """A section or sub-section written as one value (``crop: 64``, ``detector: haar``) would be a
    TypeError traceback from taking the keys of an int or a str; it is the params error naming the key."""
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match="^" + re.escape(f"{tmp_path / 'params.yaml'}: {message}") + "$"):
        load("crop", tmp_path / "params.yaml")


def test_yaml_special_floats_read_as_dvc_reads_them(tmp_path: Path) -> None:
    """DVC (YAML 1.2) reads ``.nan`` and ``.inf`` as floats: read as the strings '.nan' and '.inf', a
    ``blr: .nan`` would be refused as 'expected a number, got str', not as the non-finite number it is."""
    from dvc.utils.serialize import parse_yaml

    text = "a: .nan\nb: -.Inf\nc: .INF\n"
    (tmp_path / "p.yaml").write_text(text)
    got, want = read_yaml(tmp_path / "p.yaml"), parse_yaml(text, "p.yaml")
    assert isinstance(got["a"], float) and math.isnan(got["a"]) and math.isnan(want["a"])
    assert (got["b"], got["c"]) == (want["b"], want["c"]) == (-math.inf, math.inf)
    (tmp_path / "p.yaml").write_text("mask_ratio: .nan\n")
    with pytest.raises(ParamsError, match=r"mask_ratio: expected a finite number, got nan$"):
        load(None, tmp_path / "p.yaml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 0\ncrop:\n  ? [x, y]\n  : 1\n", "not valid YAML at line 3, column 5: found unhashable key"),
        ("- seed: 0\n- mask_ratio: 0.75\n", "expected a mapping at the top level"),
        ("", "expected a mapping at the top level"),
    ],
)
def test_a_params_file_that_is_no_mapping_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    """A list key (``? [x, y]``) or a list at the top is a params error, not a TypeError later on."""
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ParamsError, match=re.escape(f"p.yaml: {message}")):
        read_yaml(tmp_path / "p.yaml")


def test_a_folder_given_as_params_is_one_clear_error(tmp_path: Path) -> None:
    """``--params outputs/`` is refused by name, not an IsADirectoryError traceback."""
    with pytest.raises(ParamsError, match="is a folder: give the params file"):
        read_yaml(tmp_path)


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_params_path_is_named_as_empty(capsys: pytest.CaptureFixture[str], path: str) -> None:
    """``--params "$PARAMS"`` with the variable unset read as the working folder: "is a folder"; spaces
    alone as "params file not found" with the name invisible."""
    from mcf import cli

    assert cli.main(["fetch", "--params", path]) == 2
    assert capsys.readouterr().err == (f'mcf: invalid params: "{path}": an empty path (an unset variable?): '
                                       "give a params file (YAML)\n")


@pytest.mark.parametrize(
    ("data", "key"),
    [({"crop": {"out": "  "}}, "crop.out"), ({"pretrain": {"data": "\t"}}, "pretrain.data"),
     ({"fetch": {"laion_face": {"parquet": [" "]}}}, "fetch.laion_face.parquet[0]")],
)
def test_a_value_of_only_white_space_is_refused_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: dict, key: str
) -> None:
    """``crop.out: "  "`` (``-S crop.out="$OUT  "`` with OUT unset) passed every check, and crop wrote its
    output into a folder named by two spaces; an input path of spaces was found only when its own stage ran.
    Refused where every string is converted, for every section, by `mcf fetch` already."""
    monkeypatch.chdir(tmp_path)
    message = rf"params\.yaml: {re.escape(key)}: '.+' is only white space: an empty value \(an unset variable"
    with pytest.raises(ParamsError, match=message):
        load("fetch", _write(tmp_path, data), every_section=True)


@pytest.mark.parametrize(
    ("data", "key", "fragment"),
    [({"crop": {"out": "outputs/a\0b"}}, "crop.out", "holds a NUL character"),
     ({"subset": {"input": "outputs/\0"}}, "subset.input", "holds a NUL character"),
     ({"subset": {"out": "outputs/x\udc80"}}, "subset.out", "is not UTF-8 text"),
     ({"evaluate": {"alignment_label": "\ud800"}}, "evaluate.alignment_label", "is not UTF-8 text")],
)
def test_a_value_no_path_or_name_can_hold_is_refused_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: dict, key: str, fragment: str
) -> None:
    """YAML's ``"\\0"`` and ``"\\udc80"`` escapes make strings no file name holds: a NUL was a ValueError
    traceback ("embedded null byte") from the first look at the path, a lone surrogate one from pyarrow as
    the stage wrote its manifest, after the work. Refused where every string is converted."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=rf"params\.yaml: {re.escape(key)}: .* {fragment}"):
        load("fetch", _write(tmp_path, data), every_section=True)


def test_a_params_path_that_cannot_be_looked_at_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Path.is_dir() raised on a name too long (an OSError traceback, exit 1) and on a folder this user
    may not enter (exit 1 as a stage's own failure); a pipe (``--params <(...)``), which exists, was
    "params file not found". Each is now a params error naming the file, exit 2. The folder is patched:
    root, as on CI, enters a chmod 000 folder."""
    from mcf import cli

    long_name = tmp_path / ("a" * 300 + ".yaml")
    assert cli.main(["fetch", "--params", str(long_name)]) == 2
    too_long = f"mcf: invalid params: {long_name}: cannot read it: {os.strerror(errno.ENAMETOOLONG)}\n"
    assert capsys.readouterr().err == too_long

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ParamsError, match=r"fifo\.yaml: not a regular file \(a pipe or a device\)"):
        read_yaml(fifo)

    shut = tmp_path / "shut" / "p.yaml"
    stat = Path.stat

    def denied(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        if self == shut:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", denied)
    assert cli.main(["fetch", "--params", str(shut)]) == 2
    assert capsys.readouterr().err == f"mcf: invalid params: {shut}: cannot read it: Permission denied\n"


def test_an_unreadable_params_file_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A params file this user may not read (chmod 000, another user's) was a PermissionError traceback
    and exit 1, from a stage and from `mcf report` alike; it is a params error naming the file, exit 2.
    Patched: root, as on CI, reads a chmod 000 file."""
    from mcf import cli

    params = tmp_path / "p.yaml"
    params.write_text("seed: 0\n")
    read_text = Path.read_text

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        if self == params:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert cli.main(["fetch", "--params", str(params)]) == 2
    assert capsys.readouterr().err == f"mcf: invalid params: {params}: cannot read it: Permission denied\n"


def test_top_level_defaults_and_bounds(tmp_path: Path) -> None:
    """A file that leaves ``mask_ratio`` out pretrains at the paper's 0.75, one that leaves ``seed`` out runs
    the committed seed 0; a negative seed, which numpy's and torch's seeding refuse only mid-stage, is
    refused up front."""
    assert load(None, _write(tmp_path, {"seed": 3}))[0] == Common(seed=3, mask_ratio=0.75)
    assert load(None, _write(tmp_path, {"mask_ratio": 0.5}))[0] == Common(seed=0, mask_ratio=0.5)
    with pytest.raises(ParamsError, match=r"params.yaml: seed: must be >= 0, got -1$"):
        load(None, _write(tmp_path, {"seed": -1}))


def test_another_sections_error_names_the_file_and_its_own_key_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mcf fetch` finding a typo in evaluate's section names ``evaluate.batchsize``, not
    ``fetch.evaluate.batchsize``, in the file given."""
    from mcf import cli

    root = Path(__file__).resolve().parents[1]
    data = read_yaml(root / "params.yaml")
    data["evaluate"] = {**data["evaluate"], "batchsize": 8}
    path = _write(tmp_path, data)
    with pytest.raises(ParamsError) as err:
        load("fetch", path, every_section=True)
    assert (err.value.file, err.value.key) == (path, "evaluate.batchsize")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fetch", "--params", "params.yaml"]) == 2
    err_line = capsys.readouterr().err
    assert err_line.startswith("mcf: invalid params: params.yaml: evaluate.batchsize: unknown key"), err_line


def test_a_min_lr_above_a_known_peak_lr_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """With train.effective_batch set the peak lr is blr × effective_batch / 256 whatever starts the
    stage, so `mcf fetch` refuses a min_lr above it; with `train.processes` > 1 the stage's own launch
    knows its batch and refuses it once, before torchrun. Unset, the batch of a torchrun started by hand
    is unknown until training: the trainer's own check stays."""
    from mcf import cli

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mcf.data.fetch.main", lambda *_: pytest.fail("fetch ran"))
    for section in ("teacher", "pretrain"):
        edited = {**params, section: {**params[section], "train": {**params[section]["train"]}}}
        train = edited[section]["train"]
        train.update(effective_batch=train["batch_size"], min_lr=train["blr"] * 2)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(edited))
        assert cli.main(["fetch", "--params", "p.yaml"]) == 2
        refused = f"p.yaml: {section}.train.min_lr: {train['min_lr']:g} is above the peak lr"
        assert refused in capsys.readouterr().err
        train.update(effective_batch=None)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(edited))
        load("fetch", "p.yaml", every_section=True)  # 512 processes started by hand would reach it
        train.update(processes=2, min_lr=train["blr"] * train["batch_size"] * 2 / 256 * 1.5)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(edited))
        monkeypatch.setattr(f"mcf.train.{section}.check_inputs", lambda *_: None)
        monkeypatch.setattr("mcf.train.distributed.launch", lambda *_: pytest.fail("torchrun started"))
        assert cli.main([section, "--params", "p.yaml"]) == 2
        refused = f"p.yaml: {section}.train.min_lr: {train['min_lr']:g} is above the peak lr"
        assert refused in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def _profile(name: str = "params.yaml") -> dict[str, Any]:
    return yaml.safe_load((REPO / name).read_text())


def test_the_synthetic_aflw_split_is_checked_against_the_fine_tunes_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """SynthFace writes fetch.synthetic.aflw.n_train training images into the tree finetune_alignment reads;
    another data.n_train failed only in finetune (check_written_split), after fetch, crop, subset, teacher
    and pretrain had run."""
    from mcf import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mcf.data.fetch.main", lambda *_: pytest.fail("fetch ran"))
    params = _profile()
    params["finetune_alignment"]["data"]["n_train"] = 500
    _write(tmp_path, params)
    assert cli.main(["fetch", "--params", "params.yaml"]) == 2
    refused = ("params.yaml: finetune_alignment.data.n_train: is 500, but fetch.synthetic.aflw.n_train "
               "writes 600 training images into outputs/fetch/aflw19")
    assert refused in capsys.readouterr().err
    params["fetch"]["synthetic"]["aflw"]["n_train"] = 500  # both changed: agreed
    load("fetch", _write(tmp_path, params), every_section=True)
    params["fetch"]["synthetic"]["aflw"]["n_train"] = 600
    params["finetune_alignment"]["data"]["root"] = "data/AFLW"  # the real AFLW-19: its own split
    load("fetch", _write(tmp_path, params), every_section=True)
    load("fetch", _write(tmp_path, {"fetch": params["fetch"]}), every_section=True)  # section left out
    load("fetch", REPO / "params.yaml", every_section=True)
    load("teacher", REPO / "params.paper.yaml", every_section=True)


@pytest.mark.parametrize(("edits", "fragment"), [
    ({"fetch.source": "local", "fetch.data": "photos", "fetch.local.root": "photos"},
     "finetune_alignment.data.root: outputs/fetch/aflw19 is inside fetch.out (outputs/fetch), which fetch "
     "replaces whole and where source local writes its images alone"),
    ({"finetune_parsing.data.root": "outputs/fetch"},
     "finetune_parsing.data.root: outputs/fetch is inside fetch.out (outputs/fetch), which fetch replaces "
     "whole and where SynthFace's tree is outputs/fetch/lapa"),
    ({"finetune_alignment.data.root": "outputs/fetch/lapa"},
     "SynthFace's tree is outputs/fetch/aflw19: name the tree finetune_alignment reads"),
])
def test_a_fine_tune_root_inside_fetch_out_must_be_the_tree_fetch_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edits: dict[str, str], fragment: str
) -> None:
    """fetch replaces its out whole: a fine-tune reading anything in it but the SynthFace tree there found
    it missing (or no AFLW-19/LaPa tree) only in finetune, after fetch, crop, subset, teacher and pretrain."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    params = _profile()
    for key, value in edits.items():
        *sections, name = key.split(".")
        functools.reduce(dict.__getitem__, sections, params)[name] = value
    path = _write(tmp_path, params)
    with pytest.raises(ParamsError, match=re.escape(fragment)):
        load("fetch", path, every_section=True)
    load("fetch", path)  # the section alone does not know the others
    for stage, tree in (("finetune_alignment", "data/AFLW"), ("finetune_parsing", "data/lapa")):
        params[stage]["data"]["root"] = tree  # the real data, read where the user keeps it
    load("fetch", _write(tmp_path, params), every_section=True)
    load("fetch", _write(tmp_path, {"fetch": params["fetch"]}), every_section=True)  # fine-tunes left out


@pytest.mark.parametrize("task", ["alignment", "parsing"])
def test_a_real_data_label_on_synthface_fine_tunes_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    """evaluate refused the label only after scoring both tasks, the last stage of the pipeline."""
    monkeypatch.chdir(tmp_path)
    params = _profile()
    params["evaluate"][f"{task}_label"] = {"alignment": "AFLW-19", "parsing": "LaPa"}[task]
    path = _write(tmp_path, params)
    refused = (f"evaluate.{task}_label: {params['evaluate'][f'{task}_label']!r} must contain 'SynthFace': "
               f"evaluate.{task} scores finetune_{task}, whose data.root is fetch's SynthFace tree")
    with pytest.raises(ParamsError, match=re.escape(refused)):
        load("fetch", path, every_section=True)
    params["evaluate"][task] = "elsewhere"  # another run's models: their data is not known here
    load("fetch", _write(tmp_path, params), every_section=True)


def test_feature_layers_past_the_teachers_depth_are_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MCF found a feature layer past the teacher's depth only as pretrain built its model, after fetch,
    crop, subset and teacher had run (at the paper's scale, LAION-Face's download)."""
    monkeypatch.chdir(tmp_path)
    params = _profile()
    params["pretrain"]["model"]["feature_layers"] = [1, 4]
    path = _write(tmp_path, params)
    refused = ("pretrain.model.feature_layers: [4] out of range for teacher.backbone.depth 4: "
               "pretrain.teacher is the teacher stage's export (outputs/teacher)")
    with pytest.raises(ParamsError, match=re.escape(refused)):
        load("fetch", path, every_section=True)
    paper = _profile("params.paper.yaml")
    paper["teacher"]["backbone"]["depth"] = 8  # a MoCo v3 ViT of 8 blocks: the paper's layer 11 is not there
    with pytest.raises(ParamsError, match=re.escape("[8, 11] out of range for teacher.backbone.depth 8")):
        load("teacher", _write(tmp_path, paper), every_section=True)
    for edit in ({"feature_loss": False}, {"objective": "pixel_mae"}):  # no teacher read
        load("fetch", _write(tmp_path, {**params, "pretrain": {**params["pretrain"], "model": {
            **params["pretrain"]["model"], **edit}}}), every_section=True)
    params["teacher"]["backbone"]["depth"] = 5
    load("fetch", _write(tmp_path, params), every_section=True)
    params["teacher"]["backbone"]["depth"] = 4
    params["pretrain"]["teacher"] = "elsewhere"  # an export of another run: its depth is its own
    load("fetch", _write(tmp_path, params), every_section=True)


@pytest.mark.parametrize(("stage", "key", "value", "fragment"), [
    ("finetune_alignment", "blocks", [1, 2, 3, 6], "finetune_alignment.blocks: [1, 2, 3, 6] reach past "
     "pretrain.model.backbone.depth 6: finetune_alignment fine-tunes pretrain's exports (outputs/pretrain)"),
    ("finetune_parsing", "size", 60, "finetune_parsing.data.size: must be a multiple of "
     "pretrain.model.backbone.patch_size 8, at least two patches (16), got 60"),
    ("finetune_alignment", "size", 8, "finetune_alignment.data.size: must be a multiple of "
     "pretrain.model.backbone.patch_size 8, at least two patches (16), got 8"),
])
def test_a_fine_tune_that_does_not_fit_the_pretrained_vit_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, key: str, value: Any, fragment: str
) -> None:
    """Blocks past the pre-trained ViT's depth, or an input that is no whole number of its patches, were
    found only as finetune built its model, after every stage before it had run."""
    monkeypatch.chdir(tmp_path)
    params = _profile()
    (params[stage]["data"] if key == "size" else params[stage])[key] = value
    params[stage]["backbone"] = "released/backbone"  # the scratch variant still reads pretrain's
    with pytest.raises(ParamsError, match=re.escape(fragment)):
        load("fetch", _write(tmp_path, params), every_section=True)
    params[stage]["scratch_backbone"] = "released/backbone_init"  # another ViT: its own size
    load("fetch", _write(tmp_path, params), every_section=True)


def test_the_params_check_reads_a_label_as_evaluate_does() -> None:
    from mcf.params import says_synthface
    from mcf.synth.writers import names_synthface

    for label in ("SynthFace-AFLW19", "synthface", "my SYNTHFACE run", "AFLW-19", "LaPa", "Synth Face", ""):
        assert says_synthface(label) == names_synthface(label), label
