"""Resumable training state: everything that decides the next step, written atomically.

A checkpoint holds the model (without the frozen teacher, which is rebuilt from its own stage's
output), the optimizer and grad-scaler state, the step (the schedules are functions of it), the
momentum value, the data position, the dvclive step, every rank's RNG states, the number of ranks and
the hash of the run's params, data and initial weights. Loading refuses a checkpoint whose hash
differs: continuing a run under other params would silently mix two experiments.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.errors import StageError, WeightsError
from mcf.io import atomic_file, save_tensors
from mcf.models.backbone import read_weights
from mcf.params import ParamsError, require_below_cwd

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


def run_hash(identity: dict[str, Any]) -> str:
    """A stable digest of everything that defines a run (params, seed, world size, data size)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """The sha256 of the trainable weights as built: a run resumed under code that draws other initial
    weights from the same params is another run (pretrain's ``backbone_init``, rebuilt from the seed,
    would not be the start the checkpoint trained from)."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, NumPy, Python) in a ``weights_only``-safe form.

    CUDA's is the current GPU's alone, the one this process draws on: every visible GPU's would tie the
    checkpoint to the count visible when it was written, and a resume that sees fewer would fail.
    """
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def nonfinite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the float tensors in ``state`` holding a NaN or an infinity: an update can diverge
    while the loss it came from was finite, and the loss guard sees it only a step later, after the
    checkpoint (or the export) of that step was written."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(state: dict[str, Any], resume_dir: str | Path) -> None:
    """Write ``state`` to ``<resume_dir>/last.pt`` in one rename: a kill leaves the previous one."""
    with atomic_file(Path(resume_dir) / CHECKPOINT) as tmp:
        save_tensors(state, tmp)


def load_checkpoint(
    resume_dir: str | Path, expected_hash: str, world_size: int | None = None
) -> dict[str, Any] | None:
    """The checkpoint to resume from, ``None`` when there is none; a clear error when params changed,
    or, given ``world_size``, the number of processes (part of the hash, but not of the params)."""
    path = Path(resume_dir) / CHECKPOINT
    for stale in Path(resume_dir).glob(f".{CHECKPOINT}.tmp-*"):
        stale.unlink(missing_ok=True)  # left by a process killed while writing
    if not path.is_file():
        return None
    try:
        state = read_weights(path)
    except WeightsError as err:
        raise StageError(f"{err}; delete {resume_dir} to start over") from None
    written_by = state.get("world_size", world_size)  # checkpoints from before it was saved: the hash
    if world_size is not None and written_by != world_size:
        raise StageError(
            f"{path} was written by {written_by} processes, this run has {world_size}: resume it with "
            f"{written_by} (train.processes, or torchrun's), or delete {resume_dir} to start over"
        )
    if state.get("run_hash") != expected_hash:
        raise StageError(
            f"{path} belongs to a run with other params, data, precision or initial weights (hash "
            f"{state.get('run_hash')}, now {expected_hash}); delete {resume_dir} to start over, or restore "
            "the params (and the device, for precision auto; the code, for the initial weights) to resume it"
        )
    log.info("resuming from %s at step %d", path, state["step"])
    return state


def check_resume_dir(resume_dir: str | Path, key: str) -> None:
    """Refuse, before any work, a resume folder that :func:`discard_resume` must not delete when the run
    is done: the working folder or one above it (``resume_dir: .`` or ``''``), or a folder holding more
    than a run's resume state (``last.pt``, its temporary siblings, ``live/``), such as ``outputs``."""
    require_below_cwd(resume_dir, key, "a finished run deletes it with its resume state")
    folder = Path(resume_dir)
    foreign = sorted(
        p.name for p in (folder.iterdir() if folder.is_dir() else ())
        if p.name not in (CHECKPOINT, "live") and not p.name.startswith(f".{CHECKPOINT}.tmp-")
    )
    if foreign:
        raise ParamsError(key, f"{folder} holds {foreign[0]!r}, not a run's resume state, and a finished run "
                          "deletes the folder; name another folder (or empty it yourself)")


def discard_resume(resume_dir: str | Path) -> None:
    """Delete a published run's resume folder, its checkpoint first: a kill half-way through would else
    leave ``last.pt`` beside curves partly deleted, and a rerun would resume from it and publish them.
    A folder that is a symlink (rmtree refuses one) is emptied and the link kept."""
    folder = Path(resume_dir)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    if not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir() if folder.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # as rmtree's ignore_errors: the run is published already
                child.unlink()


def truncate_live(live_dir: Path, step: int) -> None:
    """Drop dvclive history rows logged after ``step`` (by a run killed after its last checkpoint).

    A row a crash cut short (too few fields, or no step) goes too; a file torn within its header holds
    no row and is removed, so dvclive starts it again. A summary (``metrics.json``) a kill cut short is
    rebuilt from the last row kept of each series: dvclive reads it on resume, and a run killed while
    its ``end`` rewrote it after the last checkpoint logs nothing more, so it published ``{"step": 0}``.
    """
    summary = live_dir / "metrics.json"
    torn = False
    if summary.is_file():
        try:
            json.loads(summary.read_text())
        except ValueError:
            torn = True
    metrics = live_dir / "plots" / "metrics"
    latest: dict[str, Any] = {}
    for tsv in sorted(metrics.rglob("*.tsv")):
        text = tsv.read_text()
        header, *rows = text.splitlines() or [""]
        columns = header.split("\t")
        if "\n" not in text or "step" not in columns:  # dvclive writes the header with its first row
            tsv.unlink()
            continue
        column = columns.index("step")
        kept = [r for r in rows if _logged_step(r, len(columns), column) <= step]
        with atomic_file(tsv) as tmp:
            tmp.write_text("\n".join([header, *kept]) + "\n")
        if kept:  # dvclive's summary: the series' last value under its path's parts, and the last step
            fields = kept[-1].split("\t")
            node = latest
            *parents, name = tsv.relative_to(metrics).with_suffix("").parts
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = _logged_value(fields[-1])
            latest["step"] = max(latest.get("step", 0), int(fields[column]))
    if torn:
        with atomic_file(summary) as tmp:
            tmp.write_text(json.dumps(latest, indent=4))


def _logged_value(text: str) -> Any:
    """A value as dvclive logged it: a number, or the text it writes for a NaN or an infinity."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _logged_step(row: str, width: int, column: int) -> float:
    """The step a dvclive row was logged at; infinity for a row cut short."""
    fields = row.split("\t")
    if len(fields) != width or not fields[column].isdigit():
        return math.inf
    return int(fields[column])
