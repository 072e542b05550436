"""``mcf report``: one run's results as a self-contained HTML page, and a markdown summary of it.

Everything is read from the run's own files, located through its params file: the params, the
data-gate results, dvclive curves, the evaluate stage's metrics, CSVs and overlays, and the paper's
numbers beside this run's. Plots and images are inlined, so the page renders offline.
``markdown_summary`` is light (no plotting) so the Prefect flow can import it cheaply.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from mcf.cli import given
from mcf.io import FULL_DISK, resolved
from mcf.report.runfiles import Run, markdown_summary, open_run

__all__ = ["build_report", "cli", "markdown_summary", "write_report"]

log = logging.getLogger(__name__)


def build_report(root: Path, params_file: str | Path = "params.yaml",
                 out: str | Path = "outputs/report/index.html") -> Path:
    """Write the report of the run in checkout ``root`` to ``out`` (relative to ``root``)."""
    return write_report(open_run(Path(root), params_file), Path(root) / out)


def write_report(run: Run, path: Path) -> Path:
    """Draw ``run``'s page and write it to ``path``."""
    from mcf.report import page  # matplotlib: only when a page is drawn

    path = page.write(run, path)
    log.info("report written to %s", path)
    return path


def cli(argv: list[str]) -> int:
    """``mcf report [--root DIR] [--params FILE] [--out FILE]``."""
    p = argparse.ArgumentParser(
        prog="mcf report",
        description="Write one self-contained HTML page (no network needed to view it) with the run's "
        "params, data-gate results, training curves, CED curve, per-class F1, overlays, and its numbers "
        "beside the paper's, each labelled with its dataset. Missing pieces become notes in the page.",
        epilog="Exit status: 0 written (a part of the run that is missing or unreadable is a note in the "
        "page); 1 a full disk or a spent quota (one line: free some space and run it again); 2 bad "
        "arguments (an --out that is a folder, an existing file other than an HTML page, or cannot be "
        "written) or a params file that is missing or not YAML.",
    )
    p.add_argument("--root", type=lambda text: Path(given(text)), default=Path("."),
                   help="the run's checkout; params paths are relative to it (default: %(default)s)")
    p.add_argument("--params", default="params.yaml",
                   help="params file, relative to --root (default: %(default)s)")
    p.add_argument("--out", default="outputs/report/index.html", type=given,
                   help="HTML file to write, relative to --root (default: %(default)s)")
    args = p.parse_args(argv)
    target = args.root / args.out
    try:  # a name past the file system's limit (ENAMETOOLONG) is refused by the first look at it
        is_dir, is_file = target.is_dir(), target.is_file()
    except OSError as err:
        p.error(f"--out {args.out}: cannot be written there ({err.strerror})")
    if is_dir:
        p.error(f"--out {args.out}: is a folder; name the HTML file to write, e.g. {args.out}/index.html")
    if is_file and (target.suffix.lower() not in (".html", ".htm")
                    or resolved(target) == resolved(args.root / args.params)):
        p.error(f"--out {args.out}: is a file other than an HTML page (the params file, a metrics JSON?), "
                "which the page would replace; name an .html file")
    run = open_run(args.root, args.params)  # a missing or broken params file is refused before --out is made
    folder = target.parent
    try:  # before the page is drawn: a path under a file, or a read-only folder, is the caller's to fix
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # one that exists but is read-only: the page's own write
            pass
    except FileExistsError:
        p.error(f"--out {args.out}: cannot be written there ({folder} is a file)")
    except OSError as err:
        if err.errno in FULL_DISK:  # no inode left: not the caller's path, as at the page's own write
            raise
        p.error(f"--out {args.out}: cannot be written there ({err.strerror})")
    print(write_report(run, target))
    return 0
