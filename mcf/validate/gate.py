"""The data gate: a Great Expectations suite that a stage's output must pass before it is published.

Suites are hand-written JSON files in ``mcf/validate/suites/<name>.json`` (a list of ``{"type",
"kwargs"}`` expectations, with ``row_condition`` in GX's dict form where a check applies to some rows
only). The gate is generic: a check that needs a per-row derived value (say "landmark inside the
image") is expressed by the caller adding that column before validating. GX runs in an ephemeral
context, so nothing is written into the repository except the latest result per suite, kept under
``.mcf/validation/`` (self git-ignored) for ``mcf validate --docs``.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from mcf.errors import GateError, StageError
from mcf.io import LOCAL_DIR, atomic_file, local_dir

SUITES_DIR = Path(__file__).parent / "suites"
RESULTS_DIR = LOCAL_DIR / "validation"
EXAMPLES = 5

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuite, ExpectationSuiteValidationResult
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult


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
    """Run the suite ``suite`` on ``df`` and return GX's result (no exception on failure)."""
    batch = (
        _context()
        .data_sources.add_pandas("mcf")
        .add_dataframe_asset(suite)
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    fmt = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES}
    return batch.validate(load_suite(suite), result_format=fmt)


def _condition(cond: Any) -> str:
    """``status == success`` for GX's dict form of a comparison; other forms as GX prints them."""
    if isinstance(cond, dict) and cond.get("type") == "comparison":
        return f"{cond['column']['name']} {cond['operator']} {cond['parameter']}"
    return str(cond)


def _describe(result: ExpectationValidationResult) -> str:
    """One line for a failed expectation: type, column, condition, unexpected count and examples."""
    config = result.expectation_config
    where = [f"column={config.kwargs['column']}"] if config.kwargs.get("column") else []
    if config.kwargs.get("row_condition"):
        where.append(f"where {_condition(config.kwargs['row_condition'])}")
    line = f"{config.type}({', '.join(where)})"
    info = result.exception_info or {}
    messages = [info.get("exception_message")] + [
        v.get("exception_message") for v in info.values() if isinstance(v, dict)
    ]
    messages = [m for m in messages if m]
    if messages:
        return f"{line}: raised {messages[0]}"
    res = result.result or {}
    if "unexpected_count" in res:
        examples = res.get("partial_unexpected_list", [])[:EXAMPLES]
        return f"{line}: {res['unexpected_count']} unexpected of {res.get('element_count')}, e.g. {examples}"
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


def run_gate(df: pd.DataFrame, suite: str, *, stage: str, keep: bool = True) -> None:
    """Validate a stage's output; raise :class:`GateError` listing every failed expectation.

    ``keep`` stores the result for the report and Data Docs; a gate run by hand leaves the pipeline's
    record alone.
    """
    result = validate(df, suite)
    try:
        if keep:
            _store(result, suite, stage)
    except OSError as err:  # a read-only checkout must not fail a stage whose data is fine
        log.warning("could not keep the validation result of %s: %s", suite, err)
    stats = result.statistics
    if not result.success:
        failed = [_describe(r) for r in result.results if not r.success]
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
    """Build GX Data Docs HTML for the stored results with GX's site builder; return the index page."""
    _import_gx()
    from great_expectations.core.expectation_validation_result import (
        ExpectationSuiteValidationResultSchema,
    )
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    paths = sorted(results_dir.glob("*.json"))
    if not paths:
        raise StageError(f"no validation results under {results_dir}: run a stage or `mcf validate` first")
    context = _context()
    context.variables.data_docs_sites = {
        "mcf": {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(out.resolve()),  # GX requires an absolute path here
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    }
    for path in paths:
        result = ExpectationSuiteValidationResultSchema().load(json.loads(path.read_text()))
        run = result.meta.get("run_id") or {}
        run_id = RunIdentifier(run_name=run.get("run_name"), run_time=run.get("run_time"))
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(name=result.suite_name), run_id, "latest")
        context.validation_results_store.set(key, result)
    context.build_data_docs(site_names=["mcf"])
    log.info("Data Docs for %d suite(s) written to %s", len(paths), out / "index.html")
    return out / "index.html"


def cli(argv: list[str]) -> int:
    """``mcf validate SUITE PARQUET`` or ``mcf validate --docs [--out DIR]``."""
    p = argparse.ArgumentParser(prog="mcf validate", description="Run a data gate or build Data Docs.")
    known = suite_names()
    p.add_argument("suite", nargs="?", help=f"the gate to run: {', '.join(known)}")
    p.add_argument("parquet", nargs="?", type=Path, help="parquet file to validate")
    p.add_argument("--docs", action="store_true", help="build Data Docs HTML for the latest results")
    p.add_argument("--out", type=Path, default=Path("outputs/validation_docs"), help="Data Docs folder")
    args = p.parse_args(argv)
    if args.docs:
        build_docs(args.out)
        return 0
    if not args.suite or not args.parquet:
        p.error("give SUITE and PARQUET, or --docs")
    if args.suite not in known:
        p.error(f"unknown suite {args.suite!r} (known: {', '.join(known)})")
    if not args.parquet.is_file():
        p.error(f"no such parquet file: {args.parquet}")
    try:
        table = pd.read_parquet(args.parquet)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        p.error(f"{args.parquet}: not a readable parquet file ({err})")
    run_gate(table, args.suite, stage="validate", keep=False)  # the pipeline's record stays its own
    return 0
