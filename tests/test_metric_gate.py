"""The CI metric gate: within tolerance passes; a deliberate regression fails."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mcf.errors import StageError
from mcf.evaluate.regression import TOLERANCE, compare, load_tolerances, tolerance_for

ROOT = Path(__file__).resolve().parents[1]


def test_tolerance_globs_first_match_wins() -> None:
    tols = {"m.json:alignment.*.nme_diag": 0.05, "m.json:*": 1.0}
    assert tolerance_for("m.json:alignment.mcf.nme_diag", tols) == 0.05
    assert tolerance_for("m.json:parsing.f1", tols) == 1.0
    assert tolerance_for("other.json:x", tols) is None


def _flat(tree: dict, prefix: str = "") -> list[str]:
    return [name for key, value in tree.items()
            for name in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def test_every_committed_glob_gates_a_committed_metric() -> None:
    """A metric renamed in the code and the committed files alike would leave its glob matching nothing,
    which fails the gate only after the whole pipeline has run; this fails first."""
    files = sorted((ROOT / "metrics").rglob("*.json"))
    names = [f"{f.relative_to(ROOT).as_posix()}:{key}" for f in files
             for key in _flat(json.loads(f.read_text()))]
    tolerances = load_tolerances(ROOT / TOLERANCE, "HEAD")
    assert [g for g in tolerances if not any(fnmatch.fnmatch(n, g) for n in names)] == []


def test_the_committed_gate_fails_when_the_evaluated_set_changes_size() -> None:
    """The images and pixels evaluate.json counts say what the numbers were measured on; untracked, a
    run scored on half the test images (NME within 0.25 of the committed) passed the gate with the
    committed file still saying 200 images."""
    committed = json.loads((ROOT / "metrics" / "evaluate.json").read_text())
    counts = [k for k in _flat(committed) if k.rsplit(".", 1)[-1] in ("images", "pixels")]
    assert counts  # evaluate.json still holds its counts
    diff = {"metrics/evaluate.json": {k: {"old": 200, "new": 100} for k in counts}}
    moves = compare(diff, load_tolerances(ROOT / TOLERANCE, "HEAD"))
    assert sorted(m.name.split(":", 1)[1] for m in moves if m.failed) == sorted(counts)


def test_the_committed_gate_fails_when_a_training_ran_another_length() -> None:
    """Untracked, a pretrain that took one step fewer (a dropped last batch) passed the gate: its last
    loss sat within the tolerance of the committed one."""
    tunes = (ROOT / "metrics").glob("finetune_*/*/metrics.json")
    files = ["metrics/pretrain/metrics.json", *sorted(f.relative_to(ROOT).as_posix() for f in tunes)]
    assert len(files) == 5  # pretrain and two variants of each fine-tune
    diff = {f: {"step": {"old": 372, "new": 371}} for f in files}
    moves = compare(diff, load_tolerances(ROOT / TOLERANCE, "HEAD"))
    assert sorted(m.name for m in moves if m.failed) == sorted(f"{f}:step" for f in files)


def test_compare_flags_moves_past_tolerance_both_ways() -> None:
    diff = {"m.json": {"a": {"old": 1.0, "new": 1.04}, "b": {"old": 1.0, "new": 0.8}, "c": {"old": 1.0}}}
    moves = {m.name: m.failed for m in compare(diff, {"m.json:*": 0.05})}
    assert moves == {"m.json:a": False, "m.json:b": True, "m.json:c": True}


def test_a_metric_missing_on_one_side_is_named_so() -> None:
    """The failure line said `None`, a Python word that is in neither metrics file."""
    diff = {"m.json": {"gone": {"old": 2, "new": None}, "new": {"old": None, "new": 4}}}
    assert [str(m) for m in compare(diff, {"m.json:*": 0.05})] == [
        "m.json:gone: 2 -> absent or null (tolerance ±0.05)",
        "m.json:new: absent or null -> 4 (tolerance ±0.05)",
    ]


def test_a_nan_or_infinite_metric_fails_the_gate() -> None:
    """|NaN - x| > tolerance is false for every tolerance: a NaN metric passed the gate with exit 0."""
    nan, inf = float("nan"), float("inf")
    pairs = {"a": (1.0, nan), "b": (nan, 1.0), "c": (nan, nan), "d": (1.0, inf), "e": (inf, inf),
             "f": (1.0, 1.0)}
    diff = {"m.json": {k: {"old": old, "new": new} for k, (old, new) in pairs.items()}}
    moves = {m.name: m.failed for m in compare(diff, {"m.json:*": 0.05})}
    assert moves == {f"m.json:{k}": k != "f" for k in pairs}


def test_a_catch_all_glob_compares_text_metrics_exactly() -> None:
    """dvc reports evaluate.json's dataset labels (strings) as metrics too: a glob over the whole file
    must not subtract them (it raised TypeError), and a changed label fails."""
    diff = {"m.json": {"dataset.alignment": {"old": "SynthFace-AFLW19", "new": "SynthFace-AFLW19"},
                       "dataset.parsing": {"old": "SynthFace-LaPa", "new": "LaPa"},
                       "nme": {"old": 1.0, "new": 1.1}}}
    moves = {m.name: m.failed for m in compare(diff, {"m.json:*": 0.25})}
    assert moves == {"m.json:dataset.alignment": False, "m.json:dataset.parsing": True, "m.json:nme": False}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def _committed_metrics(repo: Path, tolerance: str, committed: dict) -> Path:
    """A git and DVC repository at ``repo`` whose HEAD holds ``committed`` as metrics/evaluate.json and
    ``tolerance`` as metrics/tolerance.yaml; returns the metrics file."""
    _git(repo, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "metrics").mkdir()
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    (repo / "metrics" / "tolerance.yaml").write_text(tolerance)
    metrics = repo / "metrics" / "evaluate.json"
    metrics.write_text(json.dumps(committed))
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "metrics")
    return metrics


@pytest.mark.parametrize(("new", "expected_rc"), [(0.931, 0), (1.2, 1)])
@pytest.mark.parametrize("where", [".", "metrics"])
def test_check_metrics_cli(tmp_path: Path, new: float, expected_rc: int, where: str) -> None:
    """Run from the checkout or a folder inside it: dvc names the metrics files relative to where it runs
    (`../metrics/evaluate.json` from metrics/), which no tolerance glob matched, so every move went
    unchecked and the gate blamed the tolerance file ("no metric matches a glob")."""
    repo = tmp_path
    metrics = _committed_metrics(repo, "tolerance:\n  'metrics/evaluate.json:*nme*': 0.01\n",
                                 {"alignment": {"mcf": {"nme_diag": 0.93}}})
    metrics.write_text(json.dumps({"alignment": {"mcf": {"nme_diag": new}}}))
    # a change that loosens its own tolerance does not pass: the gate reads the committed one
    (repo / "metrics" / "tolerance.yaml").write_text("tolerance:\n  '*': 100\n")
    proc = subprocess.run([sys.executable, "-m", "mcf.cli", "check-metrics"], cwd=repo / where,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == expected_rc, proc.stdout + proc.stderr
    assert "nme_diag" in proc.stdout  # the markdown table is printed either way
    assert f"metric gate: {1 - expected_rc} within tolerance, {expected_rc} outside" in proc.stdout


def test_a_glob_that_matches_no_metric_fails_the_gate(tmp_path: Path) -> None:
    """A typo in one glob (`nme_dig`) left its metric ungated: NME 0.93 -> 5.0 passed with exit 0, as
    long as another glob matched something."""
    committed = {"alignment": {"mcf": {"nme_diag": 0.93}}, "dataset": {"alignment": "SynthFace-AFLW19"}}
    metrics = _committed_metrics(tmp_path, "tolerance:\n  'metrics/evaluate.json:*.nme_dig': 0.01\n"
                                 "  'metrics/evaluate.json:dataset.*': 0\n", committed)
    metrics.write_text(json.dumps({**committed, "alignment": {"mcf": {"nme_diag": 5.0}}}))
    proc = subprocess.run([sys.executable, "-m", "mcf.cli", "check-metrics"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ("FAIL metrics/evaluate.json:*.nme_dig: this glob of metrics/tolerance.yaml at HEAD matches no "
            "metric") in proc.stdout


def test_a_metrics_file_that_is_not_json_is_named_so(tmp_path: Path) -> None:
    """dvc reads a metrics file that is not valid JSON as holding no metrics, and its diff gives each of
    them as null: the gate said only "absent or null", as for metrics removed. At HEAD, then in the
    workspace."""
    committed, cut = {"alignment": {"mcf": {"nme_diag": 0.93}}}, '{"alignment": {"mcf": {"nme_diag": 0.9'
    metrics = _committed_metrics(tmp_path, "tolerance:\n  'metrics/evaluate.json:*': 0.01\n", committed)

    def gate() -> str:
        proc = subprocess.run([sys.executable, "-m", "mcf.cli", "check-metrics"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        return proc.stdout

    metrics.write_text(cut)
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "cut short")
    metrics.write_text(json.dumps(committed))
    assert "FAIL metrics/evaluate.json at HEAD: not valid JSON (Expecting" in gate()
    _git(tmp_path, "reset", "-q", "--hard", "HEAD~1")  # the valid file at HEAD, the cut one in the workspace
    metrics.write_text(cut)
    out = gate()
    assert "FAIL metrics/evaluate.json in the workspace: not valid JSON (Expecting" in out
    assert "at HEAD" not in out


@pytest.mark.parametrize(("value", "message"), [
    ("1" + "0" * 400, "every tolerance must be a number (int too large to convert to float)"),
    ("true", "m.json:*: a tolerance must be a number >= 0, got the boolean True"),
    ("no", "m.json:*: a tolerance must be a number >= 0, got the boolean False"),
])
def test_a_tolerance_that_is_no_number_is_refused_in_one_line(
    tmp_path: Path, value: str, message: str
) -> None:
    """An integer past a float's range was an OverflowError traceback; ``true`` (or YAML 1.1's ``no``) was
    read as a tolerance of 1 (or 0), gating every metric it matched by a number nobody wrote."""
    path = tmp_path / "t.yaml"
    path.write_text(f"tolerance:\n  'm.json:*': {value}\n")
    with pytest.raises(StageError, match=re.escape(message)):
        load_tolerances(path, "HEAD")


def test_a_tolerance_file_nested_past_the_recursion_limit_is_refused_in_one_line(tmp_path: Path) -> None:
    """PyYAML composes nested nodes recursively: thousands of brackets deep was a RecursionError traceback."""
    path = tmp_path / "t.yaml"
    path.write_text("tolerance: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(StageError, match="t.yaml: not valid YAML: nested too deeply to read"):
        load_tolerances(path, "HEAD")


@pytest.mark.parametrize("args", [["--rev", ""], ["--rev", " "], ["--tolerance", ""]])
def test_an_empty_rev_or_tolerance_is_a_usage_error_naming_its_flag(
    args: list[str], tmp_path: Path
) -> None:
    """``--rev ""`` (an unset variable) compared with git's index and the workspace and printed "at "
    where the revision belongs; ``--tolerance ""`` said "a folder, not a tolerance file". Each is exit 2
    in one line naming the flag."""
    proc = subprocess.run([sys.executable, "-m", "mcf.cli", "check-metrics", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.endswith(f"error: argument {args[0]}: an empty value (an unset variable?)\n")


def test_check_metrics_errors_are_one_line(tmp_path: Path) -> None:
    """A missing or malformed tolerance file, or a revision dvc cannot read, is one clear line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("tolerances:\n  '*': 0.1\n")
    cases = [
        (["--tolerance", str(tmp_path / "nope.yaml")], "nope.yaml: no such file"),
        (["--tolerance", str(tmp_path)], f"{tmp_path}: a folder, not a tolerance file"),
        (["--tolerance", str(bad)], "expected a 'tolerance:' mapping"),
    ]
    broken = tmp_path / "broken.yaml"
    broken.write_text("tolerance: {'*': 0.1\n")
    cases.append((["--tolerance", str(broken)], "broken.yaml: not valid YAML"))
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    cases.append((["--tolerance", str(tmp_path / "binary.yaml")], "binary.yaml: not a UTF-8 text file"))
    for value in (".nan", "-0.1"):  # NaN passed every move (|a - b| > NaN is false); a negative failed all
        odd = tmp_path / "odd.yaml"
        odd.write_text(f"tolerance:\n  '*': 0.1\n  'm.json:*': {value}\n")
        cases.append((["--tolerance", str(odd)], "m.json:*: a tolerance must be a number >= 0"))
    good = tmp_path / "good.yaml"
    good.write_text("tolerance:\n  '*': 0.1\n")
    cases.append((["--tolerance", str(good)], "dvc metrics diff HEAD --md --all failed"))  # not a repo
    cases.append(([], "metrics/tolerance.yaml at HEAD:"))  # the committed tolerances: no repository here
    without_git = {**os.environ, "PATH": str(tmp_path / "bin")}  # dvc runs as this Python's module
    cases.append(([], "git is not installed here (not on PATH)", without_git))
    cases.append((["--tolerance", str(good)], "dvc metrics diff HEAD --md --all failed", without_git))
    for args, message, *env in cases:
        proc = subprocess.run([sys.executable, "-m", "mcf.cli", "check-metrics", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, env=(env or [None])[0])
        assert proc.returncode == 1 and message in proc.stderr, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
