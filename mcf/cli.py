"""``mcf <command>``: one subcommand per pipeline stage, plus tools (bench, validate, export, predict,
check-metrics, report).

A thin shell: a stage command validates the whole params file, then calls the stage's
``main(common, config)``; a tool command hands its remaining arguments to the tool's ``cli(argv)``.
Modules are imported only when their command runs, so ``mcf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import re
import sys
import warnings

# OpenMP threads that spin while waiting make torch ~10x slower on a shared 2-core machine; this must
# be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from collections.abc import Callable
from typing import Any

from mcf import __version__
from mcf.errors import EXIT_PARAMS, EXIT_STAGE, StageError
from mcf.io import FULL_DISK, stage_lock
from mcf.params import ParamsError, load

# Stage name -> "module:function(common, config)". Names match dvc.yaml, params.yaml and the flow.
STAGES: dict[str, tuple[str, str]] = {
    "fetch": ("mcf.data.fetch:main", "download or render raw images and write the manifest"),
    "crop": ("mcf.data.crop:main", "detect, filter and crop faces into webdataset shards"),
    "subset": ("mcf.data.subset:main", "pick a deterministic subset of the crops"),
    "teacher": ("mcf.train.teacher:main", "load or pre-train the frozen feature teacher"),
    "pretrain": ("mcf.train.pretrain:main", "MCF pre-training of the ViT backbone"),
    "finetune_alignment": ("mcf.train.finetune:main_alignment", "fine-tune on AFLW-19 alignment"),
    "finetune_parsing": ("mcf.train.finetune:main_parsing", "fine-tune on LaPa parsing"),
    "evaluate": ("mcf.evaluate.evaluate:main", "score the fine-tuned models; write metrics and plots"),
}

# Stage name -> the top-level params its code reads: its dvc.yaml params (tests/test_stage_deps.py).
TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "fetch": ("seed",),  # SynthFace's scenes
    "crop": (),
    "subset": ("seed",),
    "teacher": ("seed",),  # its MAE uses its own teacher.mask_ratio
    "pretrain": ("seed", "mask_ratio"),
    "finetune_alignment": ("seed",),
    "finetune_parsing": ("seed",),
    "evaluate": (),
}

# The stages whose code runs a data gate (mcf.validate.gate.run_gate): only they can exit 3. teacher and
# pretrain read the subset's gated shards and run none (tests/test_stage_deps.py follows the calls).
GATED = frozenset({"fetch", "crop", "subset", "finetune_alignment", "finetune_parsing", "evaluate"})

VARIANTS = ("mcf", "scratch")

# Tool name -> "module:function(argv)". Each parses its own arguments.
TOOLS: dict[str, tuple[str, str]] = {
    "bench": ("mcf.bench:cli", "print throughput numbers (synth, fetch, crop, duplicates, pretrain)"),
    "validate": ("mcf.validate.gate:cli", "run a data gate by hand; --docs builds Data Docs HTML"),
    "export": ("mcf.models.export:cli", "write the pre-trained backbone as a timm state dict"),
    "predict": ("mcf.predict:cli", "landmarks and parsing maps for your own images (fine-tuned models)"),
    "check-metrics": ("mcf.evaluate.regression:cli", "CI gate: fail when a metric moves past its tolerance"),
    "report": ("mcf.report:cli", "write one self-contained HTML page of a run (plots, gates, vs the paper)"),
}

log = logging.getLogger("mcf")
OWN_LOGGERS = ("mcf", "flows")  # INFO, DEBUG under -v; every other logger WARNING
VERBOSE_HELP = "debug logging (mcf's own, not its libraries')"


def _resolve(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def describe(doc: str | None) -> str:
    """A docstring's first paragraph as plain ``--help`` text (no reST double backquotes or roles)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(re.sub(r":\w+:`~?([^`]+)`", r"\1", first).replace("``", "").split())


def given(text: str) -> str:
    """A tool's path or revision argument, refused when empty or only white space (an unset variable):
    ``Path("")`` is the working folder, and ``git show ":file"`` reads git's index, not a revision."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value (an unset variable?)")
    return text


def parser() -> argparse.ArgumentParser:
    """The ``mcf`` argument parser (stage commands take ``--params``; tools parse the rest)."""
    p = argparse.ArgumentParser(prog="mcf", description=describe(__doc__))
    p.add_argument("-v", "--verbose", action="store_true", help=f"{VERBOSE_HELP}; after COMMAND too")
    p.add_argument("--version", action="version", version=f"mcf {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_) in STAGES.items():
        keys = " and ".join(f"`{key}`" for key in TOP_LEVEL[name])
        top = f" plus the top-level {keys}" if keys else " (it reads no top-level key)"
        # the one stage that reaches a store or a folder that may refuse it (mcf.errors.AccessError)
        access = (" 4 no access to the source (no S3 credentials, access denied, no such bucket, a local "
                  "folder it may not read)," if name == "fetch" else "")
        gate = " 3 a data gate failed," if name in GATED else ""
        epilog = (
            f"Settings: section `{name}` of the params file{top}; the whole file is checked before any "
            "work. Paths in it are relative to the working directory; the section's input keys name what it "
            "reads and `out` what it writes (dvc.yaml lists them as the stage's deps and outs). Exit status: "
            f"0 done, 1 the stage failed, 2 params rejected or an input missing,{gate}{access} 130 "
            "interrupted (Ctrl-C); a TQDM_* variable tqdm cannot read is exit 2 too, before any work."
        )
        sp = sub.add_parser(name, help=help_, description=f"Stage `{name}`: {help_}.", epilog=epilog)
        sp.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
        sp.set_defaults(usage_error=sp.error)  # an unknown option is shown with the stage's own usage
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=VERBOSE_HELP)
        if name.startswith("finetune_"):
            sp.add_argument(
                "--variant", choices=VARIANTS, default="mcf",
                help="mcf: the pre-trained export; scratch: the same ViT with pre-training's initial "
                "weights, before its first step (default: %(default)s)",
            )
    for name, (_, help_) in TOOLS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def _error(line: str) -> None:
    """Print a stage's one-line error. A worker of mcf's own torchrun also leaves it for its launcher,
    which repeats it after torchrun's report: the flow keeps only a failed stage's last lines."""
    print(line, file=sys.stderr)
    if "MCF_EXIT_DIR" in os.environ:
        from mcf.train.distributed import record_error

        record_error(line)


def _without_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """A tool's arguments without ``-v``/``--verbose`` (up to a ``--``), and whether it was among them:
    ``mcf report -v`` is ``mcf -v report``, as a stage takes it after its name too."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a not in ("-v", "--verbose")] + argv[end:]
    return kept, len(kept) < len(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A tool parses its own arguments: hand them over untouched (argparse would reorder options).
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    is_tool = split < len(argv) and argv[split] in TOOLS
    args, rest = parser().parse_known_args(argv[: split + 1] if is_tool else argv)
    if is_tool:
        rest, verbose = _without_verbose(argv[split + 1 :])
        args.verbose = args.verbose or verbose
    # torchrun's workers but rank 0 log warnings and errors alone: rank 0 says what every rank does
    other_rank = "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0"
    # ours say what a stage does; libraries say warnings alone: their INFO lines (botocore's "Found
    # credentials in environment variables") are not the stage's, and their DEBUG lines under -v would quote
    # request lines and headers (a signed URL's signature, botocore's access key id and session token)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.DEBUG if args.verbose else logging.WARNING if other_rank else logging.INFO)
    # torch's weights-only loader warns of any pickle protocol above 2 ("please file an issue") and then
    # refuses the file, which read_weights reports in one line naming it: the warning adds two lines only
    warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
    try:  # tqdm converts its TQDM_* environment on import: a bad value is a traceback naming none of them
        import tqdm  # noqa: F401
    except ValueError as err:
        given = ", ".join(f"{k}={v!r}" for k, v in sorted(os.environ.items()) if k.startswith("TQDM_"))
        _error(f"mcf: tqdm cannot read its environment ({given}): {err}")
        return EXIT_PARAMS
    try:
        if args.command in TOOLS:
            return int(_resolve(TOOLS[args.command][0])(rest) or 0)
        if rest:
            args.usage_error(f"unrecognized arguments: {' '.join(rest)}")
        common, config = load(args.command, args.params, every_section=True)
        extra = {"variant": args.variant} if hasattr(args, "variant") else {}
        distributed = hasattr(config, "train")  # teacher and pretrain: train.processes, torchrun
        if distributed:
            from mcf.train.distributed import default_device, launch, takes_stage_lock, under_torchrun
        # one run of a stage at a time here: mcf's torchrun workers run under their launcher's lock, one
        # started by hand under its rank 0's
        worker = distributed and under_torchrun()
        locked = not distributed or takes_stage_lock()
        lock = stage_lock("@".join([args.command, *extra.values()])) if locked else contextlib.nullcontext()
        with lock:
            if distributed and config.train.processes > 1 and not worker:  # the stage's own torchrun
                # what each worker would refuse, refused once here: exit 2, not one traceback per worker
                _resolve(STAGES[args.command][0].split(":")[0] + ":check_inputs")(config)
                train = config.train
                train.check_processes(train.processes)
                train.check_min_lr(train.batch_size * train.accum_steps * train.processes)
                train.check_device(default_device())
                return launch(argv, train.processes)
            _resolve(STAGES[args.command][0])(common, config, **extra)
    except ParamsError as err:
        if err.file is None and args.command in STAGES:  # raised as the stage ran: name file and section
            top_level = err.key.startswith(f"{args.command}.") or err.key in ("seed", "mask_ratio")
            err = err.under("" if top_level else args.command, args.params)
        _error(f"mcf: invalid params: {err}")
        return EXIT_PARAMS
    except StageError as err:
        _error(f"mcf {args.command}: {err}")
        return err.exit_code
    except OSError as err:
        # a chmod 000 input, a read-only folder; an output path through a file or onto a folder, or with a
        # name past the file system's limit (which the first stat of it raised)
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                         errno.ENAMETOOLONG):
            named = err.filename2 or err.filename  # a rename's target, not the temporary file beside it
            _error(f"mcf {args.command}: {err.strerror}" + (f": {named}" if named else ""))
            return EXIT_STAGE
        if err.errno not in FULL_DISK:
            raise
        where = f" under {os.path.dirname(err.filename) or os.curdir}" if err.filename else ""
        # outputs are written to temporary siblings, so the previous ones and the last checkpoint stand
        _error(f"mcf {args.command}: {err.strerror}{where}: free some space and run it again")
        return EXIT_STAGE
    except KeyboardInterrupt:
        if "MCF_EXIT_DIR" not in os.environ:  # a worker of mcf's own torchrun: its launcher says it once
            print("mcf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    status = 1  # what an uncaught exception exits with
    try:
        status = main()
    finally:
        if "MCF_EXIT_DIR" in os.environ:  # a worker of `train.processes`' torchrun: tell the launcher
            from mcf.train.distributed import record_exit

            record_exit(status)
    sys.exit(status)
