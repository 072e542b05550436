"""The README's S3 remote recipe: `dvc push` / `dvc pull` of `data/` against moto's server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer


@pytest.fixture()
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def _run(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_push_pull_data_through_s3(tmp_path: Path, s3_endpoint: str) -> None:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mcf-data")
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    data = repo / "data"
    (data / "AFLW").mkdir(parents=True)
    (data / "AFLW" / "AFLWinfo_release.mat").write_bytes(os.urandom(4096))
    (data / "teacher").mkdir()
    (data / "teacher" / "mocov3.pth").write_bytes(os.urandom(10000))
    before = _digest(data)

    # The README's commands, with the endpoint of the local server.
    _run(["dvc", "add", "data"], repo)
    _run(["dvc", "remote", "add", "-d", "storage", "s3://mcf-data/dvc"], repo)
    _run(["dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint], repo)
    _run(["dvc", "push"], repo)
    objects = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="mcf-data")
    assert objects["KeyCount"] >= 3  # two files plus the directory listing

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(["dvc", "pull"], repo)
    assert _digest(data) == before
