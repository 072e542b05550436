"""``mcf bench <what>``: throughput benchmarks that print numbers (never timed tests)."""

from __future__ import annotations

import argparse
import importlib

from mcf.cli import describe

BENCHES = {
    "synth": "mcf.synth.bench:bench_synth",
    "fetch": "mcf.data.fetch_bench:bench_fetch",
    "crop": "mcf.data.crop:bench_crop",
    "duplicates": "mcf.data.quality:bench_duplicates",
    "pretrain": "mcf.train.bench:bench_pretrain",
}


def cli(argv: list[str]) -> int | None:
    if argv and argv[0] in BENCHES:  # the benchmark parses the rest, its own --help included
        module, name = BENCHES[argv[0]].split(":")
        return getattr(importlib.import_module(module), name)(argv[1:])
    p = argparse.ArgumentParser(prog="mcf bench", description=describe(__doc__))
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark (`mcf bench <what> --help`)")
    p.parse_args(argv[:1])  # prints the help or names the unknown benchmark, and exits
    return 2
