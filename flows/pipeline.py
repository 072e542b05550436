"""Prefect flow ``mcf``: the DVC pipeline's stages as Prefect tasks, each started once its upstream is done.

Each task runs ``dvc repro --single-item <stage>``, so a Prefect run and a plain ``dvc repro`` share one
cache, one run-cache and one ``dvc.lock``: a stage whose deps, params and command are unchanged is
skipped, and one that ran before with the same inputs is restored from the run-cache, whoever ran it
(except ``fetch``: DVC keeps no run-cache for its persistent output, the folder downloads resume from).
The stage list and order come from ``dvc.yaml`` (foreach/matrix stages appear as ``name@item``).
The flow is a thin shell: what a stage does lives in ``mcf <stage>``, what it depends on in dvc.yaml.

Deployments (``prefect.yaml``) run it on the ``gpu`` work pool; see the README for the set-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec

import networkx as nx
from dvc.repo import Repo
from dvc.stage import PipelineStage
from dvc.stage.cache import RunCacheNotFoundError
from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture, wait
from prefect.states import Cancelled

from flows.stage_guard import left_in_group
from mcf.errors import EXIT_ACCESS, EXIT_GATE, EXIT_PARAMS
from mcf.io import atomic_file, file_sha256, resolved
from mcf.params import ParamsError
from mcf.report import markdown_summary

PARAMS = "params.yaml"  # the one file DVC templates dvc.yaml from and tracks params in
GPU_STAGES = frozenset({"teacher", "pretrain", "finetune_alignment", "finetune_parsing", "evaluate"})
RETRIES = {"fetch": 2}  # I/O stages only: a failed training step is not a transient error
RETRY_DELAY_S = 30  # waited in the task (_pause_before_retry), not Prefect's retry_delay_seconds
NO_RETRY = (EXIT_PARAMS, EXIT_GATE, EXIT_ACCESS)  # `mcf <stage>`'s: rejected params, a failed gate, no access
TAIL_LINES = 40
STOP_GRACE_S = 60  # a cancelled stage's group gets this long to stop after SIGTERM (torchrun: 30 s)
# ... and in a cancelled run, less than the 30 s a worker gives the run's process before its SIGKILL,
# which would leave a stage deaf to SIGTERM running. torchrun's workers are not in the group (it starts
# each in a session of its own): torchrun passes the SIGTERM on, so only a worker deaf to it outlives this
RUN_STOP_GRACE_S = 20
# DVC unlocks the repository while a stage's command runs, so independent stages run side by side and
# wait only for each other's short bookkeeping (checks, dvc.lock updates)
DVC = [sys.executable, "-m", "dvc", "--wait-for-lock"]
GUARD = Path(__file__).with_name("stage_guard.py")  # leads each stage's process group (stdlib only)
Outcome = Literal["ran", "restored", "unchanged"]
P = ParamSpec("P")


class StageFailed(RuntimeError):
    """A stage failed; the message names it and says why (for ``dvc repro``, the tail of its log).

    ``exit_code`` is the stage command's own exit status, as DVC reports it, when it got that far.
    ``dvc_refused``: DVC failed the stage itself, not its command (a missing dependency, an output the
    command did not write): a rerun would fail the same way.
    """

    def __init__(self, stage: str, detail: str, exit_code: int | None = None,
                 dvc_refused: bool = False) -> None:
        self.stage, self.detail, self.exit_code, self.dvc_refused = stage, detail, exit_code, dvc_refused
        super().__init__(f"stage {stage!r} failed: {detail}")

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None, bool]]:
        """Rebuilt from its parts when pickled (a result Prefect persists, a process boundary)."""
        return StageFailed, (self.stage, self.detail, self.exit_code, self.dvc_refused)


@dataclass(frozen=True)
class StageRun:
    """What one task did: ``ran`` the command, ``restored`` outputs from the run-cache, or nothing."""

    stage: str
    outcome: Outcome
    seconds: float


def _base(address: str) -> str:
    """``finetune_alignment@mcf`` -> ``finetune_alignment`` (the name in params.yaml and the CLI)."""
    return address.split(":")[-1].split("@")[0]


def plan(root: Path, targets: list[str] | None = None) -> dict[str, list[str]]:
    """Stage address -> the stages it directly depends on, in dependency order (ties: dvc.yaml's order).

    The plan is ``targets`` plus everything upstream, or the whole pipeline. A target is an address
    (``finetune_alignment@mcf``) or a stage name standing for all its foreach/matrix items. Upstream
    stages are included as ``dvc repro <target>`` would: they cost a second when up to date, and a
    stage never runs on inputs DVC does not know about.
    """
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edge: stage -> a stage whose output it depends on
        stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
        if not stages:
            raise ValueError(f"no pipeline stages in {root}/dvc.yaml")
        chosen = set(stages)
        if targets is not None and not targets:  # not "all": a list emptied by mistake would run everything
            raise ValueError("no stage given (an empty list): name the stages to reach, or leave it unset "
                             "for the whole pipeline")
        if targets:
            chosen = set()
            for target in targets:
                hits = [s for s in stages if target in (s.addressing, _base(s.addressing))]
                if not hits:
                    valid = ", ".join(s.addressing for s in stages)
                    raise ValueError(f"unknown stage {target!r} (valid: {valid})")
                for stage in hits:
                    chosen |= {stage} | (nx.descendants(graph, stage) & set(stages))
        sub = graph.subgraph(chosen)
        position = {stage: i for i, stage in enumerate(stages)}
        order = nx.lexicographical_topological_sort(sub.reverse(), key=position.get)
        return {s.addressing: [d.addressing for d in sorted(sub.successors(s), key=position.get)]
                for s in order}


def _outcome(line: str, current: Outcome) -> Outcome:
    """Read DVC's own report of what it did with a stage."""
    if line.startswith("Running stage '"):
        return "ran"
    if "is cached - skipping run" in line:
        return "restored"
    return current


def stop_group(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM to ``proc``'s whole process group, SIGKILL to what is left after ``grace`` seconds.

    ``dvc repro`` passes no signal on to the stage's command, which would go on training unseen (and a
    rerun would run beside it); torchrun, in the group too, stops its workers itself within 30 s.
    """
    stop_groups([proc], grace)


def stop_groups(procs: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """:func:`stop_group` for several groups at once: all get SIGTERM first and share one ``grace``."""
    left = []
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            left.append(proc)
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        for proc in list(left):
            proc.poll()  # reap the leader
            if not left_in_group(proc.pid):  # not killpg(pid, 0), which zombies answer as live members
                left.remove(proc)
        time.sleep(0.2)
    for proc in left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()


class _Running:
    """The stage commands in flight in this process, so that a stopped flow run stops them too.

    A cancelled run (Prefect raises ``TerminationSignal`` in the flow's thread) or an interrupted one
    never reaches the task threads, which read on; their commands, in sessions of their own, were out of
    reach of the worker's kill and went on training after the run was marked cancelled.
    """

    def __init__(self) -> None:
        self.lock, self.procs, self.stop_event = threading.Lock(), set[subprocess.Popen](), threading.Event()

    @property
    def stopped(self) -> bool:
        """Whether the run is being stopped (``stop_event``, which a Dask fan-out reads too)."""
        return self.stop_event.is_set()

    def start(self, stage: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        """``Popen(cmd)`` in a session of its own, unless the run is being stopped."""
        with self.lock:
            if self.stopped:
                raise StageFailed(stage, "the flow run was stopped before the stage started")
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self.procs.add(proc)
            return proc

    def done(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def reset(self) -> None:
        with self.lock:
            self.stop_event.clear()

    def stop_all(self) -> None:
        """Stop every stage command in flight, and refuse to start more."""
        with self.lock:
            self.stop_event.set()
            procs = list(self.procs)
        stop_groups(procs, RUN_STOP_GRACE_S)


RUNNING = _Running()


def _pause_before_retry(stage: str) -> None:
    """On a retry, wait ``RETRY_DELAY_S`` first, unless the run is stopped meanwhile.

    Not Prefect's own retry delay: that is a sleep in the task's thread, which a cancel never reaches, so
    a run cancelled during it kept its process, and its worker's slot, until the delay was over.
    """
    context = TaskRunContext.get()  # none when called as a plain function (``.fn``)
    if context and context.task_run.run_count > 1:
        get_run_logger().info("%s: retrying in %d s", stage, RETRY_DELAY_S)
        if RUNNING.stop_event.wait(RETRY_DELAY_S):
            raise StageFailed(stage, "the flow run was stopped before the stage's retry")


def cancelled_when_stopped(
    body: Callable[P, StageRun], *args: P.args, **kwargs: P.kwargs
) -> StageRun | State:
    """``body(...)``, whose :class:`StageFailed` while the run is being stopped ends the task ``Cancelled``.

    The stop ended the stage's command, or kept it from starting or being recorded: raised, that was
    logged as a failure with a traceback, as if the stage had broken. The state keeps the error as its
    data, so the run's failure still names the stage where the flow's thread goes on (a stop of its own).
    A module-level call, not a wrapper: Dask pickles the task's function by value with what it names.
    """
    try:
        return body(*args, **kwargs)
    except StageFailed as err:
        if not RUNNING.stopped:
            raise
        return Cancelled(message=f"stage {err.stage!r} stopped with the flow run: {err.detail}", data=err)


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def repro(stage: str) -> StageRun | State:
    """Run one stage through DVC, streaming its output to the run's log."""
    return cancelled_when_stopped(_repro, stage)


def _repro(stage: str) -> StageRun:
    """:func:`repro`'s body."""
    _pause_before_retry(stage)
    logger = get_run_logger()
    start, outcome = time.monotonic(), "unchanged"
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    env = {"TQDM_MININTERVAL": "30", **os.environ}  # progress bars: a line every 30 s, not a flood
    # stage commands (`mcf <stage>`) come from this interpreter's environment, whatever the worker's PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # ... and import this checkout's `mcf`, the code DVC hashes as their deps, not the one pip installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")]))
    # a session of its own: a cancelled stage is stopped as a whole process group (below), and its guard
    # stops that group if this process is killed outright
    guard = [sys.executable, str(GUARD), "--parent", str(os.getpid()), "--grace", str(STOP_GRACE_S), "--"]
    cmd = [*guard, *DVC, "repro", "--single-item", stage]
    # a byte the locale's encoding cannot decode (a latin-1 file name, which Python prints as it came under
    # a UTF-8 locale) is shown as \xe9: the strict decoder raised in this loop, which then stopped the stage
    proc = RUNNING.start(stage, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="backslashreplace", env=env)
    with proc:
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                if line:
                    logger.info(line)
                    tail.append(line)
                    outcome = _outcome(line, outcome)
        except BaseException:
            stop_group(proc)  # cancelled: the stage's atomic outputs leave nothing half-written
            raise
        finally:
            RUNNING.done(proc)
    if proc.returncode:
        lines = "\n".join(tail)
        # DVC's StageCmdFailedError: "failed to run: <cmd>, exited with <status>"; without it, its
        # ReproductionError ("failed to reproduce '<stage>': <why>") is DVC's own (a missing dependency)
        status = re.findall(r"failed to run: .*, exited with (-?\d+)", lines)
        refused = not status and "failed to reproduce" in lines
        raise StageFailed(stage, f"`dvc repro` exited {proc.returncode}; its last lines:\n{lines}",
                          int(status[-1]) if status else None, refused)
    return StageRun(stage, outcome, round(time.monotonic() - start, 1))


def retry_condition(_task: Task, _task_run: TaskRun, state: State) -> bool:
    """Retry a failed I/O stage unless its command rejected its params, its data gate failed or it had no
    access to its data, or DVC refused it (a typo, bad data, missing credentials or a missing input is
    not a transient error), or the run is being stopped: its stopped command, or one it refused to
    start, failed for that, and a retry would be refused too."""
    error = state.result(raise_on_failure=False)
    refused = isinstance(error, StageFailed) and (error.dvc_refused or error.exit_code in NO_RETRY)
    return not (RUNNING.stopped or refused)


def stage_task(stage: str) -> Task[[str], StageRun | State]:
    """The ``repro`` task configured for ``stage``: retries on I/O stages, tags ``gpu`` on GPU stages.

    A GPU stage also gets ``gpu-<CUDA_VISIBLE_DEVICES>`` (the worker's device), so tag concurrency
    limits bound GPU stages overall (``gpu``) or per device (``gpu-0``), while CPU stages run freely:
    ``gpu-all`` where the variable is unset (every GPU), ``gpu-none`` where it is empty (no GPU: the
    stage runs on the CPU; it was ``gpu-``, a tag no limit would name).
    """
    base = _base(stage)
    tags = {"dvc", base}
    if base in GPU_STAGES:
        tags |= {"gpu", f"gpu-{os.environ.get('CUDA_VISIBLE_DEVICES', 'all') or 'none'}"}
    retries = RETRIES.get(base, 0)
    return repro.with_options(tags=sorted(tags), retries=retries, retry_condition_fn=retry_condition)


def _dvc(*args: str) -> str:
    """Run a quick DVC command (status, commit) and return its stdout."""
    done = subprocess.run([*DVC, *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"`dvc {' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _restored(stage: str) -> bool:
    """Check out ``stage``'s outputs from DVC's cache, as ``dvc repro`` would before running it: those
    dvc.lock records, or those of a run with these inputs in the run-cache (saved by ``dvc repro`` or a
    fan-out's ``dvc commit``); whether there were any.

    fetch's persistent output is never in it (DVC keeps no run-cache for it).
    """
    with Repo(str(Path.cwd()), _wait_for_lock=True) as repo, repo.lock:
        (target,) = repo.stage.collect(stage)
        try:
            repo.stage_cache.restore(target)
        except RunCacheNotFoundError:
            return False
    return True


@task(task_run_name="{stage}", cache_policy=NO_CACHE)
def dask_stage(stage: str, address: str | None) -> StageRun | State:
    """Stage ``fetch`` or ``crop`` fanned out on Dask (flows/fetch_dask.py, flows/crop_dask.py), then
    recorded in dvc.lock.

    A fan-out writes exactly what its stage's command writes (tests/test_flow.py checks both), so
    ``dvc commit`` records what ``dvc repro`` would have; an up-to-date stage is skipped, and one that
    ran before with the same inputs restored from the run-cache, as usual. Nothing is recorded once the
    run was stopped: a cancel stops the flow's thread, not this one, and the run puts the original
    params.yaml back and lets go of the checkout while the fan-out's tasks in flight finish (it submits
    no more, :func:`flows.dask_runner.stop_on`), so a commit then would record this profile's output
    under the other's params.
    """
    return cancelled_when_stopped(_dask_stage, stage, address)


def _dask_stage(stage: str, address: str | None) -> StageRun:
    """:func:`dask_stage`'s body."""
    _pause_before_retry(stage)
    start = time.monotonic()
    if not json.loads(_dvc("status", "--json", stage) or "{}"):
        return StageRun(stage, "unchanged", round(time.monotonic() - start, 1))
    if _restored(stage):
        _commit(stage)
        return StageRun(stage, "restored", round(time.monotonic() - start, 1))
    try:
        _fan_out(stage, address)
    except Exception as err:
        # the status `mcf <stage>` would exit with (or an error's own, as SchedulerUnreachable's), which
        # decides a retry (retry_condition)
        code = EXIT_PARAMS if isinstance(err, ParamsError) else getattr(err, "exit_code", None)
        raise StageFailed(stage, f"on Dask: {type(err).__name__}: {err}", code) from err
    _commit(stage)
    return StageRun(stage, "ran", round(time.monotonic() - start, 1))


def _fan_out(stage: str, address: str | None) -> None:
    """Run ``stage``'s fan-out flow, which submits no more tasks once the run is stopped: a cancel reaches
    the flow's thread, not the task's thread this runs in.

    Not in :func:`dask_stage`'s body: Dask pickles each task's context, the dask_stage task run's with
    it, and a task's function by value with the globals it names; ``RUNNING`` holds a lock.
    """
    # imported only when asked for: the fan-outs import Dask, OpenCV and the sources (boto3)
    from flows.dask_runner import stop_on

    if stage == "fetch":
        from flows.fetch_dask import fetch_dask as fan_out
    else:
        from flows.crop_dask import crop_dask as fan_out
    with stop_on(RUNNING.stop_event):
        fan_out(address=address)


def _commit(stage: str) -> None:
    """Record ``stage``'s outputs in dvc.lock, unless the flow run was stopped (:func:`dask_stage`)."""
    if RUNNING.stopped:
        raise StageFailed(stage, "the flow run was stopped before its output was recorded in dvc.lock")
    _dvc("commit", "--force", stage)


@contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    """Refuse a second flow run in the same checkout: they would swap params.yaml under each other.

    Also refuse a folder that is not a DVC checkout (MCF_REPO set wrong): creating the lock's ``.dvc/tmp``
    there would make DVC take that folder as the repository root of everything below it.
    """
    if not (root / ".dvc").is_dir():
        raise RuntimeError(f"{root} is not a DVC checkout of mcf (no .dvc folder): point the worker's "
                           "MCF_REPO at a clone of the repository")
    path = root / ".dvc" / "tmp" / "mcf-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another mcf flow run is using {root}; give each worker its own checkout (MCF_REPO)"
            ) from None
        yield


def _state(path: Path) -> str:
    """What ``path`` holds, to compare: a link's value (the file it names is not ours), else a sha256."""
    return f"link {os.readlink(path)}" if path.is_symlink() else file_sha256(path)


def _save(target: Path, saved: Path) -> None:
    """Keep ``target`` at ``saved`` as it is: a link as a link with the same value (a relative one names
    its file again once renamed back), else a copy. Copying a link kept only what it named then."""
    if not target.is_symlink():
        with atomic_file(saved) as tmp:
            shutil.copyfile(target, tmp)
        return
    tmp = saved.with_name(f".{saved.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.readlink(target), tmp)
    os.replace(tmp, saved)  # made durable with the record's rename beside it (atomic_file syncs the folder)


@contextmanager
def applied_params(root: Path, params_file: str) -> Iterator[None]:
    """Put ``params_file`` in place as params.yaml for the run, then put the original back.

    DVC reads params.yaml only (dvc.yaml templating and params deps), so another profile is applied by
    copying it there. dvc.lock then records the values that were run; the committed params.yaml is left
    as it was, and switching back later restores outputs from the run-cache instead of recomputing
    (``fetch`` reruns). params.paper.yaml writes under ``outputs/paper/``, so profiles keep their outputs.
    The original waits in ``.dvc/tmp`` meanwhile: a run killed before putting it back (``kill -9``, OOM)
    leaves it there, and the next run (the workspace lock keeps runs apart) restores it first, unless
    params.yaml was edited since: then the run stops and says where the original is. An edit made during
    the run is kept the same way, the original left waiting, not put back over it. A params.yaml that
    is a link is put back as that link (:func:`_save`), not as a copy that no longer follows its file.
    A ``params_file`` outside the checkout is refused: no versioned file would hold the params run.
    """
    target, saved = root / PARAMS, root / ".dvc" / "tmp" / f"mcf-flow.{PARAMS}"
    placed = saved.with_name(f"{saved.name}.sha256")  # what the swap put in place
    if saved.is_file() or saved.is_symlink():  # a relative link's value names nothing from .dvc/tmp
        now = _state(target)
        if placed.is_file() and now not in (placed.read_text().strip(), _state(saved)):
            # edited since the swap: putting the original back would lose the edit
            raise RuntimeError(f"{target} was edited after a flow run swapped it; the original "
                               f"waits in {saved}: put it back or delete it, then run again")
        get_run_logger().warning("%s was left swapped by a killed flow run: restoring it", target)
        os.replace(saved, target)
        placed.unlink(missing_ok=True)
    source = resolved(root / params_file)
    if not source.is_relative_to(resolved(root)):  # links followed: a link leading out is out too
        raise ValueError(f"params_file {params_file!r} is outside the checkout {root}: the run's params "
                         "must be a file of the repository, versioned with the code it runs")
    if source.is_dir():
        raise ValueError(f"params_file {params_file!r} is a folder under {root}: give the YAML file in it")
    if not source.is_file():
        raise ValueError(f"params_file {params_file!r} not found under {root}")
    if source == resolved(target):
        yield
        return
    _save(target, saved)
    with atomic_file(placed) as tmp:
        tmp.write_text(file_sha256(source))
    with atomic_file(target) as tmp:
        shutil.copyfile(source, tmp)
    try:
        yield
    finally:
        if (target.exists() or target.is_symlink()) and _state(target) != placed.read_text().strip():
            # edited during the run: the original waits, and the next run stops and says so
            get_run_logger().warning("%s was edited during the run: kept; the original waits in %s",
                                     target, saved)
        else:
            os.replace(saved, target)
            placed.unlink(missing_ok=True)


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, int | float | str | bool):
        yield prefix, data


def metric_rows(root: Path, completed: set[str]) -> list[dict[str, Any]]:
    """Every metric in the workspace's metrics files (those dvc.yaml declares), one row per value.

    Only the files of the ``completed`` stages (ran, restored or up to date in this run) and those no
    stage writes: a stage that failed or was not reached leaves an earlier run's file there (the
    committed ``metrics/evaluate.json``, say), whose numbers are not this run's.
    """
    with Repo(str(root)) as repo:
        shown = repo.metrics.show(on_error="ignore", hide_workspace=False)
        owners = {Path(os.path.relpath(out.fs_path, repo.root_dir)).as_posix(): stage.addressing
                  for stage in repo.index.stages for out in stage.outs if out.metric}
    workspace = next(iter(shown.values()), {})  # no revisions asked for: the workspace only
    rows = []
    for path, result in sorted(workspace.get("data", {}).items()):
        owner = next((owners[p] for p in (path, *map(str, Path(path).parents)) if p in owners), None)
        if owner is not None and owner not in completed:
            continue
        for key, value in _flatten(result.get("data", {})):
            rows.append({"file": path, "metric": key, "value": value})
    return rows


def run_stages(
    planned: dict[str, list[str]], on_dask: set[str], dask_address: str | None
) -> dict[str, State]:
    """Submit every stage once its upstream stages are done; return each stage's final state.

    The stages in ``on_dask`` (fetch, crop) fan out on the Dask cluster at ``dask_address``.
    """
    futures: dict[str, PrefectFuture[StageRun]] = {}
    RUNNING.reset()
    try:
        for stage, upstream in planned.items():
            after = [futures[u] for u in upstream]
            if stage in on_dask:  # retried as the stage's own task is
                tagged = dask_stage.with_options(tags=["dvc", "dask", stage], retries=RETRIES.get(stage, 0),
                                                 retry_condition_fn=retry_condition)
                futures[stage] = tagged.submit(stage, dask_address, wait_for=after)
            else:
                futures[stage] = stage_task(stage).submit(stage, wait_for=after)
        wait(list(futures.values()))
    except BaseException:
        RUNNING.stop_all()  # cancelled or interrupted: the stages' threads would read on, unaware
        raise
    return {stage: future.state for stage, future in futures.items()}


def summary(params_file: str, planned: dict[str, list[str]], states: dict[str, State]) -> str:
    """The run as markdown: each planned stage with what DVC did, or that it failed, was cancelled (stopped
    with the run: no error of its own to look for in its log) or never started, and then what stopped it.

    A stage that never started names its nearest stopped upstream stages (``planned``'s edges, not the
    table's order): "upstream cancelled" when each was cancelled, else "upstream failed", since a stage
    downstream of a failure would not have run without the cancel either.
    """
    lines = [f"# mcf pipeline run\n\nparams file: `{params_file}`\n", "| stage | outcome | seconds |"]
    lines.append("|---|---|---|")
    stopped: dict[str, str] = {}  # stage not completed -> "failed" or "cancelled", its own or its upstream's
    for stage, upstream in planned.items():  # dependency order: a stage's upstream is in stopped already
        state = states[stage]
        run = state.result() if state.is_completed() else None
        if run:
            outcome = run.outcome
        elif state.is_cancelled():
            stopped[stage], outcome = "cancelled", "**cancelled**"
        elif state.is_final():
            stopped[stage], outcome = "failed", "**failed**"
        else:
            causes = {stopped[u] for u in upstream if u in stopped}
            stopped[stage] = "cancelled" if causes == {"cancelled"} else "failed"
            outcome = f"not run (upstream {stopped[stage]})"
        lines.append(f"| `{stage}` | {outcome} | {run.seconds if run else ''} |")
    return "\n".join(lines)


def _raise_failures(states: dict[str, State], swapped_in: str | None = None) -> None:
    """Fail the flow run with the failed stages' errors (each names its stage).

    ``swapped_in``: the params file that stood in for params.yaml. A stage's own error names params.yaml
    (``mcf: invalid params: params.yaml: mask_ratio: ...``), which holds the committed values again once
    the run is over: each error then says which file's values those were.
    """
    errors = [state.result(raise_on_failure=False) for state in states.values()
              if state.is_final() and not state.is_completed()]
    if swapped_in:
        note = f"with {swapped_in} in place as {PARAMS}"
        errors = [StageFailed(err.stage, f"{note}, {err.detail}", err.exit_code, err.dvc_refused)
                  if isinstance(err, StageFailed) else err for err in errors]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise RuntimeError("\n\n".join(str(err) for err in errors))


@flow(name="mcf")
def mcf(
    params_file: str = PARAMS,
    stages: list[str] | None = None,
    fetch_on_dask: bool = False,
    crop_on_dask: bool = False,
    dask_address: str | None = None,
) -> list[dict[str, Any]]:
    """Reproduce the pipeline (or ``stages`` and their upstream) with DVC, one task per stage.

    Each stage starts as soon as the stages it depends on are done. ``params_file`` (relative to the
    checkout, and inside it) is applied as params.yaml for the run; ``stages`` takes stage names from dvc.yaml
    (default: all). ``fetch_on_dask`` and ``crop_on_dask`` fan those stages out on the Dask cluster at
    ``dask_address`` (default: a local cluster; fetch's downloads only, not SynthFace's rendering).
    """
    if dask_address and not (fetch_on_dask or crop_on_dask):  # the cluster would sit unused, unsaid
        raise ValueError(f"dask_address {dask_address!r} given, but neither fetch_on_dask nor crop_on_dask: "
                         "set either to run that stage on the cluster")
    root = Path.cwd()
    with workspace_lock(root), applied_params(root, params_file):
        planned = plan(root, stages)  # under the run's params: dvc.yaml's foreach lists come from them
        get_run_logger().info("stages: %s", ", ".join(planned))
        on_dask = {stage for stage, asked in (("fetch", fetch_on_dask), ("crop", crop_on_dask)) if asked}
        if idle := sorted(on_dask - set(planned)):  # as a lone dask_address: the flag would go unused, unsaid
            raise ValueError(f"{idle[0]}_on_dask set, but {idle[0]} is not among the stages to run "
                             f"({', '.join(planned)})")
        states = run_stages(planned, on_dask, dask_address)
        completed = {stage for stage, state in states.items() if state.is_completed()}
        rows = metric_rows(root, completed)  # under the run's params: dvc.yaml's metrics paths come from them
    # published even when empty: the key's latest version must not stay an earlier run's numbers
    create_table_artifact(rows, key="mcf-metrics", description="metrics files of this run's completed stages")
    create_markdown_artifact(summary(params_file, planned, states), key="mcf-summary")
    # the run's metrics beside the paper's, each labelled with its dataset (a note when evaluate did not run)
    evaluated = "evaluate" in states and states["evaluate"].is_completed()
    create_markdown_artifact(markdown_summary(root, params_file, evaluated), key="mcf-report",
                             description="mcf report's summary; `mcf report` draws the full page")
    swapped = resolved(root / params_file) != resolved(root / PARAMS)
    _raise_failures(states, params_file if swapped else None)
    return [asdict(state.result()) for state in states.values()]
