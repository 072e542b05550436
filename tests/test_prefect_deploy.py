"""Deployment ``mcf/full`` end to end: real Prefect server, work pool, ``prefect deploy``, worker, runs.

Everything binds 127.0.0.1 and lives in temporary folders (PREFECT_HOME with its SQLite database, a copy
of this checkout's tracked files as the worker's MCF_REPO). The pipeline runs the real ``dvc.yaml`` on a
tiny params profile built from the committed ``params.yaml``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mcf.params import load

ROOT = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
DVC = [sys.executable, "-m", "dvc"]

# Dotted params keys -> tiny values, so the whole chain runs in seconds; keys the committed params.yaml
# lacks are skipped (a stage not landed yet, or renamed: it then runs at its default size).
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
TINY: dict[str, Any] = {
    "fetch.synthetic.n_scenes": 16,
    "fetch.synthetic.scene_size": 96,
    "fetch.synthetic.n_identities": 8,
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A long-running process in its own session, so that its whole process group can be stopped."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


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


class Prefect:
    """The CLI and REST API of the server started for this module."""

    def __init__(self, api: str, env: dict[str, str], repo: Path) -> None:
        self.api, self.env, self.repo = api, env, repo

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*PREFECT, *args], env=self.env, cwd=self.repo, capture_output=True, text=True,
                              timeout=timeout)

    def run_deployment(self, name: str, **params: Any) -> tuple[subprocess.CompletedProcess, dict]:
        """``prefect deployment run <name> --watch``; returns the CLI result and the flow run record."""
        args = [f"--param={key}={json.dumps(value)}" for key, value in params.items()]
        done = self.cli("deployment", "run", name, "--watch", "--watch-timeout", "600", *args, timeout=660)
        found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
        assert found, f"no flow run id in:\n{done.stdout}\n{done.stderr}"
        return done, httpx.get(f"{self.api}/flow_runs/{found[1]}", timeout=10).json()

    def artifact(self, run: dict, key: str) -> dict | None:
        """The artifact ``key`` that flow run ``run`` created, if any."""
        query = {"artifacts": {"key": {"any_": [key]}}, "flow_runs": {"id": {"any_": [run["id"]]}}}
        found = httpx.post(f"{self.api}/artifacts/filter", json=query, timeout=10).json()
        return found[0] if found else None


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefect]:
    """Server -> pool ``gpu`` -> ``prefect deploy --all`` -> one worker, on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("prefect-deploy")
    repo = tmp / "repo"
    repo.mkdir()
    _copy_checkout(repo)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
    }
    for key in ("PREFECT_API_KEY", "MCF_REPO"):
        env.pop(key, None)
    server = _start([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    tmp / "server.log", env, tmp)
    procs = [server]
    try:
        _wait_healthy(api, server, tmp / "server.log")
        client = Prefect(api, env, repo)
        for args in (("work-pool", "create", "gpu", "--type", "process"), ("deploy", "--all", "--no-prompt")):
            done = client.cli(*args)  # MCF_REPO unset: `{{ $MCF_REPO }}` is kept for the worker
            assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        # the worker runs elsewhere: the deployment's pull step finds the checkout through MCF_REPO
        worker = [*PREFECT, "worker", "start", "--pool", "gpu", "--name", "gpu-0", "--limit", "1"]
        procs.append(_start(worker, tmp / "worker.log", {**env, "MCF_REPO": str(repo)}, tmp))
        yield client
    finally:
        for proc in reversed(procs):
            _stop(proc)
    for proc in procs:
        assert proc.poll() is not None


@pytest.fixture(scope="module")
def tiny_run(prefect: Prefect) -> dict:
    """``mcf/full`` on the tiny profile: every stage of dvc.yaml, on the worker."""
    committed = yaml.safe_load((prefect.repo / "params.yaml").read_text())
    (prefect.repo / "params.tiny.yaml").write_text(yaml.safe_dump(tiny_profile(committed)))
    load(None, prefect.repo / "params.tiny.yaml")  # a bad tiny value fails here, by name
    # crop fans out on a local Dask cluster inside the flow run, and is recorded in dvc.lock
    done, run = prefect.run_deployment("mcf/full", params_file="params.tiny.yaml", crop_on_dask=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return run


def test_full_deployment_runs_the_pipeline_on_a_worker(prefect: Prefect, tiny_run: dict) -> None:
    assert tiny_run["state"]["type"] == "COMPLETED"
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
    pull = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $MCF_REPO }}"
    summary = prefect.artifact(tiny_run, "mcf-summary")
    assert summary and "| `fetch` | ran |" in summary["data"] and "| `crop` | ran |" in summary["data"]
    # with the tiny profile back in place, plain DVC finds nothing to do (crop on Dask included)
    shutil.copyfile(prefect.repo / "params.tiny.yaml", prefect.repo / "params.yaml")
    try:
        status = subprocess.run([*DVC, "status", "--json"], cwd=prefect.repo, capture_output=True, text=True)
    finally:
        (prefect.repo / "params.yaml").write_bytes(committed)
    assert set(json.loads(status.stdout)) <= {"data.dvc"}, status.stdout  # data/: user-supplied, not here
    if "evaluate" in dvc_yaml:
        metrics = prefect.artifact(tiny_run, "mcf-metrics")
        assert metrics and "nme" in metrics["data"].lower()


def test_failed_stage_fails_the_run_and_names_the_stage(prefect: Prefect, tiny_run: dict) -> None:
    params = yaml.safe_load((prefect.repo / "params.tiny.yaml").read_text())
    stages = list(yaml.safe_load((prefect.repo / "dvc.yaml").read_text())["stages"])
    victim = next((s for s in stages if s != "fetch" and isinstance(params.get(s), dict)), "fetch")
    # `mcf <stage>` rejects unknown keys; fetch's params are unchanged, so DVC skips it and
    # the victim is the first stage to run (and fetch's retries do not slow this test down)
    params[victim]["no_such_key"] = 1
    (prefect.repo / "params.broken.yaml").write_text(yaml.safe_dump(params))
    done, run = prefect.run_deployment("mcf/full", params_file="params.broken.yaml")
    assert done.returncode == 1, done.stdout[-4000:]
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert f"stage '{victim}" in message and "no_such_key" in message, message
