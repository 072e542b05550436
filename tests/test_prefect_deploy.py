"""Deployment ``mcf/full`` end to end: real Prefect server, work pool, ``prefect deploy``, workers, runs.

Everything binds 127.0.0.1 and lives in temporary folders (the session's server from tests/conftest.py
with PREFECT_HOME and its SQLite database; copies of this checkout's tracked files as each worker's
MCF_REPO). Worker ``gpu-0`` runs the real ``dvc.yaml`` on a tiny params profile built from the committed
``params.yaml``; meanwhile worker ``gpu-1``, in a checkout of its own as the README sets up one per GPU,
runs a pipeline whose first stage is made to fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from conftest import PrefectServer

PREFECT = [sys.executable, "-m", "prefect"]
DVC = [sys.executable, "-m", "dvc"]

# Dotted params keys -> tiny values, so the whole chain runs in seconds; keys the committed params.yaml
# lacks are skipped (a stage not landed yet, or renamed: it then runs at its default size).
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
TINY: dict[str, Any] = {
    "fetch.synthetic.n_scenes": 16,
    "fetch.synthetic.scene_size": 96,
    "fetch.synthetic.n_identities": 8,
    "fetch.synthetic.workers": 1,
    "fetch.synthetic.aflw": {"n_train": 8, "n_test": 4, "image_size": 64},
    "fetch.synthetic.lapa": {"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 64},
    "crop.size": 32,
    "crop.min_face_size": 8.0,
    "crop.workers": 1,
    "subset.n": 32,
    "teacher.backbone": TINY_VIT,
    "teacher.decoder_dim": 32,
    "teacher.decoder_depth": 1,
    "teacher.decoder_heads": 2,
    "teacher.train.epochs": 1,
    "teacher.train.warmup_epochs": 0,
    "teacher.train.batch_size": 16,
    "pretrain.model.backbone": TINY_VIT,
    "pretrain.model.decoder_dim": 32,
    "pretrain.model.decoder_depth": 1,
    "pretrain.model.decoder_heads": 2,
    "pretrain.model.feature_layers": [0, 1, 2, 3],
    "pretrain.model.proj_hidden": 64,
    "pretrain.model.proj_dim": 32,
    "pretrain.model.pred_hidden": 64,
    "pretrain.train.epochs": 1,
    "pretrain.train.warmup_epochs": 0,
    "pretrain.train.batch_size": 16,
    "finetune_alignment.data.n_train": 8,
    "finetune_alignment.data.size": 32,
    "finetune_alignment.data.crop_size": 64,
    "finetune_alignment.blocks": [0, 1, 2, 3],
    "finetune_alignment.channels": 8,
    "finetune_alignment.epochs": 1,
    "finetune_alignment.batch_size": 4,
    "finetune_parsing.data.size": 32,
    "finetune_parsing.data.label_size": 32,
    "finetune_parsing.data.warp_size": 64,
    "finetune_parsing.blocks": [0, 1, 2, 3],
    "finetune_parsing.channels": 8,
    "finetune_parsing.epochs": 1,
    "finetune_parsing.batch_size": 4,
    "evaluate.overlays": 1,
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def tiny_profile(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every TINY key that it has replaced by the tiny value."""
    for dotted, value in TINY.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = value
    return params


def _copy_checkout(dest: Path) -> None:
    """This checkout's tracked files as they are on disk, committed into a fresh repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "checkout under test"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)


class Watch:
    """``prefect deployment run <name> --watch``, running in the background until :meth:`result`."""

    def __init__(self, prefect: Prefect, name: str, params: dict[str, Any]) -> None:
        self.api, self._id = prefect.api, ""
        self.out = Path(tempfile.mkstemp(prefix="watch-", suffix=".log", dir=prefect.tmp)[1])
        args = [f"--param={key}={json.dumps(value)}" for key, value in params.items()]
        cmd = [*PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", "600", *args]
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=prefect.env,
                                         cwd=prefect.repo, text=True)

    def record(self, timeout: float = 120) -> dict:
        """The flow run as the server has it (its id is the first thing the CLI prints)."""
        deadline = time.monotonic() + timeout
        while not self._id:
            if found := re.search(r"UUID: ([0-9a-f-]{36})", self.out.read_text()):
                self._id = found[1]
            else:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.out.read_text()
                time.sleep(0.2)
        return httpx.get(f"{self.api}/flow_runs/{self._id}", timeout=10).json()

    def claimed(self, timeout: float = 120) -> None:
        """Wait until a worker has taken the run (it is no longer Scheduled)."""
        deadline = time.monotonic() + timeout
        while self.record()["state"]["type"] == "SCHEDULED":
            assert time.monotonic() < deadline, f"no worker took flow run {self._id}"
            time.sleep(0.2)

    def result(self) -> tuple[int, str, dict]:
        """The CLI's exit status and output, and the flow run record, once the run is final."""
        self.proc.wait(660)
        return self.proc.returncode, self.out.read_text(), self.record()


class Prefect:
    """The CLI and REST API of the session's server, with the work pool and deployments of ``repo``."""

    def __init__(self, server: PrefectServer, tmp: Path) -> None:
        self.server, self.tmp, self.api, self.repo = server, tmp, server.api, tmp / "repo"
        self.env = {**server.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*PREFECT, *args], env=self.env, cwd=self.repo, capture_output=True, text=True,
                              timeout=timeout)

    def worker(self, name: str, repo: Path) -> subprocess.Popen:
        """``prefect worker start`` on pool ``gpu``, one run at a time, in checkout ``repo`` (MCF_REPO)."""
        cmd = [*PREFECT, "worker", "start", "--pool", "gpu", "--name", name, "--limit", "1"]
        return self.server.start(cmd, self.tmp / f"{name}.log", {**self.env, "MCF_REPO": str(repo)})

    def run_deployment(self, name: str, **params: Any) -> Watch:
        return Watch(self, name, params)

    def artifact(self, run: dict, key: str) -> dict | None:
        """The artifact ``key`` that flow run ``run`` created, if any."""
        query = {"artifacts": {"key": {"any_": [key]}}, "flow_runs": {"id": {"any_": [run["id"]]}}}
        found = httpx.post(f"{self.api}/artifacts/filter", json=query, timeout=10).json()
        return found[0] if found else None


def test_a_worker_without_an_absolute_mcf_repo_fails_the_pull_step_naming_it(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefect.yaml's pull steps, run by Prefect's own step runner as a worker runs them. Unset, MCF_REPO
    became the empty path, which Prefect took as the worker's own folder: the run then crashed loading
    ``flows/pipeline.py`` (FileNotFoundError, no word of MCF_REPO), or ran in whatever checkout the worker
    was started from. A relative path, after a step, would resolve against Prefect's scratch folder."""
    import asyncio
    import os

    from prefect.deployments.steps.core import StepExecutionError, run_steps
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.templating import apply_values

    steps = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    monkeypatch.chdir(tmp_path)  # the steps change the working directory
    (tmp_path / "repo").mkdir()
    # the session's server answers the steps' look-ups (variables, blocks), not a temporary one
    with temporary_settings({PREFECT_API_URL: prefect_server.api}):
        for repo in (None, "", "repo"):
            if repo is None:
                monkeypatch.delenv("MCF_REPO", raising=False)
            else:
                monkeypatch.setenv("MCF_REPO", repo)
            with pytest.raises(StepExecutionError) as failed:
                asyncio.run(run_steps(steps, print_function=lambda *_, **__: None))
            cause = str(failed.value.__cause__)
            assert "MCF_REPO" in cause and "absolute path" in cause, (repo, cause)
            assert Path.cwd() == tmp_path
        monkeypatch.setenv("MCF_REPO", str(tmp_path / "repo"))  # as the README sets it: the run starts there
        asyncio.run(run_steps(steps, print_function=lambda *_, **__: None))
        assert Path.cwd() == tmp_path / "repo"
        # deployed with MCF_REPO set, the path is pinned (prefect.yaml): a worker needs none of its own
        pinned = apply_values(steps, os.environ, remove_notset=False)  # as `prefect deploy` templates them
        monkeypatch.delenv("MCF_REPO")
        monkeypatch.chdir(tmp_path)
        asyncio.run(run_steps(pinned, print_function=lambda *_, **__: None))
    assert Path.cwd() == tmp_path / "repo"


@pytest.fixture(scope="session")
def prefect(prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    """Pool ``gpu`` -> ``prefect deploy --all`` -> worker ``gpu-0`` in a copy of this checkout."""
    client = Prefect(prefect_server, tmp_path_factory.mktemp("prefect-deploy"))
    client.repo.mkdir()
    _copy_checkout(client.repo)
    done = client.cli("work-pool", "create", "gpu", "--type", "process")
    assert done.returncode == 0, f"prefect work-pool create:\n{done.stdout}\n{done.stderr}"
    # the worker runs elsewhere: the deployment's pull step finds the checkout through MCF_REPO
    worker = client.worker("gpu-0", client.repo)  # it starts up while `prefect deploy` runs
    try:
        done = client.cli("deploy", "--all", "--no-prompt")  # MCF_REPO unset: `{{ $MCF_REPO }}` is kept
        assert done.returncode == 0, f"prefect deploy:\n{done.stdout}\n{done.stderr}"
        yield client
    finally:
        prefect_server.stop(worker)


@pytest.fixture(scope="session")
def tiny_run(prefect: Prefect) -> Iterator[Watch]:
    """``mcf/full`` on the tiny profile (every stage of dvc.yaml), taken by worker ``gpu-0``.

    It runs in the background for the session: the failing run is checked on a second worker meanwhile,
    and the other tests run before its result is awaited (markers ``starts_background`` and
    ``awaits_background``, ordered by tests/conftest.py). A tiny value that the committed params.yaml no
    longer accepts fails its stage, with a message naming the key.
    """
    committed = yaml.safe_load((prefect.repo / "params.yaml").read_text())
    (prefect.repo / "params.tiny.yaml").write_text(yaml.safe_dump(tiny_profile(committed)))
    # crop fans out on a local Dask cluster inside the flow run, and is recorded in dvc.lock
    watch = prefect.run_deployment("mcf/full", params_file="params.tiny.yaml", crop_on_dask=True)
    try:
        watch.claimed()
        yield watch
    finally:
        watch.proc.wait(660)  # a run left going would outlive the worker


@pytest.mark.starts_background
def test_failed_stage_fails_the_run_and_names_the_stage(prefect: Prefect, tiny_run: Watch) -> None:
    # a second worker with its own checkout (README: one per GPU) takes this run: gpu-0 is busy
    repo = prefect.tmp / "repo-1"
    subprocess.run(["git", "clone", "-q", str(prefect.repo), str(repo)], check=True, capture_output=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    victim = next(iter(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]))
    # `mcf <stage>` rejects an unknown key (exit 2), which is not retried: the first stage fails at once
    params[victim]["no_such_key"] = 1
    (repo / "params.broken.yaml").write_text(yaml.safe_dump(params))  # only this checkout has it
    worker = prefect.worker("gpu-1", repo)
    try:
        code, log, run = prefect.run_deployment("mcf/full", params_file="params.broken.yaml").result()
    finally:
        prefect.server.stop(worker)
    assert code == 1, log[-4000:]
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert f"stage '{victim}" in message and "no_such_key" in message and "exited with 2" in message, message
    # not retried (it would fail the same way): one try, counted by the server rather than timed
    query = {"flow_runs": {"id": {"any_": [run["id"]]}}}
    tries = {t["name"]: t["run_count"] for t in httpx.post(f"{prefect.api}/task_runs/filter", json=query,
                                                           timeout=10).json()}
    assert tries.get(victim) == 1 and max(tries.values()) == 1, tries
    # nothing half-written: no output, dvc.lock and params.yaml as committed; the other run goes on
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                             capture_output=True, text=True, check=True).stdout
    assert not (repo / params[victim]["out"]).exists() and not changed, changed
    assert tiny_run.record()["state"]["type"] != "FAILED"


@pytest.mark.awaits_background
def test_full_deployment_runs_the_pipeline_on_a_worker(prefect: Prefect, tiny_run: Watch) -> None:
    code, log, run = tiny_run.result()
    assert code == 0 and run["state"]["type"] == "COMPLETED", log[-6000:]
    lock = yaml.safe_load((prefect.repo / "dvc.lock").read_text())
    dvc_yaml = yaml.safe_load((prefect.repo / "dvc.yaml").read_text())["stages"]
    for name in dvc_yaml:  # every stage ran (foreach/matrix stages as name@item)
        assert any(locked.split("@")[0] == name for locked in lock["stages"]), name
    assert lock["stages"]["fetch"]["params"]["params.yaml"]["fetch"]["synthetic"]["n_scenes"] == 16
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            assert (prefect.repo / out["path"]).exists(), out["path"]
    # the tiny profile was applied for the run only
    show = ["git", "show", "HEAD:params.yaml"]
    committed = subprocess.run(show, cwd=prefect.repo, capture_output=True, check=True).stdout
    assert (prefect.repo / "params.yaml").read_bytes() == committed
    # the checkout is found on the worker when a run starts, not fixed at deploy time
    deployment = httpx.get(f"{prefect.api}/deployments/name/mcf/full", timeout=10).json()
    pull = deployment["pull_steps"][-1]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $MCF_REPO }}"
    summary = prefect.artifact(run, "mcf-summary")
    assert summary and "| `fetch` | ran |" in summary["data"] and "| `crop` | ran |" in summary["data"]
    # crop ran as its fan-out flow (`dvc repro crop` reads the same in the summary, dvc.lock and status)
    query = {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}}
    subflows = httpx.post(f"{prefect.api}/flow_runs/filter", json=query, timeout=10).json()
    names = [httpx.get(f"{prefect.api}/flows/{s['flow_id']}", timeout=10).json()["name"] for s in subflows]
    assert names == ["crop_dask"], names
    # with the tiny profile back in place, plain DVC finds nothing to do (crop on Dask included)
    shutil.copyfile(prefect.repo / "params.tiny.yaml", prefect.repo / "params.yaml")
    try:
        status = subprocess.run([*DVC, "status", "--json"], cwd=prefect.repo, capture_output=True, text=True)
    finally:
        (prefect.repo / "params.yaml").write_bytes(committed)
    assert set(json.loads(status.stdout)) <= {"data.dvc"}, status.stdout  # data/: user-supplied, not here
    if "evaluate" in dvc_yaml:
        metrics = prefect.artifact(run, "mcf-metrics")
        assert metrics and "nme" in metrics["data"].lower()
        report = prefect.artifact(run, "mcf-report")  # the metrics beside the paper's, labelled SynthFace
        assert report and "this run: mcf" in report["data"] and "SynthFace" in report["data"], report

