"""``mcf bench <what>``: throughput benchmarks that print numbers (never timed tests)."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "synth": "mcf.synth.bench:bench_synth",
    "crop": "mcf.data.crop:bench_crop",
    "pretrain": "mcf.train.bench:bench_pretrain",
}


def cli(argv: list[str]) -> int | None:
    p = argparse.ArgumentParser(prog="mcf bench", description=__doc__.splitlines()[0])
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    args, rest = p.parse_known_args(argv)
    module, name = BENCHES[args.what].split(":")
    return getattr(importlib.import_module(module), name)(rest)
