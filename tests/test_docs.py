"""Figures the design notes quote from the README stay the README's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_time_of_the_default_run_covers_the_readmes_latest() -> None:
    """docs/DESIGN.md said 8–17 minutes "at the latest commits" while the README's newest `dvc repro` took
    377 s: its range must hold the newest figure of the README's performance row (the row's first)."""
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| the whole default `dvc repro`"))
    latest = int(re.search(r"\| ([\d,]+) s at [0-9a-f]{7}", row).group(1).replace(",", ""))
    design = " ".join((ROOT / "docs/DESIGN.md").read_text().split())
    low, high = map(int, re.search(r"measured: (\d+)–(\d+) minutes", design).groups())
    assert low * 60 <= latest <= high * 60, f"README's latest dvc repro took {latest} s, not {low}–{high} min"
