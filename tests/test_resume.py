"""A pretrain run killed with SIGKILL resumes to bitwise the same result as an uninterrupted run.

The reference run is the stage called in this process; the killed run is a real
``python -m mcf.cli pretrain`` process that checkpoints every step and is killed once its checkpoint
has passed step 4 (so possibly while writing one); the rerun of the same command resumes.
Accumulation (2 micro-batches) and epoch boundaries (6 steps each) are crossed after the resume.
All three use one thread, which keeps CPU reductions in the same order (and the test fast on a
busy machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from test_pretrain import make_workspace, tsv_column, write_params

from mcf.params import load
from mcf.train import pretrain

TRAIN = {"epochs": 3, "accum_steps": 2, "batch_size": 8, "warmup_epochs": 1, "ckpt_every": 1}
TOTAL = 18  # 96 crops / (8 × 2) = 6 steps per epoch × 3 epochs
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUNS = ("straight", "killed")


def command(params: Path) -> list[str]:
    return [sys.executable, "-m", "mcf.cli", "pretrain", "--params", str(params)]


def checkpoint_step(resume_dir: Path) -> int:
    """The step of the checkpoint on disk, or -1 while there is none."""
    try:
        return torch.load(resume_dir / "last.pt", map_location="cpu", weights_only=True)["step"]
    except FileNotFoundError:  # not written yet, or the finished run has removed its resume folder
        return -1


def kill_past_step(
    start: Callable[[], subprocess.Popen], kill: Callable[[subprocess.Popen], None], resume_dir: Path,
    outputs: list[Path], step: int, total: int, tries: int = 3,
) -> int:
    """Start a run, ``kill`` it once its checkpoint has reached ``step``, and return the step on disk.

    The watcher can be starved on a busy machine (CI runs the Prefect pipeline beside the tests) until the
    run has written its last checkpoint or finished: then the kill tests nothing, and the run is tidied
    away and started again.
    """
    for _ in range(tries):
        proc = start()
        deadline = time.monotonic() + 240
        while checkpoint_step(resume_dir) < step and proc.poll() is None:
            assert time.monotonic() < deadline, f"no checkpoint for step {step}"
            time.sleep(0.01)
        if proc.poll() is None:
            kill(proc)
        proc.wait(timeout=60)
        killed_at = checkpoint_step(resume_dir)
        if proc.returncode == -signal.SIGKILL and step <= killed_at < total:
            assert not any(path.exists() for path in outputs)
            return killed_at
        for path in (resume_dir, *outputs):
            shutil.rmtree(path, ignore_errors=True)
    pytest.fail(f"each of {tries} runs reached its end before the kill landed")


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_exact(tmp_path: Path) -> None:
    root = make_workspace(tmp_path)
    killed = write_params(root, "killed.yaml", **TRAIN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain.main(*load("pretrain", write_params(root, "straight.yaml", **TRAIN)))
    finally:
        torch.set_num_threads(threads)

    resume_dir = root / ".resume" / "killed"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    start = partial(subprocess.Popen, command(killed), env=ENV, **quiet)
    killed_at = kill_past_step(start, lambda proc: proc.send_signal(signal.SIGKILL), resume_dir,
                               [root / "killed", root / "metrics" / "killed"], step=4, total=TOTAL)

    resumed = subprocess.run(command(killed), capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at}" in resumed.stderr

    a = torch.load(root / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(root / "killed" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    backbone = [torch.load(root / run / "backbone" / "backbone.pth", weights_only=True) for run in RUNS]
    assert all(torch.equal(backbone[0][k], backbone[1][k]) for k in backbone[0])
    # the dvclive history is continuous: rows logged after the last checkpoint were dropped
    for metric in ("loss", "loss_contrastive", "lr"):
        tsv = [root / "metrics" / run / "plots" / "metrics" / "train" / f"{metric}.tsv" for run in RUNS]
        assert tsv_column(tsv[1], "step") == list(range(1, TOTAL + 1))
        assert tsv_column(tsv[0], metric) == tsv_column(tsv[1], metric)
