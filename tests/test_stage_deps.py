"""Every module a stage runs is one of its DVC deps, so an edit reruns the stages it can change.

dvc.yaml lists each stage's code by hand; this test follows the stage function's imports (static, any
depth, function-level imports included) and fails on a module, or a data-gate suite it runs, missing
from the stage's ``deps``. Plumbing that cannot change an output (errors, atomic writes, params
parsing, process pools' Ctrl-C handling) is exempt.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from mcf import cli
from mcf.cli import GATED, STAGES, TOP_LEVEL
from mcf.params import Common

ROOT = Path(__file__).resolve().parents[1]
PLUMBING = {"mcf/__init__.py", "mcf/errors.py", "mcf/io.py", "mcf/params.py", "mcf/pools.py"}


def _file(module: str) -> Path | None:
    for path in (ROOT / f"{module.replace('.', '/')}.py", ROOT / module.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """The ``mcf`` modules ``path`` imports, with the packages Python runs on the way."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _file(f"{node.module}.{a.name}")}
    mcf = {m for m in found if m.split(".")[0] == "mcf"}
    return mcf | {".".join(m.split(".")[:i]) for m in mcf for i in range(1, m.count(".") + 1)}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = _file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo.extend(_imports(path))
    return {_file(m).relative_to(ROOT).as_posix() for m in seen}


def _suites(files: set[str]) -> set[str]:
    """The data-gate suites these files run: ``run_gate(table, "<suite>", ...)`` with a literal name, or
    with a variable, every suite name written in the function that makes the call (finetune picks
    ``"aflw19"`` or ``"lapa"`` by task)."""
    known = {p.stem for p in (ROOT / "mcf/validate/suites").glob("*.json")}
    names = set()
    for f in files:
        for func in ast.walk(ast.parse((ROOT / f).read_text())):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            calls = [n for n in ast.walk(func) if isinstance(n, ast.Call) and len(n.args) > 1
                     and getattr(n.func, "id", None) == "run_gate"]
            names |= {c.args[1].value for c in calls if isinstance(c.args[1], ast.Constant)}
            if any(not isinstance(c.args[1], ast.Constant) for c in calls):
                names |= {n.value for n in ast.walk(func) if isinstance(n, ast.Constant) and n.value in known}
    return {f"mcf/validate/suites/{name}.json" for name in names}


def _has_code(path: str) -> bool:
    body = ast.parse((ROOT / path).read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


STAGE_SPECS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGE_SPECS))
def test_stage_deps_cover_the_code_it_runs(stage: str) -> None:
    spec = STAGE_SPECS[stage].get("do", STAGE_SPECS[stage])
    deps = [d.rstrip("/") for d in spec["deps"] if not d.startswith("$")]
    ran = _closure(STAGES[stage][0].split(":")[0]) - PLUMBING
    ran |= _suites(ran)
    listed = {f for f in ran if any(f == d or f.startswith(f"{d}/") for d in deps)}
    missing = sorted(f for f in ran - listed if _has_code(f))
    assert not missing, f"dvc.yaml stage {stage!r} runs these modules but does not depend on them: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGE_SPECS))
def test_stage_params_are_its_section_and_the_top_level_keys_it_reads(stage: str) -> None:
    """A stage's dvc.yaml ``params`` are its own section (the only one ``mcf <stage>`` reads) and the
    top-level keys ``mcf <stage> --help`` names: a change to one reruns the stage, and a change to
    another does not."""
    spec = STAGE_SPECS[stage].get("do", STAGE_SPECS[stage])
    assert set(TOP_LEVEL[stage]) == set(spec["params"]) & {f.name for f in dataclasses.fields(Common)}
    assert set(spec["params"]) == {stage, *TOP_LEVEL[stage]}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_names_exit_3_where_the_stage_runs_a_data_gate(
    stage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mcf teacher --help`` and ``mcf pretrain --help`` listed "3 a data gate failed", which neither can
    exit with: they run no gate (they read the subset's gated shards)."""
    runs_a_gate = bool(_suites(_closure(STAGES[stage][0].split(":")[0]) - PLUMBING))
    assert (stage in GATED) == runs_a_gate
    with pytest.raises(SystemExit):
        cli.main([stage, "--help"])
    assert ("3 a data gate failed" in " ".join(capsys.readouterr().out.split())) == runs_a_gate


def test_closure_follows_function_level_imports() -> None:
    """The check itself: the CLI imports stage modules by name only, inside functions."""
    assert "mcf/data/sources/s3.py" in _closure("mcf.data.fetch")
    assert "mcf/data/transforms.py" in _closure("mcf.evaluate.evaluate")
    assert _suites(_closure("mcf.evaluate.evaluate")) == {
        "mcf/validate/suites/aflw19.json", "mcf/validate/suites/lapa.json"}
    # finetune names its suite through a variable: a suite dropped from its deps went unnoticed
    assert _suites(_closure("mcf.train.finetune")) == {
        "mcf/validate/suites/aflw19.json", "mcf/validate/suites/lapa.json"}
