"""The data gate: a Great Expectations suite that a stage's output must pass before it is published.

Suites are hand-written JSON files in ``mcf/validate/suites/<name>.json``: ``{"notes", "expectations"}``,
the notes saying what the suite checks and why, the expectations a list of ``{"type", "kwargs"}``, with
``row_condition`` in GX's dict form where a check applies to some rows only. A check that needs a
per-row value the table does not store (a crop's size minus the size it should have) reads a column
that :func:`derive` adds, here, so a stage and ``mcf validate`` check the same thing. GX runs in an
ephemeral context, so nothing is written into the repository except the latest result per suite, kept
under ``.mcf/validation/`` (self git-ignored) for ``mcf validate --docs``.
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mcf.errors import GateError, StageError
from mcf.io import LOCAL_DIR, atomic_dir, atomic_file, check_output, local_dir
from mcf.params import DEFAULT_PARAMS, ParamsError, load, require_path

SUITES_DIR = Path(__file__).parent / "suites"
RESULTS_DIR = LOCAL_DIR / "validation"
EXAMPLES = 5
TYPE_CHECK = "expect_column_values_to_be_of_type"
SIZE_CHECKED = ("crop", "subset")  # suites that check width_off/height_off, which derive() adds
# A margin the crop suite checks, which derive() adds -> the manifest column and crop's threshold on it:
# a kept crop cleared every threshold, a crop rejected as too_small, low_score or blurry missed its own
MARGINS = {"face_size_margin": ("face_size", "min_face_size"), "score_margin": ("score", "min_score"),
           "blur_margin": ("blur", "min_blur")}
# Suite -> what it is meant for, for `mcf validate --help` (tests check every suite has one).
TARGETS = {
    "aflw19": "no file on disk: finetune_alignment and evaluate run it on the table that "
    "mcf.data.aflw19.table(data, split) builds; write that to parquet to run it by hand",
    "crop": "<crop.out>/manifest.parquet, with crop.size and the filters' thresholds from --params",
    "fetch": "<fetch.out>/manifest.parquet",
    "lapa": "no file on disk: finetune_parsing and evaluate run it on the table that "
    "mcf.data.lapa.table(data, split) builds; write that to parquet to run it by hand",
    "subset": "<subset.out>/manifest.parquet, with the crop manifest named by subset.input in --params",
}
# Suite -> the column that names a row, so a failed check on another column (``exists: False``) says
# which image or crop broke it (tests check every suite has one among the columns it expects).
ID_COLUMNS = {"aflw19": "name", "crop": "crop_id", "fetch": "sample_id", "lapa": "stem", "subset": "crop_id"}
# A file every Data Docs build holds (GX's site layout; a web site's own index.html is not one): --out is
# replaced whole only when it holds this, so `--out ~` or a folder of other files is refused
DOCS_SIGN = "static/styles/data_docs_default_styles.css"

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite, ExpectationSuiteValidationResult


def _import_gx() -> Any:
    """Import GX with its logs at WARNING: it logs internals at INFO, even while importing, and one
    of its modules pins its logger to INFO. Every function here calls this before importing from GX.
    """
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return great_expectations


def suite_names() -> list[str]:
    """The gates there are: one committed suite per ``suites/<name>.json``."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def load_suite(name: str) -> ExpectationSuite:
    """Read ``suites/<name>.json``; an invalid expectation is an error, not a silently dropped check."""
    _import_gx()
    from great_expectations.core import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    path = SUITES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown suite {name!r} (known: {', '.join(suite_names())})")
    spec = json.loads(path.read_text())
    expectations = []
    for i, item in enumerate(spec["expectations"]):
        try:
            config = ExpectationConfiguration(type=item["type"], kwargs=item.get("kwargs", {}))
            expectations.append(config.to_domain_obj())
        except Exception as err:  # GX raises several unrelated types for a bad config
            raise ValueError(f"{path}: expectation {i} ({item.get('type')!r}) is invalid: {err}") from err
    return ExpectationSuite(name=name, expectations=expectations, meta={"notes": spec.get("notes", "")})


def _context() -> Any:
    """An in-memory GX context with progress bars off (they would flood the stage logs)."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def validate(df: pd.DataFrame, suite: str) -> ExpectationSuiteValidationResult:
    """Run the suite ``suite`` on ``df`` and return GX's result (no exception on failure).

    Failed column checks carry the id (:data:`ID_COLUMNS`) of their first failing rows; only when ``df``
    has that column, as GX fails every column check of a table that lacks it.
    """
    batch = (
        _context()
        .data_sources.add_pandas("mcf")
        .add_dataframe_asset(suite)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    fmt: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    if ID_COLUMNS.get(suite) in df.columns:
        fmt["unexpected_index_column_names"] = [ID_COLUMNS[suite]]
    return batch.validate(load_suite(suite), result_format=fmt)


def _condition(cond: Any) -> str:
    """``status == success`` for GX's dict form of a comparison; other forms, and a stored result edited
    out of that form (the report reads them), as they are."""
    if isinstance(cond, dict) and cond.get("type") == "comparison":
        column = cond.get("column")
        if isinstance(column, dict) and "name" in column and {"operator", "parameter"} <= cond.keys():
            return f"{column['name']} {cond['operator']} {cond['parameter']}"
    return str(cond)


def _rows(res: dict[str, Any], column: str | None) -> str:
    """`` (name: ['0/a.jpg'])``: the ids of the examples' rows, since a flag's value (False) names no
    file. Nothing for a check on the id column itself, whose examples are the ids. GX leaves
    ``unexpected_index_column_names`` out of a be-null check's result: its rows' keys name the id then."""
    ids, rows = res.get("unexpected_index_column_names"), res.get("partial_unexpected_index_list")
    if not ids and rows and isinstance(rows[0], dict):
        ids = [key for key in rows[0] if key != column]
    ids = ids or []
    if len(ids) != 1 or ids[0] == column or not rows:
        return ""
    return f" ({ids[0]}: {[str(row.get(ids[0])) for row in rows[:EXAMPLES]]})"


def describe(item: dict[str, Any]) -> str:
    """One line for a failed expectation, from its JSON form (``ExpectationValidationResult.to_json_dict``,
    as :func:`run_gate` stores it for the report): type, column, expected type, condition, unexpected count,
    examples and the ids of their rows."""
    config = item.get("expectation_config") or {}
    kwargs = config.get("kwargs") or {}
    where = [f"column={kwargs['column']}"] if kwargs.get("column") else []
    if kwargs.get("type_"):  # a type check's observed value is the wrong type: say which one was expected
        where.append(f"type {kwargs['type_']}")
    if kwargs.get("row_condition"):
        where.append(f"where {_condition(kwargs['row_condition'])}")
    line = f"{config.get('type')}({', '.join(where)})"
    info = item.get("exception_info") or {}
    messages = [info.get("exception_message")] + [
        v.get("exception_message") for v in info.values() if isinstance(v, dict)
    ]
    messages = [m for m in messages if m]
    if messages[:1] == ["list index out of range"] and config.get("type") == TYPE_CHECK:
        messages[0] = f'column "{kwargs.get("column")}" does not exist'  # GX 1.x looks its type up in a list
    if messages:
        return f"{line}: raised {messages[0]}"
    res = item.get("result") or {}
    if "unexpected_count" in res:
        examples = res.get("partial_unexpected_list", [])[:EXAMPLES]
        count = f"{res['unexpected_count']} unexpected of {res.get('element_count')}"
        return f"{line}: {count}, e.g. {examples}{_rows(res, kwargs.get('column'))}"
    if res.get("missing_count"):  # a set the column must contain: GX's observed_value is always None here
        return f"{line}: no row has {res.get('partial_missing_list')}"
    details = f", details {res['details']}" if res.get("details") else ""
    return f"{line}: observed {res.get('observed_value')!r}{details}"


def _store(result: ExpectationSuiteValidationResult, suite: str, stage: str) -> Path:
    """Keep the latest result of ``suite`` for ``mcf validate --docs``."""
    local_dir(RESULTS_DIR.name)
    result.meta["run_id"] = {"run_name": stage, "run_time": datetime.now(UTC).isoformat()}
    path = RESULTS_DIR / f"{suite}.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result.to_json_dict(), indent=1))
    return path


def _expected_size(df: pd.DataFrame, suite: str, config: Any) -> tuple[Any, Any]:
    """What ``width``/``height`` should be: ``crop.size`` for a crop; for a subset, what the crop stage
    wrote for the same ``crop_id`` (``config`` is that stage's section)."""
    if suite == "crop":
        return config.size, config.size
    path = Path(config.input) / "manifest.parquet"
    require_path(path, "subset.input", made_by="crop")
    try:
        crop = pd.read_parquet(path, columns=["crop_id", "width", "height"])
    except (OSError, ValueError) as err:  # not parquet, or without a column: pyarrow's ArrowInvalid
        cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"  # not its schema dump
        raise GateError(f"data gate {suite!r}: cannot read crop_id, width and height from the crop manifest "
                        f"{path} ({cause})") from None
    repeated = crop["crop_id"][crop["crop_id"].duplicated()].unique()
    if len(repeated):  # the crop gate refuses such a manifest; `mcf validate subset` may still be given one
        raise GateError(f"data gate {suite!r}: the crop manifest {path} repeats crop_id "
                        f"{sorted(repeated)[:EXAMPLES]}, so the size each crop should have is unknown; "
                        "`mcf validate crop` on it lists what else is wrong")
    ids, crop = df["crop_id"], crop.set_index("crop_id")
    try:
        return ids.map(crop["width"]).astype("Int64"), ids.map(crop["height"]).astype("Int64")
    except (TypeError, ValueError):  # 64.5 or text, which the crop gate refuses: pandas' error is a traceback
        types = f"width {crop['width'].dtype}, height {crop['height'].dtype}"
        raise GateError(f"data gate {suite!r}: the crop manifest {path} holds sizes that are no whole "
                        f"numbers ({types}), so the size each crop should have is unknown; "
                        "`mcf validate crop` on it lists what else is wrong") from None


def derive(df: pd.DataFrame, suite: str, config: Any = None) -> pd.DataFrame:
    """``df`` with the columns ``suite`` checks but no stage stores: ``width_off``/``height_off``, the
    size read back minus the expected size (0 when right), and for a crop each filter's margin
    (:data:`MARGINS`: the value minus its threshold in ``config``, never negative for a kept crop).
    Columns already there are kept as given; one whose inputs are missing is left to the suite's column
    checks, which name what is missing (exit 3), not a KeyError here."""
    columns = set(df.columns)
    size_from = {"width", "height", *(["crop_id"] if suite == "subset" else [])}
    sizes = suite in SIZE_CHECKED and not {"width_off", "height_off"} <= columns and size_from <= columns
    margins = [name for name, (value, _) in MARGINS.items()
               if suite == "crop" and name not in columns and value in columns]
    if (sizes or margins) and config is None:
        raise ValueError(f"suite {suite!r} needs the {suite} section of the params to derive the columns it "
                         "checks")
    if sizes:
        width, height = _expected_size(df, suite, config)
        df = _minus(df, suite, {"width_off": ("width", width), "height_off": ("height", height)})
    return _minus(df, suite, {m: (MARGINS[m][0], getattr(config, MARGINS[m][1])) for m in margins})


def _minus(df: pd.DataFrame, suite: str, columns: dict[str, tuple[str, Any]]) -> pd.DataFrame:
    """``df`` with each new column ``name``: column ``value`` minus ``expected``."""
    if not columns:
        return df
    try:
        return df.assign(**{name: df[value] - expected for name, (value, expected) in columns.items()})
    except TypeError:  # numbers stored as text by other code: one line naming them (exit 3), not a traceback
        used = [value for value, _ in columns.values()]
        names = " and ".join([", ".join(used[:-1]), used[-1]] if len(used) > 1 else used)
        types = ", ".join(f"{c} {df[c].dtype}" for c in used)
        raise GateError(f"data gate {suite!r}: {names} must be numbers, got {types}") from None


def run_gate(df: pd.DataFrame, suite: str, *, stage: str, config: Any = None, keep: bool = True) -> None:
    """Validate a stage's output; raise :class:`GateError` listing every failed expectation.

    ``config`` is the section of the params :func:`derive` needs (crop, subset). ``keep`` stores the
    result for the report and Data Docs; a gate run by hand leaves the pipeline's record alone.
    """
    df = derive(df, suite, config)
    result = validate(df, suite)
    try:
        if keep:
            _store(result, suite, stage)
    except OSError as err:  # a read-only checkout must not fail a stage whose data is fine
        log.warning("could not keep the validation result of %s: %s", suite, err)
    stats = result.statistics
    if not result.success:
        failed = [describe(r.to_json_dict()) for r in result.results if not r.success]
        lines = "\n".join(f"  - {f}" for f in failed)
        raise GateError(
            f"stage {stage!r}: data gate {suite!r} failed {len(failed)} of "
            f"{stats['evaluated_expectations']} expectations on {len(df)} rows:\n{lines}"
        )
    log.info(
        "gate %s (%s): %d expectations passed on %d rows",
        suite,
        stage,
        stats["evaluated_expectations"],
        len(df),
    )


def build_docs(out: Path, results_dir: Path = RESULTS_DIR) -> Path:
    """Build GX Data Docs HTML for the stored results with GX's site builder; return the index page.

    ``out`` must be new, empty or an earlier build (:data:`DOCS_SIGN`); the site is built beside it and
    swapped in whole, so a build stopped half-way leaves the earlier one as it was.
    """
    _import_gx()
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )
    from marshmallow import ValidationError  # GX's result schema is marshmallow's

    paths = sorted(results_dir.glob("*.json"))
    if not paths:
        raise StageError(f"no validation results under {results_dir}: run a stage (mcf fetch, crop, subset, "
                         "finetune_*, evaluate) first; `mcf validate SUITE PARQUET` stores no result")
    context = _context()
    for path in paths:
        try:  # a stored result cut short or hand-edited: JSON's, the schema's or our error, not a traceback
            doc = json.loads(path.read_text(encoding="utf-8"))
            result = ExpectationSuiteValidationResultSchema().load(doc)  # TypeError: a required key missing
            run = result.meta.get("run_id") or {}
            if not isinstance(run, dict) or not all(isinstance(run.get(k), str | None)
                                                    for k in ("run_name", "run_time")):
                raise ValueError("meta.run_id is not an object of run_name and run_time strings")
        except (ValueError, TypeError, ValidationError) as err:
            raise StageError(f"{path}: not a gate result as a stage stores it ({type(err).__name__}: {err}); "
                             "delete it, or run the stage whose gate wrote it again") from None
        run_id = RunIdentifier(run_name=run.get("run_name"), run_time=run.get("run_time"))
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(name=result.suite_name), run_id, "latest")
        context.validation_results_store.set(key, result)
    with atomic_dir(out, sign=DOCS_SIGN) as tmp:
        context.variables.data_docs_sites = {
            "mcf": {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(tmp.resolve()),  # GX requires an absolute path here
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        }
        context.build_data_docs(site_names=["mcf"])
    log.info("Data Docs for %d suite(s) written to %s", len(paths), out / "index.html")
    return out / "index.html"


def cli(argv: list[str]) -> int:
    """``mcf validate SUITE PARQUET`` or ``mcf validate --docs [--out DIR]``."""
    known = suite_names()
    targets = "\n".join(
        textwrap.fill(TARGETS[name], 100, initial_indent=f"  {name:8} ", subsequent_indent=" " * 11)
        for name in known
    )
    p = argparse.ArgumentParser(
        prog="mcf validate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a data gate on a parquet file by hand (the pipeline's stored results stay as they\n"
        "are), or build Data Docs HTML from the results the stages stored.",
        epilog=f"suites, and the table each is meant for:\n{targets}\n\nexit status: 0 passed (or docs "
        "written), 1 no stored results for --docs or one\nthat is damaged, 2 bad arguments or params (an "
        "--out holding other files\nthan an earlier Data Docs build), 3 the gate failed",
    )
    p.add_argument("suite", nargs="?", help=f"the gate to run: {', '.join(known)}")
    p.add_argument("parquet", nargs="?", type=Path, help="parquet file to validate")
    p.add_argument("--params", default=str(DEFAULT_PARAMS),
                   help="params file the crop and subset suites read (default: %(default)s)")
    p.add_argument("--docs", action="store_true", help="build Data Docs HTML for the latest results")
    p.add_argument("--out", type=Path, default=Path("outputs/validation_docs"),
                   help="Data Docs folder: new, empty or an earlier Data Docs build, which is replaced "
                   "whole; one that holds other files is refused (default: %(default)s)")
    args = p.parse_args(argv)  # -v: `mcf` takes it, after the command too (mcf/cli.py)
    if args.docs:
        if args.suite or args.parquet:  # else the gate would be skipped and exit 0 read as a pass
            p.error("--docs builds the docs alone: run SUITE PARQUET and --docs as two commands")
        # checked before GX, which logs a traceback per page it fails to write and then raises its own, and
        # before the results are read: usage, exit 2, like every other bad argument here
        try:
            check_output(args.out, DOCS_SIGN)
        except StageError as err:
            p.error(f"--out: {err}")
        build_docs(args.out)
        return 0
    if not args.suite or not args.parquet:
        p.error("give SUITE and PARQUET, or --docs")
    if args.suite not in known:
        p.error(f"unknown suite {args.suite!r} (known: {', '.join(known)})")
    if args.parquet.is_dir():  # "no such parquet file" read as a wrong path, not the wrong kind of path
        manifest = args.parquet / "manifest.parquet"
        such = f", such as {manifest}" if manifest.is_file() else ""
        p.error(f"{args.parquet} is a folder, not a parquet file: give the file itself{such}")
    if not args.parquet.is_file():
        p.error(f"no such parquet file: {args.parquet}")
    try:
        table = pd.read_parquet(args.parquet)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        p.error(f"{args.parquet}: not a readable parquet file ({err})")
    config = load(args.suite, args.params)[1] if args.suite in SIZE_CHECKED else None
    try:
        run_gate(table, args.suite, stage="validate", config=config, keep=False)  # the stored record stays
    except ParamsError as err:  # subset.input's crop manifest missing: name the --params file, as stages do
        raise err.under("", args.params) from None
    return 0
