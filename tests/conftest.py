"""Test set-up: telemetry off, no network, small deterministic data; one server for the Prefect tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import pandas as pd

for _key, _value in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)
# The S3 tests sign for moto on 127.0.0.1 with fake keys, never with a developer's own (set here or not)
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1")
for _key in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
    os.environ.pop(_key, None)
# The tests pin CPU results (bit-exact resumes, fp32 by `auto`): on a GPU host they stay on the CPU too.
os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run every test from a scratch working directory, never from the checkout.

    In-process stages and gates keep their state under the working directory (``.mcf/validation/``, the
    gate results ``mcf report`` shows, and ``.mcf/locks/``). Run from the checkout, the tests' fixtures,
    some of them failing on purpose, would replace a finished run's gate results and hold its stage
    locks. Session-scoped, so module-scoped fixtures that train run here too; a test's own
    ``monkeypatch.chdir`` still applies on top.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield Path.cwd()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests marked ``starts_background`` first and those marked ``awaits_background`` last.

    The tiny ``mcf/full`` deployment run (tests/test_prefect_deploy.py) keeps about one core busy for
    a minute and a half: started first and awaited last, it overlaps the other tests instead of adding
    its time to theirs. The sort is stable, so every other test keeps its place.
    """
    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("starts_background") else (
            2 if item.get_closest_marker("awaits_background") else 1)

    items.sort(key=rank)


def contract_types(heading: str) -> dict[str, str]:
    """docs/CONTRACTS.md's Arrow types of the table under ``## <heading>``, as pyarrow prints them
    (``list<double>, 4`` is ``list<element: double>``): the tests pin the written files to the page."""
    text = (Path(__file__).resolve().parents[1] / "docs/CONTRACTS.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    types = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 2 or not cells[1]:
            continue
        kind = re.sub(r"list<(\w+)>.*", r"list<element: \1>", cells[1])
        types |= dict.fromkeys(re.findall(r"`(\w+)`", cells[0]), kind)
    return types


def suite_types(suite: str) -> dict[str, str]:
    """The column -> ``type_`` of every type check in ``mcf/validate/suites/<suite>.json``."""
    from mcf.validate.gate import SUITES_DIR, TYPE_CHECK

    spec = json.loads((SUITES_DIR / f"{suite}.json").read_text())
    return {e["kwargs"]["column"]: e["kwargs"]["type_"] for e in spec["expectations"]
            if e["type"] == TYPE_CHECK}


def frame_types(frame: pd.DataFrame) -> dict[str, str]:
    """Each column's type as a type check names it: ``str`` for an object column of str values alone,
    else the dtype's name (``bool``, ``int64``, ``float64``)."""
    return {c: "str" if col.dtype == object and col.map(type).eq(str).all() else str(col.dtype)
            for c, col in frame.items()}


class PrefectServer:
    """A real ``prefect server start`` on 127.0.0.1 (SQLite under ``home``), shared by all Prefect tests.

    Starting one costs ~10 s of CPU (imports, database migrations), so tests/test_flow.py's in-process
    flows and tests/test_prefect_deploy.py's CLI and workers use the same one. ``env`` reaches it from a
    subprocess; ``start`` runs a long-lived process (a worker) that is stopped at the latest with the server.
    """

    def __init__(self, home: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.home, self.api = home, f"http://127.0.0.1:{port}/api"
        self.env = {
            **os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_CLI_PROMPT": "false", "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
        }
        for key in ("PREFECT_API_KEY", "MCF_REPO"):
            self.env.pop(key, None)
        self.procs: list[subprocess.Popen] = []
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        self.server = self.start(cmd, home / "server.log", self.env)

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        """``cmd`` in its own session, so that stopping it stops its children too."""
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        """SIGTERM to the process group, SIGKILL if it has not exited 15 s later."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def wait_healthy(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                break
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        log = (self.home / "server.log").read_text()[-3000:]
        pytest.fail(f"prefect server not healthy (exit code {self.server.poll()}):\n{log}")


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, as a terminal's Ctrl-C does: a job a script starts with `&` (CI's
    runner may) inherits SIGINT ignored, and a test of Ctrl-C would then see nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A real small file system at ``mount`` (a full disk, a read-only mount), unmounted on leaving.
    Mounting needs root, as on CI and the dev machines; skipped elsewhere."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a test may still map a file


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real full disk: a 256 KiB tmpfs."""
    with tmpfs(tmp_path / "small", "size=256k") as mount:
        yield mount


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One Prefect server for the session; every process started through it is stopped at the end."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    try:
        server.wait_healthy()
        yield server
    finally:
        for proc in reversed(server.procs):
            server.stop(proc)
    assert all(proc.poll() is not None for proc in server.procs)
