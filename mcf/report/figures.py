"""The report's plots, drawn from the run's CSV and dvclive files and returned as PNG bytes.

The page embeds them as data URIs, so it renders offline with no files beside it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import matplotlib
import pandas as pd

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mcf.evaluate.plots import literal_text  # noqa: E402


def to_png(fig: Figure) -> bytes:
    """Render and close a figure (closing keeps many reports from leaking memory)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _panel_order(name: str) -> tuple[int, str]:
    """The total loss first, then its parts, then schedules (lr, momentum)."""
    schedule = name.startswith("lr/") or name.endswith(("/lr", "/momentum"))
    return (2 if schedule else 0 if name.endswith("/loss") else 1, name)


@literal_text
def curves_png(runs: Mapping[str, Mapping[str, pd.DataFrame]], title: str) -> bytes:
    """One panel per dvclive series (``train/loss``, ``lr/head``…), one line per run (variant)."""
    names = sorted({name for curves in runs.values() for name in curves}, key=_panel_order)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for label, curves in runs.items():
            if name in curves:
                df = curves[name]
                ax.plot(df["step"], df[df.columns[-1]], marker="." if len(df) < 20 else None, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


@literal_text
def ced_png(table: pd.DataFrame, dataset: str) -> bytes:
    """CED of NME_box from ``plots/ced.csv`` (threshold, one column per variant).

    The CSV's thresholds are fractions (0 to 0.07); they are drawn ×100, the unit of every NME the page
    prints beside the curve, so an nme_box of 8.4 reads against the same axis.
    """
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for variant in table.columns.drop("threshold"):
        ax.plot(100 * table["threshold"], table[variant], label=f"{variant} ({dataset})")
    ax.set_xlabel("NME_box (×100)")
    ax.set_ylabel("fraction of test images")
    ax.set_ylim(0, 1)
    ax.set_title(f"CED, {dataset} full test", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


@literal_text
def f1_png(table: pd.DataFrame, dataset: str) -> bytes:
    """Per-class F1 bars from ``plots/f1.csv`` (class, one column per variant).

    A class absent from both the labels and the predictions has no F1 (null): it is marked "n/a" at its
    bar's place, which a zero-height bar alone would not tell from an F1 of 0.
    """
    variants = list(table.columns.drop("class"))
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, variant in enumerate(variants):
        xs = [x + (i - (len(variants) - 1) / 2) * width for x in range(len(table))]
        ax.bar(xs, table[variant].fillna(0), width, label=f"{variant} ({dataset})")
        for x in (x for x, f1 in zip(xs, table[variant], strict=True) if pd.isna(f1)):
            ax.text(x, 1, "n/a", ha="center", va="bottom", rotation=90, fontsize=6)
    ax.set_xticks(range(len(table)), table["class"], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class F1, {dataset} test", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return to_png(fig)
