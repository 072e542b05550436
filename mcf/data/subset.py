"""Stage ``subset``: a deterministic pick of ``n`` kept crops, "a small part of LAION-FACE-cropped".

Output folder ``subset.out``:

- ``shards/crops-*.tar``: only the chosen crops, copied without re-encoding, in the crop stage's order
  (pre-training shuffles; see :mod:`mcf.data.shards` for the sample schema).
- ``manifest.parquet``: the chosen rows of the crop manifest (same columns), with ``shard``, ``width``,
  ``height``, ``mean`` and ``std`` read back from the new shards, plus ``face_size_bin`` (str) when
  stratifying by face size.

The pick is a function of (crop manifest, ``seed``, params) only: candidates are taken in ``crop_id``
order, so it does not depend on how the crop stage ordered its rows.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from mcf.data.shards import READ_BACK, iter_encoded, read_back, write_manifest, write_shards
from mcf.errors import StageError
from mcf.io import atomic_dir, read_table
from mcf.params import Common, ParamsError, param, require_apart, require_path

log = logging.getLogger(__name__)

FACE_SIZE_BIN = "face_size_bin"


@dataclasses.dataclass(frozen=True)
class SubsetConfig:
    """``subset`` section of params.yaml."""

    input: str = "outputs/crop"  # the crop stage's output (crop.out)
    out: str = "outputs/subset"
    n: int = param(1500, ge=1)  # crops to pick (all kept crops, with a warning, when fewer exist)
    stratify: str | None = None  # face_size_bin, or a crop-manifest column (no list column); null: uniform
    bins: list[float] = param([32.0, 48.0, 64.0])  # face_size_bin edges in source pixels, increasing
    shard_size: int = param(1000, ge=1)  # crops per output shard
    workers: int = param(2, ge=1)  # processes reading the new shards back; the output does not depend on it

    def __post_init__(self) -> None:
        require_apart(self.out, self.input, "subset.input", "crop")
        if not self.bins or any(b <= a for a, b in zip(self.bins, self.bins[1:], strict=False)):
            raise ParamsError("bins", f"must be a non-empty increasing list, got {self.bins}")


def face_size_bins(face_size: pd.Series, edges: list[float]) -> pd.Series:
    """Label each face size with its half-open bin: ``<32``, ``32-48``, ..., ``>=64``."""
    inner = [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:], strict=False)]
    labels = [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]
    return pd.cut(face_size, [-np.inf, *edges, np.inf], right=False, labels=labels).astype(str)


def quotas(counts: pd.Series, n: int) -> pd.Series:
    """Split ``n`` over groups in proportion to ``counts`` (largest remainder; ties to the earlier group).

    Integer arithmetic: in floats, equal remainders can differ in the last bit and break the tie rule.
    """
    total = int(counts.sum())
    share = counts * n // total
    remainder = (counts * n % total).sort_values(ascending=False, kind="stable")
    share[remainder.index[: n - int(share.sum())]] += 1
    return share


def pick(kept: pd.DataFrame, n: int, seed: int, stratify: str | None) -> pd.Index:
    """Index labels of ``n`` rows of ``kept`` (in ``crop_id`` order), drawn without replacement.

    Stratified, each value of the ``stratify`` column gets its proportional quota, drawn in sorted-value
    order from one generator, so (manifest, seed, params) fix the result. Null is a value of its own
    (last), so every row can be picked.
    """
    kept = kept.sort_values("crop_id", kind="stable")
    rng = np.random.default_rng(seed)
    if stratify is None:
        return kept.index[np.sort(rng.choice(len(kept), size=n, replace=False))]
    groups = list(kept.groupby(stratify, sort=True, dropna=False).indices.values())  # positions in kept
    share = quotas(pd.Series([len(g) for g in groups]), n)
    chosen = [
        kept.index[g[rng.choice(len(g), size=int(k), replace=False)]]
        for g, k in zip(groups, share, strict=True)
    ]
    return pd.Index(np.concatenate(chosen)) if chosen else pd.Index([])


def _is_list(value: object) -> bool:
    return isinstance(value, (list, np.ndarray))


def _candidates(cfg: SubsetConfig) -> pd.DataFrame:
    """The kept crops of the crop manifest, with the stratification column checked or derived."""
    path = Path(cfg.input) / "manifest.parquet"
    require_path(path, "subset.input", made_by="crop")
    manifest = read_table(path, ["crop_id", "status", "face_size", *READ_BACK], "rerun `mcf crop`")
    kept = manifest[manifest["status"] == "kept"].copy()
    if cfg.stratify == FACE_SIZE_BIN:
        kept[FACE_SIZE_BIN] = face_size_bins(kept["face_size"], cfg.bins)
    elif cfg.stratify is not None:
        # list-valued columns (box, landmarks) have no strata: groupby would fail on unhashable arrays
        scalar = [c for c in kept.columns if not kept[c].map(_is_list).any()]
        if cfg.stratify not in scalar:
            what = "a column of lists" if cfg.stratify in kept.columns else "no column"
            valid = [FACE_SIZE_BIN, *scalar]
            # a params error (exit 2), found only now: the columns are the crop manifest's
            raise ParamsError("stratify", f"{what} {cfg.stratify!r} (valid: {', '.join(valid)})")
    if kept.empty:
        raise StageError(f"subset: the crop manifest {path} has no kept crops")
    return kept


def _chosen_shards(rows: pd.DataFrame, shard_dir: Path) -> list[str]:
    """The crop shards that hold ``rows`` (crop order); one the crop manifest names but is gone is a
    :class:`StageError` now, not a gate failure after an hour of copying that cannot say which shard."""
    names = sorted(set(rows["shard"].dropna()))  # a kept crop without a shard is left to the gate
    missing = [name for name in names if not (shard_dir / name).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise StageError(f"subset: the crop manifest names shards missing from {shard_dir}: "
                         f"{', '.join(missing[:3])}{more}; rerun `mcf crop`")
    return [str(shard_dir / name) for name in names]


def write_subset(rows: pd.DataFrame, cfg: SubsetConfig, out_dir: Path) -> pd.DataFrame:
    """Copy the crops of ``rows`` into new shards (crop order); their manifest, with read-back columns.

    Rows follow the written shards; a chosen crop that was not written (no shard) or a written crop that
    was not chosen (no status) is kept in the result for the gate to fail on.
    """
    shards = _chosen_shards(rows, Path(cfg.input) / "shards")
    rows = rows.drop(columns=READ_BACK)
    wanted = set(rows["crop_id"])
    samples = (s for s in iter_encoded(shards) if s[0] in wanted)
    # reads every crop of those shards: at the paper's 20M all of them, an hour or more, so it shows a bar
    with tqdm(samples, total=len(wanted), desc="copy crops", unit="crop") as copied:  # closed on an error too
        write_shards(copied, out_dir / "shards", cfg.shard_size)
    stats = read_back(out_dir / "shards", cfg.workers)
    written = stats.merge(rows, on="crop_id", how="left")
    missing = rows[~rows["crop_id"].isin(stats["crop_id"])]
    return pd.concat([written, missing], ignore_index=True)[[*rows.columns, *READ_BACK]]


def subset(cfg: SubsetConfig, seed: int) -> pd.DataFrame:
    """The whole stage: pick, copy, gate, atomic rename onto ``cfg.out``."""
    from mcf.validate.gate import run_gate

    kept = _candidates(cfg)
    n = cfg.n
    if n > len(kept):
        log.warning("subset.n=%d but the crop stage kept %d crops: taking them all", n, len(kept))
        n = len(kept)
    if cfg.stratify and (values := kept[cfg.stratify].nunique(dropna=False)) > n:
        # each value's quota rounds to 0 or 1 and ties go to the earlier values: the n smallest, any seed
        counts = f"{cfg.stratify!r} has {values} values among the {len(kept)} kept crops, more than the n={n}"
        raise ParamsError("stratify", f"{counts} to pick, so the pick would be its {n} smallest values "
                          f"whatever the seed: stratify by {FACE_SIZE_BIN} or a column of fewer values")
    chosen = kept.loc[pick(kept, n, seed, cfg.stratify)]
    with atomic_dir(cfg.out, sign="manifest.parquet") as tmp:
        manifest = write_subset(chosen, cfg, tmp)
        run_gate(manifest, "subset", stage="subset", config=cfg)  # sizes must be the crop stage's
        write_manifest(manifest, tmp / "manifest.parquet")
    if cfg.stratify:
        log.info("subset strata: %s", manifest[cfg.stratify].value_counts().sort_index().to_dict())
    log.info("subset: %d of %d kept crops (seed %d) -> %s", len(manifest), len(kept), seed, cfg.out)
    return manifest


def main(common: Common, cfg: SubsetConfig) -> None:
    """``mcf subset``: the pick is drawn from the top-level ``seed``."""
    subset(cfg, common.seed)
