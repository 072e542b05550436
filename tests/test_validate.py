"""The data gate: a good fetch manifest passes, corrupt ones fail naming the expectation, docs build."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import get_args, get_type_hints

import pandas as pd
import pytest
import yaml
from conftest import contract_types, suite_types

from mcf.cli import main as cli_main
from mcf.data.crop import CropConfig
from mcf.data.fetch import FetchConfig
from mcf.data.sources.image import STATUSES
from mcf.data.subset import SubsetConfig
from mcf.errors import GateError, StageError
from mcf.validate import gate


@pytest.fixture(autouse=True)
def _results_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate keeps results relative to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": ["a", "b", "c"],
            "path": ["images/a.jpg", "images/b.png", None],
            "status": ["success", "success", "http_error"],
            "error": [None, None, "HTTP 404"],
            "sha256": ["0" * 64, "f" * 64, None],
            "width": [64, 32, 0],
            "height": [48, 32, 0],
            "caption": ["a face", "", "gone"],
            "source": ["laion-face"] * 3,
            "url": ["http://x/a", "http://x/b", "http://x/c"],
        }
    )


def _failure(df: pd.DataFrame) -> str:
    with pytest.raises(StageError) as err:
        gate.run_gate(df, "fetch", stage="fetch")
    return str(err.value)


def test_good_manifest_passes_and_stores_result() -> None:
    """The result is kept under the suite's name, run_name the stage that ran it (evaluate runs the aflw19
    suite: the fetch suite in stage fetch could not tell the two apart)."""
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    stored = json.loads((gate.RESULTS_DIR / "fetch.json").read_text())
    assert stored["success"] is True
    assert stored["meta"]["run_id"]["run_name"] == "fetch"
    assert (gate.RESULTS_DIR.parent / ".gitignore").read_text().strip().endswith("*")
    gate.run_gate(_aflw19_table(), "aflw19", stage="evaluate")
    stored = json.loads((gate.RESULTS_DIR / "aflw19.json").read_text())
    assert stored["meta"]["run_id"]["run_name"] == "evaluate"


def test_a_result_that_cannot_be_kept_does_not_fail_a_good_gate(caplog: pytest.LogCaptureFixture) -> None:
    """The stored result is only for the report and Data Docs: a checkout where ``.mcf/validation`` cannot
    be written (here ``.mcf`` is a file) must warn, not fail a stage whose data passed its gate."""
    gate.RESULTS_DIR.parent.write_text("not a folder")
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    assert "could not keep the validation result of fetch" in caplog.text


def test_missing_sha256_on_success_fails() -> None:
    df = _manifest()
    df.loc[1, "sha256"] = None
    msg = _failure(df)
    assert "stage 'fetch'" in msg
    assert "expect_column_values_to_not_be_null(column=sha256, where status == success)" in msg
    assert "1 unexpected" in msg


def test_duplicate_id_and_bad_status_are_each_listed() -> None:
    df = _manifest()
    df.loc[1, "sample_id"] = "a"
    df.loc[2, "status"] = "exploded"
    msg = _failure(df)
    assert "expect_column_values_to_be_unique(column=sample_id): 2 unexpected of 3, e.g. ['a', 'a']\n" in msg
    assert "expect_column_values_to_be_in_set(column=status): 1 unexpected of 3, e.g. ['exploded']" in msg


def test_failed_checks_name_their_rows_by_id() -> None:
    df = _manifest()
    df.loc[1, "sha256"] = None
    msg = _failure(df)
    check = "(column=sha256, where status == success): 1 unexpected of 2, e.g. [None]"
    assert f"{check} (sample_id: ['b'])" in msg
    msg = _failure(df.drop(columns=["sample_id"]))  # no id column: the other checks still run
    assert msg.endswith(check)


def test_a_failed_check_shows_five_examples_and_their_rows() -> None:
    """Seven successes without a hash: the line counts all seven and shows the first five (EXAMPLES), each
    with its row's id; the failing rows of the manifest's three would not tell five from fewer."""
    df = pd.concat([_manifest().iloc[[0]]] * 7, ignore_index=True).assign(sample_id=list("defghij"),
                                                                         sha256=None)
    check = "(column=sha256, where status == success): 7 unexpected of 7, e.g. [None, None, None, None, None]"
    assert f"{check} (sample_id: ['d', 'e', 'f', 'g', 'h'])" in _failure(df)


def test_a_failed_null_check_names_its_rows_too() -> None:
    """GX leaves ``unexpected_index_column_names`` out of an ``expect_column_values_to_be_null`` result
    (its index list still holds the ids), so an error on a success named the message, not the image."""
    df = _manifest()
    df.loc[1, "error"] = "HTTP 500"
    assert "where status == success): 1 unexpected of 2, e.g. ['HTTP 500'] (sample_id: ['b'])" in _failure(df)


def test_every_suite_has_an_id_column_it_expects() -> None:
    for name in gate.suite_names():
        spec = json.loads((gate.SUITES_DIR / f"{name}.json").read_text())
        columns = next(e for e in spec["expectations"] if e["type"] == "expect_table_columns_to_match_set")
        assert gate.ID_COLUMNS[name] in columns["kwargs"]["column_set"], name


@pytest.mark.parametrize("row", [1, 2])  # a success, a failure
def test_a_null_size_fails(row: int) -> None:
    """A range check skips nulls (GX), so a null width passed for a success and for a failure (0 there)."""
    df = _manifest().astype({"width": "Int64"})
    df.loc[row, "width"] = None
    assert "expect_column_values_to_not_be_null(column=width): 1 unexpected" in _failure(df)


def test_no_success_at_all_fails() -> None:
    df = _manifest().iloc[[2]]
    msg = _failure(df)  # says which value is missing, not GX's observed_value (always None for this check)
    assert msg.endswith("expect_column_distinct_values_to_contain_set(column=status): no row has ['success']")


def test_the_report_lists_a_failed_gate_as_the_stage_said_it(tmp_path: Path) -> None:
    """One ``describe`` for both: the stage's error lines and the report's gate table, which reads the
    result the gate stored (a distinct-values check printed GX's "observed None" in the report)."""
    from mcf.report.runfiles import Run, read_gates

    with pytest.raises(StageError) as err:
        gate.run_gate(_manifest().iloc[[2]].drop(columns=["sha256"]), "fetch", stage="fetch")
    said = [line.removeprefix("  - ") for line in str(err.value).splitlines()[1:]]
    [stored] = read_gates(Run(tmp_path, tmp_path / "params.yaml", {}))
    assert stored.failures == said and any(f.endswith("no row has ['success']") for f in said)


def test_missing_column_is_reported_not_crashed() -> None:
    msg = _failure(_manifest().drop(columns=["sha256"]))
    assert "expect_table_columns_to_match_set(): observed" in msg and "'missing': ['sha256']" in msg
    assert "column=sha256, where status == success): raised" in msg
    assert '(column=sha256, type str): raised column "sha256" does not exist' in msg  # not GX's IndexError


def test_suite_status_and_source_sets_match_the_code() -> None:
    suite = json.loads((gate.SUITES_DIR / "fetch.json").read_text())
    sets = {e["kwargs"]["column"]: e["kwargs"]["value_set"] for e in suite["expectations"]
            if e["type"] == "expect_column_values_to_be_in_set"}
    assert sets == {"status": list(STATUSES), "source": list(get_args(get_type_hints(FetchConfig)["source"]))}


def test_unknown_suite_and_invalid_expectation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        gate.load_suite("nope")
    (tmp_path / "bad.json").write_text(json.dumps({"expectations": [{"type": "expect_it_to_work"}]}))
    monkeypatch.setattr(gate, "SUITES_DIR", tmp_path)
    with pytest.raises(ValueError, match="expectation 0 .*expect_it_to_work"):
        gate.load_suite("bad")


def test_cli_validates_a_parquet_and_builds_docs(tmp_path: Path) -> None:
    bad = _manifest()
    bad.loc[0, "width"] = 0
    bad.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(GateError):
        gate.run_gate(bad, "fetch", stage="fetch")  # the pipeline's record, for the report and the docs
    _manifest().to_parquet(tmp_path / "good.parquet")
    assert gate.cli(["fetch", str(tmp_path / "good.parquet")]) == 0  # a run by hand does not replace it
    stored = json.loads((gate.RESULTS_DIR / "fetch.json").read_text())
    assert stored["success"] is False and stored["meta"]["run_id"]["run_name"] == "fetch"
    with pytest.raises(GateError, match="(?s)stage 'validate'.*column=width"):
        gate.cli(["fetch", str(tmp_path / "bad.parquet")])
    assert cli_main(["validate", "fetch", str(tmp_path / "bad.parquet")]) == 3  # not retried by the flow
    assert gate.cli(["--docs", "--out", str(tmp_path / "docs")]) == 0
    index = (tmp_path / "docs" / "index.html").read_text()
    assert "fetch" in index
    pages = list((tmp_path / "docs" / "validations" / "fetch").rglob("*.html"))
    assert len(pages) == 1
    page = pages[0].read_text()
    assert "<html" in page and "values must be greater than or equal to" in page
    assert "1 unexpected values found" in page


def test_docs_out_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    (tmp_path / "docs").write_text("")
    with pytest.raises(SystemExit) as exit_:
        gate.cli(["--docs", "--out", str(tmp_path / "docs")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--out: {tmp_path / 'docs'} exists and holds no {gate.DOCS_SIGN}" in err


def test_docs_out_under_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An --out below a file (a typo'd parent) ended in GX's FileExistsError traceback, after GX had logged
    one per page it tried; now refused before GX runs, naming the file, exit 2 as an --out that is a file."""
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit) as exit_:
        gate.cli(["--docs", "--out", str(tmp_path / "notes.txt" / "docs")])
    err = capsys.readouterr().err
    out = tmp_path / "notes.txt" / "docs"
    assert exit_.value.code == 2 and f"--out: cannot write {out}: {tmp_path / 'notes.txt'} is a file\n" in err
    assert "Traceback" not in err


def _docs_files(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("out", ["HOME", ".", "SITE"])
def test_docs_refuse_an_out_that_holds_other_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> None:
    """`--out ~` or `--out .` mixed Data Docs into that folder, over any index.html or static/ already
    there; now a folder that is neither new, empty nor an earlier Data Docs build is refused before GX
    runs, in one line naming it, exit 2, and left as it was (a web site with its own index.html too)."""
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    home, site = tmp_path / "home", tmp_path / "site"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("keep me")
    (site / "static").mkdir(parents=True)
    (site / "index.html").write_text("<html>my site</html>")
    folder = {"HOME": home, ".": Path("."), "SITE": site}[out]
    before = _docs_files(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        gate.cli(["--docs", "--out", str(folder)])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and f"mcf validate: error: --out: {folder} " in line
    assert ("holds the working folder" if out == "." else "is not an earlier output") in line
    assert _docs_files(tmp_path) == before and "Traceback" not in err


def test_docs_replace_an_earlier_build_whole_and_fill_an_empty_folder(tmp_path: Path) -> None:
    """An empty folder is taken, and an earlier build (GX's own layout in it) replaced whole: GX built into
    it, read the pages there and ended in an IndexError traceback on a file it had not written."""
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    (tmp_path / "docs").mkdir()
    assert gate.cli(["--docs", "--out", "docs"]) == 0
    (tmp_path / "docs" / "validations" / "notes.html").write_text("not a page GX wrote")
    assert gate.cli(["--docs", "--out", "docs"]) == 0
    assert not (tmp_path / "docs" / "validations" / "notes.html").exists()
    assert "fetch" in (tmp_path / "docs" / "index.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".docs")) == []


def test_docs_interrupted_leave_the_earlier_build_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GX wrote its pages straight into --out: a build stopped half-way (Ctrl-C, a full disk) left a mix
    of old and new pages. Now it is built beside --out and swapped in whole."""
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    assert gate.cli(["--docs", "--out", "docs"]) == 0
    before = _docs_files(tmp_path / "docs")
    gate.run_gate(_manifest(), "fetch", stage="fetch")  # a newer result: new pages, a new index
    build = gate._context

    def interrupted() -> object:
        context = build()

        def build_then_stop(**kwargs: object) -> None:
            type(context).build_data_docs(context, **kwargs)
            raise KeyboardInterrupt

        context.build_data_docs = build_then_stop
        return context

    monkeypatch.setattr(gate, "_context", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gate.cli(["--docs", "--out", "docs"])
    assert _docs_files(tmp_path / "docs") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".docs")] == []


@pytest.mark.parametrize(("damage", "cause"), [
    (lambda d: "{", "JSONDecodeError"),
    (lambda d: [d], "ValidationError"),
    (lambda d: {**d, "statistics": [1]}, "ValidationError: {'statistics': ['Not a valid mapping type.']}"),
    (lambda d: {k: v for k, v in d.items() if k != "success"}, "TypeError"),
    (lambda d: {**d, "meta": {**d["meta"], "run_id": ["fetch"]}}, "ValueError: meta.run_id is not an object"),
])
def test_docs_of_a_damaged_stored_result_is_one_line(
    tmp_path: Path, damage: Callable[[dict], object], cause: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stored result cut short or hand-edited ended `mcf validate --docs` in a JSONDecodeError,
    marshmallow ValidationError, TypeError or AttributeError traceback; now one line naming it, exit 1."""
    gate.run_gate(_manifest(), "fetch", stage="fetch")
    path = gate.RESULTS_DIR / "fetch.json"
    damaged = damage(json.loads(path.read_text()))
    path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    assert cli_main(["validate", "--docs", "--out", str(tmp_path / "docs")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mcf validate: {path}: not a gate result as a stage stores it ({cause}")
    assert "\n" not in err and "delete it, or run the stage" in err


def test_docs_without_stored_results_say_what_stores_one(tmp_path: Path) -> None:
    """A gate run by hand stores nothing (the pipeline's record stays), so the hint names the stages."""
    _manifest().to_parquet(tmp_path / "good.parquet")
    assert gate.cli(["fetch", str(tmp_path / "good.parquet")]) == 0
    with pytest.raises(StageError, match=r"run a stage \(mcf fetch, crop, subset, finetune_\*, evaluate\) "
                       r"first; `mcf validate SUITE PARQUET` stores no result") as err:
        gate.cli(["--docs", "--out", str(tmp_path / "docs")])
    assert "or `mcf validate` first" not in str(err.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["fetchh", "GOOD"], "unknown suite 'fetchh' (known: aflw19, crop, fetch, lapa, subset)"),
     (["fetch", "TEXT"], "not a readable parquet file"),
     (["fetch", "DIR"], "is a folder, not a parquet file: give the file itself"),  # not "no such file"
     (["fetch", "GOOD", "--docs"], "--docs builds the docs alone")],  # not a skipped gate and exit 0
)
def test_cli_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _manifest().to_parquet(tmp_path / "good.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    (tmp_path / "dir").mkdir()
    names = {"GOOD": str(tmp_path / "good.parquet"), "TEXT": str(tmp_path / "text.parquet"),
             "DIR": str(tmp_path / "dir")}
    with pytest.raises(SystemExit) as exit_:
        gate.cli([names.get(a, a) for a in args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_stage_out_folder_given_as_parquet_names_its_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The folder a stage writes (crop.out) given for PARQUET: the usage error names the manifest in it."""
    (tmp_path / "crop").mkdir()
    _manifest().to_parquet(tmp_path / "crop" / "manifest.parquet")
    with pytest.raises(SystemExit) as exit_:
        gate.cli(["fetch", str(tmp_path / "crop")])
    assert exit_.value.code == 2
    assert (f"{tmp_path / 'crop'} is a folder, not a parquet file: give the file itself, such as "
            f"{tmp_path / 'crop' / 'manifest.parquet'}\n") in capsys.readouterr().err


def test_every_suite_says_what_it_checks_and_derived_columns_are_kept() -> None:
    assert set(gate.TARGETS) == set(gate.suite_names())
    given = pd.DataFrame({"width": [64], "height": [64], "width_off": [5], "height_off": [5]})
    assert gate.derive(given, "crop") is given  # no config needed: nothing is recomputed
    with pytest.raises(ValueError, match="needs the crop section"):
        gate.derive(given.drop(columns=["width_off"]), "crop")
    bare = pd.DataFrame({"crop_id": ["a"]})  # no sizes: left to the suite, which names the missing columns
    assert gate.derive(bare, "crop", CropConfig()) is bare
    with pytest.raises(GateError, match='column "width" does not exist|width'):
        gate.run_gate(bare, "crop", stage="validate", config=CropConfig(), keep=False)


@pytest.mark.parametrize("suite", ["crop", "subset"])
def test_sizes_stored_as_text_fail_the_gate_naming_them(suite: str, tmp_path: Path) -> None:
    """A table written by other code (a hand-run ``mcf validate``) with sizes as strings: exit 3, one line."""
    table = GOOD[suite]().astype({"width": str})
    with pytest.raises(GateError, match=f"data gate '{suite}': width and height must be numbers, got "
                       "width object, height"):
        gate.run_gate(table, suite, stage="validate", config=_gate_config(suite, tmp_path), keep=False)


def _crop_manifest() -> pd.DataFrame:
    """A crop manifest (with what was read back) the crop suite passes: one kept crop, one rejected."""
    return pd.DataFrame({
        "crop_id": ["a_0", "b_0"], "sample_id": ["a", "b"], "face": [0, 0], "status": ["kept", "rejected"],
        "reason": [None, "blurry"], "detector": ["table", "table"], "box": ["1,2,60,62"] * 2,
        "landmarks": ["..."] * 2, "score": [0.9, 0.8], "face_size": [60.0, 50.0], "blur": [80.0, 1.0],
        "phash": ["0123456789abcdef", "fedcba9876543210"], "shard": ["crops-000000.tar", None],
        "width": pd.array([64, None], "Int64"), "height": pd.array([64, None], "Int64"),  # as read back
        "mean": [120.0, None], "std": [40.0, None],
    })


def _subset_manifest() -> pd.DataFrame:
    """A subset manifest the subset suite passes (the crop manifest above has its sizes): its kept row,
    every column kept (docs/CONTRACTS.md: the chosen rows of the crop manifest, same columns)."""
    return _crop_manifest().iloc[[0]]


def _aflw19_table() -> pd.DataFrame:
    return pd.DataFrame({
        "name": ["0/a.jpg", "0/b.jpg"], "split": ["full"] * 2, "exists": [True] * 2, "decodes": [True] * 2,
        "width": [100, 80], "height": [90, 80], "box_left": [10.0] * 2, "box_right": [60.0] * 2,
        "box_top": [5.0] * 2, "box_bottom": [70.0] * 2, "box_w": [50.0] * 2, "box_h": [65.0] * 2,
        "centre_in_box": [True] * 2,
        "x_min": [0.1] * 2, "x_max": [0.6] * 2, "y_min": [0.1] * 2, "y_max": [0.7] * 2, "visible": [19, 15],
        "finite": [True] * 2, "eye_gap": [30.0, 24.0],
    })


def _lapa_table() -> pd.DataFrame:
    return pd.DataFrame({
        "stem": ["a", "b"], "split": ["test"] * 2, "has_image": [True] * 2, "has_label": [True] * 2,
        "has_landmarks": [True] * 2, "image_decodes": [True] * 2, "width": [64, 80], "height": [64, 70],
        "label_width": [64, 80], "label_height": [64, 70], "size_match": [True] * 2,
        "label_format_ok": [True] * 2, "label_min": [0, 0], "label_max": [10, 9], "n_landmarks": [106, 106],
        "x_min": [0.1] * 2, "x_max": [0.9] * 2, "y_min": [0.05] * 2, "y_max": [1.02] * 2,
    })


GOOD = {"fetch": _manifest, "crop": _crop_manifest, "subset": _subset_manifest, "aflw19": _aflw19_table,
        "lapa": _lapa_table}


def _gate_config(suite: str, tmp_path: Path) -> CropConfig | SubsetConfig | None:
    """The params section the size checks read; for a subset, the crop manifest it is compared with."""
    if suite == "subset":
        _crop_manifest().to_parquet(tmp_path / "manifest.parquet")
        return SubsetConfig(input=str(tmp_path))
    return CropConfig(size=64) if suite == "crop" else None


def _set(column: str, row: int, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row, column] = value
        return df
    return change


@pytest.mark.parametrize(
    ("suite", "column", "value"),
    [("fetch", "sha256", "0" * 64), ("crop", "crop_id", "a_0"), ("crop", "shard", "crops-000000.tar")],
)
def test_a_value_with_a_trailing_newline_fails_its_regex(
    suite: str, column: str, value: str, tmp_path: Path
) -> None:
    """GX matches with ``str.contains`` (``re.search``), where ``$`` also matches before a final newline,
    so ``'a_0\\n'`` passed ``^[A-Za-z0-9_-]+$`` as a crop_id; the suites end their patterns with ``\\Z``."""
    table = _set(column, 0, value + "\n")(GOOD[suite]())
    with pytest.raises(GateError, match=rf"expect_column_values_to_match_regex\(column={column}\b"):
        gate.run_gate(table, suite, stage="test", config=_gate_config(suite, tmp_path), keep=False)
    for name in gate.suite_names():
        spec = json.loads((gate.SUITES_DIR / f"{name}.json").read_text())
        for e in spec["expectations"]:
            assert not e["kwargs"].get("regex", r"\Z").endswith("$"), (name, e["kwargs"]["column"])


@pytest.mark.parametrize("suite", sorted(GOOD))
def test_each_suite_passes_a_good_table(suite: str, tmp_path: Path) -> None:
    gate.run_gate(GOOD[suite](), suite, stage="test", config=_gate_config(suite, tmp_path), keep=False)


@pytest.mark.parametrize(
    ("suite", "breakage", "check"),
    [
        ("fetch", _set("error", 0, "HTTP 500"),
         "expect_column_values_to_be_null(column=error, where status == success)"),
        ("fetch", _set("sha256", 2, "0" * 64),
         "expect_column_values_to_be_null(column=sha256, where status != success)"),
        ("fetch", _set("path", 0, "/etc/a.jpg"),
         "expect_column_values_to_match_regex(column=path, where status == success)"),
        ("fetch", _set("caption", 1, None), "expect_column_values_to_not_be_null(column=caption)"),
        ("fetch", _set("source", 0, "ftp"), "expect_column_values_to_be_in_set(column=source)"),
        ("crop", _set("reason", 0, "duplicate"),
         "expect_column_values_to_be_null(column=reason, where status == kept)"),
        ("crop", _set("face_size", 0, 23.5),
         "expect_column_values_to_be_between(column=face_size_margin, where status == kept)"),
        ("crop", _set("score", 0, 0.89),
         "expect_column_values_to_be_between(column=score_margin, where status == kept)"),
        ("crop", _set("blur", 1, 20.0),
         "expect_column_values_to_be_between(column=blur_margin, where reason == blurry)"),
        ("crop", lambda df: df.iloc[[1]], "expect_column_distinct_values_to_contain_set(column=status)"),
        ("crop", lambda df: _set("face", 1, None)(df.astype({"face": "Int64"})),
         "expect_column_values_to_not_be_null(column=face)"),
        ("crop", _set("detector", 0, None),
         "expect_column_values_to_not_be_null(column=detector, where status == kept)"),
        ("crop", _set("detector", 1, None),
         "expect_column_values_to_not_be_null(column=detector, where reason IN "
         "['outside_image', 'bad_landmarks', 'too_small', 'low_score', 'blurry', 'duplicate'])"),
        ("crop", _set("face_size", 0, None),
         "expect_column_values_to_not_be_null(column=face_size, where status == kept)"),
        ("crop", _set("height", 0, 63), "expect_column_values_to_be_between(column=height_off)"),
        ("subset", lambda df: pd.concat([df, df]), "expect_column_values_to_be_unique(column=crop_id)"),
        ("subset", _set("status", 0, "rejected"), "expect_column_values_to_be_in_set(column=status)"),
        ("subset", _set("face", 0, -1), "expect_column_values_to_be_between(column=face)"),
        ("subset", lambda df: df.drop(columns=["landmarks"]), "expect_table_columns_to_match_set()"),
        ("aflw19", _set("x_max", 1, float("nan")), "expect_column_values_to_not_be_null(column=x_max)"),
        ("aflw19", _set("eye_gap", 0, 0.0), "expect_column_values_to_be_between(column=eye_gap)"),
        ("aflw19", _set("centre_in_box", 1, False),
         "expect_column_values_to_be_in_set(column=centre_in_box)"),
        ("lapa", _set("n_landmarks", 1, 98), "expect_column_values_to_be_between(column=n_landmarks)"),
        ("lapa", _set("x_max", 1, 9.0), "expect_column_values_to_be_between(column=x_max)"),
    ],
)
def test_each_suite_refuses_what_its_notes_rule_out(
    suite: str, breakage: Callable[[pd.DataFrame], pd.DataFrame], check: str, tmp_path: Path
) -> None:
    """One break per case, refused by the one expectation meant for it: a success with an error, a failure
    with a hash, a success's file outside images/, a null caption (docs/CONTRACTS.md: "" when none), a
    source fetch has not, a kept crop with a reason, a kept crop below crop.min_face_size or crop.min_score
    (0.9: 0.9 itself passes, as in the crop stage), a crop rejected as blurry whose blur reaches
    crop.min_blur, no kept crop, a face without its index (nullable
    Int64, or the null would also make it a float column and fail the type check too), a kept crop
    without its detector or face size (the subset gate requires it of the same rows), a blurry face without
    its detector (docs/CONTRACTS.md: null only for an undecodable image), a crop of the wrong
    height only, a crop chosen twice, a rejected crop in a subset, a negative face index or a crop column
    dropped in a subset (landmarks, which only the column set names), a NaN landmark extreme (a range check
    skips it), a LaPa face short of 106 landmarks."""
    with pytest.raises(GateError) as err:
        gate.run_gate(breakage(GOOD[suite]()), suite, stage="test", config=_gate_config(suite, tmp_path),
                      keep=False)
    assert "failed 1 of" in str(err.value) and f"  - {check}" in str(err.value)


def test_a_crop_manifest_with_repeated_ids_fails_the_subset_gate_by_hand_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The subset gate looks up each crop's size in the crop manifest by crop_id. The crop gate refuses a
    manifest that repeats one before any subset is drawn, but `mcf validate subset` can be pointed at one:
    pandas' InvalidIndexError ended it in a traceback. It is the gate failing (exit 3) on one line."""
    crop = pd.concat([_crop_manifest(), _crop_manifest().iloc[[0]]], ignore_index=True)
    (tmp_path / "crop").mkdir()
    crop.to_parquet(tmp_path / "crop" / "manifest.parquet")
    _subset_manifest().to_parquet(tmp_path / "subset.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"subset": {"input": str(tmp_path / "crop")}}))
    args = ["validate", "--params", str(tmp_path / "params.yaml"), "subset", str(tmp_path / "subset.parquet")]
    assert cli_main(args) == 3
    err = capsys.readouterr().err
    path = tmp_path / "crop" / "manifest.parquet"
    assert err == (f"mcf validate: data gate 'subset': the crop manifest {path} repeats crop_id ['a_0'], "
                   "so the size each crop should have is unknown; "
                   "`mcf validate crop` on it lists what else is wrong\n")


def test_a_missing_crop_manifest_names_the_params_file_subset_input_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mcf validate subset --params FILE` with no crop manifest where FILE's subset.input points: the line
    named the key but not FILE, as a stage's params errors do (here FILE is not params.yaml). Exit 2."""
    _subset_manifest().to_parquet(tmp_path / "subset.parquet")
    params = tmp_path / "other.yaml"
    params.write_text(yaml.safe_dump({"subset": {"input": str(tmp_path / "crop")}}))
    args = ["validate", "--params", str(params), "subset", str(tmp_path / "subset.parquet")]
    assert cli_main(args) == 2
    assert capsys.readouterr().err == (f"mcf: invalid params: {params}: subset.input: path does not exist: "
                                       f"{tmp_path / 'crop' / 'manifest.parquet'} (run `mcf crop` first)\n")


@pytest.mark.parametrize("crop", ["not parquet", "no width"])
def test_a_crop_manifest_the_subset_gate_cannot_read_is_one_line(
    crop: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mcf validate subset` reads crop_id, width and height from the crop manifest subset.input names: a
    file that is not parquet, or one without those columns, was pyarrow's ArrowInvalid traceback (the
    latter with the whole schema). It is the gate failing (exit 3) on one line naming the file."""
    (tmp_path / "crop").mkdir()
    path = tmp_path / "crop" / "manifest.parquet"
    if crop == "not parquet":
        path.write_text("junk")
    else:
        _crop_manifest().drop(columns=["width"]).to_parquet(path)
    _subset_manifest().to_parquet(tmp_path / "subset.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"subset": {"input": str(tmp_path / "crop")}}))
    args = ["validate", "--params", str(tmp_path / "params.yaml"), "subset", str(tmp_path / "subset.parquet")]
    assert cli_main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"mcf validate: data gate 'subset': cannot read crop_id, width and height from the "
                          f"crop manifest {path} (ArrowInvalid: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("width", [64.5, "wide"])
def test_a_crop_manifest_size_that_is_no_whole_number_fails_the_subset_gate_by_hand_on_one_line(
    width: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mcf validate subset` takes each crop's size from the crop manifest subset.input names: one written by
    other code with a width of 64.5 or text ended in pandas' TypeError or ValueError traceback. The crop gate
    refuses such a manifest; here it is the subset gate failing (exit 3) on one line naming the file."""
    (tmp_path / "crop").mkdir()
    _crop_manifest().assign(width=[width, None]).to_parquet(tmp_path / "crop" / "manifest.parquet")
    _subset_manifest().to_parquet(tmp_path / "subset.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"subset": {"input": str(tmp_path / "crop")}}))
    args = ["validate", "--params", str(tmp_path / "params.yaml"), "subset", str(tmp_path / "subset.parquet")]
    assert cli_main(args) == 3
    path = tmp_path / "crop" / "manifest.parquet"
    kind = "float64" if isinstance(width, float) else "object"
    assert capsys.readouterr().err == (
        f"mcf validate: data gate 'subset': the crop manifest {path} holds sizes that are no whole numbers "
        f"(width {kind}, height Int64), so the size each crop should have is unknown; "
        "`mcf validate crop` on it lists what else is wrong\n")


def _as(kind: str) -> Callable[[pd.Series], pd.Series]:
    return lambda column: column.astype(kind)


@pytest.mark.parametrize(
    ("suite", "column", "change"),
    [
        ("fetch", "width", _as("float64")),
        ("fetch", "sample_id", lambda c: pd.Series(range(len(c)))),
        ("fetch", "caption", lambda c: pd.Series(range(len(c)))),
        ("crop", "face", _as("float64")),
        ("crop", "face", _as("bool")),
        ("crop", "width", _as("float64")),
        ("crop", "score", lambda c: pd.Series([1, 0])),
        ("crop", "sample_id", lambda c: pd.Series([1, 2])),
        ("subset", "face", _as("float64")),
        ("subset", "height", _as("float64")),
        ("subset", "sample_id", lambda c: pd.Series([7], index=c.index)),
        ("aflw19", "exists", _as("int64")),
        ("aflw19", "finite", _as("int64")),
        ("aflw19", "visible", _as("float64")),
        ("lapa", "has_image", _as("int64")),
        ("lapa", "n_landmarks", _as("float64")),
        ("lapa", "width", _as("float64")),
    ],
)
def test_a_column_of_the_wrong_type_fails_its_type_check(
    suite: str, column: str, change: Callable[[pd.Series], pd.Series], tmp_path: Path
) -> None:
    """docs/CONTRACTS.md gives each column's type (the aflw19 and lapa tables: their ``table()``), and each
    of these passed every other check: a float size or face index compares with 0, an int id is unique and
    non-null, a 0/1 int is ``in [true]`` (``1 == True``). The table went on with the wrong type."""
    table = GOOD[suite]()
    table[column] = change(table[column])
    with pytest.raises(GateError) as err:
        gate.run_gate(table, suite, stage="test", config=_gate_config(suite, tmp_path), keep=False)
    assert "failed 1 of" in str(err.value)
    assert f"  - expect_column_values_to_be_of_type(column={column}" in str(err.value)


def test_a_face_index_stored_as_text_names_its_type() -> None:
    """A string ``face`` failed before only as a range check that raised on comparing text with 0."""
    table = _crop_manifest().astype({"face": str})
    with pytest.raises(GateError, match=r"expect_column_values_to_be_of_type\(column=face, type int64\): "
                       r"2 unexpected of 2, e\.g\. \['0', '0'\]"):
        gate.run_gate(table, "crop", stage="test", config=CropConfig(size=64), keep=False)


@pytest.mark.parametrize(("suite", "heading"), [("fetch", "fetch"), ("crop", "crop"), ("subset", "crop")])
def test_type_checks_follow_the_contract(suite: str, heading: str) -> None:
    """Every scalar column docs/CONTRACTS.md types is type-checked, as the pandas name of its Arrow type."""
    pandas_name = {"string": "str", "double": "float64", "int64": "int64"}
    documented = {c: pandas_name[t] for c, t in contract_types(f"{heading}: `manifest.parquet`").items()
                  if not t.startswith("list")}
    assert suite_types(suite) == documented


@pytest.mark.parametrize(
    "cond",
    [{"type": "comparison", "column": "status", "operator": "==", "parameter": "success"},
     {"type": "comparison", "column": ["status"], "operator": "==", "parameter": "success"},
     {"type": "comparison", "column": None}, {"type": "comparison", "column": {}}, {"type": "comparison"}],
)
def test_a_hand_edited_row_condition_is_described_not_crashed(cond: dict) -> None:
    """`mcf report` reads the stored results; a row_condition's column that is no ``{"name": ...}`` raised
    TypeError (or KeyError) there, which the report does not turn into a note: it is printed as it is."""
    item = {"success": False, "expectation_config": {
        "type": "expect_column_values_to_not_be_null", "kwargs": {"column": "path", "row_condition": cond}}}
    assert gate.describe(item).startswith(f"expect_column_values_to_not_be_null(column=path, where {cond})")


def test_an_empty_split_fails_the_gate_on_its_row_count_alone(tmp_path: Path) -> None:
    """A LaPa split folder with no files (a copy cut short) gave table() a frame without columns, so the
    gate listed all 26 expectations, 25 as 'column ... does not exist', hiding the one that says why."""
    from mcf.data.lapa import LaPaConfig
    from mcf.data.lapa import table as lapa_table

    for sub in ("images", "labels", "landmarks"):
        (tmp_path / "LaPa" / "test" / sub).mkdir(parents=True)
    with pytest.raises(GateError) as err:
        gate.run_gate(lapa_table(LaPaConfig(root=str(tmp_path)), "test"), "lapa", stage="test", keep=False)
    assert "failed 1 of" in str(err.value)
    assert str(err.value).endswith("expectations on 0 rows:\n"
                                   "  - expect_table_row_count_to_be_between(): observed 0"), str(err.value)


@pytest.mark.parametrize(("suite", "column"), [
    ("aflw19", "exists"), ("aflw19", "decodes"), ("aflw19", "finite"), ("aflw19", "width"),
    ("aflw19", "visible"),
    ("lapa", "stem"), ("lapa", "has_image"), ("lapa", "image_decodes"), ("lapa", "size_match"),
    ("lapa", "label_format_ok"), ("lapa", "width"), ("lapa", "label_max"), ("lapa", "n_landmarks"),
])
def test_a_null_flag_or_count_fails_its_not_null_check(suite: str, column: str) -> None:
    """``in [true]`` and range checks skip nulls (GX), and a bool column holding a null is an object
    column whose other values are bool, so a row of unknown existence, decode, size match or landmark
    count passed every check (as a NaN coordinate did before 964436d)."""
    table = GOOD[suite]()
    kind = "Int64" if pd.api.types.is_integer_dtype(table[column]) else object
    table[column] = table[column].astype(kind)
    table.loc[1, column] = None
    with pytest.raises(GateError) as err:
        gate.run_gate(table, suite, stage="test", keep=False)
    assert "failed 1 of" in str(err.value)
    assert f"  - expect_column_values_to_not_be_null(column={column}): 1 unexpected" in str(err.value)


# Suite -> (row of its good table each broken row starts from, changes, the checks the notes say catch them).
BREAKS: dict[str, list[tuple[int, dict[str, object], list[str]]]] = {
    "fetch": [
        (2, {"sample_id": None}, ["expect_column_values_to_not_be_null(column=sample_id)"]),
        (2, {"source": None}, ["expect_column_values_to_not_be_null(column=source)"]),
        (2, {"status": None}, ["expect_column_values_to_not_be_null(column=status)"]),
        (2, {"height": None}, ["expect_column_values_to_not_be_null(column=height)"]),
        (0, {"sha256": "1" * 64}, ["expect_column_values_to_be_unique(column=path)"] * 2),  # a's path: 2 rows
        (1, {"path": "images/z.png", "width": 0},
         ["expect_column_values_to_be_between(column=width, where status == success)"]),
        (2, {"path": "images/c.jpg"},
         ["expect_column_values_to_be_null(column=path, where status != success)"]),
        (2, {"error": None}, ["expect_column_values_to_not_be_null(column=error, where status != success)"]),
        (2, {"width": 5}, ["expect_column_values_to_be_between(column=width, where status != success)"]),
        (2, {"width": -1}, ["expect_column_values_to_be_between(column=width, where status != success)"]),
    ],
    "crop": [
        (0, {"crop_id": None}, ["expect_column_values_to_not_be_null(column=crop_id)"]),
        (0, {"sample_id": None}, ["expect_column_values_to_not_be_null(column=sample_id)"]),
        (1, {"status": None}, ["expect_column_values_to_not_be_null(column=status)"]),
        (0, {"detector": "mtcnn"}, ["expect_column_values_to_be_in_set(column=detector)"]),
        (1, {"reason": None},
         ["expect_column_values_to_not_be_null(column=reason, where status == rejected)"]),
        (1, {"reason": "ugly"}, ["expect_column_values_to_be_in_set(column=reason)"]),
        (0, {"shard": None}, ["expect_column_values_to_not_be_null(column=shard, where status == kept)"]),
        (1, {"shard": "crops-000001.tar"},
         ["expect_column_values_to_be_null(column=shard, where status == rejected)"]),
        (0, {"width": None}, ["expect_column_values_to_not_be_null(column=width, where status == kept)"]),
        (0, {"height": None}, ["expect_column_values_to_not_be_null(column=height, where status == kept)"]),
        (0, {"width": 65}, ["expect_column_values_to_be_between(column=width_off)"]),
        (0, {"width": 63}, ["expect_column_values_to_be_between(column=width_off)"]),
        (0, {"blur": None}, ["expect_column_values_to_not_be_null(column=blur, where status == kept)"]),
        (0, {"phash": None}, ["expect_column_values_to_not_be_null(column=phash, where status == kept)"]),
        (0, {"phash": "0123456789ABCDEF"}, ["expect_column_values_to_match_regex(column=phash)"]),
        (0, {"mean": None}, ["expect_column_values_to_not_be_null(column=mean, where status == kept)"]),
        (0, {"mean": 2.0}, ["expect_column_values_to_be_between(column=mean)"]),
        (0, {"mean": 251.0}, ["expect_column_values_to_be_between(column=mean)"]),
        (0, {"std": None}, ["expect_column_values_to_not_be_null(column=std, where status == kept)"]),
        (0, {"std": 1.0}, ["expect_column_values_to_be_between(column=std)"]),
        (0, {"std": 129.0}, ["expect_column_values_to_be_between(column=std)"]),
        (0, {"score": 1.5}, ["expect_column_values_to_be_between(column=score)"]),
        (1, {"reason": "too_small", "face_size": 24.0},  # crop.min_face_size itself is no shortfall
         ["expect_column_values_to_be_between(column=face_size_margin, where reason == too_small)"]),
        (1, {"reason": "low_score", "score": 0.9},
         ["expect_column_values_to_be_between(column=score_margin, where reason == low_score)"]),
    ],
    "subset": [
        (0, {"sample_id": None}, ["expect_column_values_to_not_be_null(column=sample_id)"]),
        (0, {"status": None}, ["expect_column_values_to_not_be_null(column=status)"]),
        (0, {"shard": None}, ["expect_column_values_to_not_be_null(column=shard)"]),
        (0, {"shard": "crops-1.tar"}, ["expect_column_values_to_match_regex(column=shard)"]),
        (0, {"crop_id": "not_in_crop"}, ["expect_column_values_to_not_be_null(column=width_off)",
                                         "expect_column_values_to_not_be_null(column=height_off)"]),
        (0, {"height": None}, ["expect_column_values_to_not_be_null(column=height)",
                               "expect_column_values_to_not_be_null(column=height_off)"]),
        (0, {"width": 65}, ["expect_column_values_to_be_between(column=width_off)",
                            "expect_column_unique_value_count_to_be_between(column=width)"]),
        (0, {"width": 63}, ["expect_column_values_to_be_between(column=width_off)"]),
        (0, {"crop_id": "other_size", "height": 63},  # the crop manifest says 63 too: only the count sees it
         ["expect_column_unique_value_count_to_be_between(column=height)"]),
        (0, {"mean": None}, ["expect_column_values_to_not_be_null(column=mean)"]),
        (0, {"mean": 251.0}, ["expect_column_values_to_be_between(column=mean)"]),
        (0, {"mean": 2.0}, ["expect_column_values_to_be_between(column=mean)"]),
        (0, {"std": None}, ["expect_column_values_to_not_be_null(column=std)"]),
        (0, {"std": 129.0}, ["expect_column_values_to_be_between(column=std)"]),
        (0, {"std": 1.0}, ["expect_column_values_to_be_between(column=std)"]),
        (0, {"blur": None}, ["expect_column_values_to_not_be_null(column=blur)"]),
        (0, {"phash": None}, ["expect_column_values_to_not_be_null(column=phash)"]),
        (0, {"phash": "0123"}, ["expect_column_values_to_match_regex(column=phash)"]),
    ],
    "aflw19": [
        (0, {"name": None}, ["expect_column_values_to_not_be_null(column=name)"]),
        (0, {"height": None}, ["expect_column_values_to_not_be_null(column=height)"]),
        (0, {"centre_in_box": None}, ["expect_column_values_to_not_be_null(column=centre_in_box)"]),
        (0, {"box_h": None}, ["expect_column_values_to_not_be_null(column=box_h)"]),
        (0, {"y_min": None}, ["expect_column_values_to_not_be_null(column=y_min)"]),
        (0, {"y_max": None}, ["expect_column_values_to_not_be_null(column=y_max)"]),
        (0, {"eye_gap": None}, ["expect_column_values_to_not_be_null(column=eye_gap)"]),
        (0, {"width": 0}, ["expect_column_values_to_be_between(column=width)"]),
        (0, {"height": 0}, ["expect_column_values_to_be_between(column=height)"]),
        (0, {"box_w": 0.0}, ["expect_column_values_to_be_between(column=box_w)"]),
        (0, {"box_h": 0.0}, ["expect_column_values_to_be_between(column=box_h)"]),
        (0, {"x_min": -0.2}, ["expect_column_values_to_be_between(column=x_min)"]),
        (0, {"x_min": 1.2}, ["expect_column_values_to_be_between(column=x_min)"]),
        (0, {"y_min": -0.2}, ["expect_column_values_to_be_between(column=y_min)"]),
        (0, {"y_min": 1.2}, ["expect_column_values_to_be_between(column=y_min)"]),
        (0, {"y_max": 1.2}, ["expect_column_values_to_be_between(column=y_max)"]),
        (0, {"y_max": -0.2}, ["expect_column_values_to_be_between(column=y_max)"]),
        (0, {"x_max": 1.2}, ["expect_column_values_to_be_between(column=x_max)"]),
        (0, {"x_max": -0.2}, ["expect_column_values_to_be_between(column=x_max)"]),
        (0, {"visible": 20}, ["expect_column_values_to_be_between(column=visible)"]),
        (0, {"visible": -1}, ["expect_column_values_to_be_between(column=visible)"]),
    ],
    "lapa": [
        (0, {"has_label": None}, ["expect_column_values_to_not_be_null(column=has_label)"]),
        (0, {"has_landmarks": None}, ["expect_column_values_to_not_be_null(column=has_landmarks)"]),
        (0, {"label_min": None}, ["expect_column_values_to_not_be_null(column=label_min)"]),
        (0, {"stem": "a"}, ["expect_column_values_to_be_unique(column=stem)"] * 2),
        (0, {"has_label": False}, ["expect_column_values_to_be_in_set(column=has_label)"]),
        (0, {"width": 0}, ["expect_column_values_to_be_between(column=width)"]),
        (0, {"label_min": -1}, ["expect_column_values_to_be_between(column=label_min)"]),
        (0, {"label_min": 11}, ["expect_column_values_to_be_between(column=label_min)"]),
        (0, {"label_max": 11}, ["expect_column_values_to_be_between(column=label_max)"]),
        (0, {"label_max": -1}, ["expect_column_values_to_be_between(column=label_max)"]),
        (0, {"x_min": -0.2}, ["expect_column_values_to_be_between(column=x_min)"]),
        (0, {"x_min": 1.2}, ["expect_column_values_to_be_between(column=x_min)"]),
        (0, {"y_min": -0.2}, ["expect_column_values_to_be_between(column=y_min)"]),
        (0, {"y_min": 1.2}, ["expect_column_values_to_be_between(column=y_min)"]),
        (0, {"y_max": 1.2}, ["expect_column_values_to_be_between(column=y_max)"]),
        (0, {"y_max": -0.2}, ["expect_column_values_to_be_between(column=y_max)"]),
        (0, {"x_max": 1.2}, ["expect_column_values_to_be_between(column=x_max)"]),
        (0, {"x_max": -0.2}, ["expect_column_values_to_be_between(column=x_max)"]),
    ],
}


@pytest.mark.parametrize("suite", sorted(BREAKS))
def test_each_rule_a_suite_states_catches_its_own_broken_row(suite: str, tmp_path: Path) -> None:
    """The good table plus one row per break of a rule the suite's notes state (a null where one is ruled
    out, a value past its range or set, a repeated id, a second crop size): the gate must list exactly the
    checks meant for them. A check dropped from a suite, or its bound widened (``max_value`` gone, a
    ``row_condition`` loosened), would let such a table through while every other test's table passed."""
    good = GOOD[suite]()
    ids = gate.ID_COLUMNS[suite]
    rows = []
    for i, (row, changes, _) in enumerate(BREAKS[suite]):
        broken = good.iloc[[row]].copy().astype(object)
        broken[ids] = f"x{i}"
        for column, value in changes.items():
            broken[column] = [value]
        rows.append(broken)
    table = pd.concat([good.astype(object), *rows], ignore_index=True)
    for column, kind in good.dtypes.items():  # as a stage types them: a null int is Int64, a null flag object
        nulls = table[column].isna().any()
        if kind.name != "object" and not (kind.name == "bool" and nulls):
            table[column] = table[column].astype("Int64" if kind.name == "int64" and nulls else kind)
    config = _gate_config(suite, tmp_path)
    if suite == "subset":  # the crop stage wrote every crop at 64², other_size at 64 x 63, not_in_crop never
        crop = table[["crop_id", "width", "height"]].dropna(subset=["crop_id"]).assign(width=64, height=64)
        crop.loc[crop["crop_id"] == "other_size", "height"] = 63
        crop[crop["crop_id"] != "not_in_crop"].to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(GateError) as err:
        gate.run_gate(table, suite, stage="test", config=config, keep=False)
    failed = {}  # check -> its unexpected rows (1 for a check on the whole column)
    for line in str(err.value).splitlines()[1:]:
        check, result = line[4:].split("): ", 1)
        failed[check + ")"] = int(re.match(r"(\d+) unexpected", result)[1]) if "unexpected" in result else 1
    assert failed == Counter(check for *_, checks in BREAKS[suite] for check in checks), str(err.value)
