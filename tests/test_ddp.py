"""Pretrain under torchrun: 2 gloo processes on 127.0.0.1, killed mid-run and resumed, against a run
that started its own torchrun (``train.processes: 2``).

Each rank reads half of every epoch (6 steps of 2 × 8 crops instead of 12 of 8), rank 0 alone
writes the checkpoint and it carries both ranks' RNG states, and the resumed run ends with the same
weights as an uninterrupted 2-process run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain import TINY, make_workspace, tsv_column, write_params
from test_resume import kill_past_step

from mcf import cli
from mcf.data.pretrain_data import CropDataset
from mcf.errors import StageError
from mcf.models.backbone import BackboneConfig, create_backbone, save_backbone
from mcf.models.mcf import MCF, MCFConfig
from mcf.train import distributed
from mcf.train.loop import Run, TrainConfig, Trainer

TRAIN = {"epochs": 2, "batch_size": 8, "warmup_epochs": 1, "ckpt_every": 1}
TOTAL = 12  # 96 crops / (2 ranks × 8) = 6 steps per epoch × 2 epochs
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUNS = ("straight", "killed")


def torchrun(params: Path) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "--log-dir", str(params.parent / "torchrun-logs"),  # not in /tmp
        "-m", "mcf.cli", "pretrain", "--params", str(params),
    ]


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun starts its workers in their own sessions)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def checkpoint(resume_dir: Path) -> dict | None:
    path = resume_dir / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


@pytest.mark.slow
def test_torchrun_two_processes_resume_exactly(tmp_path: Path) -> None:
    root = make_workspace(tmp_path)
    # the uninterrupted run starts its own torchrun (train.processes), as `dvc repro` would; the guard holds
    straight = write_params(root, "straight.yaml", **TRAIN, processes=2, effective_batch=16)
    killed = write_params(root, "killed.yaml", **TRAIN)
    command = [sys.executable, "-m", "mcf.cli", "pretrain", "--params", str(straight)]
    bars = {k: v for k, v in ENV.items() if k != "TQDM_DISABLE"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=bars)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 processes under torchrun" in done.stderr
    # rank 0 alone says what every rank does: each line and bar once, not once per rank (rank 1 said that
    # it wrote the output too)
    once = ("effective batch 16", "pretrain: wrote", "96 crops in", "index shards:   0%",
            "decode crops:   0%")
    for line in once:
        assert done.stderr.count(line) == 1, (line, done.stderr[-3000:])

    resume_dir = root / ".resume" / "killed"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

    def kill(launcher: subprocess.Popen) -> None:  # the workers may have just ended and been reaped: a
        for pid in children(launcher.pid):  # kill past the last step is retried by kill_past_step
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()

    def start() -> subprocess.Popen:  # a fresh port for each try
        return subprocess.Popen(torchrun(killed), env=ENV, **quiet)

    outputs = [root / "killed", root / "metrics" / "killed"]
    kill_past_step(start, kill, resume_dir, outputs, step=3, total=TOTAL)
    state = checkpoint(resume_dir)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert sorted(p.name for p in resume_dir.iterdir() if not p.name.startswith(".")) == ["last.pt", "live"]

    resumed = subprocess.run(torchrun(killed), capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {state['step']}" in resumed.stderr
    a, b = (torch.load(root / r / "checkpoint.pt", weights_only=True)["model"] for r in RUNS)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    tsv = root / "metrics" / "killed" / "plots" / "metrics" / "train" / "loss.tsv"
    assert tsv_column(tsv, "step") == list(range(1, TOTAL + 1))


@pytest.mark.slow
def test_ctrl_c_under_train_processes_ends_on_one_line(tmp_path: Path) -> None:
    """Ctrl-C reaches the launcher and torchrun (the terminal's group; torchrun passes it on to its
    workers): the stage ended in torchrun's SignalException traceback and three 'mcf: interrupted'
    lines, one per process. Now: one line, last, and exit 130."""
    root = make_workspace(tmp_path)
    params = write_params(root, **{**TRAIN, "epochs": 2000, "processes": 2})
    script = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              f"from mcf.cli import main\nsys.exit(main(['pretrain', '--params', {str(params)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        await_training(root, proc)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
        _, err = proc.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in err and err.count("mcf: interrupted") == 1, err[-3000:]
    assert err.endswith("mcf: interrupted\n")  # the launcher waited for torchrun to stop its workers
    assert checkpoint(root / ".resume" / "params") is not None  # the resume state stands


def running(pid: int) -> bool:
    """Whether ``pid`` still runs: not gone, and not a zombie left for a parent to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def await_training(root: Path, proc: subprocess.Popen) -> None:
    """Until both workers have trained (the resume checkpoint is written), ``proc`` running all along."""
    deadline = time.monotonic() + 240
    while checkpoint(root / ".resume" / "params") is None:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)


def await_gone(pids: list[int], seconds: float) -> bool:
    """Whether every one of ``pids`` has ended (zombies count as ended) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(map(running, pids))


@pytest.mark.slow
def test_torchrun_and_its_workers_end_when_the_launcher_is_killed_outright(tmp_path: Path) -> None:
    """`train.processes` starts torchrun under the stage's process: SIGKILLed (the OOM killer, a CI
    runner), that left torchrun and its workers training for ever, holding the GPUs and the stage's stdout,
    so whatever read that to its end (dvc repro, a CI runner) hung. torchrun stops them, and itself."""
    root = make_workspace(tmp_path)
    params = write_params(root, **{**TRAIN, "epochs": 2000, "processes": 2})  # minutes of training left
    scratch = tmp_path / "tmp"  # the launcher's exit-status folder, which a SIGKILL leaves behind
    scratch.mkdir()
    with (tmp_path / "stderr").open("w") as err:  # a file: torchrun's log would fill an unread pipe
        launcher = subprocess.Popen([sys.executable, "-m", "mcf.cli", "pretrain", "--params", str(params)],
                                    env={**ENV, "TMPDIR": str(scratch)}, stdout=subprocess.PIPE, stderr=err)
    agents: list[int] = []
    workers: list[int] = []
    try:
        await_training(root, launcher)
        agents = children(launcher.pid)
        assert len(agents) == 1
        workers = children(agents[0])
        assert len(workers) == 2
        launcher.kill()
        try:
            launcher.communicate(timeout=60)  # to the end of stdout, which torchrun and its workers hold
        except subprocess.TimeoutExpired:
            pytest.fail("the stage's output did not end within 60 s of its process being killed")
        assert await_gone(agents + workers, 10)  # torchrun, handed to another parent, may not be reaped yet
        assert [p.name[:9] for p in scratch.iterdir()] == ["mcf-exit-"]  # in the test's folder, not /tmp
    finally:
        for pid in [*agents, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()


@pytest.mark.slow
def test_workers_stop_when_torchrun_is_killed_outright(tmp_path: Path) -> None:
    """torchrun starts its workers in sessions of their own: SIGKILLed (the OOM killer, a stop's last
    resort), it cannot stop them, so each worker stops itself once its parent is gone."""
    root = make_workspace(tmp_path)
    params = write_params(root, **{**TRAIN, "epochs": 2000})  # minutes of training left when killed
    agent = subprocess.Popen(torchrun(params), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        await_training(root, agent)
        workers = children(agent.pid)
        assert len(workers) == 2
        agent.kill()
        agent.wait()
        assert await_gone(workers, 15)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_launcher_reaches_torchrun(tmp_path: Path) -> None:
    """`train.processes` re-runs the stage under torchrun: stopping the parent stops the child too."""
    child = (
        "import os, pathlib, signal, sys, time\n"
        f"p = pathlib.Path({str(tmp_path)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *_: (p.joinpath('stopped').touch(), sys.exit(7)))\n"
        # ready once the launcher forwards SIGTERM (it sets its handler after starting this process): a
        # SIGTERM before that would end the launcher alone, leaving this process running
        "status = pathlib.Path(f'/proc/{os.getppid()}/status')\n"
        "while not int(status.read_text().split('SigCgt:')[1].split()[0], 16) & 1 << signal.SIGTERM - 1:\n"
        "    time.sleep(0.01)\n"
        "p.joinpath('ready').touch()\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import sys\nfrom mcf.train.distributed import run_forwarding_sigterm\n"
        f"sys.exit(run_forwarding_sigterm([sys.executable, '-c', {child!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 7 and (tmp_path / "stopped").exists()


def test_the_launchers_sigterm_is_its_own_again_once_torchrun_ends() -> None:
    """Once torchrun has ended, a SIGTERM to the launcher (a stop of the stage) must stop it, not be passed
    on to a child already gone."""
    before = signal.getsignal(signal.SIGTERM)
    assert distributed.run_forwarding_sigterm([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_in_the_launcher_waits_for_torchrun_to_stop(tmp_path: Path) -> None:
    """Ctrl-C reaches the launcher and torchrun alike: the launcher waits while torchrun stops its workers,
    so that its one line comes last and nothing trains on once `mcf` has exited (leaving the ``with``
    block, Popen waits a quarter of a second)."""
    child = (
        "import os, pathlib, signal, sys, time\n"
        f"p = pathlib.Path({str(tmp_path)!r})\n"
        "def stop(*_):\n    time.sleep(0.6)\n    p.joinpath('stopped').touch()\n    sys.exit(1)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "time.sleep(0.2)\n"  # the launcher waits by then
        "os.kill(os.getppid(), signal.SIGINT)\n"  # a terminal's Ctrl-C: the launcher and torchrun
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(60)\n"
    )
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a CI's background job ignores it
    try:
        with pytest.raises(KeyboardInterrupt):
            distributed.run_forwarding_sigterm([sys.executable, "-c", child])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "stopped").exists()


def test_a_worker_leaves_its_status_and_error_for_its_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What launch reads back to keep `mcf`'s exit status (2: params) through torchrun's 1 and to repeat
    each rank's one line last; a process outside torchrun leaves nothing."""
    monkeypatch.setenv(distributed.EXIT_DIR_ENV, str(tmp_path))
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    distributed.record_exit(2)
    distributed.record_error("mcf: invalid params: x")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.record_exit(2)
    distributed.record_error("mcf: invalid params: x")
    left = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert left == {"rank1": "2", "rank1.err": "mcf: invalid params: x"}


def test_more_processes_than_gpus_is_refused_as_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """8 processes on a machine that sees 1 GPU: exit 2 (a rerun there fails the same way, so the flow
    does not retry it), naming the key and both counts, before torchrun starts."""
    root = make_workspace(tmp_path)
    params = write_params(root, processes=8, batch_size=2, accum_steps=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["pretrain", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "pretrain.train.processes: 8 asked, but this process sees 1 GPU(s)" in err


def test_a_params_error_in_the_workers_exits_2_through_torchrun(tmp_path: Path) -> None:
    """feature_layers [0, 1] against a teacher export of depth 1, found by each worker as it loads the
    export (no check of the params file can see it, and the launcher only checks that the export exists):
    torchrun exits 1 for any failed worker, but `mcf pretrain` keeps its exit-status contract (2: params
    rejected, not retried)."""
    root = make_workspace(tmp_path, n=16)
    shallow = BackboneConfig(**{**TINY, "depth": 1})
    save_backbone(create_backbone(shallow), shallow, root / "teacher")
    params = write_params(root, processes=2)
    command = [sys.executable, "-m", "mcf.cli", "pretrain", "--params", str(params)]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**ENV, "TMPDIR": str(scratch)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert "starting 2 processes under torchrun" in done.stderr
    # torchrun's log folder goes with the launcher's own: each run left an empty torchelastic_* in /tmp
    assert list(scratch.iterdir()) == []
    assert "[1] out of range for a teacher of depth 1" in done.stderr
    assert done.returncode == 2, done.stderr[-3000:]
    # the workers' one line, not torchrun's ChildFailedError traceback and its table of failures
    for noise in ("Traceback", "ChildFailedError", "Root Cause", "failed (exitcode"):
        assert noise not in done.stderr, done.stderr[-3000:]
    # repeated once, last, after torchrun's report of the failure (the flow keeps a log's last 40 lines)
    last = done.stderr.splitlines()[-1]
    assert last == (f"mcf: invalid params: {params}: pretrain.model.feature_layers: [1] out of range for a "
                    "teacher of depth 1 (rank 0, 1)"), last


@pytest.mark.parametrize(
    ("crash", "report", "tracebacks"),
    [("raise RuntimeError('a bug')", "exited 1", 1),
     ("os.kill(os.getpid(), signal.SIGKILL)", "was killed by SIGKILL", 0)],
)
def test_a_worker_that_crashes_is_reported_in_one_line(
    tmp_path: Path, crash: str, report: str, tracebacks: int
) -> None:
    """A worker that leaves no error line of its own (a bug, whose traceback names no rank, or a signal):
    torchrun's ChildFailedError traceback and table give way to one line, last, naming the rank and how
    it ended; a bug's traceback is the worker's own."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"import os, signal, time\nif os.environ['RANK'] == '1':\n    {crash}\n"
                      "time.sleep(60)\n")  # rank 0 until torchrun stops it
    command = [sys.executable, "-c", distributed.TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
               "--log-dir", str(tmp_path / "logs"), str(worker)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "ChildFailedError" not in done.stderr and done.stderr.count("Traceback") == tracebacks, done.stderr
    assert re.fullmatch(rf"mcf: rank 1 \(pid \d+\) {report}", done.stderr.splitlines()[-1]), done.stderr


def test_resume_under_another_world_size_names_the_process_counts(tmp_path: Path) -> None:
    """A checkpoint of 2 processes, resumed by 1 with the same params: refused (each rank's data slice,
    lr and RNG states belong to 2), saying so rather than blaming params, data or precision."""
    root = make_workspace(tmp_path, n=32)
    cfg = MCFConfig(backbone=BackboneConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                    feature_loss=False, proj_hidden=32, proj_dim=16, pred_hidden=32)
    crops = CropDataset(root / "subset" / "shards", TINY["img_size"], 64)
    train = TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, ckpt_every=1)
    Trainer(MCF(cfg), crops, train, Run(0, 0.75, root / "resume", {}, rank=0, world_size=2)).fit()
    with pytest.raises(StageError, match="written by 2 processes, this run has 1: resume it with 2"):
        Trainer(MCF(cfg), crops, train, Run(0, 0.75, root / "resume", {}, world_size=1))


def _node_local_rank(rank: int, port: int, root: str) -> None:
    """One rank whose resume_dir is its own folder, as on a disk local to its node."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    distributed.init_distributed()
    try:
        cfg = MCFConfig(backbone=BackboneConfig(**TINY), decoder_dim=16, decoder_depth=1, decoder_heads=2,
                        feature_loss=False, proj_hidden=32, proj_dim=16, pred_hidden=32)
        crops = CropDataset(Path(root) / "subset" / "shards", TINY["img_size"], 64)
        train = TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, ckpt_every=1)
        run = Run(0, 0.75, Path(root) / f"node{rank}", {}, rank=rank, world_size=2)
        Trainer(MCF(cfg), crops, train, run).fit()  # rank 0 leaves a checkpoint in node0/ alone
        try:
            Trainer(MCF(cfg), crops, train, run)
            outcome = "resumed"
        except StageError as err:
            outcome = str(err)
        (Path(root) / f"rank{rank}.txt").write_text(outcome)
    finally:
        distributed.cleanup()


@pytest.mark.timeout(120)
def test_ranks_that_find_different_checkpoints_refuse_to_train(tmp_path: Path) -> None:
    """A resume_dir each node reads on its own disk: rank 0 finds the last step's checkpoint, rank 1 none.
    Both refuse, instead of training replicas from different steps (which drift apart, then hang)."""
    root = make_workspace(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_node_local_rank, args=(port, str(root)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        outcome = (root / f"rank{rank}.txt").read_text()
        assert "the ranks disagree on where to start" in outcome, outcome
        assert "0: (" in outcome and ", 6), 1: (" in outcome and ", None)}" in outcome


class _PerSampleLoss(torch.nn.Module):
    """The smallest model the loop trains: no randomness (each rank would draw other masks than one
    process does) and a loss that is a mean over images, so 2 ranks × 2 micro-batches of 4 images
    average to the loss of one batch of 16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, 5)

    def forward(self, imgs: torch.Tensor, mask_ratio: float) -> dict[str, torch.Tensor]:
        return {"loss": (self.proj(imgs.flatten(1)).tanh() - 0.5).pow(2).mean()}

    def momentum_at(self, step: int, total: int) -> float:
        return 0.996

    def update_momentum(self, momentum: float) -> None:
        pass


_TOY_CROPS = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))


def _train_toy(batch_size: int, accum_steps: int, root: Path, rank: int = 0, world_size: int = 1) -> dict:
    """Train the toy for 4 steps of 16 images; the gradients each step applied, the optimizer steps
    whose backward all-reduced (a DDP comm hook), and the final weights."""
    train = TrainConfig(epochs=1, warmup_epochs=0, batch_size=batch_size, accum_steps=accum_steps, blr=0.05)
    run = Run(0, 0.75, root / f"resume{world_size}", {}, rank=rank, world_size=world_size)
    trainer = Trainer(_PerSampleLoss(), _TOY_CROPS, train, run)  # a uint8 tensor indexes as crops do
    grads: list[list[torch.Tensor]] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    synced: list[int] = []
    if world_size > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses a string annotation
            synced.append(trainer.step)
            return allreduce_hook(None, bucket)

        trainer.net.register_comm_hook(None, hook)
    model = trainer.fit()
    return {"grads": grads, "synced": synced, "model": model.state_dict(), "total": trainer.total}


def _accumulating_rank(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    distributed.init_distributed()
    try:
        torch.save(_train_toy(4, 2, Path(root), rank, 2), Path(root) / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


@pytest.mark.timeout(120)
def test_ddp_with_accumulation_trains_as_one_process_with_the_same_effective_batch(tmp_path: Path) -> None:
    """2 gloo ranks × batch 4 × accum_steps 2 apply, at each of 4 optimizer steps, the gradient of one
    process's batch of 16 (the same images: each step's 16 crops of the epoch's order, split between the
    ranks), and end with its weights; the gradients are all-reduced once per optimizer step, on the last
    micro-batch (``no_sync`` on the others). Gradients are compared, not only weights: AdamW's update
    hardly changes when every gradient is off by one factor (a micro-batch loss left undivided)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_accumulating_rank, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = _train_toy(16, 1, tmp_path)
    assert single["total"] == 4 and all(r["total"] == 4 for r in ranks)
    for r in ranks:
        assert r["synced"] == [0, 1, 2, 3]  # one all-reduce per optimizer step, not one per micro-batch
        assert len(r["grads"]) == 4
        for got, want in zip(r["grads"], single["grads"], strict=True):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
        for k, w in single["model"].items():
            torch.testing.assert_close(r["model"][k], w, rtol=1e-5, atol=1e-6)
        assert not torch.equal(r["model"]["proj.weight"], _PerSampleLoss().proj.weight.detach())  # it trained
    assert all(torch.equal(ranks[0]["model"][k], ranks[1]["model"][k]) for k in ranks[0]["model"])
