"""``mcf check-metrics``: the CI metric gate over ``dvc metrics diff``.

CI reproduces the default pipeline and compares its metrics with the committed ones. Any tracked
metric that moves past its stated tolerance, in either direction, fails the gate: a drop is a
regression, and a rise means the committed numbers are no longer what the pipeline produces.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mcf.cli import describe, given
from mcf.errors import StageError
from mcf.params import yaml_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    """One metric's change between the committed and the reproduced run."""

    name: str
    old: float | str | None
    new: float | str | None
    tolerance: float

    @property
    def failed(self) -> bool:
        if self.old is None or self.new is None:
            return True  # a tracked metric appeared or vanished
        if isinstance(self.old, str) or isinstance(self.new, str):
            return self.old != self.new  # a label (evaluate's dataset names) has no tolerance: equal or not
        # not `> tolerance`: every comparison with NaN is false, so a NaN metric (json and dvc pass it
        # through) would sit within any tolerance; NaN, and infinities that differ by NaN, fail
        return not abs(self.new - self.old) <= self.tolerance

    def __str__(self) -> str:
        # dvc's JSON diff gives null for a metric missing on one side and for one stored as null alike
        old, new = ("absent or null" if v is None else v for v in (self.old, self.new))
        return f"{self.name}: {old} -> {new} (tolerance ±{self.tolerance})"


TOLERANCE = "metrics/tolerance.yaml"


def load_tolerances(path: str | Path | None, rev: str) -> dict[str, float]:
    """``{glob over 'file:metric.key': absolute tolerance}``; the first matching glob wins.

    Without ``path`` the tolerances are :data:`TOLERANCE` as committed at ``rev``, the revision the
    metrics are compared with: a change cannot loosen its own gate.
    """
    if path is None:
        done = _run(["git", "show", f"{rev}:{TOLERANCE}"])
        if done.returncode:
            why = (done.stderr.strip().splitlines() or ["not found"])[-1]
            raise StageError(f"{TOLERANCE} at {rev}: {why}")
        where, text = f"{rev}:{TOLERANCE}", done.stdout
    elif Path(path).is_file():
        where = f"--tolerance {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StageError(f"{where}: not a UTF-8 text file (a tolerance file is YAML)") from None
    else:
        raise StageError(f"--tolerance {path}: " + ("a folder, not a tolerance file" if Path(path).is_dir()
                                                     else "no such file"))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise StageError(f"{where}: {yaml_problem(err)}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively: thousands of brackets deep
        raise StageError(f"{where}: not valid YAML: nested too deeply to read") from None
    table = data.get("tolerance") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise StageError(f"{where}: expected a 'tolerance:' mapping of metric globs to numbers")
    # float() takes a bool (`true`, YAML 1.1's `no`) for 1 or 0, which gated metrics by a number nobody wrote
    if flags := [k for k, v in table.items() if isinstance(v, bool)]:
        raise StageError(f"{where}: {flags[0]}: a tolerance must be a number >= 0, got the boolean "
                         f"{table[flags[0]]}")
    try:
        tolerances = {str(k): float(v) for k, v in table.items()}
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: an integer past a float's range
        raise StageError(f"{where}: every tolerance must be a number ({err})") from None
    for glob, tol in tolerances.items():
        if not tol >= 0:  # NaN would pass every move (no difference exceeds it), a negative fail every one
            raise StageError(f"{where}: {glob}: a tolerance must be a number >= 0, got {tol}")
    return tolerances


def tolerance_for(name: str, tolerances: dict[str, float]) -> float | None:
    """The tolerance of ``name``, or ``None`` when the metric is not tracked."""
    return next((tol for pattern, tol in tolerances.items() if fnmatch.fnmatch(name, pattern)), None)


def compare(diff: dict, tolerances: dict[str, float]) -> list[Move]:
    """Tracked metrics of a ``dvc metrics diff --json`` result, each with its tolerance."""
    moves = []
    for file, metrics in sorted(diff.items()):
        for key, change in sorted(metrics.items()):
            name = f"{file}:{key}"
            tol = tolerance_for(name, tolerances)
            if tol is not None:
                moves.append(Move(name, change.get("old"), change.get("new"), tol))
    return moves


def unmatched(diff: dict, tolerances: dict[str, float]) -> list[str]:
    """The globs that match no metric of a ``dvc metrics diff --json --all`` result: a typo, or a metric
    renamed in the code and the committed files alike, leaves a glob that gates nothing."""
    names = [f"{file}:{key}" for file, metrics in diff.items() for key in metrics]
    return [glob for glob in tolerances if not any(fnmatch.fnmatch(name, glob) for name in names)]


def not_json(diff: dict, tolerances: dict[str, float], rev: str, root: Path) -> list[str]:
    """``"<file> at <rev>: not valid JSON (why)"`` (or ``in the workspace``) for each JSON metrics file
    of ``diff`` with a tracked metric null on that side: dvc reads a file that is not valid JSON as
    holding no metrics, and its diff gives each of them as null, as for metrics removed."""
    found = []
    for file, metrics in sorted(diff.items()):
        tracked = [c for k, c in metrics.items() if tolerance_for(f"{file}:{k}", tolerances) is not None]
        for side, where in (("old", f"at {rev}"), ("new", "in the workspace")):
            if not file.endswith(".json") or all(c.get(side) is not None for c in tracked):
                continue
            try:
                if side == "new":
                    text = (root / file).read_text(encoding="utf-8")
                else:
                    done = _run(["git", "show", f"{rev}:./{file}"], cwd=root)
                    if done.returncode:
                        continue  # no such file at rev: its metrics are absent, as the moves say
                    text = done.stdout
                json.loads(text)
            except OSError:
                continue  # no such file in the workspace
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                found.append(f"{file} {where}: not valid JSON ({err})")
    return found


def _run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:  # one line, not a traceback
        raise StageError(f"{command[0]} is not installed here (not on PATH)") from None


def dvc_root(start: Path) -> Path:
    """The DVC project holding ``start`` (the nearest folder with ``.dvc/``, as dvc finds it), else
    ``start``: dvc names metrics files relative to where it runs, and the tolerance globs (like
    :data:`TOLERANCE` in ``git show``) are relative to the project's root."""
    return next((p for p in (start, *start.parents) if (p / ".dvc").is_dir()), start)


def _dvc(*args: str) -> str:
    # this environment's dvc, on PATH or not, from the project root: from metrics/ it names the file
    # `../metrics/evaluate.json`, which no glob matches, and every move went unchecked
    done = _run([sys.executable, "-m", "dvc", *args], cwd=dvc_root(Path.cwd().resolve()))
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise StageError(f"dvc {' '.join(args)} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mcf check-metrics", description=describe(__doc__),
        epilog="Exit status: 0 every tracked metric within its tolerance; 1 one moved past it, appeared or "
        "vanished, a glob of the tolerance file matched no metric, or the comparison could not run (dvc or "
        "the tolerance file failed); 2 bad arguments.",
    )
    p.add_argument("--rev", default="HEAD", type=given,
                   help="committed revision to compare with (default: %(default)s)")
    p.add_argument("--tolerance", default=None, type=given,
                   help=f"tolerance file (default: {TOLERANCE} as committed at --rev)")
    args = p.parse_args(argv)
    tolerances = load_tolerances(args.tolerance, args.rev)
    print(_dvc("metrics", "diff", args.rev, "--md", "--all"))
    diff = json.loads(_dvc("metrics", "diff", args.rev, "--json", "--all") or "{}")
    moves = compare(diff, tolerances)
    failed = [m for m in moves if m.failed]
    for m in failed:
        print(f"FAIL {m}")
    for line in not_json(diff, tolerances, args.rev, dvc_root(Path.cwd().resolve())):
        print(f"FAIL {line}")
    idle = unmatched(diff, tolerances)
    source = f"--tolerance {args.tolerance}" if args.tolerance else f"{TOLERANCE} at {args.rev}"
    for glob in idle:
        print(f"FAIL {glob}: this glob of {source} matches no metric")
    print(f"metric gate: {len(moves) - len(failed)} within tolerance, {len(failed)} outside")
    return 1 if failed or idle else 0
