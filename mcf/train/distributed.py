"""Process-group helpers for torchrun, with a single-process path when torchrun's env is absent, and
where (device) and in which precision (autocast dtype) a process computes.

Every helper works uninitialised (rank 0 of 1), so the same training code runs on a laptop, under
``torchrun --nproc_per_node 8`` and in tests that spawn gloo processes on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from mcf.params import ParamsError
from mcf.pools import on_death

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

log = logging.getLogger(__name__)

LAUNCHER_ENV = "MCF_LAUNCHER_PID"  # set by launch() for its workers: the launcher holds the stage lock
EXIT_DIR_ENV = "MCF_EXIT_DIR"  # set by launch() for its workers: where each leaves its exit status


def under_torchrun() -> bool:
    """Whether torchrun started this process (its environment is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def takes_stage_lock() -> bool:
    """Whether this process holds its stage's lock (:func:`mcf.io.stage_lock`): one outside torchrun, and
    rank 0 of a torchrun started by hand; the workers of :func:`launch` run under their launcher's."""
    return not under_torchrun() or (os.environ["RANK"] == "0" and LAUNCHER_ENV not in os.environ)


def is_initialized() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


# derive_seed's keys: 0, 1, ... are the ranks' streams (``seed_process``); these sit above any rank
INIT_KEY = 2**32 - 2  # a model's initial weights (MCF's init): no rank may draw its masks from them
MAE_INIT_KEY = 2**32 - 1  # the teacher stage's MAE, which must not start from its student's weights


def derive_seed(seed: int, key: int) -> int:
    """A seed for the stream ``key`` of a run seeded ``seed`` (NumPy's SeedSequence): streams keyed apart
    stay independent, where ``seed + key`` would give run 0's stream 1 to run 1's stream 0."""
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def default_device() -> torch.device:
    """Where a single-process stage runs: the (first) GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto`` is bf16 on CUDA and fp32 (no autocast) on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def init_distributed() -> tuple[int, int, int, torch.device]:
    """Join torchrun's process group from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Returns ``(rank, world_size, local_rank, device)``. NCCL on CUDA, gloo on the CPU. Without the
    torchrun environment this is a single process on ``cuda`` (when present) or ``cpu``.
    """
    cuda = torch.cuda.is_available()
    if not under_torchrun():
        return 0, 1, 0, default_device()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if not is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world)
        log.info("process group %s: rank %d of %d on %s", backend, rank, world, device)
        exit_with_agent(os.getppid())
    return rank, world, local_rank, device


def exit_with_agent(agent: int) -> None:
    """SIGTERM this worker once ``agent`` (torchrun, its parent) is gone.

    torchrun starts each worker in a session of its own, out of reach of a stop sent to the stage's
    process group. Killed outright (SIGKILL, the OOM killer) it stops nothing, and its workers would train
    on unseen, to write outputs no stage records.
    """
    on_death(agent, partial(os.kill, os.getpid(), signal.SIGTERM))


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order; no gradient flows back.

    Not distributed: the tensor itself, detached. Rank r's rows sit at ``[r * N, (r + 1) * N)``,
    which is where the contrastive loss looks for each rank's positives.
    """
    if not is_initialized():
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_initialized():
        dist.barrier()


def launch(argv: list[str], processes: int) -> int:
    """Run ``mcf <argv>`` again as ``processes`` torchrun workers on this machine; their exit status.

    ``train.processes`` asks for it, so that ``dvc repro`` and the Prefect flow, which start each stage
    as one command, train with DDP: one worker per GPU (NCCL), or gloo processes on the CPU. The
    rendezvous stays on 127.0.0.1 with a free port. torchrun exits 1 whatever its workers' statuses
    were, so the workers' own status (:func:`record_exit`) is returned when they agree on one: params
    the workers reject still exit 2. torchrun's log folder, which it never removes (one more
    ``torchelastic_*`` in the temp folder each run), goes in the launcher's own, removed on its return.
    """
    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:
        # the machine, not a fault of the run: a rerun here fails the same way, so a params error (exit 2)
        raise ParamsError("train.processes", f"{processes} asked, but this process sees {gpus} GPU(s)")
    log.info("starting %d processes under torchrun", processes)
    with tempfile.TemporaryDirectory(prefix="mcf-exit-") as exits:
        command = [
            sys.executable, "-c", TORCHRUN, "--nnodes", "1", "--nproc_per_node", str(processes),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--log-dir", str(Path(exits, "logs")),
            "-m", "mcf.cli", *argv,
        ]
        env = {**os.environ, LAUNCHER_ENV: str(os.getpid()), EXIT_DIR_ENV: exits}
        code = run_forwarding_sigterm(command, env)
        failed = {int(p.read_text()) for p in Path(exits).glob("rank*[0-9]")} - {0}
        ranks: dict[str, list[int]] = {}  # each worker's one-line error -> the ranks that gave it
        for p in Path(exits).glob("rank*.err"):
            ranks.setdefault(p.read_text(), []).append(int(p.stem.removeprefix("rank")))
    if code:  # last, after torchrun's own report of the failure, which would bury them
        for line, which in sorted(ranks.items(), key=lambda item: min(item[1])):
            print(f"{line} (rank {', '.join(map(str, sorted(which)))})", file=sys.stderr)
    return failed.pop() if code and len(failed) == 1 else code


# torchrun's main through :func:`torchrun_main`, which the launcher starts in its stead
TORCHRUN = ("import sys; from mcf.train.distributed import torchrun_main; "
            "sys.exit(torchrun_main(sys.argv[1:]))")


def torchrun_main(argv: list[str]) -> int:
    """torchrun on ``argv``; stopped by a signal (Ctrl-C, a stop's SIGTERM), which it passes on to its
    workers, it exits 128 + n: its own SignalException was a 30-line traceback under the launcher's one
    line.

    Its launcher killed outright (the OOM killer, a CI runner's SIGKILL), torchrun and its workers trained
    on for ever, holding the GPUs and the stage's stdout, so whatever read that to its end (dvc repro)
    hung: torchrun now takes a SIGTERM then, and stops its workers (each in a session of its own, which
    only torchrun reaches) as for any stop. The launcher is the one :func:`launch` names, which is this
    process's parent; named, one that died while torch imported is seen too.
    """
    launcher = int(os.environ.get(LAUNCHER_ENV, os.getppid()))
    on_death(launcher, partial(os.kill, os.getpid(), signal.SIGTERM))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    # its log line of the first failed worker: report_failure says it, or leaves it to the worker's own
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not record.getMessage().startswith("failed (exitcode"))
    try:
        main(argv)
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:  # uncaught, a 40-line traceback and table above the workers' one line
        report_failure(err)
        return 1
    return 0


def report_failure(err: ChildFailedError) -> None:
    """Say in one line how torchrun's first failed worker ended, unless it left its own error line (which
    :func:`launch` repeats): a worker killed by a signal says nothing itself, and the traceback of an
    uncaught exception, printed above, names no rank."""
    rank, failure = err.get_first_failure()
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and Path(folder, f"rank{rank}.err").exists():
        return
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited {failure.exitcode}"
    print(f"mcf: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)


def record_exit(status: int) -> None:
    """Leave this worker's exit status where its :func:`launch` reads it (nothing outside one)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and under_torchrun():
        Path(folder, f"rank{os.environ['RANK']}").write_text(str(status))


def record_error(line: str) -> None:
    """Leave this worker's one-line error where its :func:`launch` repeats it (nothing outside one)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and under_torchrun():
        Path(folder, f"rank{os.environ['RANK']}.err").write_text(line)


def run_forwarding_sigterm(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` and wait; a SIGTERM to this process is passed on, so the child (torchrun, which
    stops its workers in turn) is not left training on its own when only the parent is stopped."""
    with subprocess.Popen(command, env=env) as proc:
        previous = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the terminal's Ctrl-C reached the child too: wait while it stops
            proc.wait()  # (torchrun its workers), so that the one line comes last and nothing runs on
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)


def cleanup() -> None:
    """Leave the process group, if any (call once at the end of a run)."""
    if is_initialized():
        dist.destroy_process_group()
