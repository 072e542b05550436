"""The `mcf` shell: every stage is a subcommand, and tools get their arguments untouched."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mcf import cli
from mcf.errors import GateError, StageError
from mcf.io import atomic_file, stage_lock
from mcf.params import SECTIONS, ParamsError
from mcf.train.distributed import LAUNCHER_ENV

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the default, CPU params


def test_every_params_section_is_a_stage_command() -> None:
    assert set(cli.STAGES) == set(SECTIONS) == set(cli.TOP_LEVEL)


def test_tool_receives_its_options_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda argv: seen.append(argv) or 0)
    assert cli.main(["-v", "export", "--checkpoint", "a.pt", "--out", "b"]) == 0
    assert seen == [["--checkpoint", "a.pt", "--out", "b"]]


@pytest.mark.parametrize("argv", [["-v", "report"], ["report", "-v"], ["bench", "pretrain", "--verbose"]])
def test_verbose_is_mcfs_own_debug_log(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """-v turns mcf's loggers to DEBUG, not the root's: a library's debug log quotes credentials
    (test_fetch runs `mcf -v fetch` on S3 for that). After a tool's name as after a stage's: the tool
    refused it ("unrecognized arguments: -v")."""
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda argv: seen.append(argv) or 0)
    loggers = [logging.getLogger(name) for name in cli.OWN_LOGGERS]
    root = logging.getLogger().level
    try:
        assert cli.main(argv) == 0
        assert [x.level for x in loggers] == [logging.DEBUG] * len(loggers)
        assert logging.getLogger().level == root  # GX's and its libraries' debug lines stay off
        assert seen == [["pretrain"] if "bench" in argv else []]
    finally:
        for x in loggers:
            x.setLevel(logging.NOTSET)


def test_a_tools_argument_after_a_double_dash_is_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda argv: seen.append(argv) or 0)
    assert cli.main(["predict", "--out", "o", "--", "-v"]) == 0
    assert seen == [["--out", "o", "--", "-v"]]


@pytest.mark.parametrize(("env", "level"), [
    ({}, logging.INFO), ({"WORLD_SIZE": "2", "RANK": "0"}, logging.INFO),
    ({"WORLD_SIZE": "2", "RANK": "1"}, logging.WARNING),
])
def test_torchruns_other_ranks_log_warnings_alone(
    env: dict[str, str], level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 says what every rank does: rank 1's info lines repeated each one (it said that it wrote the
    output too), while one process and rank 0 keep theirs."""
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda argv: 0)
    root, ours = logging.getLogger(), logging.getLogger("mcf")
    handlers, before = root.handlers, root.level
    root.handlers = []  # basicConfig sets up a root without handlers alone (pytest's capture is one)
    try:
        assert cli.main(["report"]) == 0
        assert ours.level == level
        assert root.level == logging.WARNING  # a library's INFO line is not what the stage did
    finally:
        root.handlers = handlers
        root.setLevel(before)
        ours.setLevel(logging.NOTSET)


@pytest.mark.parametrize("argv", [["-v", "subset"], ["subset", "-v"], ["subset"]])
def test_verbose_before_or_after_the_stage(argv: list[str]) -> None:
    args = cli.parser().parse_args(argv)
    assert args.command == "subset" and args.verbose == ("-v" in argv)


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`mcf --version` said 'the following arguments are required: COMMAND' (exit 2)."""
    import mcf

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"mcf {mcf.__version__}\n"


def test_stage_help_says_where_its_settings_and_files_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["crop", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "section `crop` of the params file (it reads no top-level key)" in text
    assert "2 params rejected or an input missing, 3 a data gate failed, 130 interrupted (Ctrl-C)" in text
    with pytest.raises(SystemExit):
        cli.main(["fetch", "--help"])  # the one stage a store or a folder may refuse
    text = " ".join(capsys.readouterr().out.split())
    assert ("3 a data gate failed, 4 no access to the source (no S3 credentials, access denied, no such "
            "bucket, a local folder it may not read)") in text
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "section `pretrain` of the params file plus the top-level `seed` and `mask_ratio`;" in text


@pytest.mark.parametrize("tool", ["duplicates", "crop", "fetch", "pretrain"])
def test_bench_help_is_plain_text(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``mcf bench duplicates --help`` printed its docstring's reST (:func:`duplicates`, ``--spread``)."""
    with pytest.raises(SystemExit):
        cli.main(["bench", tool, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_bench_without_a_benchmark_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A bare ``mcf bench`` must name the benchmarks and exit 2, not index an empty argument list."""
    with pytest.raises(SystemExit) as done:
        cli.main(["bench"])
    assert done.value.code == 2 and "{crop,duplicates,fetch,pretrain,synth}" in capsys.readouterr().err


def test_describe_drops_roles_and_backquotes() -> None:
    doc = "Rejects (:func:`duplicates`, :class:`~mcf.Foo`) at ``--spread``.\n\nNot this."
    assert cli.describe(doc) == "Rejects (duplicates, mcf.Foo) at --spread."


def test_a_full_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path, full_disk: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = yaml.safe_load(PARAMS.read_text())
    params["fetch"]["out"] = str(full_disk / "fetch")
    params["fetch"]["synthetic"].update(n_scenes=200, workers=1)  # ~500 KiB of JPEGs
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fetch"]) == 1
    err = capsys.readouterr().err
    assert err.endswith("mcf fetch: No space left on device: free some space and run it again\n")
    assert list(full_disk.iterdir()) == []


def test_a_second_run_of_a_stage_is_refused_while_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It would resume from the first's live checkpoint and delete its resume folder when done."""
    params = str(PARAMS)
    monkeypatch.chdir(tmp_path)
    scratch = ["finetune_parsing", "--variant", "scratch", "--params", params]
    with stage_lock("finetune_parsing@scratch"):
        assert cli.main(scratch) == 1
        err = capsys.readouterr().err
        assert f"stage finetune_parsing@scratch is already running in this folder (pid {os.getpid()})" in err
        assert cli.main([*scratch[:2], "mcf", *scratch[3:]]) == 2  # another variant runs: input missing
    assert cli.main(scratch) == 2  # the lock went with its holder
    assert (tmp_path / ".mcf" / ".gitignore").read_text().endswith("*\n")


def test_a_torchrun_started_by_hand_holds_the_lock_in_its_rank_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README's several-node run is ``torchrun ... -m mcf.cli pretrain`` by hand: no mcf launcher holds
    the lock for its workers, so rank 0 takes it, and a second run is refused rather than resuming from
    its live checkpoint. The workers of mcf's own torchrun (train.processes) leave it to their launcher."""
    params = str(PARAMS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    with stage_lock("pretrain"):
        assert cli.main(["pretrain", "--params", params]) == 1
        assert "stage pretrain is already running in this folder" in capsys.readouterr().err
        monkeypatch.setenv("RANK", "1")
        assert cli.main(["pretrain", "--params", params]) == 2  # not rank 0: on to its missing input
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv(LAUNCHER_ENV, "1")
        assert cli.main(["pretrain", "--params", params]) == 2  # its launcher holds the lock


def test_the_tests_run_outside_the_checkout() -> None:
    """conftest.py's session fixture: a stage or gate run in-process keeps its `.mcf/` state (the gate
    results `mcf report` shows, the stage locks) in a scratch folder, never in the checkout's."""
    assert not Path.cwd().resolve().is_relative_to(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("spec", ["moco_v3:{}", "mcf:{}", "timm:vit_tiny_patch16_224:{}"])
def test_a_missing_teacher_checkpoint_is_an_input_missing_whatever_the_spec(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every spec that names a weights file you supply (teacher.data) refuses a missing one as the help
    says, exit 2 naming the key, before any import: not a stage failure (exit 1)."""
    params = yaml.safe_load(PARAMS.read_text())
    params["teacher"] |= {"source": spec.format("data/w.pth"), "data": "data/w.pth"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["teacher", "--params", "p.yaml"]) == 2
    assert "teacher.data: path does not exist: data/w.pth" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("argv", [[], ["-v"]])
def test_no_command_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``mcf`` or ``mcf -v`` alone: argparse's exit 2 naming COMMAND, not an IndexError."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_a_misspelt_stage_option_is_refused_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mcf crop --parms p.yaml`` must not run crop with the default params.yaml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load", lambda *_, **__: pytest.fail("the stage ran"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["crop", "--parms", "p.yaml"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "mcf crop: error: unrecognized arguments: --parms p.yaml" in err
    assert "usage: mcf crop [-h] [--params PARAMS]" in err  # the stage's usage, not mcf's


def test_a_fine_tune_by_hand_fine_tunes_the_pre_trained_export() -> None:
    """``mcf finetune_alignment`` without --variant is the mcf variant, as its help says."""
    for stage in ("finetune_alignment", "finetune_parsing"):
        assert cli.parser().parse_args([stage]).variant == "mcf"


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/d/out/.x.tmp-7"), 1,
         f"mcf fetch: {os.strerror(errno.EDQUOT)} under /d/out: free some space and run it again\n"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/disk/resume/.last.pt.tmp-7"), 1,
         f"mcf fetch: {os.strerror(errno.ENOSPC)} under /disk/resume: free some space and run it again\n"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), ".report.html.tmp-7"), 1,  # written in the cwd
         f"mcf fetch: {os.strerror(errno.ENOSPC)} under .: free some space and run it again\n"),
        (KeyboardInterrupt(), 130, "mcf: interrupted\n"),
        (GateError("the fetch gate failed"), 3, "mcf fetch: the fetch gate failed\n"),
    ],
)
def test_a_stage_stopped_by_its_disk_ctrl_c_or_a_gate_is_one_line(
    raised: BaseException, code: int, line: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A quota is a full disk too, named with the folder it filled; Ctrl-C is the shell's 130; a failed
    gate is 3, which the flow does not retry."""
    def stage(*_: object, **__: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "_resolve", lambda target: stage)
    params = str(PARAMS)
    assert cli.main(["fetch", "--params", params]) == code
    assert capsys.readouterr().err == line


def test_another_os_error_is_not_taken_for_a_full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    def stage(*_: object, **__: object) -> None:
        raise OSError(errno.EIO, "Input/output error", "/x")

    monkeypatch.setattr(cli, "_resolve", lambda target: stage)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["fetch", "--params", str(PARAMS)])


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, os.strerror(errno.EACCES), "outputs/crop/manifest.parquet"),
    OSError(errno.EROFS, os.strerror(errno.EROFS), "outputs/crop/manifest.parquet"),
])
def test_an_input_it_may_not_read_or_a_file_it_may_not_write_is_one_line(
    error: OSError, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chmod 000 input (the crop manifest `mcf subset` reads) was a PermissionError traceback; it is
    the stage failing (exit 1) on one line naming the file, which a rerun passes once it is readable."""
    def stage(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(cli, "_resolve", lambda target: stage)
    assert cli.main(["subset", "--params", str(PARAMS)]) == 1
    assert capsys.readouterr().err == f"mcf subset: {error.strerror}: outputs/crop/manifest.parquet\n"


@pytest.mark.parametrize("argv", [
    ["export", "--checkpoint", "a.pt", "--out", "x" * 300],
    ["predict", "face.jpg", "--alignment", "a.pt", "--out", "x" * 300],
])
def test_an_output_name_too_long_for_the_file_system_is_one_line(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name past the file system's 255 bytes (ENAMETOOLONG) was an OSError traceback from the first stat
    of the output path, in every command that writes one: the command fails (exit 1) on one line."""
    monkeypatch.chdir(tmp_path)
    Path("face.jpg").write_bytes(b"")
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mcf {argv[0]}: {os.strerror(errno.ENAMETOOLONG)}: ") and err.count("\n") == 1, err


def _metrics_under_a_file(blocker: Path) -> None:  # evaluate's metrics path, as it writes it
    with atomic_file(blocker / "evaluate.json") as tmp:
        tmp.write_text("{}")


def _curves_under_a_file(blocker: Path) -> None:  # a resume_dir that is a file: dvclive's folder in it
    os.makedirs(blocker / "live", exist_ok=True)


def _checkpoint_onto_a_folder(blocker: Path) -> None:  # resume_dir/last.pt that is a folder
    blocker.unlink()
    (blocker / "last.pt").mkdir(parents=True)
    with atomic_file(blocker / "last.pt") as tmp:
        tmp.write_bytes(b"")


@pytest.mark.parametrize(("write", "named"), [
    (_metrics_under_a_file, "ff"),
    (_curves_under_a_file, "ff/live"),
    (_checkpoint_onto_a_folder, "ff/last.pt"),
])
def test_an_output_path_through_a_file_or_onto_a_folder_is_one_line(
    write: Callable[[Path], None], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """evaluate.metrics under an existing file was a FileExistsError traceback after every model was
    scored; a teacher/pretrain resume_dir that is a file, or whose last.pt is a folder, a NotADirectoryError
    or IsADirectoryError one. Each is the stage failing (exit 1) on one line naming the path to fix, not
    the temporary file written beside it."""
    monkeypatch.chdir(tmp_path)
    Path("ff").write_text("a file where a folder belongs")
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda *_, **__: write(Path("ff")))
    assert cli.main(["evaluate", "--params", str(PARAMS)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mcf evaluate: ") and err.endswith(f": {named}\n") and err.count("\n") == 1, err


def test_a_worker_of_mcfs_own_torchrun_trains_instead_of_starting_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.processes: 2 starts torchrun once; each worker it starts reads the same params and must run
    the stage, not launch a torchrun of its own."""
    params = yaml.safe_load(PARAMS.read_text())
    params["pretrain"]["train"]["processes"] = 2
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    Path(params["pretrain"]["data"], "shards").mkdir(parents=True)
    Path(params["pretrain"]["teacher"]).mkdir(parents=True)
    Path(params["pretrain"]["teacher"], "backbone.pth").touch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(LAUNCHER_ENV, "1")
    monkeypatch.setattr("mcf.train.distributed.launch", lambda *_: pytest.fail("torchrun started"))
    ran: list[str] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda *_, **__: ran.append(target))
    assert cli.main(["pretrain", "--params", "p.yaml"]) == 0
    assert ran == ["mcf.train.pretrain:main"]


def test_one_process_trains_here_and_two_start_torchrun_checked_at_their_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.processes: 1 trains in this process, not under a torchrun of one. 2 start torchrun once
    min_lr is checked against the peak lr of their effective batch, twice one process's: a min_lr
    between the two peaks is a valid run of 2, not refused."""
    params = yaml.safe_load(PARAMS.read_text())
    train = params["pretrain"]["train"]
    monkeypatch.chdir(tmp_path)
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    ran: list[str] = []
    monkeypatch.setattr(cli, "_resolve", lambda target: lambda *_, **__: ran.append(target))
    launched: list[tuple[list[str], int]] = []
    monkeypatch.setattr("mcf.train.distributed.launch", lambda *args: launched.append(args) or 0)
    one_peak = train["blr"] * train["batch_size"] * train["accum_steps"] / 256
    for processes, stage in ((1, "mcf.train.pretrain:main"), (2, "mcf.train.pretrain:check_inputs")):
        train.update(processes=processes, min_lr=one_peak * 1.5 if processes > 1 else 0.0)
        Path("p.yaml").write_text(yaml.safe_dump(params))
        ran.clear()
        assert cli.main(["pretrain", "--params", "p.yaml"]) == 0
        assert ran == [stage]
    assert launched == [(["pretrain", "--params", "p.yaml"], 2)]


@pytest.mark.parametrize(("command", "key", "named"), [
    ("pretrain", "train.min_lr", "p.yaml: pretrain.train.min_lr"),
    ("pretrain", "pretrain.train.min_lr", "p.yaml: pretrain.train.min_lr"),
    ("pretrain", "mask_ratio", "p.yaml: mask_ratio"),
    ("pretrain", "seed", "p.yaml: seed"),
    ("report", "out", "out"),
])
def test_a_params_error_raised_as_a_command_runs_names_its_key_as_the_file_does(
    command: str, key: str, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A stage's own check names its key under the stage's section, a top-level key (seed, mask_ratio) as
    the file has it; a tool's has no params file of mcf's to name, and is exit 2 on one line all the same."""
    params = yaml.safe_load(PARAMS.read_text())
    monkeypatch.chdir(tmp_path)
    Path("p.yaml").write_text(yaml.safe_dump(params))

    def stage(*_: object, **__: object) -> None:
        raise ParamsError(key, "too big")

    monkeypatch.setattr(cli, "_resolve", lambda target: stage)
    argv = [command, "--params", "p.yaml"] if command in cli.STAGES else [command]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"mcf: invalid params: {named}: too big\n"


def test_sync_bn_on_the_cpu_is_refused_once_before_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each worker would refuse it, one message each amid torchrun's report: the launcher refuses it once."""
    params = yaml.safe_load(PARAMS.read_text())
    params["pretrain"]["train"].update(processes=2, sync_bn=True)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    Path(params["pretrain"]["data"], "shards").mkdir(parents=True)
    Path(params["pretrain"]["teacher"]).mkdir(parents=True)
    Path(params["pretrain"]["teacher"], "backbone.pth").touch()
    monkeypatch.setattr("mcf.train.distributed.launch", lambda *_: pytest.fail("torchrun started"))
    assert cli.main(["pretrain", "--params", "p.yaml"]) == 2
    refusal = "pretrain.train.sync_bn: true needs CUDA; this run is on the CPU"
    assert capsys.readouterr().err == f"mcf: invalid params: p.yaml: {refusal}\n"


def test_the_lock_names_its_holder_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run writes its pid over the last one's; a lock file without one names no pid."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        with stage_lock("crop"):
            pass
    with stage_lock("crop"), pytest.raises(StageError) as err:
        with stage_lock("crop"):
            pass
    assert f"(pid {os.getpid()})" in str(err.value)
    assert (tmp_path / ".mcf" / "locks" / "crop.lock").read_text() == f"pid {os.getpid()}\n"
    (tmp_path / ".mcf" / "locks" / "crop.lock").write_text("")
    with open(tmp_path / ".mcf" / "locks" / "crop.lock") as held, pytest.raises(StageError) as err:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with stage_lock("crop"):
            pass
    assert "already running in this folder (another process)" in str(err.value)


# Each runs a process pool of a stage, then Ctrl-C as a terminal sends it: SIGINT to the whole process
# group, the workers too, once the parent has taken its first result (patched progress bar).
_POOL_RUNS = {
    "synth": """
from mcf.synth import writers
from mcf.synth.config import SynthConfig
cfg = SynthConfig(n_scenes=400, scene_size=96, n_identities=10, workers=2)
for i, _ in enumerate(writers._ordered(functools.partial(writers._render_scene, cfg, 0), 400, 2, "x")):
    if i == 8:
        ctrl_c()
""",
    "crop": """
from mcf.data import crop
from mcf.synth.config import SynthConfig
from mcf.synth.writers import write_corpus
synth = SynthConfig(n_scenes=60, scene_size=96, n_identities=10, workers=1)
manifest, detections = write_corpus(synth, 0, tmp)
manifest.to_parquet(tmp / "manifest.parquet")
detections.to_parquet(tmp / "detections.parquet")
cfg = crop.CropConfig(input=str(tmp), out=str(tmp / "crop"), chunk_size=1, workers=2)
crop.tqdm = Bar
crop.run_chunks(crop.load_sources(cfg), cfg, tmp / "parts")
""",
    "read_back": """
from mcf.data import shards
jpeg = shards.encode_jpeg(np.zeros((64, 64, 3), np.uint8), 95)
shards.write_shards(((f"c{i:05d}", jpeg, {}) for i in range(4000)), tmp, 20)
shards.tqdm = lambda mapped, **_: (ctrl_c() if i == 1 else None or r for i, r in enumerate(mapped))
shards.read_back(tmp, 2)
""",
    "queueing": """
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from mcf.pools import cancelled_on_error, ignore_ctrl_c, workers_ignore_ctrl_c
def chunks():  # Ctrl-C while the pool's tasks are queued and its workers start: it must not be lost
    for i in range(400):
        i == 3 and ctrl_c()
        yield i
pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"), initializer=ignore_ctrl_c)
with cancelled_on_error(pool, "queueing"):
    with workers_ignore_ctrl_c():
        mapped = pool.map(abs, chunks())
    print("queued", file=sys.stderr)
    list(mapped)
""",
}
_POOL_PRELUDE = """
import functools, os, signal, sys, tempfile
from pathlib import Path
import numpy as np
tmp = Path(tempfile.mkdtemp())
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job (CI's `cmd &`) starts it ignored
def ctrl_c():
    os.killpg(0, signal.SIGINT)
class Bar:
    def __init__(self, *_, **__): self.n = 0
    def update(self, n): self.n += 1; self.n == 2 and ctrl_c()
    def close(self): pass
try:
"""


@pytest.mark.parametrize("pool", sorted(_POOL_RUNS))
def test_ctrl_c_stops_a_stages_process_pool_at_once_with_one_line(pool: str, tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's group: the workers must leave the stopping to the
    parent. A worker that took it died with its own traceback, and a crop pool could hang at exit,
    Ctrl-C again doing nothing, its workers stuck."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    body = textwrap.indent(_POOL_RUNS[pool].strip(), "    ")
    script = _POOL_PRELUDE + body + "\nexcept KeyboardInterrupt:\n    print('interrupted', file=sys.stderr)\n"
    script += "    sys.exit(130)\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"still running 90 s after Ctrl-C:\n{err[-3000:]}")
    assert (proc.returncode, err) == (130, "interrupted\n")
    deadline = time.monotonic() + 30  # a forkserver or resource tracker leaves once it sees its parent gone
    while True:  # (1-2 s here under load; a process that stays is still there after 30 s)
        left = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left


def _killed_outright(_: int) -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer ends a worker holding a big image


def test_a_pool_worker_killed_outright_fails_on_one_line_naming_the_step() -> None:
    """A crop or read-back worker killed outright broke the pool: the stage ended in a 25-line traceback
    ending in BrokenProcessPool's "terminated abruptly", which names neither the step nor a likely cause."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from mcf.pools import cancelled_on_error

    pool = ProcessPoolExecutor(1, mp_context=get_context("fork"))
    with pytest.raises(StageError, match=r"^a worker process of crop died: .*out-of-memory killer"):
        with cancelled_on_error(pool, "crop"):
            pool.submit(_killed_outright, 0).result()


# Each holds a stage's process pool busy: its workers block reading FIFOs (tmp/fifo-*) until written.
_KILLED_PARENT_RUNS = {
    "crop": """
from mcf.data import crop
cfg = crop.CropConfig(input=str(tmp), out=str(tmp / "crop"), chunk_size=1, workers=2)
none = np.zeros(0, np.int64)
names = np.array([f.name for f in fifos], object)
crop.run_chunks(crop.Sources(tmp, names.copy(), names, None, none, none, True), cfg, tmp / "parts")
""",
    "read_back": """
from mcf.data import shards
shards.read_back(tmp, 2)
""",
    "synth": """
from mcf.synth import writers
def render(i: int) -> bytes:
    return fifos[i].read_bytes()
list(writers._ordered(render, 2, 2, "synth corpus"))
""",
}
# where pidfd_open is missing (macOS, Linux before 5.3): the forked workers have none either
_KILLED_PARENT_RUNS["synth_no_pidfd"] = "import os\ndel os.pidfd_open\n" + _KILLED_PARENT_RUNS["synth"]


@pytest.mark.parametrize("pool", sorted(_KILLED_PARENT_RUNS))
def test_a_pools_workers_end_with_their_parent_killed_outright(pool: str, tmp_path: Path) -> None:
    """A stage killed outright (the out-of-memory killer, a CI runner's SIGKILL) left its pool's workers
    waiting for work for ever, holding their memory and the stage's stdout: whatever read that to its end
    (dvc repro, a CI runner, subprocess.run) hung."""
    import signal
    import subprocess
    import sys
    import time

    fifos = [tmp_path / (f"crops-{i:06d}.tar" if pool == "read_back" else f"fifo-{i}") for i in range(2)]
    for fifo in fifos:
        os.mkfifo(fifo)
    script = f"""
import sys
from pathlib import Path
import numpy as np
tmp = Path({str(tmp_path)!r})
fifos = [tmp / name for name in {[f.name for f in fifos]!r}]
""" + _KILLED_PARENT_RUNS[pool]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    held = []  # write ends: a worker blocked opening its FIFO goes on to block reading it
    try:
        deadline = time.monotonic() + 60
        for fifo in fifos[: 1 if pool.startswith("synth") else 2]:  # synth: both images are one task
            while True:  # ENXIO until a reader has it open: a worker is running the stage's own code
                try:
                    held.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                    time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=20)  # to the end of stdout and stderr, which every worker holds
        except subprocess.TimeoutExpired:
            pytest.fail("the stage's output did not end within 20 s of its process being killed")
        deadline = time.monotonic() + 20  # a forkserver or resource tracker goes once its writers have
        while (left := subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True,
                                      text=True).stdout.split()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for fd in held:
            os.close(fd)


@pytest.mark.parametrize(("stage", "resume_dir"), [
    ("teacher", ""), ("teacher", "."), ("teacher", "outputs"), ("pretrain", "."), ("pretrain", "outputs"),
    ("finetune_alignment", "."), ("finetune_parsing", ""),
])
def test_a_resume_dir_holding_other_files_is_refused_before_it_is_deleted(
    stage: str, resume_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A finished run deletes its resume folder whole (a fine-tune's <resume_dir>/<variant>): `.` or ``''``
    deleted the working folder (params.yaml, the checkout), `outputs` every stage's output, and for a
    fine-tune `.` the `mcf/` folder beside it. Refused before any work, exit 2 naming the key."""
    params = yaml.safe_load(PARAMS.read_text())
    params[stage]["resume_dir"] = resume_dir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    kept = [tmp_path / "outputs" / "subset" / "manifest.parquet", tmp_path / "mcf" / "__init__.py"]
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the pipeline's resume state")
    assert cli.main([stage, "--params", "p.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mcf: invalid params: p.yaml: {stage}.resume_dir: ") and err.count("\n") == 1
    assert all(path.is_file() for path in kept)
