"""The ``mcf`` Prefect flow on a small real DVC project: order, skipping, params profiles, failures.

The project here is a git + DVC repository in a temporary folder with three cheap stages shaped like the
real pipeline (a foreach stage, metrics, an upstream fetch), so these tests pin the flow's behaviour
without waiting for the real stages; tests/test_prefect_deploy.py runs the real pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from dvc.repo import Repo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.pipeline import GUARD, StageFailed, mcf, plan, retry_condition, stage_task, stop_group  # noqa: E402

if TYPE_CHECKING:
    from conftest import PrefectServer

pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")  # inside DVC

STAGE_SCRIPT = '''
"""Toy stages: fetch writes n lines, train copies them per variant, evaluate counts them."""
import json, sys
from pathlib import Path
import yaml

params = yaml.safe_load(Path("params.yaml").read_text())
stage = sys.argv[1]
out = Path("out")
out.mkdir(exist_ok=True)
if stage == "fetch":
    if params["fetch"].get("fail"):  # a download that failed: fetch is retried
        with open("fetch.tried", "a") as tried:
            tried.write("tried\\n")
        sys.exit("fetch: connection reset")
    (out / "fetch.txt").write_text("".join(f"{i}\\n" for i in range(params["fetch"]["n"])))
elif stage == "train":
    if sys.argv[2] in params["train"].get("hang", []):
        import os, signal, time
        if params["train"].get("deaf", True):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # deaf to SIGTERM, as a stuck stage is
        Path("hang.pid.tmp").write_text(str(os.getpid()))  # whole, or the test may read it empty
        os.replace("hang.pid.tmp", "hang.pid")
        time.sleep(300)
    if sys.argv[2] in params["train"].get("latin1", []):  # a file name in an older encoding, as printed
        sys.stdout.buffer.write(b"train: skipping caf\\xe9.jpg\\n")
        sys.stdout.flush()
    if sys.argv[2] in params["train"]["fail"]:
        for i in range(60):
            print(f"train log line {i}", flush=True)
        sys.exit("train: diverged")
    (out / f"train_{sys.argv[2]}.txt").write_text((out / "fetch.txt").read_text())
elif stage == "evaluate":
    counts = {v: len((out / f"train_{v}.txt").read_text().split()) for v in params["variants"]}
    Path("metrics.json").write_text(json.dumps({"lines": counts, "total": sum(counts.values())}))
'''

# evaluate comes first in the file: the flow must take its order from the DAG. `python -P -m stage` finds
# stage.py only through PYTHONPATH, as the `mcf` console script finds the checkout's package: the flow
# must put the checkout there, or a stage would run the code pip installed instead of what DVC hashed.
DVC_YAML = """
stages:
  evaluate:
    cmd: python -P -m stage evaluate
    deps: [stage.py, out/train_a.txt, out/train_b.txt]
    params: [variants]
    metrics:
      - metrics.json:
          cache: false
  fetch:
    cmd: python -P -m stage fetch
    deps: [stage.py]
    params: [fetch]
    outs: [out/fetch.txt]
  train:
    foreach: ${variants}
    do:
      cmd: python -P -m stage train ${item}
      deps: [stage.py, out/fetch.txt]
      params: [train]
      outs:
        - out/train_${item}.txt
"""

PARAMS = {"variants": ["a", "b"], "fetch": {"n": 3}, "train": {"fail": []}}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture(scope="session")
def prefect_api(prefect_server: PrefectServer) -> Iterator[None]:
    """This process's flows report to the session's Prefect server (tests/conftest.py).

    The server is the one tests/test_prefect_deploy.py drives: one server start (~10 s of CPU) instead
    of a second one from ``prefect_test_harness``.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api, PREFECT_HOME: prefect_server.home}):
        yield
        APILogWorker.drain_all()  # the last logs and events reach the server before it stops
        EventsWorker.drain_all()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC project with the toy stages, as the flow's working directory."""
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _git(tmp_path, "init", "-q")
    Repo.init(str(tmp_path)).close()  # in this process: a `dvc init` subprocess costs a second of imports
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "toy")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _outcomes(runs: list[dict]) -> dict[str, str]:
    return {run["stage"]: run["outcome"] for run in runs}


def test_plan_follows_the_dag_and_pulls_in_upstream(project: Path) -> None:
    assert plan(project) == {"fetch": [], "train@a": ["fetch"], "train@b": ["fetch"],
                             "evaluate": ["train@a", "train@b"]}
    assert plan(project, ["train@b"]) == {"fetch": [], "train@b": ["fetch"]}
    assert list(plan(project, ["train"])) == ["fetch", "train@a", "train@b"]
    with pytest.raises(ValueError, match=r"unknown stage 'pretrian' \(valid: evaluate, fetch, train@a"):
        plan(project, ["pretrian"])
    # an empty list is no stage, not every stage: it would start the whole pipeline (pretraining too)
    with pytest.raises(ValueError, match=r"no stage given \(an empty list\)"):
        plan(project, [])


def test_plan_of_a_checkout_without_stages_is_refused(tmp_path: Path) -> None:
    """A checkout whose dvc.yaml has no stages (or is missing) planned nothing: the flow run then
    succeeded having run nothing, instead of saying the checkout holds no pipeline."""
    _git(tmp_path, "init", "-q")
    Repo.init(str(tmp_path)).close()
    with pytest.raises(ValueError, match="no pipeline stages in"):
        plan(tmp_path)


def test_stage_tasks_retry_io_and_tag_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.states import Failed

    import flows.pipeline

    fetch, finetune = stage_task("fetch"), stage_task("finetune_alignment@scratch")
    assert fetch.retries == 2 and "gpu" not in fetch.tags
    # a transient failure is retried; rejected params (`mcf` exits 2), a failed data gate (3) or no access
    # to the data (4: no credentials, say) fail at once
    failed = {code: Failed(data=StageFailed("fetch", "...", code)) for code in (1, 2, 3, 4, None)}
    assert fetch.retry_condition_fn is retry_condition
    assert retry_condition(fetch, None, failed[1]) and retry_condition(fetch, None, failed[None])
    assert not any(retry_condition(fetch, None, failed[code]) for code in (2, 3, 4))
    refused = Failed(data=StageFailed("fetch", "missing data", None, dvc_refused=True))  # by DVC itself
    assert not retry_condition(fetch, None, refused)
    monkeypatch.setattr(flows.pipeline, "RUNNING", flows.pipeline._Running())
    flows.pipeline.RUNNING.stop_all()  # a stopped run: its stopped or unstarted stage is not retried
    assert not retry_condition(fetch, None, failed[1]) and not retry_condition(fetch, None, failed[None])
    assert finetune.retries == 0 and {"gpu", "finetune_alignment", "dvc"} <= finetune.tags
    assert "gpu" in stage_task("pretrain").tags and "gpu" not in stage_task("crop").tags
    assert "gpu" in stage_task("evaluate").tags  # it scores on the GPU too
    # pickled (a persisted result), a failure keeps the status its retry is decided on
    again = pickle.loads(pickle.dumps(StageFailed("fetch", "...", None, dvc_refused=True)))
    assert (again.stage, again.exit_code, again.dvc_refused, str(again)) == (
        "fetch", None, True, "stage 'fetch' failed: ...")


def test_gpu_stages_are_tagged_with_the_workers_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert {"gpu", "gpu-3"} <= stage_task("teacher").tags
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # a worker that sees every GPU: README's `gpu-all` limit
    assert {"gpu", "gpu-all"} <= stage_task("teacher").tags
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a worker that sees no GPU (the stage runs on the CPU)
    assert {"gpu", "gpu-none"} <= stage_task("teacher").tags


def _gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except FileNotFoundError:
        return True


def test_a_cancelled_stage_is_stopped_with_its_whole_process_group(tmp_path: Path) -> None:
    """dvc passes no signal on to the stage's command: SIGTERM goes to the group, SIGKILL to what stays."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}; trap '' TERM; sleep 300 & echo $! >> {pids}; wait"
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(pids.read_text().split() if pids.exists() else []) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    polite, stubborn = map(int, pids.read_text().split())
    stop_group(proc, grace=1.0)
    assert proc.returncode == -signal.SIGKILL  # the leader ignored SIGTERM
    deadline = time.monotonic() + 5
    while not (_gone(polite) and _gone(stubborn)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(polite) and _gone(stubborn)


def test_a_cancelled_stage_hears_sigterm_at_once() -> None:
    """SIGTERM first, so a stage that heeds it (torchrun stopping its workers) ends now, not when the
    grace runs out with a SIGKILL it cannot clean up after."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    began = time.monotonic()
    stop_group(proc, grace=30.0)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - began < 10


def test_a_stopped_run_starts_no_stage_command() -> None:
    """A stage whose upstream finished as the run was being stopped started its command after
    ``stop_all`` had stopped the others, so it trained on, unseen, after the run ended."""
    from flows.pipeline import _Running

    running = _Running()
    running.stop_all()
    with pytest.raises(StageFailed, match="stage 'train@a' failed: the flow run was stopped before"):
        running.start("train@a", [sys.executable, "-c", "pass"])
    assert running.procs == set()
    running.reset()  # the next run starts its stages again
    proc = running.start("train@a", [sys.executable, "-c", "pass"])
    assert proc.wait() == 0 and running.procs == {proc}


def _wait_gone(*pids: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(map(_gone, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(map(_gone, pids))


def test_a_stage_guard_stops_its_group_when_its_parent_is_killed(tmp_path: Path) -> None:
    """SIGTERM to the group once the parent is gone, SIGKILL to what is deaf to it ``grace`` s later."""
    pids = tmp_path / "pids"
    stage = f"sleep 300 & echo $! > {pids}; trap '' TERM; echo $$ >> {pids}; exec sleep 300"
    guard = [sys.executable, str(GUARD), "--parent", "{pid}", "--grace", "3", "--", "bash", "-c", stage]
    code = (f"import os, subprocess, time; subprocess.Popen([a.format(pid=os.getpid()) for a in {guard!r}], "
            "start_new_session=True); time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while len(pids.read_text().split() if pids.exists() else []) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    polite, stubborn = map(int, pids.read_text().split())
    parent.kill()
    parent.wait()
    assert _wait_gone(polite, timeout=5) and not _gone(stubborn)  # SIGTERM first, then the grace
    assert _wait_gone(stubborn, timeout=10)


def test_a_stage_guard_whose_parent_is_killed_exits_once_its_group_has_stopped(tmp_path: Path) -> None:
    """A stage that heeds SIGTERM ends at once; its guard then waited out the whole grace (60 s in the
    flow) before exiting, an idle leftover in ``ps`` long after the killed run's stage was gone."""
    pid_file = tmp_path / "guard"
    guard = [sys.executable, str(GUARD), "--parent", "{pid}", "--grace", "30", "--", "sleep", "300"]
    code = (f"import os, pathlib, subprocess, time; g = subprocess.Popen([a.format(pid=os.getpid()) for a in "
            f"{guard!r}], start_new_session=True); pathlib.Path({str(pid_file)!r}).write_text(str(g.pid)); "
            "time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    guard_pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    assert _wait_gone(guard_pid, timeout=10)  # not the 30 s grace


def test_a_stage_guard_stops_what_its_killed_command_left_running(tmp_path: Path) -> None:
    """A ``dvc repro`` killed outright leaves its stage's command behind: the guard stops it, SIGKILL
    after ``grace`` for one deaf to SIGTERM, and still exits with the killed command's status."""
    pids = tmp_path / "pids"
    # killed once the deaf one has its trap (it says so), not after a fixed pause it might not be run within
    stage = (f"sleep 300 & echo $! > {pids}; (trap '' TERM; echo $BASHPID >> {pids}; exec sleep 300) & "
             f"while [ $(wc -l < {pids}) -lt 2 ]; do sleep 0.05; done; kill -9 $$")
    guard = [sys.executable, str(GUARD), "--parent", str(os.getpid()), "--grace", "2", "--"]
    began = time.monotonic()
    done = subprocess.run([*guard, "bash", "-c", stage], start_new_session=True, timeout=30)
    polite, stubborn = map(int, pids.read_text().split())
    assert done.returncode == 128 + signal.SIGKILL and _gone(polite) and _gone(stubborn)
    assert 2 <= time.monotonic() - began < 20  # the deaf one waited out the grace


def test_a_stage_guard_exits_with_its_commands_status() -> None:
    guard = [sys.executable, str(GUARD), "--parent", str(os.getpid()), "--grace", "1", "--"]
    assert subprocess.run([*guard, "true"], start_new_session=True).returncode == 0
    assert subprocess.run([*guard, "bash", "-c", "exit 3"], start_new_session=True).returncode == 3
    killed = subprocess.run([*guard, "bash", "-c", "kill -9 $$"], start_new_session=True)
    assert killed.returncode == 128 + signal.SIGKILL
    assert "start it as a process group leader" in subprocess.run([*guard, "true"], text=True,
                                                                  capture_output=True).stderr
    bare = subprocess.run(guard, text=True, capture_output=True, start_new_session=True)
    assert bare.returncode == 2 and "no command after --" in bare.stderr  # a usage error, no traceback


GUARD_UNDER_A_SUBREAPER = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the stage come to this process
guard = [sys.executable, sys.argv[1], "--parent", str(os.getpid()), "--grace", "5", "--"]
began = time.monotonic()
done = subprocess.run([*guard, "bash", "-c", "sleep 300 & exit 0"], start_new_session=True,
                      capture_output=True, text=True)
print(done.returncode, time.monotonic() - began, done.stderr.strip())
"""


def test_a_stage_guard_takes_a_stopped_leftover_its_reaper_has_not_reaped_for_gone() -> None:
    """A worker that is PID 1 of its container (no init) or another subreaper adopts what a stage leaves
    and may never reap it: counted as live, that zombie held the guard for the whole grace and a round of
    SIGKILLs, then drew a false "outlived SIGKILL" alarm in the stage's log."""
    done = subprocess.run([sys.executable, "-c", GUARD_UNDER_A_SUBREAPER, str(GUARD)], capture_output=True,
                          text=True, timeout=60, check=True)
    code, seconds, stderr = done.stdout.split(" ", 2)
    assert (code, stderr.strip()) == ("0", "") and float(seconds) < 4  # not the 5 s grace


STOP_UNDER_A_SUBREAPER = """
import ctypes, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from flows.pipeline import stop_group
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the stage come to this process
stage = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
time.sleep(0.5)  # its sleeps started
began = time.monotonic()
stop_group(stage, grace=5)
print(stage.returncode, time.monotonic() - began)
"""


def test_a_cancelled_stage_whose_leftovers_a_reaper_leaves_unreaped_is_stopped_at_once() -> None:
    """Under a worker that is PID 1 of its container or another subreaper that does not reap, a stopped
    stage's processes stay zombies of its group: taken for live, they held a cancel for the whole grace
    (20 s of the 30 s a worker gives the run) and the task's own stop for 60 s, all of it heeding SIGTERM."""
    done = subprocess.run([sys.executable, "-c", STOP_UNDER_A_SUBREAPER, str(ROOT)], capture_output=True,
                          text=True, timeout=60, check=True)
    code, seconds = done.stdout.split()
    assert code == str(-signal.SIGTERM) and float(seconds) < 4, done.stdout  # not the 5 s grace


def test_flow_runs_once_then_skips_and_restores_from_run_cache(prefect_api: None, project: Path) -> None:
    from prefect.artifacts import Artifact

    assert set(_outcomes(mcf()).values()) == {"ran"}
    assert json.loads((project / "metrics.json").read_text()) == {"lines": {"a": 3, "b": 3}, "total": 6}
    table = json.loads(Artifact.get("mcf-metrics").data)
    assert {"file": "metrics.json", "metric": "total", "value": 6} in table
    assert "| `train@b` | ran |" in Artifact.get("mcf-summary").data
    assert "# mcf run summary" in Artifact.get("mcf-report").data  # mcf.report's (no evaluate metrics here)

    # A second profile: applied for the run only, recorded in dvc.lock, params.yaml left as committed.
    committed = (project / "params.yaml").read_bytes()
    (project / "params.tiny.yaml").write_text(yaml.safe_dump({**PARAMS, "fetch": {"n": 1}}))
    assert _outcomes(mcf(params_file="params.tiny.yaml", stages=["train@a"])) == {
        "fetch": "ran", "train@a": "ran"}
    assert (project / "out/fetch.txt").read_text() == "0\n"
    assert (project / "params.yaml").read_bytes() == committed
    assert not (project / ".dvc" / "tmp" / "mcf-flow.params.yaml").exists()
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["fetch"]["params"] == {
        "params.yaml": {"fetch": {"n": 1}}}

    # Back to the default: what ran before with these inputs comes from DVC's run-cache.
    assert _outcomes(mcf()) == {"fetch": "restored", "train@a": "restored", "train@b": "unchanged",
                                "evaluate": "unchanged"}
    assert (project / "out/fetch.txt").read_text() == "0\n1\n2\n"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "-q"], cwd=project)
    assert status.returncode == 0  # the plain DVC view agrees: nothing left to do


def test_a_run_after_a_stopped_one_runs_and_claims_no_metrics_it_did_not_evaluate(
    prefect_api: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped in this process (Ctrl-C, a cancel) refuses to start stages until the next run begins;
    a run that stops short of ``evaluate`` reports the checkout's metrics file as not its own."""
    from prefect.artifacts import Artifact

    import flows.pipeline

    monkeypatch.setattr(flows.pipeline, "RUNNING", flows.pipeline._Running())
    flows.pipeline.RUNNING.stop_all()  # as an interrupted run leaves it
    assert _outcomes(mcf(stages=["fetch"])) == {"fetch": "ran"}
    assert "this run did not get through `evaluate`" in Artifact.get("mcf-report").data


def test_metric_rows_leave_out_the_files_of_stages_this_run_did_not_complete(project: Path) -> None:
    """A metrics file left by an earlier run (committed, as metrics/evaluate.json is) was published in
    mcf-metrics by a run that stopped before the stage writing it, as that run's numbers."""
    from flows.pipeline import metric_rows

    (project / "metrics.json").write_text(json.dumps({"total": 99}))  # an earlier run's
    assert metric_rows(project, {"fetch", "train@a", "train@b"}) == []
    assert metric_rows(project, {"evaluate"}) == [{"file": "metrics.json", "metric": "total", "value": 99}]
    # a metrics file no stage writes (dvc.yaml's top-level `metrics`) is no earlier run's: always shown
    with (project / "dvc.yaml").open("a") as dvc_yaml:
        dvc_yaml.write("metrics: [by_hand.json]\n")
    (project / "by_hand.json").write_text(json.dumps({"faces": 7}))
    assert metric_rows(project, set()) == [{"file": "by_hand.json", "metric": "faces", "value": 7}]


def test_a_run_that_stops_before_evaluate_publishes_no_earlier_metrics(
    prefect_api: None, project: Path
) -> None:
    from prefect.artifacts import Artifact

    (project / "metrics.json").write_text(json.dumps({"total": 99}))  # an earlier run's
    assert _outcomes(mcf(stages=["fetch"])) == {"fetch": "ran"}
    assert json.loads(Artifact.get("mcf-metrics").data) == []  # this run's (empty), not an earlier one


def test_failed_stage_names_itself_with_its_log_tail(prefect_api: None, project: Path) -> None:
    from prefect.artifacts import Artifact

    (project / "params.broken.yaml").write_text(yaml.safe_dump({**PARAMS, "train": {"fail": ["a"]}}))
    state = mcf(params_file="params.broken.yaml", return_state=True)
    assert state.is_failed()
    assert "stage 'train@a' failed" in state.message
    with pytest.raises(StageFailed) as caught:
        state.result()
    message = str(caught.value)
    assert caught.value.exit_code == 1  # the stage command's own status, read from DVC's report
    assert "train log line 59" in message and "train: diverged" in message
    assert "train log line 10\n" not in message  # only the tail, not the whole log
    # a stage's own error names params.yaml, which is the committed file again once the run is over
    assert "with params.broken.yaml in place as params.yaml" in message
    assert "with params.broken.yaml in place as params.yaml" in state.message
    assert not (project / "out/train_a.txt").exists()
    # the independent branch still ran; what needs the failed stage did not start
    assert (project / "out/train_b.txt").exists() and not (project / "metrics.json").exists()
    table = Artifact.get("mcf-summary").data
    assert "| `train@a` | **failed** |" in table and "| `train@b` | ran |" in table
    assert "| `evaluate` | not run (upstream failed) |" in table


def test_fetch_missing_a_dependency_fails_once_naming_it(
    prefect_api: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC refuses a stage whose dependency is missing (the LAION-Face parts not pulled) before its command
    runs: fetch's retries, meant for a network's hiccups, would only wait twice to fail the same way."""
    import flows.pipeline

    (project / "dvc.yaml").write_text(DVC_YAML.replace("deps: [stage.py]", "deps: [stage.py, parts.txt]"))
    monkeypatch.setattr(flows.pipeline, "RETRY_DELAY_S", 0)
    starts: list[str] = []
    start = flows.pipeline.RUNNING.start

    def counted(stage: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        starts.append(stage)
        return start(stage, cmd, **kwargs)

    monkeypatch.setattr(flows.pipeline.RUNNING, "start", counted)
    state = mcf(stages=["fetch"], return_state=True)
    with pytest.raises(StageFailed, match="parts.txt") as caught:
        state.result()
    assert caught.value.dvc_refused and caught.value.exit_code is None
    assert starts == ["fetch"]  # tried once
    assert not (project / "out/fetch.txt").exists()  # the command never ran


def test_several_failed_stages_are_each_named_in_the_run_failure() -> None:
    """Independent stages that fail in one run (train@a and train@b) each say why, with the profile
    that stood in for params.yaml: reporting only the first would hide the second until a rerun."""
    from prefect.states import Completed, Failed

    from flows.pipeline import StageRun, _raise_failures

    states = {"fetch": Completed(data=StageRun("fetch", "ran", 1.0)),
              "train@a": Failed(data=StageFailed("train@a", "diverged", 1)),
              "train@b": Failed(data=StageFailed("train@b", "out of memory", 1))}
    with pytest.raises(RuntimeError) as caught:
        _raise_failures(states, "params.tiny.yaml")
    note = "with params.tiny.yaml in place as params.yaml"
    assert str(caught.value) == (f"stage 'train@a' failed: {note}, diverged\n\n"
                                 f"stage 'train@b' failed: {note}, out of memory")


def test_the_summary_tells_a_cancelled_stage_from_a_failed_one() -> None:
    """A stage stopped with the run (its task ``Cancelled``) did not break: the summary said **failed**
    for it as for a stage whose command failed, which sent a reader to its log for an error it never had."""
    from prefect.states import Cancelled, Completed, Failed, Pending

    from flows.pipeline import StageRun, summary

    stopped = StageFailed("train@b", "the flow run was stopped before the stage started")  # as RUNNING raises
    states = {"fetch": Completed(data=StageRun("fetch", "ran", 1.0)),
              "train@a": Failed(data=StageFailed("train@a", "diverged", 1)),
              "train@b": Cancelled(data=stopped),  # as cancelled_when_stopped returns it
              "train@c": Cancelled(),
              "evaluate": Pending()}
    planned = {"fetch": [], "train@a": ["fetch"], "train@b": ["fetch"], "train@c": ["fetch"],
               "evaluate": ["train@a", "train@b", "train@c"]}
    table = summary("params.yaml", planned, states)
    assert "| `fetch` | ran | 1.0 |" in table and "| `train@a` | **failed** |  |" in table
    assert "| `train@b` | **cancelled** |  |" in table and "| `train@c` | **cancelled** |  |" in table
    # train@a's failure alone would have kept it from starting
    assert "| `evaluate` | not run (upstream failed) |  |" in table


def test_the_summary_says_a_stage_after_a_cancelled_one_was_not_run_for_the_cancel() -> None:
    """A stage that never started because the run was cancelled upstream of it said "not run (upstream
    failed)", though nothing failed. It names what stopped its own upstream (the plan's edges, through
    stages that never started either), not whatever stopped last before it in the table."""
    from prefect.states import Cancelled, Completed, Failed, Pending

    from flows.pipeline import StageRun, summary

    planned = {"fetch": [], "train@a": ["fetch"], "train@b": ["fetch"], "eval@a": ["train@a"],
               "eval@b": ["train@b"], "report@b": ["eval@b"], "report@a": ["eval@a"]}
    states = {"fetch": Completed(data=StageRun("fetch", "ran", 1.0)),
              "train@a": Failed(data=StageFailed("train@a", "diverged", 1)),
              "train@b": Cancelled(),
              "eval@a": Pending(), "eval@b": Pending(), "report@b": Pending(), "report@a": Pending()}
    table = summary("params.yaml", planned, states)
    assert "| `train@b` | **cancelled** |  |" in table
    assert "| `eval@b` | not run (upstream cancelled) |  |" in table  # after eval@a in the table
    assert "| `report@b` | not run (upstream cancelled) |  |" in table  # through eval@b, not run either
    assert "| `eval@a` | not run (upstream failed) |  |" in table
    assert "| `report@a` | not run (upstream failed) |  |" in table  # after report@b in the table


def test_a_stage_printing_bytes_that_are_not_utf8_runs_to_its_end(prefect_api: None, project: Path) -> None:
    """A stage's output is read as text: a byte that is not UTF-8 (a latin-1 file name, printed as
    Python prints undecodable names) raised UnicodeDecodeError in the reading task, which stopped the
    healthy stage and failed the run with no word of the stage."""
    latin1 = {**PARAMS, "train": {"fail": [], "latin1": ["a"]}}
    (project / "params.latin1.yaml").write_text(yaml.safe_dump(latin1))
    runs = mcf(params_file="params.latin1.yaml", stages=["train@a"])
    assert _outcomes(runs) == {"fetch": "ran", "train@a": "ran"}
    assert (project / "out/train_a.txt").exists()


def test_a_stage_whose_output_the_task_fails_to_read_is_stopped(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in the task's read of the stage's log (the strict decoder once raised there) failed the
    task but left its ``dvc repro`` and the stage's command training on, unseen: the task stops them
    before it fails."""
    import flows.pipeline
    from flows.pipeline import repro

    (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "train": {"fail": [], "hang": ["a"],
                                                                              "deaf": False}}))
    (project / "out").mkdir()
    (project / "out/fetch.txt").write_text("0\n")  # train@a's dep, as fetch leaves it
    pid = project / "hang.pid"

    class Unreadable:  # the run's logger: its first line raises once the stage's command runs
        def info(self, line: str) -> None:
            deadline = time.monotonic() + 30
            while not pid.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")

    monkeypatch.setattr(flows.pipeline, "get_run_logger", Unreadable)
    raised: queue.Queue[BaseException] = queue.Queue()

    def read() -> None:
        try:
            repro.fn("train@a")
        except BaseException as err:  # handed to the test's thread
            raised.put(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        reader.join(20)
        assert not reader.is_alive()  # it waited on the stage's command, which trained on
        assert isinstance(raised.get_nowait(), UnicodeDecodeError)
        assert _wait_gone(int(pid.read_text()), timeout=5)
    finally:
        if pid.exists() and not _gone(stage := int(pid.read_text())):
            os.kill(stage, signal.SIGKILL)
        reader.join(30)


def test_a_stage_stopped_with_its_run_ends_cancelled_without_a_traceback(
    prefect_api: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage whose command the run's stop ended, or that the stop kept from starting, was logged as a
    failure with a traceback (``Task run failed with exception: StageFailed(...)``), as if it had broken."""
    import logging

    from prefect import flow
    from prefect.client.schemas.objects import State

    import flows.pipeline

    (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "train": {"fail": [], "hang": ["a"],
                                                                              "deaf": False}}))
    (project / "out").mkdir()
    (project / "out/fetch.txt").write_text("0\n")  # train@a's dep, as fetch leaves it
    monkeypatch.setattr(flows.pipeline, "RUNNING", flows.pipeline._Running())
    pid = project / "hang.pid"

    def stop_once_it_runs() -> None:  # as the flow's thread does when the run is cancelled
        deadline = time.monotonic() + 60
        while not pid.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        flows.pipeline.RUNNING.stop_all()

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    stopper = threading.Thread(target=stop_once_it_runs, daemon=True)
    stopper.start()
    states: list[State] = []

    @flow
    def stopped_run() -> None:
        for stage in ("train@a", "fetch"):  # fetch: retried on a failure
            states.append(stage_task(stage)(stage, return_state=True))

    try:
        stopped_run()
    finally:
        logger.removeHandler(handler)
        stopper.join()
        if pid.exists() and not _gone(stage := int(pid.read_text())):
            os.kill(stage, signal.SIGKILL)
    in_flight, refused = states
    assert in_flight.is_cancelled() and in_flight.message.startswith(
        "stage 'train@a' stopped with the flow run: `dvc repro` exited")
    assert refused.is_cancelled() and "stopped before the stage started" in refused.message
    assert _wait_gone(int(pid.read_text()), timeout=5)
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records if r.exc_info]


PREFECT_KILL_GRACE_S = 30  # a worker SIGKILLs a cancelled flow run's process group this long after SIGTERM


@contextlib.contextmanager
def _flow_run_with_a_hung_stage(
    server: PrefectServer, project: Path, deaf: bool
) -> Iterator[tuple[subprocess.Popen, int]]:
    """A flow run in a session of its own, and the pid of its stage ``train@a`` once that hangs (``deaf``:
    to SIGTERM too). Whatever is left of either is killed at the end."""
    hang = {**PARAMS, "train": {"fail": [], "hang": ["a"], "deaf": deaf}}
    (project / "params.hang.yaml").write_text(yaml.safe_dump(hang))
    env = {**server.env, "PYTHONPATH": str(ROOT)}
    code = "from flows.pipeline import mcf; mcf(params_file='params.hang.yaml')"
    flow_run = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (project / "hang.pid").exists():
            assert flow_run.poll() is None and time.monotonic() < deadline, flow_run.returncode
            time.sleep(0.2)
        yield flow_run, int((project / "hang.pid").read_text())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow_run.pid, signal.SIGKILL)
        if (project / "hang.pid").exists() and not _gone(stage := int((project / "hang.pid").read_text())):
            os.kill(stage, signal.SIGKILL)


def test_a_stopped_flow_run_stops_its_running_stages(prefect_server: PrefectServer, project: Path) -> None:
    """Cancelling a run (Prefect's SIGTERM, raised in the flow's thread) stops the stage commands in flight:
    the task threads never hear of it, and each command runs in a session of its own, out of reach of
    the worker's kill of the flow run's process group. One deaf to SIGTERM is killed before the worker
    kills the flow run (30 s after its SIGTERM), which would leave it running."""
    with _flow_run_with_a_hung_stage(prefect_server, project, deaf=True) as (flow_run, stage):
        flow_run.send_signal(signal.SIGTERM)  # as a worker cancels a run: SIGTERM, SIGKILL 30 s later
        with contextlib.suppress(subprocess.TimeoutExpired):
            flow_run.wait(PREFECT_KILL_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow_run.pid, signal.SIGKILL)
        assert flow_run.wait() == -signal.SIGTERM  # it ended itself (Prefect re-raises it), not by SIGKILL
        assert _wait_gone(stage, timeout=5)  # it trained on, unseen, after the run ended
        assert (project / "params.yaml").read_text() == yaml.safe_dump(PARAMS)


def test_a_flow_run_stopped_while_fetch_waits_to_retry_ends_at_once(
    prefect_server: PrefectServer, project: Path
) -> None:
    """Prefect's own retry delay is a sleep in the task's thread, which a cancel never reaches: the
    cancelled run's process, and its worker's slot, stayed until the 30 s were over."""
    import httpx

    (project / "params.flaky.yaml").write_text(yaml.safe_dump({**PARAMS, "fetch": {"n": 3, "fail": True}}))
    env = {**prefect_server.env, "PYTHONPATH": str(ROOT)}
    code = "from flows.pipeline import mcf; mcf(params_file='params.flaky.yaml', stages=['fetch'])"
    since = datetime.now(UTC).isoformat()  # not other tests' on the shared server
    query = {"task_runs": {"expected_start_time": {"after_": since}}}
    flow_run = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, states = time.monotonic() + 60, set[str]()
        while not states & {"AwaitingRetry", "Retrying"}:  # its first try failed; it waits to retry
            assert flow_run.poll() is None and time.monotonic() < deadline, (flow_run.returncode, states)
            time.sleep(0.2)
            runs = httpx.post(f"{prefect_server.api}/task_runs/filter", json=query, timeout=10).json()
            states = {run["state_name"] for run in runs}
        flow_run.send_signal(signal.SIGTERM)  # as a worker cancels a run
        assert flow_run.wait(20) == -signal.SIGTERM  # not 30 s on, when the retry delay is over
        assert (project / "fetch.tried").read_text() == "tried\n"  # and not tried again once stopped
        assert (project / "params.yaml").read_text() == yaml.safe_dump(PARAMS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(flow_run.pid, signal.SIGKILL)


def test_a_killed_flow_runs_stages_are_stopped(prefect_server: PrefectServer, project: Path) -> None:
    """A flow process killed outright (SIGKILL, the OOM killer) cannot stop its stages: each one's guard
    sees it gone and stops the stage, which would otherwise train on unseen, holding its lock."""
    with _flow_run_with_a_hung_stage(prefect_server, project, deaf=False) as (flow_run, stage):
        flow_run.kill()
        assert flow_run.wait() == -signal.SIGKILL
        assert _wait_gone(stage, timeout=10)


def _subflows(state: Any) -> list[str]:
    """The names of the flows that ran as subflows of the flow run that ended in ``state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    parent = FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
        return [client.read_flow(run.flow_id).name for run in runs]


def test_fetch_on_dask_runs_the_fan_out_flow_for_fetch(prefect_api: None, project: Path) -> None:
    """``fetch_on_dask`` routes the fetch stage to flows/fetch_dask.py, which reads mcf's params: the
    toy project's params.yaml is not an mcf one, and the failure says so."""
    state = mcf(fetch_on_dask=True, return_state=True)
    assert state.is_failed() and "stage 'fetch' failed" in state.message
    with pytest.raises(StageFailed, match="on Dask: ParamsError: params.yaml: train: unknown top-level key"):
        state.result()
    assert not (project / "out").exists()
    assert _subflows(state) == ["fetch_dask"]  # crop_dask fails on these params with the same message


def test_fetch_on_dask_is_retried_as_fetch_is(
    prefect_api: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: fetch is retried, unless it rejects its params or its gate fails; on Dask as well."""
    import flows.fetch_dask
    import flows.pipeline
    from mcf.errors import GateError
    from mcf.params import ParamsError

    class Waits(threading.Event):
        """The run's stop event, recording the waits on it: the retry's pause is one."""

        def __init__(self) -> None:
            super().__init__()
            self.timeouts: list[float | None] = []

        def wait(self, timeout: float | None = None) -> bool:
            self.timeouts.append(timeout)
            return super().wait(timeout)

    monkeypatch.setattr(flows.pipeline, "RETRY_DELAY_S", 1)
    running = flows.pipeline._Running()
    running.stop_event = waits = Waits()
    monkeypatch.setattr(flows.pipeline, "RUNNING", running)
    calls: list[str] = []
    times: list[float] = []

    def flaky(address: str | None) -> None:
        calls.append("flaky")
        times.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("the scheduler went away")
        (project / "out").mkdir(exist_ok=True)
        (project / "out/fetch.txt").write_text("0\n1\n2\n")

    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", flaky)
    assert _outcomes(mcf(fetch_on_dask=True, stages=["fetch"])) == {"fetch": "ran"} and len(calls) == 2
    # after the retry delay: paused for it, not only apart by the retry's `dvc status` (0.6 s unloaded)
    assert waits.timeouts == [1] and times[1] - times[0] >= 1
    for error, code in ((ParamsError("fetch.source", "no"), 2), (GateError("manifest: bad rows"), 3)):
        (project / "out/fetch.txt").unlink(missing_ok=True)  # fetch is to do again, not to restore:
        (project / "dvc.lock").unlink(missing_ok=True)  # neither as dvc.lock has it nor from the run-cache
        shutil.rmtree(project / ".dvc/cache/runs", ignore_errors=True)
        calls.clear()

        def refused(address: str | None, error: Exception = error) -> None:
            calls.append("refused")
            raise error

        monkeypatch.setattr(flows.fetch_dask, "fetch_dask", refused)
        state = mcf(fetch_on_dask=True, stages=["fetch"], return_state=True)
        with pytest.raises(StageFailed) as caught:
            state.result()
        assert caught.value.exit_code == code and len(calls) == 1  # a rerun would fail the same way


def test_a_stage_on_dask_is_recorded_in_dvc_lock_and_skipped_once_up_to_date(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its fan-out a stage is committed, so dvc.lock records what it wrote (plain DVC then finds
    nothing to do); the next run finds it up to date and does not fan it out again."""
    import flows.fetch_dask
    from flows.pipeline import dask_stage

    calls: list[str | None] = []

    def fan_out(address: str | None) -> None:
        calls.append(address)
        (project / "out").mkdir(exist_ok=True)
        (project / "out/fetch.txt").write_text("0\n1\n2\n")

    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", fan_out)
    assert dask_stage.fn("fetch", "tcp://scheduler:8786").outcome == "ran"  # the task's body: no server
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["fetch"]["outs"]
    assert outs[0]["md5"] == hashlib.md5(b"0\n1\n2\n").hexdigest()
    assert dask_stage.fn("fetch", "tcp://scheduler:8786").outcome == "unchanged"
    assert calls == ["tcp://scheduler:8786"]


def test_a_stage_on_dask_whose_flow_run_was_stopped_meanwhile_is_not_recorded(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel stops the flow's thread, not the task's thread the fan-out runs in: the run put the
    original params.yaml back and let go of the checkout while the fan-out went on (until the worker's
    SIGKILL, 30 s later). A fan-out that finished in that time was committed under the params put back,
    so dvc.lock recorded the output of one profile as made from the other's params."""
    import flows.fetch_dask
    from flows.pipeline import RUNNING, dask_stage

    def stopped_meanwhile(address: str | None) -> None:
        (project / "out").mkdir(exist_ok=True)
        (project / "out/fetch.txt").write_text("0\n1\n2\n")
        RUNNING.stop_all()  # the flow's thread, cancelled while the fan-out ran

    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", stopped_meanwhile)
    try:
        state = dask_stage.fn("fetch", None)
    finally:
        RUNNING.reset()
    assert state.is_cancelled() and "the flow run was stopped" in state.message
    assert not (project / "dvc.lock").exists()


def test_a_stage_on_dask_whose_dvc_status_fails_fails_naming_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc status` that fails prints nothing on stdout, which read as "no changes" would report the
    stage unchanged and never fan it out: the stage fails with DVC's exit status and message."""
    import flows.fetch_dask
    from flows.pipeline import dask_stage

    calls: list[str | None] = []
    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", calls.append)
    (project / "dvc.yaml").write_text("stages: [fetch]\n")  # a list where DVC wants a mapping
    with pytest.raises(RuntimeError, match=r"`dvc status --json fetch` exited [1-9]\d*: .*dvc\.yaml"):
        dask_stage.fn("fetch", None)
    assert calls == []


def _stopping_slice(i: int, folder: str) -> int:
    """A slice on a worker process: marks that it ran; the first waits until the test has stopped the run."""
    (Path(folder) / f"ran-{i}").touch()
    deadline = time.monotonic() + 60
    while i == 0 and not (Path(folder) / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return i


def test_a_stage_on_dask_whose_flow_run_was_stopped_submits_no_more_slices(
    prefect_api: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop reaches the flow's thread, not the task's thread the fan-out runs in: it went on submitting
    every slice (all 10 queued ones of a 1-worker cluster ran after a SIGTERM) until the worker's SIGKILL,
    30 s later. Now none is submitted after the stop; the one in flight finishes. On worker processes, in
    the flow: each slice's context holds the dask_stage task's, pickled (a first try failed that way)."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    import flows.fetch_dask
    import flows.pipeline
    from flows.dask_runner import submit_in_order, task_runner
    from flows.pipeline import RUNNING

    monkeypatch.setattr(flows.pipeline, "RETRY_DELAY_S", 0)  # a failure's retries, at once
    sliced = task(_stopping_slice, cache_policy=NO_CACHE)
    folder = project / "slices"
    folder.mkdir()

    @flow
    def fan_out(address: str | None) -> list[int]:
        return submit_in_order(sliced, [(i, str(folder)) for i in range(4)], window=1)

    def stop_once_slice_0_runs() -> None:  # as a cancel does, from the flow's thread
        deadline = time.monotonic() + 60
        while not (folder / "ran-0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        RUNNING.stop_all()
        (folder / "go").touch()

    runner = task_runner(None, n_workers=1, processes=True)
    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", fan_out.with_options(task_runner=runner))
    stopper = threading.Thread(target=stop_once_slice_0_runs, daemon=True)
    stopper.start()
    try:  # as a task of the flow: each slice's pickled context holds the dask_stage task run's
        state = mcf(fetch_on_dask=True, stages=["fetch"], return_state=True)
    finally:
        stopper.join()
        RUNNING.reset()
    with pytest.raises(StageFailed, match="on Dask: Stopped: the flow run was stopped"):
        state.result()
    assert sorted(f.name for f in folder.iterdir()) == ["go", "ran-0"]
    assert not (project / "dvc.lock").exists()


def test_a_stage_on_dask_that_ran_before_with_these_inputs_is_restored_from_the_run_cache(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `dvc repro` restores it (README: finished stages are skipped or restored from the run-cache):
    switching back to a profile whose outputs `dvc commit` saved restores them, it does not fan out
    again (crop's 20M images at the paper's scale). The toy fetch has no persistent output, as crop."""
    import flows.fetch_dask
    from flows.pipeline import dask_stage

    calls: list[int] = []

    def fan_out(address: str | None) -> None:
        n = yaml.safe_load((project / "params.yaml").read_text())["fetch"]["n"]
        calls.append(n)
        (project / "out").mkdir(exist_ok=True)
        (project / "out/fetch.txt").write_text("".join(f"{i}\n" for i in range(n)))

    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", fan_out)
    assert dask_stage.fn("fetch", None).outcome == "ran"
    (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "fetch": {"n": 1}}))
    assert dask_stage.fn("fetch", None).outcome == "ran"
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    assert dask_stage.fn("fetch", None).outcome == "restored"
    assert calls == [3, 1] and (project / "out/fetch.txt").read_text() == "0\n1\n2\n"
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "fetch"], cwd=project,
                            capture_output=True, text=True)
    assert json.loads(status.stdout) == {}  # dvc.lock records the restored output


def test_a_stage_on_dask_outside_the_stages_to_run_is_refused(prefect_api: None, project: Path) -> None:
    """`-p stages='["fetch"]' -p crop_on_dask=true`: crop is not planned, so the flag (and its cluster)
    went unused without a word; the run stops before any stage."""
    message = r"crop_on_dask set, but crop is not among the stages to run \(fetch\)"
    with pytest.raises(ValueError, match=message):
        mcf(stages=["fetch"], crop_on_dask=True)
    # the toy stages write out/ and dvc.lock: a check after the run would have run fetch first
    assert not (project / "out").exists() and not (project / "dvc.lock").exists()
    assert (project / "params.yaml").read_text() == yaml.safe_dump(PARAMS)


def test_a_dask_address_without_a_stage_on_dask_is_refused(project: Path) -> None:
    """`-p dask_address=...` alone ran fetch and crop on the worker itself, the cluster unused and unsaid."""
    with pytest.raises(ValueError, match="dask_address 'tcp://scheduler:8786' given, but neither"):
        mcf.fn(dask_address="tcp://scheduler:8786")  # the flow's body: refused before any Prefect call
    assert not (project / "out").exists()


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: a connect to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _plus_one(i: int) -> int:
    return i + 1


def test_a_dask_address_nothing_answers_at_fails_the_stage_at_once_naming_it(
    prefect_api: None, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong `dask_address` failed fetch after 2.5 minutes: Dask's client retried the refused connect
    for its 30 s connect timeout, and the flow retried fetch twice, 30 s apart, with the same address.
    Now the address is checked once, the stage fails at once, not retried, with a message naming it."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    import flows.fetch_dask
    from flows.dask_runner import task_runner

    address = f"tcp://127.0.0.1:{_closed_port()}"
    calls: list[str | None] = []

    def fan_out(address: str | None) -> None:  # fetch_dask's use of the runner, without mcf's params
        calls.append(address)
        runner = task_runner(address, n_workers=1, processes=False)
        flow(lambda: task(_plus_one, cache_policy=NO_CACHE).submit(1).result()).with_options(
            task_runner=runner)()

    monkeypatch.setattr(flows.fetch_dask, "fetch_dask", fan_out)
    start = time.monotonic()
    state = mcf(fetch_on_dask=True, stages=["fetch"], dask_address=address, return_state=True)
    with pytest.raises(StageFailed, match=f"on Dask: SchedulerUnreachable: no Dask scheduler answers at "
                                          f"{address}: a TCP connect .* Connection refused"):
        state.result()
    assert calls == [address]  # not retried: the next try would find the same address
    assert time.monotonic() - start < 30  # within Dask's 30 s connect timeout, let alone a retry's
    assert not (project / "out").exists()


def test_a_dask_address_a_scheduler_answers_at_runs_the_tasks(prefect_api: None) -> None:
    """The check of the address (a TCP connect, before Dask's own) lets a scheduler on TCP through."""
    from distributed import LocalCluster
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.dask_runner import task_runner

    @flow
    def fan() -> list[int]:
        plus_one = task(_plus_one, cache_policy=NO_CACHE)
        return [future.result() for future in [plus_one.submit(i) for i in range(3)]]

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        runner = task_runner(cluster.scheduler_address, n_workers=0, processes=False)
        assert fan.with_options(task_runner=runner)() == [1, 2, 3]


def test_a_dask_address_over_tls_is_checked_and_one_dask_reaches_otherwise_is_left_to_it() -> None:
    """tls:// is TCP too: a wrong one failed after Dask's 30 s connect timeout and the flow's retries, as
    tcp:// did. An address not over TCP (ucx://, inproc://) or without a port is Dask's to reach: a plain
    connect to it would refuse a scheduler that answers there."""
    from flows.dask_runner import SchedulerUnreachable, probe

    port = _closed_port()
    with pytest.raises(SchedulerUnreachable, match=f"no Dask scheduler answers at tls://127.0.0.1:{port}: "):
        probe(f"tls://127.0.0.1:{port}")
    for address in (f"ucx://127.0.0.1:{port}", "inproc://127.0.0.1/1/1", "tcp://127.0.0.1"):
        probe(address)  # no connect: refused as the port is, each would raise


def test_a_dask_address_that_does_not_answer_fails_after_the_probes_timeout() -> None:
    """A host that drops the connect (a firewall, a full listen queue) held the probe for the kernel's
    SYN retries, about two minutes, not the timeout given. A listener whose queue a first connect fills
    drops the next one, as such a host does."""
    from flows.dask_runner import SchedulerUnreachable, probe

    raised: list[BaseException] = []

    def probed(address: str) -> None:
        try:
            probe(address, timeout=0.2)
        except SchedulerUnreachable as err:
            raised.append(err)

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        with socket.create_connection(listener.getsockname(), timeout=5):  # fills the queue: never accepted
            prober = threading.Thread(target=probed, args=(address,), daemon=True)
            prober.start()
            prober.join(10)
    assert not prober.is_alive() and len(raised) == 1
    assert "a TCP connect (0.2 s timeout) got timed out" in str(raised[0]), raised


def test_a_second_flow_run_in_the_same_checkout_is_refused(tmp_path: Path) -> None:
    """Two runs in one checkout would swap params.yaml under each other: the second is refused at once."""
    from flows.pipeline import workspace_lock

    (tmp_path / ".dvc").mkdir()
    with workspace_lock(tmp_path):
        with pytest.raises(RuntimeError, match="another mcf flow run is using"), workspace_lock(tmp_path):
            pass
    with workspace_lock(tmp_path):  # released when the first run ends
        pass


def test_a_folder_that_is_no_checkout_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """MCF_REPO pointing elsewhere: the lock's ``.dvc/tmp`` there would make DVC take the folder as the
    repository root of every folder below it."""
    from flows.pipeline import workspace_lock

    refused = pytest.raises(RuntimeError, match="is not a DVC checkout of mcf .*MCF_REPO")
    with refused, workspace_lock(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


def test_missing_params_file_is_named_and_a_killed_runs_swap_undone(prefect_api: None, project: Path) -> None:
    committed = (project / "params.yaml").read_bytes()
    saved = project / ".dvc" / "tmp" / "mcf-flow.params.yaml"  # as a run killed mid-way leaves it
    saved.write_bytes(committed)
    (project / "params.yaml").write_text("the other profile: {}\n")
    state = mcf(params_file="params.nope.yaml", return_state=True)
    assert state.is_failed() and "params.nope.yaml" in state.message
    assert (project / "params.yaml").read_bytes() == committed and not saved.exists()
    # a swap left by a killed run, then params.yaml edited by hand: the edit is not overwritten
    saved.write_bytes(committed)
    other = b"the other profile: {}\n"
    saved.with_name(f"{saved.name}.sha256").write_text(hashlib.sha256(other).hexdigest())
    (project / "params.yaml").write_text("edited by hand: {}\n")
    state = mcf(return_state=True)
    assert state.is_failed() and "was edited after a flow run swapped it" in state.message
    assert (project / "params.yaml").read_text() == "edited by hand: {}\n" and saved.read_bytes() == committed
    saved.unlink()
    (project / "params.yaml").write_bytes(committed)


def test_a_folder_given_as_params_file_is_named_as_one(project: Path) -> None:
    from flows.pipeline import applied_params

    (project / "profiles").mkdir()
    with pytest.raises(ValueError, match="params_file 'profiles' is a folder under"):
        with applied_params(project, "profiles"):
            pass


def test_a_params_file_outside_the_checkout_is_refused(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The run's params must be reproducible from the repository: a profile elsewhere (an absolute path,
    ``../``, a link leading out) would be recorded in dvc.lock with no versioned file behind it."""
    from flows.pipeline import applied_params

    committed = (project / "params.yaml").read_bytes()
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "params.other.yaml"
    elsewhere.write_text(yaml.safe_dump({**PARAMS, "fetch": {"n": 1}}))
    (project / "params.link.yaml").symlink_to(elsewhere)
    for given in (str(elsewhere), os.path.relpath(elsewhere, project), "params.link.yaml"):
        with pytest.raises(ValueError, match=f"params_file {given!r} is outside the checkout"):
            with applied_params(project, given):
                pass
        assert (project / "params.yaml").read_bytes() == committed


def test_a_run_killed_inside_the_swap_is_undone_by_the_next_unless_edited_since(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed outright (kill -9) with another profile in place leaves the original and a record of
    what it put there: the next run keeps a later edit of params.yaml, and otherwise puts the original
    back, also when the kill came before the profile was in place."""
    import logging

    import flows.pipeline
    from flows.pipeline import applied_params

    monkeypatch.setattr(flows.pipeline, "get_run_logger", lambda: logging.getLogger("test"))  # no flow run
    committed = (project / "params.yaml").read_bytes()
    tiny = yaml.safe_dump({**PARAMS, "fetch": {"n": 1}}).encode()
    (project / "params.tiny.yaml").write_bytes(tiny)
    code = ("import os, pathlib, flows.pipeline as p\n"
            "with p.applied_params(pathlib.Path.cwd(), 'params.tiny.yaml'):\n    os._exit(9)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", code], cwd=project, env=env)
    assert killed.returncode == 9 and (project / "params.yaml").read_bytes() == tiny
    (project / "params.yaml").write_text("edited by hand: {}\n")
    edited = pytest.raises(RuntimeError, match="was edited after a flow run swapped it")
    with edited, applied_params(project, "params.yaml"):
        pass
    assert (project / "params.yaml").read_text() == "edited by hand: {}\n"
    (project / "params.yaml").write_bytes(tiny)  # the edit undone: the swap is undone as usual
    with applied_params(project, "params.yaml"):
        assert (project / "params.yaml").read_bytes() == committed
    saved = project / ".dvc" / "tmp" / "mcf-flow.params.yaml"
    assert not saved.exists()
    # killed between recording the profile and putting it in place: params.yaml is still the original
    saved.write_bytes(committed)
    saved.with_name(f"{saved.name}.sha256").write_text(hashlib.sha256(tiny).hexdigest())
    with applied_params(project, "params.yaml"):
        assert (project / "params.yaml").read_bytes() == committed and not saved.exists()


def test_params_yaml_edited_during_a_swapped_run_is_kept(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit of params.yaml while another profile is in place (an editor saving its buffer, a git pull
    in the checkout) was overwritten by the original at the end of the run, unsaid; a killed run's swap
    already kept such an edit. The edit stays, and the next run stops, naming where the original waits."""
    import logging

    import flows.pipeline
    from flows.pipeline import applied_params

    monkeypatch.setattr(flows.pipeline, "get_run_logger", lambda: logging.getLogger("test"))  # no flow run
    committed = (project / "params.yaml").read_bytes()
    (project / "params.tiny.yaml").write_text(yaml.safe_dump({**PARAMS, "fetch": {"n": 1}}))
    with applied_params(project, "params.tiny.yaml"):
        (project / "params.yaml").write_text("edited by hand: {}\n")
    assert (project / "params.yaml").read_text() == "edited by hand: {}\n"
    saved = project / ".dvc" / "tmp" / "mcf-flow.params.yaml"
    assert saved.read_bytes() == committed
    refused = pytest.raises(RuntimeError, match=f"swapped it; the original waits in {saved}:")
    with refused, applied_params(project, "params.yaml"):
        pass
    # a run that leaves params.yaml as it put it puts the original back, also after a failed stage
    (project / "params.yaml").write_bytes(committed)
    saved.unlink()
    with pytest.raises(KeyError), applied_params(project, "params.tiny.yaml"):
        raise KeyError("a stage failed")
    assert (project / "params.yaml").read_bytes() == committed and not saved.exists()
    # params.yaml deleted during the run (a `git stash`): no edit to keep, the original is put back
    with applied_params(project, "params.tiny.yaml"):
        (project / "params.yaml").unlink()
    assert (project / "params.yaml").read_bytes() == committed and not saved.exists()


def test_a_linked_params_yaml_is_a_link_again_after_the_run(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``params.yaml -> profiles/params.default.yaml``: the swap saved a copy and put the copy back, so
    the link was a plain file after the run and no longer followed its profile. The link comes back
    (same value) after a run, a failed run and a killed one, and its profile is never written."""
    import logging

    import flows.pipeline
    from flows.pipeline import applied_params

    monkeypatch.setattr(flows.pipeline, "get_run_logger", lambda: logging.getLogger("test"))  # no flow run
    params, profile = project / "params.yaml", project / "profiles" / "params.default.yaml"
    profile.parent.mkdir()
    params.rename(profile)
    params.symlink_to("profiles/params.default.yaml")
    committed = profile.read_bytes()
    tiny = yaml.safe_dump({**PARAMS, "fetch": {"n": 1}}).encode()
    (project / "params.tiny.yaml").write_bytes(tiny)

    def linked() -> bool:
        return params.is_symlink() and os.readlink(params) == "profiles/params.default.yaml"

    with applied_params(project, "params.tiny.yaml"):
        assert params.read_bytes() == tiny and profile.read_bytes() == committed
    assert linked()
    with pytest.raises(KeyError), applied_params(project, "params.tiny.yaml"):
        raise KeyError("a stage failed")
    assert linked()
    code = ("import os, pathlib, flows.pipeline as p\n"
            "with p.applied_params(pathlib.Path.cwd(), 'params.tiny.yaml'):\n    os._exit(9)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", code], cwd=project, env=env)
    assert killed.returncode == 9 and params.read_bytes() == tiny and not params.is_symlink()
    with applied_params(project, "params.yaml"):
        assert linked()
    assert linked() and profile.read_bytes() == committed
    assert [p.name for p in (project / ".dvc" / "tmp").glob("mcf-flow.params*")] == []


def _fan_out_parameters(flow_name: str) -> list[dict]:
    """The parameters the Prefect API recorded for each run of ``flow_name``.

    They must not grow with the data: the API refuses a flow run's parameters past 512 KB, which the
    default run's 1,200 crop sources (750 KB) passed when the images were handed to the fan-out flow.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.parameters for run in runs]


def test_crop_on_dask_matches_the_serial_stage(prefect_api: None, tmp_path: Path) -> None:
    import dataclasses

    import pandas as pd

    from flows.crop_dask import crop_dask
    from mcf.data.crop import crop
    from mcf.params import load
    from mcf.synth import write_corpus
    from mcf.synth.config import SynthConfig

    fetch = tmp_path / "fetch"
    manifest, detections = write_corpus(SynthConfig(n_scenes=20, scene_size=128, n_identities=6), 0, fetch)
    manifest.to_parquet(fetch / "manifest.parquet", index=False)
    detections.to_parquet(fetch / "detections.parquet", index=False)
    params = tmp_path / "params.yaml"
    section = {"input": str(fetch), "out": str(tmp_path / "dask"), "size": 32, "min_face_size": 8.0,
               "chunk_size": 3, "shard_size": 10}
    params.write_text(yaml.safe_dump({"crop": section}))
    _, cfg = load("crop", params)
    serial = crop(dataclasses.replace(cfg, out=str(tmp_path / "serial"), workers=1))

    counts = crop_dask(params_file=str(params), n_workers=2, processes=False)
    on_dask = pd.read_parquet(tmp_path / "dask" / "manifest.parquet")
    pd.testing.assert_frame_equal(on_dask, pd.read_parquet(tmp_path / "serial" / "manifest.parquet"))
    assert counts == serial["reason"].fillna("kept").value_counts().to_dict() and counts["kept"] >= 10
    files = {p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file()}
    assert len([f for f in files if f.suffix == ".tar"]) >= 2
    assert files == {p.relative_to(tmp_path / "dask") for p in (tmp_path / "dask").rglob("*") if p.is_file()}
    for rel in files:  # byte for byte: DVC records the same hash either way
        assert (tmp_path / "dask" / rel).read_bytes() == (tmp_path / "serial" / rel).read_bytes(), rel
    assert not list(tmp_path.glob(".dask*"))  # the atomic staging folder is gone
    recorded = _fan_out_parameters("crop_fan_out")
    assert recorded and all(set(p) == {"cfg", "parts_dir"} for p in recorded), recorded


class _Gate:
    """Tasks that run until the flow asks for their result: a task submitted and not yet asked for is in
    flight, whatever the timing, and the count of those that run at once is exact."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reset()

    def reset(self) -> None:
        self.submitted = self.asked = self.running = 0
        self.released: set[int] = set()
        self.most_in_flight = self.most_running = 0


_GATE = _Gate()  # module state, by name: Dask ships the task body by reference (a closure's would be copied)
_GATE_TIMEOUT_S = 60.0  # reached only when the runner starts fewer tasks than it must


def _gated_square(i: int) -> int:
    with _GATE.cond:
        _GATE.running += 1
        _GATE.most_running = max(_GATE.most_running, _GATE.running)
        _GATE.cond.notify_all()
        released = _GATE.cond.wait_for(lambda: i in _GATE.released, _GATE_TIMEOUT_S)
        _GATE.running -= 1
    assert released, f"task {i} was never asked for"
    return i * i


class _GatedFuture:
    def __init__(self, future: Any, i: int, workers: int) -> None:
        self.future, self.i, self.workers = future, i, workers

    def result(self) -> Any:
        """Release the task once as many run as the workers and the tasks in flight allow."""
        with _GATE.cond:
            in_flight = _GATE.submitted - _GATE.asked
            _GATE.asked += 1
            _GATE.cond.wait_for(lambda: _GATE.running >= min(self.workers, in_flight), _GATE_TIMEOUT_S)
            _GATE.released.add(self.i)
            _GATE.cond.notify_all()
        return self.future.result()


class _GatedTask:
    def __init__(self, task: Any, workers: int) -> None:
        self.task, self.workers = task, workers

    def submit(self, i: int) -> _GatedFuture:
        future = self.task.submit(i)
        with _GATE.cond:
            _GATE.submitted += 1
            _GATE.most_in_flight = max(_GATE.most_in_flight, _GATE.submitted - _GATE.asked)
        return _GatedFuture(future, i, self.workers)


def test_fan_out_keeps_a_bounded_window_of_tasks_in_flight(prefect_api: None) -> None:
    """The fan-out flows submit at most ``window`` tasks at once (Dask's scheduler holds a task's
    arguments until it has run), on every worker the window allows, and return results in call order.

    No task ends before the flow asks for its result: an unbounded window submits all 7 first, and the
    count of tasks in flight shows it whatever the timing."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.dask_runner import submit_in_order, task_runner

    gated = task(_gated_square, cache_policy=NO_CACHE)

    @flow
    def fan(window: int) -> list[int]:
        return submit_in_order(_GatedTask(gated, 4), [(i,) for i in range(7)], window)

    for window, running in ((2, 2), (7, 4)):  # 4 one-thread workers
        _GATE.reset()
        runner = task_runner(None, n_workers=4, processes=False)
        assert fan.with_options(task_runner=runner)(window) == [i * i for i in range(7)]
        assert (_GATE.most_in_flight, _GATE.most_running) == (window, running), window


def _cluster_shape() -> tuple[int, int]:
    """The threads of the Dask worker this runs on, and the count of its cluster's workers."""
    from distributed import get_client, get_worker

    return get_worker().state.nthreads, len(get_client().scheduler_info()["workers"])


def test_a_local_cluster_has_the_workers_asked_for_of_one_thread_each(prefect_api: None) -> None:
    """A worker of several threads, or one worker too many, runs more slices at once than the host was
    sized for (each slice downloads on ``fetch.threads`` threads); the window test above cannot see that:
    its gate releases a task as soon as ``workers`` of them run."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.dask_runner import task_runner

    @flow
    def shape() -> tuple[int, int]:
        return task(_cluster_shape, cache_policy=NO_CACHE).submit().result()

    assert shape.with_options(task_runner=task_runner(None, n_workers=2, processes=False))() == (1, 2)


_LATE_DONE: queue.Queue[int] = queue.Queue()  # module state, by name, as _GATE: each late slice once done


def _write_late(folder: str, i: int) -> int:
    """Slice 0 fails at once; the others write into the flow's staging folder a moment later, as a crop
    chunk or a fetch slice does (creating the folders it writes into)."""
    import time

    if i == 0:
        raise RuntimeError("slice 0 failed")
    try:
        time.sleep(1.0)
        (Path(folder) / f"part-{i}").mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"part-{i}" / "shard.tar").write_text("late")
    finally:
        _LATE_DONE.put(i)
    return i


def test_a_failed_slice_waits_for_the_others_before_the_staging_folder_goes(
    prefect_api: None, tmp_path: Path
) -> None:
    """On a cluster of its own (``address``), the runner leaves the workers running when the flow ends: a
    failed slice deleted the staging folder (atomic_dir) while the other slices went on writing into it,
    which left a stray ``.out.tmp-<pid>`` folder (or, on a retry in the same process, wrote into the
    next attempt's)."""
    from distributed import LocalCluster
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.dask_runner import submit_in_order, task_runner
    from mcf.io import atomic_dir

    late = task(_write_late, cache_policy=NO_CACHE)

    @flow
    def fan(folder: str) -> list[int]:
        return submit_in_order(late, [(folder, i) for i in range(4)])

    while not _LATE_DONE.empty():
        _LATE_DONE.get_nowait()
    with LocalCluster(n_workers=4, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        runner = task_runner(cluster.scheduler_address, n_workers=0, processes=False)
        with pytest.raises(RuntimeError, match="slice 0 failed"), atomic_dir(tmp_path / "out", "x") as tmp:
            fan.with_options(task_runner=runner)(str(tmp))
        for _ in range(3):  # past the other slices' writes, had they gone on (a slow worker's too)
            _LATE_DONE.get(timeout=60)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


class _Signalled:
    """A task whose submit is interrupted while it serializes the task's context with pydantic, as
    prefect-dask's submit does (most of its time on a busy scheduler); its futures record a wait."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.waited: list[int] = []

    def submit(self, i: int) -> Any:
        from pydantic import BaseModel, model_serializer

        class Context(BaseModel):
            @model_serializer(mode="wrap")
            def _serialize(self, handler: Any) -> Any:
                if i == at:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, or a cancel's SIGTERM: Prefect's handler
                return {}

        at, waited = self.at, self.waited
        Context().model_dump()

        class Future:
            _final_state = None

            def wait(self, timeout: float | None = None) -> None:
                waited.append(i)

            def result(self) -> int:
                return i

        return Future()


def test_a_ctrl_c_during_a_submit_stops_the_fan_out_at_once(ctrl_c: None) -> None:
    """A Ctrl-C or a cancel's SIGTERM that landed while prefect-dask serialized a task's context for a
    submit was raised by pydantic as a PydanticSerializationError, an ordinary error: the fan-out took it
    for a failed slice, waited for every slice in flight (up to 256 of them), then failed with pydantic's
    message. Seen cancelling fetch_dask: 3 times in 6, 14 s of queued slices run after the SIGTERM."""
    from flows.dask_runner import submit_in_order

    task = _Signalled(at=3)
    with pytest.raises(KeyboardInterrupt):
        submit_in_order(task, [(i,) for i in range(6)], window=5)  # type: ignore[arg-type]
    assert task.waited == []


class _Done:
    """A future whose task has finished."""

    def __init__(self, result: int) -> None:
        self.value = result

    def result(self) -> int:
        return self.value


class _AtOnce:
    """A task whose futures are done as it is submitted."""

    def submit(self, i: int) -> _Done:
        return _Done(i)


def test_a_stop_reaches_the_fan_outs_of_its_own_body_only() -> None:
    """A nested ``stop_on`` that put back no stop on leaving let the outer run, stopped, go on submitting;
    one left in place on leaving refused every later fan-out of the process, its run long over."""
    from flows.dask_runner import Stopped, stop_on, submit_in_order

    outer, inner = threading.Event(), threading.Event()
    calls = [(i,) for i in range(3)]
    with stop_on(outer):
        with stop_on(inner):
            inner.set()
            with pytest.raises(Stopped, match="the flow run was stopped: no more tasks submitted"):
                submit_in_order(_AtOnce(), calls)  # type: ignore[arg-type]
        assert submit_in_order(_AtOnce(), calls) == [0, 1, 2]  # type: ignore[arg-type]
        outer.set()
        with pytest.raises(Stopped):
            submit_in_order(_AtOnce(), calls)  # type: ignore[arg-type]
    assert submit_in_order(_AtOnce(), calls) == [0, 1, 2]  # type: ignore[arg-type]


class _Terminated(Exception):
    """What this test's SIGTERM handler raises, as Prefect's raises its TerminationSignal."""


def _terminate(_sig: int, _frame: Any) -> None:
    raise _Terminated


@pytest.mark.parametrize(("sig", "raised"),
                         [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, _Terminated)])
def test_a_stop_signal_is_held_through_a_submit_and_a_second_one_is_not(
    sig: int, raised: type[BaseException], ctrl_c: None
) -> None:
    """A cancel's SIGTERM, as a Ctrl-C, must wait for the submit it lands in (pydantic turns it into an
    ordinary error there); a second one must not wait: the first submit starts the cluster, which may
    hang."""
    from flows.dask_runner import stops_held

    previous = signal.signal(signal.SIGTERM, _terminate)
    reached = []
    try:
        with pytest.raises(raised):
            with stops_held():
                os.kill(os.getpid(), sig)
                reached.append("held")
        with pytest.raises(raised):
            with stops_held():
                os.kill(os.getpid(), sig)
                os.kill(os.getpid(), sig)  # raised here
                reached.append("held twice")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert reached == ["held"]


def test_crop_on_dask_is_refused_while_mcf_crop_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow and `mcf crop` write the same output: one holds the crop lock, the other is refused."""
    import pandas as pd

    from flows.crop_dask import crop_dask
    from mcf.errors import StageError
    from mcf.io import stage_lock

    monkeypatch.chdir(tmp_path)  # the lock lives under the working directory, as for `mcf crop`
    (tmp_path / "fetch").mkdir()
    pd.DataFrame({"sample_id": ["a"], "path": [None], "status": ["http_error"]}).to_parquet(
        tmp_path / "fetch" / "manifest.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"crop": {"input": "fetch", "out": "crop"}}))
    with stage_lock("crop"), pytest.raises(StageError, match="stage crop is already running"):
        crop_dask.fn(params_file="params.yaml", processes=False)  # the flow's body, no Prefect server
    assert not list(tmp_path.glob("*crop*"))


def test_fetch_on_dask_is_refused_while_mcf_fetch_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow and `mcf fetch` write the same output and journal folder: with another stage's lock both
    ran, each resuming from the other's journal files as they were written, the first done deleting them."""
    import flows.fetch_dask
    from mcf.errors import StageError
    from mcf.io import stage_lock

    def fan_out(**_: Any) -> None:
        raise AssertionError("fanned out while `mcf fetch` runs")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    section = {"source": "local", "data": "images", "out": "out", "local": {"root": "images"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": section}))
    monkeypatch.setattr(flows.fetch_dask.fan_out, "with_options", fan_out)
    with stage_lock("fetch"), pytest.raises(StageError, match="stage fetch is already running"):
        flows.fetch_dask.fetch_dask.fn(params_file="params.yaml", processes=False)
    assert not list(tmp_path.glob("*out*"))


def _handed_to_the_fan_out(module: Any, fan_out_flow: Any, monkeypatch: pytest.MonkeyPatch,
                           **params: Any) -> tuple[Any, tuple]:
    """The task runner ``fan_out_flow`` (its body, given ``params``) runs its fan-out on, and what it hands
    the first fan-out task, which stops it there (no Prefect server)."""
    seen = []

    def with_options(task_runner: Any) -> Any:
        def fan_out(*args: Any) -> None:
            seen.append((task_runner, args))
            raise RuntimeError("stop before the fan-out")

        return fan_out

    monkeypatch.setattr(module.fan_out, "with_options", with_options)
    with pytest.raises(RuntimeError, match="stop before the fan-out"):
        fan_out_flow.fn(params_file="params.yaml", **params)
    return seen[0]


def test_crop_on_dask_hands_its_workers_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of a cluster (``address``) sees the checkout at the same absolute path, not in the flow's
    working directory: every path a chunk reads, YuNet's model included, reaches it absolute."""
    import flows.crop_dask

    monkeypatch.chdir(tmp_path)
    (tmp_path / "yunet.onnx").touch()
    section = {"input": "fetch", "out": "crop", "detector": {"yunet_model": "yunet.onnx"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"crop": section}))
    cfg, parts_dir = _handed_to_the_fan_out(flows.crop_dask, flows.crop_dask.crop_dask, monkeypatch,
                                            processes=False)[1]
    assert [cfg.input, cfg.out, cfg.detector.yunet_model] == [
        str(tmp_path / "fetch"), str(tmp_path / "crop"), str(tmp_path / "yunet.onnx")]
    assert Path(parts_dir).is_absolute()


def test_crop_on_dask_without_a_fetched_image_fails_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `mcf crop`: no image makes no chunk and no parts folder, and the gate names the empty output
    (removing the parts folder was a FileNotFoundError naming the staging folder)."""
    import pandas as pd

    import flows.crop_dask
    from mcf.errors import GateError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fetch").mkdir()
    pd.DataFrame({"sample_id": ["a"], "path": [None], "status": ["http_error"]}).to_parquet(
        tmp_path / "fetch" / "manifest.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"crop": {"input": "fetch", "out": "crop"}}))
    monkeypatch.setattr(flows.crop_dask.fan_out, "with_options", lambda **_: lambda cfg, parts: [])
    with pytest.raises(GateError, match=r"expect_table_row_count_to_be_between\(\): observed 0"):
        flows.crop_dask.crop_dask.fn(params_file="params.yaml", processes=False)
    assert not list(tmp_path.glob("*crop*"))


def test_fetch_on_dask_hands_its_workers_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for crop: a worker of a cluster (``address``) resolves the output, staging and the local
    source's root as the checkout's absolute paths, not against its own working directory."""
    import flows.fetch_dask

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    section = {"source": "local", "data": "images", "out": "out", "local": {"root": "images"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": section}))
    cfg, staging, _ = _handed_to_the_fan_out(flows.fetch_dask, flows.fetch_dask.fetch_dask, monkeypatch,
                                             processes=False)[1]
    assert [cfg.out, cfg.local.root] == [str(tmp_path / "out"), str(tmp_path / "images")]
    assert Path(staging).is_absolute()


@pytest.mark.parametrize("stage", ["fetch", "crop"])
def test_a_stage_on_dask_starts_the_local_cluster_it_is_given(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``n_workers`` and ``processes`` size the local cluster; left out, fetch has a worker per CPU and
    crop ``crop.workers``. Ignored, a flow sized for a shared host took every core of it."""
    import flows.crop_dask
    import flows.fetch_dask

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    sections = {"fetch": {"source": "local", "data": "images", "out": "out", "local": {"root": "images"}},
                "crop": {"input": "fetch", "out": "crop", "workers": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(sections))
    module = flows.fetch_dask if stage == "fetch" else flows.crop_dask
    fan_out_flow = module.fetch_dask if stage == "fetch" else module.crop_dask
    for n_workers, processes in ((5, False), (1, True)):
        cluster = _handed_to_the_fan_out(module, fan_out_flow, monkeypatch, n_workers=n_workers,
                                         processes=processes)[0].cluster_kwargs
        assert (cluster["n_workers"], cluster["processes"]) == (n_workers, processes)
    cluster = _handed_to_the_fan_out(module, fan_out_flow, monkeypatch)[0].cluster_kwargs
    assert cluster["n_workers"] == (os.cpu_count() if stage == "fetch" else 3)


def test_a_crop_chunk_on_a_dask_worker_runs_opencv_on_one_thread(tmp_path: Path) -> None:
    """The cluster's workers are the parallelism: OpenCV's own thread pool in each of them oversubscribed
    the host's cores (a worker per core, each with a pool as large)."""
    import cv2

    from flows.crop_dask import crop_part
    from mcf.data.crop import CropConfig

    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        assert crop_part.fn([], CropConfig(), str(tmp_path / "part-000000")).rows.empty
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(threads)


def test_fetch_on_dask_refuses_slices_of_no_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``rows_per_task=0`` is refused by name before the params are read (here there are none), not by
    the slicing's ``range() arg 3 must not be zero`` after the listing."""
    from flows.fetch_dask import fetch_dask

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="rows_per_task must be at least 1, not 0"):
        fetch_dask.fn(rows_per_task=0)


def test_fetch_on_dask_with_nothing_to_fetch_fails_naming_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `mcf fetch`: an empty listing is a stage error naming the folder, before any slice; without the
    check the fan-out returned an empty manifest for the gate to refuse without saying why."""
    import flows.fetch_dask
    from mcf.errors import StageError
    from mcf.params import load

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    section = {"source": "local", "data": "images", "out": "out", "local": {"root": "images"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": section}))
    _, cfg = load("fetch", "params.yaml")
    with pytest.raises(StageError, match="the local source lists no rows: nothing in images"):
        flows.fetch_dask.fan_out.fn(cfg, str(tmp_path / "staging"), 1)


@pytest.mark.parametrize("stage", ["fetch", "crop"])
def test_a_stage_on_dask_checks_every_section_before_any_work(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `mcf <stage>` does (README: every stage checks the whole params.yaml): a typo in evaluate's
    section stops the fan-out before it starts, not `mcf subset` after days of downloads and crops."""
    import flows.crop_dask
    import flows.fetch_dask
    from mcf.params import ParamsError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "fetch").mkdir()
    sections = {"fetch": {"source": "local", "data": "images", "out": "out", "local": {"root": "images"}},
                "crop": {"input": "fetch", "out": "crop"}, "evaluate": {"batchsize": 8}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(sections))
    module = flows.fetch_dask if stage == "fetch" else flows.crop_dask
    fan_out_flow = module.fetch_dask if stage == "fetch" else module.crop_dask
    with pytest.raises(ParamsError, match="evaluate.batchsize: unknown key"):
        _handed_to_the_fan_out(module, fan_out_flow, monkeypatch, processes=False)


def _six_local_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any]:
    """Six PNGs under ``images/`` and a params file fetching them (the local source); the working
    directory is ``tmp_path``, where the gate keeps its results. Returns the params file and its config."""
    import numpy as np
    from PIL import Image

    from mcf.params import load

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"fetch": {"source": "local", "out": str(tmp_path / "out"),
                                                "data": str(root), "local": {"root": str(root)}}}))
    monkeypatch.chdir(tmp_path)
    return params, load("fetch", params)[1]


def _spoil_keeping_stat(root: Path) -> None:
    """Make every photo unreadable with the same name, size and mtime: only a reused row succeeds."""
    import os

    for path in root.iterdir():
        stat = path.stat()
        path.write_bytes(b"x" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_fetch_on_dask_reads_a_killed_runs_journal_once(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is read once per run, not once per slice: every slice read the whole folder (each
    earlier entry once per slice, and the files the slices before it were writing), quadratic in the
    rows; at 20M rows in 2,000 slices of 10,000, with 1M entries taking 7.7 s and 1.6 GB to read."""
    from flows.fetch_dask import fetch_dask
    from mcf.data.fetch import journal_dir, limits, remote_source
    from mcf.data.sources.download import Journal, fetch_records

    params, cfg = _six_local_photos(tmp_path, monkeypatch)
    out = tmp_path / "out"
    fetch_records(remote_source(cfg), out, journal_dir(out), tmp_path / "killed", limits(cfg))  # then killed
    _spoil_keeping_stat(tmp_path / "images")
    read: list[int] = []  # the entries each read of the journal folder returned
    load_journal = Journal.load

    def counted(self: Journal) -> list[dict]:
        entries = load_journal(self)
        read.append(len(entries))
        return entries

    monkeypatch.setattr(Journal, "load", counted)
    counts = fetch_dask(params_file=str(params), n_workers=2, processes=False, rows_per_task=1)
    assert counts == {"success": 6} and read == [6]


def test_fetch_on_dask_reads_the_previous_manifest_once(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun reuses the previous output's files, reading its manifest once per run, not once per slice:
    each slice's filtered read scanned every row of it, quadratic in the rows (0.4 s a slice of 10,000 at
    2M rows, 2,000 slices at 20M)."""
    import pyarrow.parquet as pq

    from flows.fetch_dask import fetch_dask
    from mcf.data.fetch import main
    from mcf.params import Common

    params, cfg = _six_local_photos(tmp_path, monkeypatch)
    main(Common(), cfg)  # the previous output
    _spoil_keeping_stat(tmp_path / "images")
    read: list[str] = []  # the previous manifest's reads
    read_table = pq.read_table

    def counted(source: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(source) == tmp_path / "out" / "manifest.parquet":
            read.append(str(source))
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", counted)
    counts = fetch_dask(params_file=str(params), n_workers=2, processes=False, rows_per_task=1)
    assert counts == {"success": 6} and len(read) == 1


def test_fetch_on_dask_matches_the_serial_stage_and_resumes_it(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LAION-style rows over HTTP on 127.0.0.1, in slices of 3 on a local Dask cluster: the serial
    stage's manifest and files, then a rerun that reuses every success, whichever way it was split."""
    import dataclasses
    import functools
    import io
    import threading
    from collections import Counter
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import numpy as np
    import pandas as pd
    from PIL import Image

    from flows.fetch_dask import fetch_dask
    from mcf.data.fetch import journal_dir, main
    from mcf.params import Common, ParamsError, load

    site = tmp_path / "site"
    site.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(7):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(buf, format="PNG")
        (site / f"{i}.png").write_bytes(buf.getvalue())
        names.append(f"{i}.png")
    (site / "page.html").write_text("<html>not an image</html>")
    requests: Counter = Counter()

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            requests[self.path] += 1

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        urls = [url + n for n in [*names[:4], "missing.jpg", "page.html", *names[4:]]]
        parquet = tmp_path / "part-00000.parquet"
        rows = {"SAMPLE_ID": range(len(urls)), "URL": urls, "TEXT": ["a face"] * len(urls)}
        pd.DataFrame(rows).to_parquet(parquet)
        face = [[1, 2, 10, 12], [[3, 4]] * 5, 0.9]  # released detections: a fetched image, a failed one, none
        (tmp_path / "det.json").write_text(json.dumps({"0": [face, face], "4": [face], "99": [face]}))
        section = {"source": "laion-face", "data": str(tmp_path), "out": str(tmp_path / "dask"), "threads": 2,
                   "laion_face": {"parquet": [str(parquet)], "timeout": 5.0,
                                  "detections": [str(tmp_path / "det.json")]}}
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"fetch": section}))
        monkeypatch.chdir(tmp_path)  # the gate keeps its results under the working directory
        _, cfg = load("fetch", params)
        main(Common(), dataclasses.replace(cfg, out=str(tmp_path / "serial")))
        serial = pd.read_parquet(tmp_path / "serial" / "manifest.parquet")
        assert serial["status"].value_counts().to_dict() == {"success": 7, "http_error": 1, "not_image": 1}

        counts = fetch_dask(params_file=str(params), n_workers=2, processes=False, rows_per_task=3)
        assert counts == {"success": 7, "http_error": 1, "not_image": 1}
        on_dask = pd.read_parquet(tmp_path / "dask" / "manifest.parquet")
        pd.testing.assert_frame_equal(on_dask, serial)
        detections = pd.read_parquet(tmp_path / "dask" / "detections.parquet")
        assert detections["sample_id"].tolist() == ["0", "0"]  # read before the downloads, kept if fetched
        pd.testing.assert_frame_equal(detections, pd.read_parquet(tmp_path / "serial" / "detections.parquet"))

        def tree(root: Path) -> set[Path]:
            return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}

        files = tree(tmp_path / "serial")
        assert files == tree(tmp_path / "dask") and len(files) == 7 + 2  # images, manifest, detections
        for rel in files:
            assert (tmp_path / "dask" / rel).read_bytes() == (tmp_path / "serial" / rel).read_bytes(), rel
        assert not journal_dir(tmp_path / "dask").exists() and not list(tmp_path.glob(".dask*"))

        before = Counter(requests)
        assert fetch_dask(params_file=str(params), n_workers=2, processes=False, rows_per_task=4) == counts
        assert set(requests - before) == {"/missing.jpg", "/page.html"}  # successes reused, failures retried
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "dask" / "manifest.parquet"), serial)
        recorded = _fan_out_parameters("fetch_fan_out")
        assert recorded and all(set(p) == {"cfg", "staging", "rows_per_task"} for p in recorded), recorded

        params.write_text(yaml.safe_dump({"fetch": {"out": str(tmp_path / "synth")}}))
        with pytest.raises(ParamsError, match="fetch.source: synthetic: .* fetch_dask fans out downloads"):
            fetch_dask(params_file=str(params), processes=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
