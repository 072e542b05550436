"""The fetch stage against real servers on 127.0.0.1: per-row statuses, bounds, resume, S3, local."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml
from PIL import Image, ImageFile, PngImagePlugin
from urllib3.response import GzipDecoder

from mcf.data import fetch_bench
from mcf.data.fetch import FetchConfig, journal_dir, limits, main, remote_source
from mcf.data.sources import download, image, laion, s3
from mcf.data.sources.download import Journal, Limits, Source, fetch_records
from mcf.data.sources.image import (
    PILLOW_MAX_PIXELS,
    FetchFailure,
    Record,
    inspect,
    read_bounded,
    redact,
    redact_url,
    save_image,
)
from mcf.data.sources.local import FileReader
from mcf.errors import AccessError, StageError
from mcf.io import file_sha256
from mcf.params import Common, ParamsError, build

MAX_BYTES = 60_000
MAX_PIXELS = 1_000_000


def _image(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(len(fmt) + size[0])
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    """A PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(side: int = 8_000) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: 8 KB that decodes to 64 megapixels."""
    row = b"\x00" + bytes((side + 7) // 8)
    raw = zlib.compress(row * side, 9)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", raw) + _chunk(b"IEND")


JPEG, PNG = _image("JPEG"), _image("PNG", (24, 36))
BODIES = {
    "/good.jpg": JPEG,
    "/good.png": PNG,
    "/truncated.jpg": JPEG[: len(JPEG) // 2],
    "/page.html": b"<html><body>not an image</body></html>",
    "/huge.bin": JPEG + b"\0" * (2 * MAX_BYTES),
    "/bomb.png": _png_bomb(),
    "/noai.jpg": JPEG,
    "/cookie.jpg": JPEG,  # with a Set-Cookie
}


# /robots/<name>.jpg: JPEG with these X-Robots-Tag headers, one entry per header
ROBOTS = {
    "googlebot": ["googlebot: noindex, noimageindex"],  # Google only: fetched
    "bing-and-all": ["bingbot: noai", "noimageai"],  # a second header addresses everyone
    "ours": ["mcf-fetch: noai"],  # our user agent's product token
    "img2dataset": ["img2dataset: noai"],  # the tool whose settings we follow
    "value-rule": ["max-image-preview:large, noindex"],  # a rule's value, not a crawler
    "substring": ["noindexnow, xnoai"],  # no directive of the list
}


# redirects to a Location no URL parser takes: an unbalanced IPv6 bracket, a byte that is not UTF-8
BAD_LOCATIONS = {"/to-bad-ipv6": "http://[::1/x.jpg", "/to-latin1": "caf\u00e9.jpg"}


class Handler(BaseHTTPRequestHandler):
    """Serves BODIES, plus /missing (404), /broken (500), /throttled (429), /slow (late headers), /drip
    (slow body), /drip-gzip (gzip dripping bytes that decode to nothing), /drip-head (a 404's headers a
    byte at a time), /a<n>, /b<n> and /c<n> (redirect chains: to /a<n-1>, and from /a0 to /good.png; /c<n>
    hops take 0.3 s each), /loop (to itself), /leak (to a long ftp URL), /hang/<port> (to that port),
    /bad-gzip.jpg (a JPEG sent as gzip), /robots/<name>.jpg (a JPEG with the X-Robots-Tag headers of
    ROBOTS[name]), /cookie-hop (to /good.png, setting a cookie), /late.jpg (a JPEG after 0.4 s),
    /status/<code> (that error) and /bytes/<n> (n bytes; ``/unsized``: without a Content-Length;
    ``/claims/<m>``: a Content-Length of m, then the n bytes and a close)."""

    counts: Counter = Counter()
    authorization: list[str | None] = []  # each request's Authorization header
    user_agents: list[str | None] = []  # and User-Agent
    cookies: list[tuple[str, str | None]] = []  # and (path, Cookie)
    lock = threading.Lock()
    interrupt_once: set[str] = set()

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        with self.lock:
            self.counts[self.path] += 1
            self.authorization.append(self.headers.get("Authorization"))
            self.user_agents.append(self.headers.get("User-Agent"))
            self.cookies.append((self.path, self.headers.get("Cookie")))
            interrupt = self.path in self.interrupt_once
            self.interrupt_once.discard(self.path)
        if interrupt:  # Ctrl-C while this image downloads: a real SIGINT wakes the waiting main thread
            os.kill(os.getpid(), signal.SIGINT)  # (interrupt_main's flag could be lost in a finaliser)
            time.sleep(0.5)
        try:
            self._respond()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _respond(self) -> None:
        if self.path == "/loop" or (self.path[1:2] in ("a", "b", "c") and self.path[2:].isdigit()):
            hops = int(self.path[2:]) if self.path[2:].isdigit() else 0
            if self.path[1] == "c":
                time.sleep(0.3)
            self.send_response(302)
            chain = f"{self.path[:2]}{hops - 1}" if hops else "/good.png"
            self.send_header("Location", self.path if self.path == "/loop" else chain)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/heavy-redirect", "/dripping-redirect"):  # to /good.png, with a body
            self.send_response(302)
            self.send_header("Location", "/good.png")
            self.end_headers()  # no length: the bounds must hold while the body streams
            for _ in range(4 * MAX_BYTES // 1024 if self.path == "/heavy-redirect" else 100):
                self.wfile.write(b"\0" * 1024 if self.path == "/heavy-redirect" else b"a")
                self.wfile.flush()
                if self.path == "/dripping-redirect":
                    time.sleep(0.05)
        elif self.path in BAD_LOCATIONS:
            self.send_response(302)
            self.send_header("Location", BAD_LOCATIONS[self.path])  # sent as latin-1
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/hang/"):  # to a port whose connects hang (the ``hung_port`` fixture)
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.path.removeprefix('/hang/')}/x.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/leak":  # to a scheme requests refuses, quoting the URL, credentials and all
            self.send_response(302)
            self.send_header("Location", "ftp://" + "u" * 140 + ":s3cretpassword@host/x.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/bad-gzip.jpg":  # a body its Content-Encoding does not decode
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)
        elif self.path == "/cookie-hop":
            self.send_response(302)
            self.send_header("Location", "/good.png")
            self.send_header("Set-Cookie", "hop=1; Path=/")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/status/"):
            self.send_error(int(self.path.removeprefix("/status/")))
        elif self.path.startswith("/bytes/"):
            size, *rest = self.path.removeprefix("/bytes/").split("/")
            self.send_response(200)
            if rest != ["unsized"]:
                self.send_header("Content-Length", rest[1] if rest[:1] == ["claims"] else size)
            self.end_headers()
            self.wfile.write(b"\xff" * int(size))
        elif self.path == "/broken":
            self.send_error(500)
        elif self.path == "/throttled":
            self.send_error(429)
        elif self.path in ("/slow", "/late.jpg"):
            time.sleep(1.0 if self.path == "/slow" else 0.4)
            self._send(JPEG)
        elif self.path == "/drip-head":  # the headers a byte at a time: each read is in time, the whole not;
            # a 404's, which cut short would read as the server's own answer (an http_error, not retried)
            self.wfile.write(b"HTTP/1.1 404 Not Found\r\nX-Pad: ")
            for _ in range(200):
                self.wfile.write(b"a")
                self.wfile.flush()
                with self.lock:
                    self.counts["/drip-head bytes"] += 1
                time.sleep(0.05)
            self.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
        elif self.path == "/drip-gzip":  # gzip whose bytes decode to nothing: empty deflate blocks, dripped
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
            for _ in range(100):
                self.wfile.write(b"\x00\x00\x00\xff\xff")  # a stored block of no bytes, not the last
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", str(30 * 64))
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\xff" * 64)
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path in BODIES:
            self._send(BODIES[self.path])
        elif self.path.startswith("/robots/"):
            self._send(JPEG)
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        if self.path == "/noai.jpg":
            self.send_header("X-Robots-Tag", "noai, noimageai")
        if self.path == "/cookie.jpg":
            self.send_header("Set-Cookie", "seen=1; Path=/")
        for value in ROBOTS.get(self.path.removeprefix("/robots/").removesuffix(".jpg"), []):
            self.send_header("X-Robots-Tag", value)
        if self.path != "/huge.bin":  # no length: the bound must hold while streaming
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[str]:
    Handler.counts, Handler.authorization, Handler.user_agents, Handler.cookies = Counter(), [], [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the gate keeps its results under the working directory


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXPECTED = {
    "/good.jpg": "success",
    "/good.png": "success",
    "/missing": "http_error",
    "/broken": "http_error",
    "/throttled": "http_error",
    "/slow": "timeout",
    "/drip": "timeout",
    "/truncated.jpg": "truncated",
    "/page.html": "not_image",
    "/huge.bin": "too_large",
    "/bomb.png": "decompression_bomb",
    "/noai.jpg": "disallowed",
    "/a4": "success",  # 5 redirects: the bound
    "/b5": "http_error",  # 6
    "/loop": "http_error",
}


def _laion_parquet(path: Path, urls: list[str | None]) -> Path:
    pd.DataFrame(
        {
            "SAMPLE_ID": range(100, 100 + len(urls)),
            "URL": urls,
            "TEXT": [f"caption {i}" for i in range(len(urls))],
            "NSFW": ["UNLIKELY"] * len(urls),
        }
    ).to_parquet(path)
    return path


def _config(**fetch: Any) -> FetchConfig:
    """``fetch.data`` as a user sets it, unless given: the photos folder, or the folder of the parts."""
    defaults = {"out": "out", "max_bytes": MAX_BYTES, "max_pixels": MAX_PIXELS, "retries": 1, "threads": 8}
    if fetch.get("source") == "local":
        defaults["data"] = fetch.get("local", {}).get("root", "data/images")
    elif fetch.get("source") == "laion-face":
        section = fetch.get("laion_face", {})
        files = [*section.get("parquet", []), *section.get("detections", [])]
        folders = [str(Path(f).resolve().parent) for f in files]
        defaults["data"] = os.path.commonpath(folders) if files else "."
    return build(FetchConfig, defaults | fetch, "fetch")


def _laion_config(parquet: Path, threads: int = 8, **laion: Any) -> FetchConfig:
    section = {"parquet": [str(parquet)], "timeout": 0.3, "total_timeout": 1.0, "extra_columns": ["NSFW"]}
    return _config(source="laion-face", threads=threads, laion_face=section | laion)


def test_keys_that_share_a_long_prefix_get_their_own_files() -> None:
    """Two S3 keys under one 66-character prefix whose sha1s share their first 40 bits (found by search;
    some 180 such pairs are expected among 20M keys) were one file: the readable part kept the shared
    head, the hash 40 bits. A path keeps the key's tail and 64 bits now."""
    import hashlib

    from mcf.data.sources.image import image_path

    head = "datasets/laion-face/part-00012/aligned-faces-from-the-2021-crawl/"
    a, b = f"{head}00607931.jpg", f"{head}01682937.jpg"
    assert hashlib.sha1(a.encode()).hexdigest()[:10] == hashlib.sha1(b.encode()).hexdigest()[:10]
    assert image_path(a, ".jpg") != image_path(b, ".jpg")
    assert image_path(a, ".jpg").startswith(f"images/{hashlib.sha1(a.encode()).hexdigest()[:2]}/")
    assert "2021-crawl_00607931.jpg_" in image_path(a, ".jpg")
    readable = Path(image_path("x" * 40 + "/../" + "y" * 56, ".jpg")).name.rsplit("_", 1)[0]
    assert readable == "_.._" + "y" * 56  # the last 60 characters, sanitised: no folder of its own


def test_laion_statuses_and_resume(server: str, tmp_path: Path) -> None:
    # credentials and a signature in a failing URL must not reach the manifest's error text
    unreachable = f"http://user:pa55@127.0.0.1:{_closed_port()}/x.jpg?X-Amz-Signature=s1gnature"
    urls = [server + p for p in EXPECTED] + [unreachable, "ftp://a/b.jpg", None]
    cfg = _laion_config(_laion_parquet(tmp_path / "part-00000.parquet", urls))
    main(Common(), cfg)
    manifest = pd.read_parquet("out/manifest.parquet")
    assert len(manifest) == len(urls)
    got = dict(zip(manifest["url"].str.replace(server, ""), manifest["status"], strict=False))
    assert {p: got[p] for p in EXPECTED} == EXPECTED
    assert manifest["status"].tolist()[-3:] == ["connection_error", "invalid_url", "invalid_url"]
    unreachable_error = manifest["error"].iloc[-3]
    assert "x.jpg?<redacted>" in unreachable_error
    assert "pa55" not in unreachable_error and "s1gnature" not in unreachable_error
    ok = manifest[manifest["status"] == "success"].set_index("url")
    assert ok.loc[server + "/good.png", ["width", "height"]].tolist() == [24, 36]
    assert Path("out", ok.loc[server + "/good.jpg", "path"]).read_bytes() == JPEG
    assert all(file_sha256(Path("out", p)) == h for p, h in zip(ok["path"], ok["sha256"], strict=True))
    assert manifest.loc[manifest["url"] == server + "/missing", "error"].item() == "HTTP 404"
    assert manifest["NSFW"].eq("UNLIKELY").all() and manifest["sample_id"].iloc[0] == "100"
    assert Handler.counts["/broken"] == 2 and Handler.counts["/missing"] == 1  # 5xx retried, 404 not
    assert Handler.counts["/throttled"] == 2  # Too Many Requests: retried like a 5xx
    assert not journal_dir(Path("out")).exists()

    before = Counter(Handler.counts)
    main(Common(), cfg)
    again = Handler.counts - before
    retried = set(EXPECTED) - {"/good.jpg", "/good.png", "/a4"}  # only failures are requested
    assert set(again) == retried | {"/b4", "/b3", "/b2", "/b1", "/b0"}
    rerun = pd.read_parquet("out/manifest.parquet")
    pd.testing.assert_frame_equal(rerun, manifest)  # error texts too: no memory addresses in them


def _bombs() -> dict[str, tuple[str, bytes]]:
    """An image just over each bound on the header work of inspect, by the bound's name."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG", progressive=True)
    progressive = buf.getvalue()
    last_scan = progressive[progressive.rindex(b"\xff\xda") : -2]
    at = JPEG.index(b"\xff\xdb")  # after SOI and APP0
    fill = b"\xff" * (image.MAX_JPEG_HEADER_STEPS + 1)
    return {
        "MAX_JPEG_SCANS": (".jpg", progressive[:-2] + last_scan * image.MAX_JPEG_SCANS + b"\xff\xd9"),
        "MAX_JPEG_HEADER_STEPS": (".jpg", JPEG[:at] + fill + JPEG[at:]),
        "MAX_PNG_CHUNKS": (".png", _rechunked(PNG, 1, before=_chunk(b"quUx") * image.MAX_PNG_CHUNKS)),
    }


@pytest.mark.parametrize("bound", ["MAX_JPEG_SCANS", "MAX_JPEG_HEADER_STEPS", "MAX_PNG_CHUNKS"])
def test_a_bomb_an_earlier_run_stored_is_not_reused(
    bound: str, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run before a bound on header work existed stored a file over it as a success; the next run reused
    it on its sha256, and the crop stage's decoder met the bomb. A stored file must pass the checks a
    download passes on its bytes (fetched again, it is the decompression_bomb it is)."""
    suffix, bomb = _bombs()[bound]
    monkeypatch.setitem(BODIES, f"/bomb{suffix}", bomb)
    urls = [f"{server}/bomb{suffix}", f"{server}/good.jpg"]
    cfg = _laion_config(_laion_parquet(tmp_path / "part.parquet", urls), total_timeout=5.0)
    cfg = dataclasses.replace(cfg, max_bytes=2 * len(bomb))
    with monkeypatch.context() as earlier:
        earlier.setattr(image, bound, 10**9)
        main(Common(), cfg)
    assert pd.read_parquet("out/manifest.parquet")["status"].tolist() == ["success", "success"]
    main(Common(), cfg)
    manifest = pd.read_parquet("out/manifest.parquet")
    assert manifest["status"].tolist() == ["decompression_bomb", "success"]
    assert Handler.counts[f"/bomb{suffix}"] == 2 and Handler.counts["/good.jpg"] == 1  # the good one reused


def test_killed_run_resumes_from_journal(server: str, tmp_path: Path, ctrl_c: None) -> None:
    urls = [server + "/good.jpg", server + "/good.png", server + "/crash"]
    cfg = _laion_config(_laion_parquet(tmp_path / "part.parquet", urls), threads=1)
    Handler.interrupt_once = {"/crash"}
    with pytest.raises(KeyboardInterrupt):
        main(Common(), cfg)
    assert not Path("out").exists()
    journal = journal_dir(Path("out"))
    entries = [json.loads(line) for line in (journal / "journal.jsonl").read_text().splitlines()]
    assert [e["url"] for e in entries] == urls[:2]
    (journal / entries[1]["path"]).write_bytes(b"changed on disk")  # must not be reused

    main(Common(), cfg)
    assert Handler.counts["/good.jpg"] == 1 and Handler.counts["/good.png"] == 2
    manifest = pd.read_parquet("out/manifest.parquet")
    assert manifest["status"].tolist() == ["success", "success", "http_error"]
    assert Path("out", manifest["path"][1]).read_bytes() == PNG
    assert not journal.exists()


# `mcf fetch` as a terminal runs it; SIGINT raises KeyboardInterrupt even where the tests run as a background
# job (CI's `cmd &`), which starts a process with SIGINT ignored
CTRL_C_CLI = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['mcf', 'fetch', '--params', sys.argv[1]]; runpy.run_module('mcf.cli', run_name='__main__')"
)


def test_ctrl_c_ends_a_fetch_hung_on_silent_servers_at_once(server: str, tmp_path: Path) -> None:
    """Ctrl-C on `mcf fetch` while every download hangs (a server that takes the connection and never
    answers) waited for each running request's read timeout and then its retry (2 x 20 s here; 2 x 10 s at
    the defaults): the pool joined its threads and the retries went on. It ends within seconds now, exit 130
    with the CLI's line, nothing published, and a rerun reuses what the journal kept."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes each connect; no request is ever read
        silent.settimeout(30)
        hung = [f"http://127.0.0.1:{silent.getsockname()[1]}/{i}.jpg" for i in range(4)]
        urls = [server + "/good.jpg", server + "/good.png", *hung]
        parquet = _laion_parquet(tmp_path / "part.parquet", urls)
        section = {"parquet": [str(parquet)], "timeout": 20.0, "total_timeout": 20.0}
        fetch = {"source": "laion-face", "data": str(tmp_path), "out": "out", "threads": 4, "retries": 1}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": fetch | {"laion_face": section}}))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen([sys.executable, "-c", CTRL_C_CLI, "params.yaml"], cwd=tmp_path, env=env,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            accepted = [silent.accept()[0] for _ in hung]  # every hung request is in flight
            journal = journal_dir(tmp_path / "out") / "journal.jsonl"
            deadline = time.monotonic() + 30
            while len(Journal(journal.parent).load()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # and both answered images are journaled
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
            # the interpreter's own exit takes 2 s of it here, 3.5 s on half a core; a wait for the hung
            # requests would take their 20 s read timeout
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("`mcf fetch` still running 15 s after Ctrl-C")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        for conn in accepted:
            conn.close()
    assert (proc.returncode, err.splitlines()[-1:]) == (130, ["mcf: interrupted"])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert sorted(json.loads(line)["url"] for line in journal.read_text().splitlines()) == urls[:2]

    _laion_parquet(parquet, urls[:2] + [server + "/late.jpg"] * len(hung))  # the hosts answer now
    main(Common(), _config(source="laion-face", threads=4, out=str(tmp_path / "out"),
                           laion_face=section | {"timeout": 2.0, "total_timeout": 5.0}))
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert set(manifest["status"]) == {"success"}
    assert Handler.counts["/good.jpg"] == Handler.counts["/good.png"] == 1  # reused from the journal


def test_a_download_that_ends_after_ctrl_c_is_journaled_but_not_staged(tmp_path: Path, ctrl_c: None) -> None:
    """Ctrl-C no longer waits for the downloads under way, so one may end after fetch_records has raised
    and its caller has deleted the staging folder: linking the image there made that folder again (under
    the same pid: a later run's staging in the same process, a flow's retry, would hold a stray file). The
    image is journaled for the next run, and staging is left alone."""
    started, release, slow = threading.Event(), threading.Event(), []

    def fetch(row: dict[str, Any]) -> bytes:
        if row["url"] == "slow":
            slow.append(threading.current_thread())
            started.set()
            release.wait(10)
            return PNG
        started.wait(10)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while "slow" downloads
        release.wait(10)  # the caller must not wait for this one either
        raise FetchFailure("timeout", "ReadTimeout")

    rows = pd.DataFrame({"sample_id": ["a", "b"], "url": ["ctrl-c", "slow"]})
    source = Source("test", rows, fetch, ("url",), "a test")
    staging, limits = tmp_path / "new", Limits(2, 0, MAX_BYTES, MAX_PIXELS)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        fetch_records(source, tmp_path / "old", tmp_path / "journal", staging, limits)
    assert time.monotonic() - start < 5
    release.set()
    slow[0].join(10)  # the download, its journal line and the link it must not make are all done
    assert not slow[0].is_alive()
    [entry] = Journal(tmp_path / "journal").load()
    assert entry["url"] == "slow" and (tmp_path / "journal" / entry["path"]).read_bytes() == PNG
    assert not staging.exists()


def test_the_fetch_pool_keeps_its_bound_and_raises_a_call_s_error() -> None:
    """The pool fetch_records runs on (its own daemon threads): every item once, no more than 4 x threads
    taken from the iterator ahead of the results (20M rows must not be queued at once), and an error of a
    call raised in the caller's thread."""
    taken = []

    def items() -> Iterator[int]:
        for i in range(40):
            taken.append(i)
            yield i

    results = []
    for result in download._bounded_map(lambda i: i * i, items(), 2, threading.Event()):
        assert len(taken) - len(results) <= 8
        results.append(result)
    assert sorted(results) == [i * i for i in range(40)]
    with pytest.raises(ZeroDivisionError):
        list(download._bounded_map(lambda i: 1 / (i - 3), range(8), 2, threading.Event()))


def test_the_fetch_pool_left_early_waits_for_no_running_call() -> None:
    """Closing the pool's results early (Ctrl-C, an error) waited for every running call
    (ThreadPoolExecutor's shutdown, and its join of the threads at exit): a download hung on a silent
    server held Ctrl-C for its timeouts. Now the stop event is set, the running calls are left to end
    on daemon threads, and no queued item starts."""
    release, stop, started = threading.Event(), threading.Event(), []

    def call(i: int) -> int:
        started.append(i)
        if i:
            release.wait(10)
        return i

    before = set(threading.enumerate())
    results = download._bounded_map(call, range(20), 2, stop)
    assert next(results) == 0
    start = time.monotonic()
    results.close()
    assert time.monotonic() - start < 5 and stop.is_set()  # not the running call's 10 s
    workers = [t for t in threading.enumerate() if t not in before]
    assert len(workers) == 2 and all(t.daemon for t in workers)
    release.set()
    for worker in workers:
        worker.join(5)
    assert not any(t.is_alive() for t in workers) and len(started) <= 3  # 0, then the one or two running


def test_ctrl_c_that_the_kernel_gives_a_fetch_thread_still_stops_the_pool(ctrl_c: None) -> None:
    """The kernel may hand a process's SIGINT to any of its threads. Given to a fetch thread hung on a
    silent server, Python's handler waited for the main thread, which slept on the results until some
    download ended (a read timeout or more later): a rare Ctrl-C held the run for the full timeout."""
    hung, release, stop = queue.SimpleQueue(), threading.Event(), threading.Event()

    def call(i: int) -> int:
        hung.put(threading.get_ident())
        release.wait(10)
        return i

    results = download._bounded_map(call, range(2), 2, stop)
    threading.Timer(0.2, lambda: signal.pthread_kill(hung.get(timeout=5), signal.SIGINT)).start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(results)
        assert time.monotonic() - start < 2 and stop.is_set()
    finally:
        release.set()


def test_two_threads_saving_one_row_write_temporary_files_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped run's thread may still be saving a row when a rerun in the same process (a flow's retry,
    a Dask worker's next task) fetches it again: with one temporary name, the second rename found the
    file gone (FileNotFoundError), which ended the rerun."""
    renamed, both_written = os.replace, threading.Barrier(2)

    def replace(src: Path, dest: Path) -> None:
        both_written.wait(5)  # each thread has written its temporary file: now both rename
        renamed(src, dest)

    monkeypatch.setattr(os, "replace", replace)
    records: list[Record] = []
    threads = [threading.Thread(target=lambda: records.append(save_image(PNG, "a", tmp_path, MAX_PIXELS)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(records) == 2 and (tmp_path / records[0].path).read_bytes() == PNG
    assert not list(tmp_path.rglob("*.part"))


def test_no_retry_once_the_run_has_stopped() -> None:
    """A retry after Ctrl-C waited out another timeout (a silent server: twice the read timeout); the
    pause before a retry ends when the run stops, and no further try is made."""
    calls, stop = [], threading.Event()

    def fetch(row: dict[str, Any]) -> bytes:
        calls.append(row)
        threading.Timer(0.1, stop.set).start()  # Ctrl-C while the first try is timing out
        raise FetchFailure("timeout", "ReadTimeout", retryable=True)

    start = time.monotonic()
    with pytest.raises(FetchFailure):
        download._fetch_with_retries(fetch, {"url": "u"}, 5, stop)
    assert len(calls) == 1 and time.monotonic() - start < 3  # 6 tries and 6.2 s of pauses had it gone on


def test_total_timeout_holds_across_redirects(server: str, tmp_path: Path) -> None:
    """Each hop is within the read timeout, the chain is not: no hop starts once the image's time is up."""
    parquet = _laion_parquet(tmp_path / "part.parquet", [server + "/c4", server + "/good.jpg"])
    main(Common(), _laion_config(parquet, timeout=1.0, total_timeout=0.5))
    assert pd.read_parquet("out/manifest.parquet")["status"].tolist() == ["timeout", "success"]
    assert Handler.counts["/c1"] == 0 and Handler.counts["/c4"] == 2  # two tries, each stopped early


@pytest.mark.parametrize(
    ("path", "status"), [("/heavy-redirect", "too_large"), ("/dripping-redirect", "timeout")]
)
def test_a_redirects_body_obeys_the_byte_and_time_bounds(server: str, path: str, status: str) -> None:
    """requests reads a redirect's body whole before it follows it: read so, 4 × max_bytes there went into
    memory, and a body dripping a byte every 50 ms held the thread past total_timeout (for ever). The
    timeout is retried, as any is."""
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"timeout": 1.0, "total_timeout": 0.5}), MAX_BYTES)
    start = time.monotonic()
    with pytest.raises(FetchFailure) as failed:
        fetch({"url": server + path})
    assert failed.value.status == status and "redirect" in failed.value.error
    assert failed.value.retryable == (status == "timeout")
    assert time.monotonic() - start < 2.5 and Handler.counts["/good.png"] == 0


@pytest.mark.parametrize("path", list(BAD_LOCATIONS))
def test_a_redirect_to_a_location_no_parser_takes_is_an_invalid_url(server: str, path: str) -> None:
    """requests raised a bare ValueError (UnicodeDecodeError) on such a Location: the row's status was the
    catch-all ``error``, where the same URL given in the metadata is ``invalid_url``."""
    fetch = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    with pytest.raises(FetchFailure) as failed:
        fetch({"url": server + path})
    assert failed.value.status == "invalid_url" and "redirect" in failed.value.error


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port whose connects hang: its listener's queue is full and never accepted (the kernel drops the
    SYNs, as a host that has gone quiet does)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port, queued = listener.getsockname()[1], []
        while True:
            conn = socket.socket()
            conn.settimeout(0.2)
            try:
                conn.connect(("127.0.0.1", port))
            except TimeoutError:
                conn.close()
                break
            queued.append(conn)
            assert len(queued) < 16, "the kernel accepts every connect: no hung port here"
        yield port
        for conn in queued:
            conn.close()


def test_total_timeout_bounds_the_connect_of_each_hop(server: str, hung_port: int) -> None:
    """A hop's connect gets what is left of the image's time, not a whole connect timeout of its own."""
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"timeout": 5.0, "total_timeout": 0.5}), MAX_BYTES)
    for url in (f"{server}/hang/{hung_port}", f"http://127.0.0.1:{hung_port}/x.jpg"):
        start = time.monotonic()
        with pytest.raises(FetchFailure) as failed:
            fetch({"url": url})
        assert failed.value.status == "timeout" and time.monotonic() - start < 2.5  # 0.5 s, not 5 s


def test_total_timeout_bounds_the_name_lookup(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo takes no timeout (a resolver that does not answer blocks for its own retries): the
    lookup, and the connects after it, end when the image's time is up; a late connection is dropped."""
    real, answer = socket.getaddrinfo, threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        answer.wait(5.0)  # the resolver answers once the test says so (at the latest after 5 s)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"timeout": 3.0, "total_timeout": 0.5}), MAX_BYTES)
    start = time.monotonic()
    try:
        with pytest.raises(FetchFailure) as failed:
            fetch({"url": server + "/good.jpg"})
        assert failed.value.status == "timeout" and time.monotonic() - start < 2.5  # 0.5 s, not 5 s
    finally:
        answer.set()  # the lookup ends and its connect is made: nothing is requested on it
    for thread in threading.enumerate():
        if thread.name == "fetch-connect":
            thread.join(5.0)
    assert Handler.counts["/good.jpg"] == 0


def test_a_body_its_content_encoding_does_not_decode_is_not_retried(server: str) -> None:
    """A server that labels plain bytes gzip sends the same broken body every time: it was a
    connection_error, retried as a dropped connection is."""
    fetcher = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    with pytest.raises(FetchFailure) as failure:
        fetcher({"url": server + "/bad-gzip.jpg"})
    assert (failure.value.status, failure.value.retryable) == ("not_image", False)
    assert failure.value.error.startswith("the body does not decode as its Content-Encoding says")
    assert "content-encoding: gzip" in failure.value.error


def test_a_body_that_fails_to_decode_past_the_deadline_is_a_timeout(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode error met once total_timeout has passed is a timeout, retried, not a not_image: the
    watchdog may have cut the body mid-stream (urllib3 reports a cut zstd body as undecodable), and the
    image took longer than it may whatever its bytes. Here the gzip decoder spends the deadline on the
    bytes it is handed, as it would on a long run of received bytes that decode to nothing; /bad-gzip.jpg's
    then fail to decode."""
    total_timeout = 0.3
    decompress, errors = GzipDecoder.decompress, []

    def slow(self: GzipDecoder, data: bytes, max_length: int = -1) -> bytes:
        if data and not errors:
            time.sleep(total_timeout)
        try:
            return decompress(self, data, max_length)
        except zlib.error as err:
            errors.append(err)
            raise

    monkeypatch.setattr(GzipDecoder, "decompress", slow)
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"total_timeout": total_timeout}), MAX_BYTES)
    with pytest.raises(FetchFailure) as failure:
        fetch({"url": server + "/bad-gzip.jpg"})
    assert len(errors) == 1  # the body reached the decoder, which refused it
    assert (failure.value.status, failure.value.retryable) == ("timeout", True)
    assert failure.value.error == "total time per image exceeded"


def test_fetch_max_bytes_is_the_bound_exactly(server: str) -> None:
    """An image of ``max_bytes`` is kept and one byte more is ``too_large``, announced or not; a
    Content-Length over the bound is refused before any byte is read (read on, a body cut short after it was
    ``truncated``); a body that ends before its Content-Length is ``truncated``, retried as a dropped
    connection is."""
    fetch = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    assert fetch({"url": f"{server}/bytes/{MAX_BYTES}"}) == b"\xff" * MAX_BYTES
    assert fetch({"url": f"{server}/bytes/{MAX_BYTES}/unsized"}) == b"\xff" * MAX_BYTES
    announced = ("too_large", f"Content-Length {MAX_BYTES + 1} is over {MAX_BYTES} bytes")
    expected = {
        f"/bytes/{MAX_BYTES + 1}/unsized": ("too_large", f"more than {MAX_BYTES} bytes"),
        f"/bytes/{MAX_BYTES + 1}": announced,
        f"/bytes/10/claims/{MAX_BYTES + 1}": announced,
        "/bytes/10/claims/1000": ("truncated", "body ended early: "),
    }
    for path, (status, error) in expected.items():
        with pytest.raises(FetchFailure) as failed:
            fetch({"url": server + path})
        assert (failed.value.status, failed.value.retryable) == (status, status == "truncated"), path
        assert failed.value.error.startswith(error), failed.value.error


def test_only_a_failure_that_may_pass_next_time_is_retried(server: str) -> None:
    """fetch.retries takes a timeout, a dropped connection, HTTP 5xx and 429, nothing else: a 4xx or a
    redirect chain over max_redirects answers the same each time. Any HTTP status from 400 up fails its row
    (read on, a 400's page was a ``not_image``)."""
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"timeout": 0.2}), MAX_BYTES)
    expected = {
        server + "/slow": ("timeout", "ReadTimeout", True),  # headers after 1 s: the read timeout
        server + "/status/400": ("http_error", "HTTP 400", False),
        server + "/status/503": ("http_error", "HTTP 503", True),
        server + "/b5": ("http_error", "more than 5 redirects", False),
        f"http://127.0.0.1:{_closed_port()}/x.jpg": ("connection_error", "ConnectionError: ", True),
    }
    for url, (status, error, retryable) in expected.items():
        with pytest.raises(FetchFailure) as failed:
            fetch({"url": url})
        assert (failed.value.status, failed.value.retryable) == (status, retryable), url
        assert failed.value.error.startswith(error), failed.value.error


def test_total_timeout_holds_while_the_headers_drip(server: str, tmp_path: Path) -> None:
    """A byte every 50 ms never trips the read timeout: the deadline cuts the connection itself."""
    parquet = _laion_parquet(tmp_path / "part.parquet", [server + "/drip-head", server + "/good.jpg"])
    main(Common(), _laion_config(parquet, timeout=1.0, total_timeout=0.5))
    assert pd.read_parquet("out/manifest.parquet")["status"].tolist() == ["timeout", "success"]
    assert Handler.counts["/drip-head"] == 2  # retried once, as a timeout is
    assert Handler.counts["/drip-head bytes"] < 100  # of 2 × 200: both tries were cut off near 0.5 s


def test_total_timeout_holds_while_a_compressed_body_drips_nothing(server: str) -> None:
    """urllib3's read1 reads on until the bytes decode to something: gzip that decodes to nothing (empty
    deflate blocks), a block every 50 ms, held the thread past total_timeout, as long as the server went on
    (for ever), where each chunk's deadline check was never reached."""
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"timeout": 1.0, "total_timeout": 0.5}), MAX_BYTES)
    start = time.monotonic()
    with pytest.raises(FetchFailure) as failed:
        fetch({"url": server + "/drip-gzip"})
    assert failed.value.status == "timeout" and time.monotonic() - start < 2.5  # 0.5 s, not the 5 s drip


class _ForwardingProxy(Handler):
    """A forwarding HTTP proxy in front of :class:`Handler`: it answers ``GET http://any-host/<path>`` as
    the server would ``GET /<path>``."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.path = "/" + self.path.split("://", 1)[-1].partition("/")[2]
        super().do_GET()


@pytest.fixture
def proxy(server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every http:// URL goes through a :class:`_ForwardingProxy` on 127.0.0.1 (``HTTP_PROXY``)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ForwardingProxy)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    for name in ("NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{httpd.server_address[1]}")
    yield
    httpd.shutdown()
    httpd.server_close()


def test_total_timeout_holds_behind_a_proxy(
    proxy: None, server: str, hung_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy from the environment gets requests' own proxy pools; the deadline must hold there too: a
    head dripping through the proxy is cut at total_timeout, and a proxy whose connects hang gets the
    time left."""
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"timeout": 5.0, "total_timeout": 0.5}), MAX_BYTES)
    assert fetch({"url": "http://images.invalid/good.jpg"}) == BODIES["/good.jpg"]  # through the proxy
    start = time.monotonic()
    with pytest.raises(FetchFailure) as failed:
        fetch({"url": "http://images.invalid/drip-head"})
    assert failed.value.status == "timeout" and time.monotonic() - start < 2.5  # 0.5 s, not the 10 s drip
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{hung_port}")
    for url in ("http://images.invalid/x.jpg", "https://images.invalid/x.jpg"):  # https: a CONNECT tunnel
        start = time.monotonic()
        with pytest.raises(FetchFailure) as failed:
            fetch({"url": url})
        assert failed.value.status == "timeout" and time.monotonic() - start < 2.5  # 0.5 s, not 5 s


class _KeepAlive(Handler):
    """:class:`Handler` over HTTP/1.1: a connection stays open for the next request. ``connections`` counts
    those accepted."""

    protocol_version = "HTTP/1.1"
    connections = 0

    def setup(self) -> None:
        super().setup()
        with self.lock:
            _KeepAlive.connections += 1


def test_a_kept_alive_connection_is_not_cut_at_the_last_images_deadline() -> None:
    """The watchdog holds a connection to its download's deadline until that download ends; a hold left
    behind shut the connection the next image reused (HTTP keep-alive) at the previous image's deadline,
    mid-request: a spurious connection_error, and a retry."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    httpd.daemon_threads, _KeepAlive.connections = True, 0
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {"total_timeout": 1.5}), MAX_BYTES)
    try:
        start = time.monotonic()
        assert fetch({"url": url + "/good.jpg"}) == JPEG  # its deadline: 1.5 s from start
        time.sleep(max(0.0, start + 1.3 - time.monotonic()))
        # asked at 1.3 s, answered 0.4 s later: the first deadline falls mid-request, its own is 1.1 s after
        assert fetch({"url": url + "/late.jpg"}) == JPEG
        assert _KeepAlive.connections == 1  # the second image went over the first one's connection
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_no_cookie_outlives_its_download(server: str) -> None:
    """Each thread's session kept every cookie a server set, sent it back with that host's later images
    (which could then tell the crawler's downloads apart) and copied the whole jar into each request: a
    thread that had met 10,000 hosts setting one spent 0.1 s of CPU, the GIL held, on every image. A
    cookie set on a redirect's hop still goes to the next hop, as requests sends it."""
    fetch = laion.HttpFetcher(build(laion.LaionFaceConfig, {}), MAX_BYTES)
    for path in ("/cookie.jpg", "/good.jpg", "/cookie-hop", "/good.jpg"):
        fetch({"url": server + path})
    assert Handler.cookies == [("/cookie.jpg", None), ("/good.jpg", None), ("/cookie-hop", None),
                               ("/good.png", "hop=1"), ("/good.jpg", None)]
    assert not fetch._session().cookies


def test_robots_directives_scoped_to_another_crawler_do_not_refuse(server: str, tmp_path: Path) -> None:
    """img2dataset's reading of X-Robots-Tag: each header is ``[crawler:] directive, ...``; one scoped to
    another crawler does not address us, and directives match whole, not as substrings."""
    urls = [f"{server}/robots/{name}.jpg" for name in ROBOTS]
    main(Common(), _laion_config(_laion_parquet(tmp_path / "part.parquet", urls)))
    manifest = pd.read_parquet("out/manifest.parquet")
    assert dict(zip(ROBOTS, manifest["status"], strict=True)) == {
        "googlebot": "success",
        "bing-and-all": "disallowed",
        "ours": "disallowed",
        "img2dataset": "disallowed",
        "value-rule": "disallowed",
        "substring": "success",
    }
    assert manifest["error"][1] == "X-Robots-Tag: noimageai"


def test_robots_directives_before_a_value_rule_address_everyone_once() -> None:
    """Text before a header's first colon names a crawler only if it is one word: ``noai, unavailable_after:
    <date>`` addresses everyone (read as a crawler's name, its ``noai`` was ignored). A directive given in
    several headers is named once, and params' directives match in any case."""
    agents, refusals = {"mcf-fetch", "img2dataset"}, laion.robots_refusals
    assert refusals(["noai, unavailable_after: 25 Jun 2030 15:00:00 PST"], agents, ["noai"]) == ["noai"]
    assert refusals(["noai", "NOAI", "mcf-fetch: noai"], agents, ["noai"]) == ["noai"]
    assert refusals(["noimageai"], agents, ["NoImageAI"]) == ["NoImageAI"]


def test_robots_header_naming_our_user_agent_in_another_case_refuses(server: str) -> None:
    """X-Robots-Tag crawler names are case-insensitive: a ``user_agent`` of ``MCF-Fetch/2.0`` is addressed by
    ``mcf-fetch: noai`` (its product token kept in its own case never matched the lowered header). It is
    the User-Agent sent, not requests' own."""
    cfg = build(laion.LaionFaceConfig, {"user_agent": "MCF-Fetch/2.0 (research)"})
    with pytest.raises(FetchFailure) as failed:
        laion.HttpFetcher(cfg, MAX_BYTES)({"url": server + "/robots/ours.jpg"})
    assert (failed.value.status, failed.value.error) == ("disallowed", "X-Robots-Tag: noai")
    assert Handler.user_agents == ["MCF-Fetch/2.0 (research)"]


def test_laion_detections_json_keep_fetched_rows(server: str, tmp_path: Path) -> None:
    urls = [server + "/good.jpg", server + "/missing", server + "/good.png"]
    parquet = _laion_parquet(tmp_path / "part.parquet", urls)
    box, points = [1, 2, 30, 28], [[5, 6], [20, 6], [12, 14], [7, 22], [19, 22]]
    released = {"100": [[box, points, 0.99], {"box": box, "landmarks": sum(points, []), "score": 0.5}]}
    released["101"] = [[box, points, 0.9]]
    (tmp_path / "det.json").write_text(json.dumps(released))
    (tmp_path / "det2.json").write_text(json.dumps({"102": [[box, points, 0.8]], "999": []}))  # another part
    parts = [str(tmp_path / "det.json"), str(tmp_path / "det2.json")]
    main(Common(), _laion_config(parquet, detections=parts))
    det = pd.read_parquet("out/detections.parquet")
    assert det["sample_id"].tolist() == ["100", "100", "102"] and det["face"].tolist() == [0, 1, 0]
    assert det["box"][1].tolist() == [1.0, 2.0, 30.0, 28.0]
    assert det["landmarks"][0].tolist() == [5.0, 6.0, 20.0, 6.0, 12.0, 14.0, 7.0, 22.0, 19.0, 22.0]
    assert det["score"].tolist() == [0.99, 0.5, 0.8]


def test_laion_damaged_detections_fail_before_the_first_download(server: str, tmp_path: Path) -> None:
    """The released detections were read after every download: at paper scale a malformed face in them
    failed the stage hours in, its downloads spent. They are now read, for the listed rows, first."""
    parquet = _laion_parquet(tmp_path / "part.parquet", [server + "/good.jpg", server + "/good.png"])
    (tmp_path / "det.json").write_text(json.dumps({"101": [[[1, 2, 30], [[5, 6]] * 5, 0.9]]}))  # 3 box values
    with pytest.raises(StageError, match=r"detections: face 0 of '101' is malformed: need 4 box values"):
        main(Common(), _laion_config(parquet, detections=[str(tmp_path / "det.json")]))
    assert not Handler.counts and not Path("out").exists()


def test_laion_detections_given_twice_fail_before_the_first_download(server: str, tmp_path: Path) -> None:
    """One file listed twice, or two parts that share a sample: fetch wrote each face twice, and the crop
    stage refused the table only after every image was downloaded."""
    parquet = _laion_parquet(tmp_path / "part.parquet", [server + "/good.jpg", server + "/good.png"])
    face = [[1, 2, 30, 28], [[5, 6], [20, 6], [12, 14], [7, 22], [19, 22]], 0.9]
    (tmp_path / "a.json").write_text(json.dumps({"100": [face], "101": [face]}))
    (tmp_path / "b.json").write_text(json.dumps({"101": [face]}))
    again = [str(tmp_path / "a.json"), str(tmp_path / ".." / tmp_path.name / "a.json")]
    with pytest.raises(ParamsError, match=r"detections\[1\]: .*a\.json is detections\[0\] again"):
        main(Common(), _laion_config(parquet, detections=again))
    shared = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    message = r"face 0 of sample '101' is given twice \(in .*a\.json, .*b\.json\)"
    with pytest.raises(StageError, match=message):
        main(Common(), _laion_config(parquet, detections=shared))
    assert not Handler.counts and not Path("out").exists()


def _released_pth(path: Path, released: dict[int, Any], numpy1: bool = False) -> Path:
    """A detections file as LAION-Face releases it (FacePerceiver/LAION-Face, README "Download the Face
    Detection Metadata" and download_detection.sh): ``sample2detect_<part>.pth``, ``torch.save`` of a dict
    int(SAMPLE_ID) -> [(box, landmarks, score), ...] as batch-face's RetinaFace returns each face
    (elliottzheng/batch-face, face_detection/alignment.py ``parse_det``: box ``det[:4]`` float32 [4],
    landmarks ``det[5:].reshape(5, 2)``, score ``det[4]``, numpy values). ``numpy1``: the legacy torch
    format naming numpy 1's ``numpy.core.multiarray``, as a file saved before numpy 2 does."""
    if not numpy1:
        torch.save(released, path)
        return path
    buf = io.BytesIO()
    torch.save(released, buf, _use_new_zipfile_serialization=False)  # protocol 2: GLOBAL lines
    data = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n" in data
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("numpy1", [False, True])
def test_laion_released_pth_detections_are_read(tmp_path: Path, numpy1: bool) -> None:
    """The released detections are torch files of numpy values keyed by int ids; fetch refused any
    detections file but .json or .parquet, so the paper profile could not use them as downloaded."""
    box = np.array([1, 2, 30, 28], np.float32)
    points = np.array([[5, 6], [20, 6], [12, 14], [7, 22], [19, 22]], np.float32)
    released = {1581282016264: [(box, points, np.float32(0.99)), (box + 1, points + 1, np.float32(0.5))],
                1581282016265: [], 42: [(box, points, np.float32(0.9))]}
    path = _released_pth(tmp_path / "sample2detect_0.pth", released, numpy1)
    laion.LaionFaceConfig(parquet=[str(path)], detections=[str(path)]).check_inputs()
    found = laion.read_detections([path], {"1581282016264", "1581282016265"})
    assert found["sample_id"].tolist() == ["1581282016264"] * 2 and found["face"].tolist() == [0, 1]
    assert found["box"][1] == [2.0, 3.0, 31.0, 29.0]
    assert found["landmarks"][0] == [5.0, 6.0, 20.0, 6.0, 12.0, 14.0, 7.0, 22.0, 19.0, 22.0]
    assert found["score"].tolist() == pytest.approx([0.99, 0.5])


def test_laion_pth_detections_of_tensors_needing_grad_are_one_line(tmp_path: Path) -> None:
    """torch's safe loader rebuilds tensors too; one that needs grad as a box made numpy raise a
    RuntimeError that escaped as a traceback."""
    box = torch.tensor([1.0, 2.0, 30.0, 28.0], requires_grad=True)
    torch.save({7: [(box, np.zeros((5, 2), np.float32), np.float32(0.9))]}, tmp_path / "det.pth")
    with pytest.raises(StageError, match=r"face 0 of '7' is malformed: .*requires grad"):
        laion.read_detections([tmp_path / "det.pth"], {"7"})


def test_laion_pth_detections_never_run_code(tmp_path: Path) -> None:
    """A .pth is a pickle: one that would call a function is refused in one line, never unpickled."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(tmp_path / "ran"),))

    torch.save({7: [Payload()]}, tmp_path / "det.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "det.pth").read_bytes()[:40])
    for name in ("det.pth", "cut.pth"):
        with pytest.raises(StageError, match=rf"{name}: not a torch file of numbers") as err:
            laion.read_detections([tmp_path / name], {"7"})
        assert "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists()


class _Calls:
    """Pickles as a call of ``func(*args)``: what a crafted file can ask of the allowed numpy globals."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def test_laion_pth_detections_crafted_arguments_fail_in_one_line(tmp_path: Path) -> None:
    """An allowed global called with arguments it refuses (numpy.dtype("nonsense"): TypeError) escaped
    the loader's refusal as a traceback; any failure to load the file is its one line."""
    points = np.zeros((5, 2), np.float32)
    torch.save({7: [(_Calls(np.dtype, "nonsense"), points, 0.9)]}, tmp_path / "det.pth")
    with pytest.raises(StageError, match=r"det.pth: not a torch file of numbers.*TypeError") as err:
        laion.read_detections([tmp_path / "det.pth"], {"7"})
    assert "\n" not in str(err.value)


def test_laion_pth_detections_huge_views_are_refused_before_copying(tmp_path: Path) -> None:
    """A tensor of 10**15 elements over one float's storage (stride 0: a file of a few hundred bytes)
    was copied whole (``ravel``, then ``tolist``) before its length was checked: petabytes asked for here,
    and at 10**9 elements some 40 GB filled before the refusal. Its size is now checked on the view."""
    points = np.zeros((5, 2), np.float32)
    huge = torch.zeros(1, dtype=torch.float64).expand(10**15)
    torch.save({7: [(huge, points, 0.9)], 8: [(np.zeros(4), huge, 0.9)]}, tmp_path / "det.pth")
    assert (tmp_path / "det.pth").stat().st_size < 4096
    for sample_id in ("7", "8"):
        with pytest.raises(StageError, match=rf"face 0 of '{sample_id}' is malformed: need 4 box values"):
            laion.read_detections([tmp_path / "det.pth"], {sample_id})


@pytest.mark.parametrize("newobj", [False, True])
def test_laion_pth_detections_never_call_the_array_constructor(tmp_path: Path, newobj: bool) -> None:
    """numpy's pickles rebuild arrays with ``_reconstruct`` and never call ``numpy.ndarray(...)``, which
    the allow-list let a file call (REDUCE or NEWOBJ): ``ndarray((n,), "O")`` fills n slots with None while
    the file loads, 80 GB for n = 10**10 from a file of a few hundred bytes. Such a call is refused."""
    import copyreg

    class NewArray(_Calls):
        __class__ = np.ndarray  # type: ignore[assignment]  # pickle writes NEWOBJ for its own class only

    points = np.zeros((5, 2), np.float32)
    call = NewArray(copyreg.__newobj__, np.ndarray, (4,), "O") if newobj else _Calls(np.ndarray, (4,), "O")
    torch.save({7: [(call, points, 0.9)]}, tmp_path / "det.pth")
    assert (b"\x81" if newobj else b"R") in zipfile.ZipFile(tmp_path / "det.pth").read("det/data.pkl")
    with pytest.raises(StageError, match=r"det.pth: not a torch file of numbers.*ndarray") as err:
        laion.read_detections([tmp_path / "det.pth"], {"7"})
    assert "\n" not in str(err.value)


class _Rebuilt:
    """Pickles as numpy pickles an array (``_reconstruct`` of an empty one, then ``__setstate__``), with
    the ``state`` given."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


class _Dtype:
    """Pickles as a float64 dtype whose pickled state sets ``flags``, as numpy's dtype.__setstate__ takes."""

    def __init__(self, flags: int) -> None:
        self.flags = flags

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.dtype, ("f8", False, True), (3, "<", None, None, None, -1, -1, self.flags))


@pytest.mark.parametrize("dtype", ["object", "float64 flagged as pickled as a list"])
def test_laion_pth_detections_cannot_crash_numpy(tmp_path: Path, dtype: str) -> None:
    """numpy's ndarray.__setstate__ reads an object array's items from the pickled list without checking
    its length: an array of 10 objects given an empty list read past the list and crashed the process
    (SIGSEGV), from a file the allow-list accepted; so did a float64 dtype whose pickled flags say its
    items are pickled as a list. An array's state is now bytes of a plain dtype, or refused."""
    given = _Calls(np.dtype, "O") if dtype == "object" else _Dtype(flags=2)
    points = np.zeros((5, 2), np.float32)
    torch.save({7: [(_Rebuilt((1, (10,), given, False, [])), points, 0.9)]}, tmp_path / "det.pth")
    code = ("from mcf.data.sources import laion; from mcf.errors import StageError\n"
            f"try: laion.read_detections([{str(tmp_path / 'det.pth')!r}], {{'7'}})\n"
            "except StageError as err: print(err)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "det.pth: not a torch file of numbers" in done.stdout and "array state" in done.stdout


def test_laion_pth_detections_refuse_a_flagged_dtype_even_with_bytes(tmp_path: Path) -> None:
    """An array's state is refused unless its dtype has no flags, bytes or not: flags (as object dtypes
    carry) tell numpy to read the bytes as references or a list, not numbers. A float64 flagged so, given
    bytes, loaded as a face."""
    points = np.zeros((5, 2), np.float32)
    box = _Rebuilt((1, (4,), _Dtype(flags=1), False, bytes(range(1, 33))))
    torch.save({7: [(box, points, 0.9)]}, tmp_path / "det.pth")
    with pytest.raises(StageError, match=r"det.pth: not a torch file of numbers.*array state that is not"):
        laion.read_detections([tmp_path / "det.pth"], {"7"})


def test_laion_pth_detections_never_rebuild_an_array_at_a_shape_of_their_own(tmp_path: Path) -> None:
    """numpy's pickles call ``_reconstruct`` at shape (0,) and fill the array from its state; a file calling
    it at a shape of its own got an array of uninitialised memory (a box of whatever was there), and at
    (10**9,) of objects gigabytes. Refused in one line."""
    from numpy._core.multiarray import _reconstruct

    points = np.zeros((5, 2), np.float32)
    torch.save({7: [(_Calls(_reconstruct, np.ndarray, (4,), b"b"), points, 0.9)]}, tmp_path / "det.pth")
    with pytest.raises(StageError, match=r"det.pth: not a torch file of numbers.*at a shape of its own"):
        laion.read_detections([tmp_path / "det.pth"], {"7"})


def test_laion_rows_keep_a_repeated_id_first_and_stop_at_max_rows(tmp_path: Path) -> None:
    first = _laion_parquet(tmp_path / "a.parquet", ["u0", "u1"])  # ids 100, 101
    second = tmp_path / "b.parquet"
    pd.DataFrame({"SAMPLE_ID": [101, 102, 103], "URL": ["v1", "v2", "v3"], "TEXT": ["t"] * 3}).to_parquet(
        second
    )
    cfg = laion.LaionFaceConfig(parquet=[str(first), str(second)])
    assert laion.read_rows(cfg)["url"].tolist() == ["u0", "u1", "v2", "v3"]  # 101's first row is kept
    capped = laion.read_rows(dataclasses.replace(cfg, max_rows=4))  # the first 4 rows, then unique ids
    assert capped["url"].tolist() == ["u0", "u1", "v2"]


def test_laion_null_caption_is_empty(tmp_path: Path) -> None:
    """A row without TEXT gets the caption ``""``: read as a string it was ``None`` (``nan`` for a part
    whose captions are all null), a caption the image never had."""
    part = tmp_path / "part.parquet"
    pd.DataFrame({"SAMPLE_ID": [1, 2], "URL": ["u1", "u2"], "TEXT": ["a face", None]}).to_parquet(part)
    assert laion.read_rows(laion.LaionFaceConfig(parquet=[str(part)]))["caption"].tolist() == ["a face", ""]


def test_laion_detections_parquet_keep_fetched_rows(tmp_path: Path) -> None:
    """Detections already in our flat schema are filtered to the fetched ids, as the released JSON is."""
    box, points = [1.0, 2.0, 30.0, 28.0], [5.0, 6.0, 20.0, 6.0, 12.0, 14.0, 7.0, 22.0, 19.0, 22.0]
    pd.DataFrame(
        {"sample_id": [100, 101, 102], "face": [0, 0, 0], "box": [box] * 3, "landmarks": [points] * 3,
         "score": [0.9, 0.8, 0.7]}
    ).to_parquet(tmp_path / "det.parquet")
    found = laion.read_detections([tmp_path / "det.parquet"], {"100", "102"})
    assert found["sample_id"].tolist() == ["100", "102"] and found["score"].tolist() == [0.9, 0.7]


def test_laion_integer_ids_with_nulls_match_detections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = pa.array([100, None, 102], pa.int64())  # pandas reads this column back as float64
    part, det = tmp_path / "part.parquet", tmp_path / "det.json"
    pq.write_table(pa.table({"SAMPLE_ID": ids, "URL": ["u"] * 3, "TEXT": ["t"] * 3}), part)
    rows = laion.read_rows(laion.LaionFaceConfig(parquet=[str(part)]))
    assert rows["sample_id"].tolist() == ["100", "part:1", "102"]
    det.write_text(json.dumps({"102": [[[1, 2, 30, 28], [5, 6, 20, 6, 12, 14, 7, 22, 19, 22], 0.99]]}))
    assert laion.read_detections([det], set(rows["sample_id"]))["sample_id"].tolist() == ["102"]
    assert "none of the 1 sample ids" not in caplog.text
    assert laion.read_detections([det], {"102.0"}).empty
    assert "none of the 1 sample ids" in caplog.text and "'102' there, '102.0' here" in caplog.text


def test_laion_empty_detections_part_or_no_listed_rows_read_as_no_faces(tmp_path: Path) -> None:
    """A part with no detections (``{}``), or no listed rows, has no ids to compare: the warning that none
    match, which names the smallest of each, would fail on an empty set (``min()``) and end the stage."""
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "det.json").write_text('{"7": []}')
    assert laion.read_detections([tmp_path / "empty.json"], {"7"}).empty
    assert laion.read_detections([tmp_path / "det.json"], set()).empty


@pytest.mark.parametrize(("bad", "score"), [('[1, 2, NaN, 28]', "0.9"), ('[1, 2, 30, Infinity]', "0.9"),
                                           ('[1, 2, 30, 28]', "NaN")])
def test_laion_non_finite_detection_fails_naming_the_face(tmp_path: Path, bad: str, score: str) -> None:
    """JSON allows NaN and Infinity, in the box or the score: either is refused naming the face, before it
    reaches detections.parquet and the crop stage."""
    points = "[5, 6, 20, 6, 12, 14, 7, 22, 19, 22]"
    faces = f"[[1, 2, 30, 28], {points}, 0.9], [{bad}, {points}, {score}]"
    (tmp_path / "det.json").write_text(f'{{"7": [{faces}]}}')
    with pytest.raises(StageError, match=r"face 1 of '7' is malformed: .* must be finite"):
        laion.read_detections([tmp_path / "det.json"], {"7"})


@pytest.mark.parametrize(("name", "content", "message"), [
    ("det.json", b"{'7': []}", r"det\.json is not JSON: Expecting property name"),
    ("det.json", b"\xff\xfe{}", r"det\.json is not JSON: 'utf-8' codec can't decode"),
    ("det.json", b'[["7", []]]', r"det\.json is not a JSON object of SAMPLE_ID -> faces"),
    ("det.json", b'{"7": null}', r"det\.json: the faces of '7' are not a list"),
    ("det.json", b'{"7": 3}', r"det\.json: the faces of '7' are not a list"),
    ("det.parquet", b"PAR1 cut short", r"det\.parquet: not a readable parquet table \(ArrowInvalid: "),
])
def test_laion_damaged_detections_file_is_one_line(tmp_path: Path, name: str, content: bytes,
                                                   message: str) -> None:
    """The user's released detections were read unguarded: a JSONDecodeError, UnicodeDecodeError,
    AttributeError, TypeError or ArrowInvalid traceback, after every image was downloaded."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StageError, match=message) as err:
        laion.read_detections([tmp_path / name], {"7"})
    assert "fetch.laion_face.detections" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("column", "values"), [
    ("face", ["0", "1"]), ("face", [0, None]), ("box", ["1 2 30 28"] * 2), ("landmarks", [["5"] * 10] * 2),
    ("score", ["0.9", "high"]),
])
def test_laion_detections_parquet_of_other_types_is_one_line(tmp_path: Path, column: str,
                                                             values: list[Any]) -> None:
    """A detections parquet whose columns are not the flat schema's types passed through to a traceback:
    pyarrow's when fetch wrote detections.parquet beside another file's numbers, or crop's TypeError
    (a string face) or ValueError (a string box). Refused on reading, naming the column."""
    box, points = [1.0, 2.0, 30.0, 28.0], [5.0, 6.0, 20.0, 6.0, 12.0, 14.0, 7.0, 22.0, 19.0, 22.0]
    table = {"sample_id": ["7", "8"], "face": [0, 0], "box": [box] * 2, "landmarks": [points] * 2,
             "score": [0.9, 0.8]}
    pd.DataFrame(table | {column: values}).to_parquet(tmp_path / "det.parquet")
    with pytest.raises(StageError, match=rf"det\.parquet: column {column} is not of its type in docs/"):
        laion.read_detections([tmp_path / "det.parquet"], {"7", "8"})
    nulls = table | {"landmarks": [None, points], "score": [None, 0.8]}  # unknown, as the contract allows
    pd.DataFrame(nulls).to_parquet(tmp_path / "det.parquet")
    assert laion.read_detections([tmp_path / "det.parquet"], {"7", "8"})["face"].tolist() == [0, 0]


def test_laion_detections_parquet_with_only_empty_landmarks_loads(tmp_path: Path) -> None:
    """Landmarks empty (or null) on every row, 'unknown' as the contract allows, are Arrow's list<null>
    when pandas writes them: the type check refused that as not list<double>."""
    box = [1.0, 2.0, 30.0, 28.0]
    pd.DataFrame({"sample_id": ["7", "8"], "face": [0, 0], "box": [box] * 2, "landmarks": [[], None],
                  "score": [0.9, None]}).to_parquet(tmp_path / "det.parquet")
    assert pq.read_schema(tmp_path / "det.parquet").field("landmarks").type == pa.list_(pa.null())
    found = laion.read_detections([tmp_path / "det.parquet"], {"7", "8"})
    assert found["sample_id"].tolist() == ["7", "8"] and len(found["landmarks"][0]) == 0


def test_laion_damaged_metadata_part_is_one_line(tmp_path: Path) -> None:
    """A metadata part that is not parquet was pyarrow's ArrowInvalid traceback from read_schema."""
    part = tmp_path / "part.parquet"
    part.write_bytes(b"not parquet at all")
    message = (r"part\.parquet: not a readable parquet table \(ArrowInvalid: [^\n]*; "
               r"check fetch\.laion_face\.parquet$")
    with pytest.raises(StageError, match=message):
        main(Common(), _laion_config(part))
    assert not Path("out").exists()


def test_mpo_is_a_jpeg() -> None:
    """Phones write JPEGs with a second (depth, preview) image; Pillow calls them MPO."""
    first = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[first.resize((20, 15))])
    assert inspect(buf.getvalue(), MAX_PIXELS) == (".jpg", 40, 30)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 5, 6, 7, 8])
def test_size_is_the_upright_size_the_crop_stage_decodes(tmp_path: Path, fmt: str, orientation: int) -> None:
    """A phone photo stores its pixels sideways with an EXIF orientation; OpenCV turns it upright."""
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format=fmt, exif=exif.tobytes())
    (tmp_path / "img").write_bytes(buf.getvalue())
    height, width = cv2.imread(str(tmp_path / "img"), cv2.IMREAD_COLOR).shape[:2]
    upright = (40, 30) if orientation == 1 else (30, 40)  # 5 and 7 transpose too (mirrored)
    assert inspect(buf.getvalue(), MAX_PIXELS)[1:] == (width, height) == upright


def test_a_bomb_is_refused_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's getexif decodes a whole PNG (an eXIf chunk may follow the pixels), and the orientation was
    read before the max_pixels check: this 8 KB PNG was decoded to 64 megapixels before being refused
    (a 420 KB RGB one declaring 144 took 590 MB and 3 s). A PNG cut short in its pixels was not_image."""

    def decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{self.size} pixels decoded")

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", decode)
        with pytest.raises(FetchFailure, match="decompression_bomb: 8000x8000 is over 1000000 pixels"):
            inspect(_png_bomb(), MAX_PIXELS)
    with pytest.raises(FetchFailure, match="^truncated: "):
        inspect(PNG[: len(PNG) * 2 // 3], MAX_PIXELS)


def test_a_jpeg_of_too_many_scans_is_a_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A progressive JPEG's decoder passes over every coefficient in each scan, at a 1/8 draft too: its
    last scan repeated 400 times (31 bytes each) took 5 s at 4000x4000, max_bytes of them hours."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG", progressive=True)
    progressive = buf.getvalue()
    assert inspect(progressive, MAX_PIXELS) == (".jpg", 64, 64)  # 10 scans
    last_scan = progressive[progressive.rindex(b"\xff\xda"):-2]
    bomb = progressive[:-2] + last_scan * image.MAX_JPEG_SCANS + b"\xff\xd9"

    def decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"{self.size} pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(FetchFailure, match=f"^decompression_bomb: more than {image.MAX_JPEG_SCANS} JPEG"):
        inspect(bomb, MAX_PIXELS)


@pytest.mark.parametrize("stray", [b"\xff\xfe\x00\x02", b"\xff", b"\x00"], ids=["comments", "fill", "junk"])
def test_a_jpeg_header_of_too_many_steps_is_a_bomb_refused_before_pillow_opens_it(
    stray: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow parses a JPEG's header in Python, a turn per segment or stray byte, keeping every segment:
    4 MB of empty comments took 15 s and 130 MB (all threads waiting on the GIL), 20 MB five times that."""
    at = JPEG.index(b"\xff\xdb")  # after SOI and APP0
    assert inspect(JPEG[:at] + stray * 100 + JPEG[at:], MAX_PIXELS)[0] == ".jpg"
    bomb = JPEG[:at] + stray * (image.MAX_JPEG_HEADER_STEPS + 1) + JPEG[at:]

    def opened(*args: Any) -> None:
        raise AssertionError("Pillow opened it")

    monkeypatch.setattr(Image, "open", opened)
    with pytest.raises(FetchFailure, match=f"^decompression_bomb: a JPEG header of more than "
                       f"{image.MAX_JPEG_HEADER_STEPS} segments"):
        inspect(bomb, MAX_PIXELS)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A well-formed PNG's chunks as (type, data), IEND included."""
    chunks, at = [], 8
    while at < len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        chunks.append((kind, data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def _rechunked(png: bytes, idats: int, before: bytes = b"", after: bytes = b"") -> bytes:
    """``png`` with its image data cut into ``idats`` IDAT chunks (empty ones once the bytes run out), and
    the chunks ``before`` ahead of them and ``after`` behind them."""
    chunks = _png_chunks(png)
    head = b"".join(_chunk(kind, data) for kind, data in chunks if kind not in (b"IDAT", b"IEND"))
    pixels = b"".join(data for kind, data in chunks if kind == b"IDAT")
    step = -(-len(pixels) // idats)
    body = b"".join(_chunk(b"IDAT", pixels[i * step : (i + 1) * step]) for i in range(idats))
    return b"\x89PNG\r\n\x1a\n" + head + before + body + after + _chunk(b"IEND")


@pytest.mark.parametrize("where", ["unknown before", "text before", "unknown after", "IDAT"])
def test_a_png_of_too_many_chunks_is_a_bomb_refused_before_pillow_opens_it(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow walks a PNG's chunks in Python: those up to the image data on each of inspect's three opens,
    all of them in verify, the IDATs and those after them in load. 300,000 empty ones (3.6 MB) took 2-2.6 s
    ahead of the image data, 1 s behind it or as IDATs; max_bytes of them up to 13 s, all threads waiting on
    the GIL meanwhile. A bound holds at its value (the IHDR counts among the chunks besides image data)."""

    def png(chunks: int) -> bytes:
        if where == "IDAT":
            return _rechunked(PNG, chunks)
        kind, side = where.split()
        extra = _chunk(b"tEXt" if kind == "text" else b"quUx") * (chunks - 1)
        return _rechunked(PNG, 1, **{side: extra})

    bound = image.MAX_PNG_DATA_CHUNKS if where == "IDAT" else image.MAX_PNG_CHUNKS
    assert inspect(png(bound), MAX_PIXELS) == (".png", 24, 36)
    bomb = png(bound + 1)

    def opened(*args: Any) -> None:
        raise AssertionError("Pillow opened it")

    monkeypatch.setattr(Image, "open", opened)
    what = "image data chunks" if where == "IDAT" else "chunks besides its image data"
    with pytest.raises(FetchFailure, match=f"^decompression_bomb: a PNG of more than {bound} {what}$"):
        inspect(bomb, MAX_PIXELS)


def test_a_png_of_many_small_idats_or_an_apng_of_many_frames_is_no_bomb() -> None:
    """Encoders cut a PNG's image data into IDATs of 8 KB (libpng) or less (some a row each): a large image
    has thousands. An APNG has two chunks a frame (fcTL, fdAT); inspect checks its first. Both count against
    the bound on image data chunks, not the one on other chunks."""
    pixels = np.random.default_rng(3).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    many = _rechunked(buf.getvalue(), 2 * image.MAX_PNG_CHUNKS)
    assert len(_png_chunks(many)) > 2 * image.MAX_PNG_CHUNKS
    assert inspect(many, MAX_PIXELS) == (".png", 100, 100)
    decoded = cv2.imdecode(np.frombuffer(many, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decoded[..., ::-1], pixels)  # a PNG OpenCV reads, pixel for pixel

    frames = image.MAX_PNG_CHUNKS  # fcTL, fdAT, IHDR, acTL: twice the bound on other chunks, and more
    ihdr, idat = (data for kind, data in _png_chunks(PNG) if kind in (b"IHDR", b"IDAT"))
    dot = zlib.compress(b"\x00\x7f\x7f\x7f")  # a 1x1 RGB frame

    def fctl(seq: int, width: int, height: int) -> bytes:
        return _chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, width, height, 0, 0, 1, 10, 0, 0))

    apng = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"acTL", struct.pack(">II", frames, 0))
            + fctl(0, 24, 36) + _chunk(b"IDAT", idat)
            + b"".join(fctl(2 * i - 1, 1, 1) + _chunk(b"fdAT", struct.pack(">I", 2 * i) + dot)
                       for i in range(1, frames))
            + _chunk(b"IEND"))
    with Image.open(io.BytesIO(apng)) as im:
        assert im.format == "PNG" and im.n_frames == frames  # an APNG is a PNG to Pillow (FORMATS)
    assert inspect(apng, MAX_PIXELS) == (".png", 24, 36)


def test_a_png_cut_anywhere_is_truncated_or_not_an_image() -> None:
    """The chunk walk ahead of Pillow stops quietly where the chunks run out or make no sense: Pillow's own
    checks say what such a file is."""
    png = _rechunked(PNG, 3, before=_chunk(b"tEXt", b"k\0v"), after=_chunk(b"quUx", b"1234"))
    garbled = png[:33] + b"\xff\xff\xff\xf0" + png[37:]  # the first chunk after IHDR claims 4 GB
    for case in [png[:cut] for cut in range(len(png) - 12)] + [garbled]:
        with pytest.raises(FetchFailure) as failure:
            inspect(case, MAX_PIXELS)
        assert failure.value.status in ("truncated", "not_image"), case


def test_formats_opencv_may_not_read_are_not_images() -> None:
    """Pillow opens GIF, BMP, TIFF ...: only JPEG, PNG and WebP are kept (docs/CONTRACTS.md), and the format
    check is what turns the others into a row; without it a GIF ended the stage in a KeyError."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(FetchFailure, match="^not_image: unsupported image format GIF$"):
        inspect(buf.getvalue(), MAX_PIXELS)


def test_a_header_over_pillow_s_own_bound_is_a_bomb() -> None:
    """Past twice Image.MAX_IMAGE_PIXELS Pillow refuses to open an image at all (max_pixels cannot go
    higher): that refusal is a decompression_bomb row too, not a not_image one."""
    with pytest.raises(FetchFailure, match=r"^decompression_bomb: Image size \(196000000 pixels\) exceeds"):
        inspect(_png_bomb(14_000), PILLOW_MAX_PIXELS)


def test_a_png_with_a_bad_checksum_is_truncated() -> None:
    """Pillow's load decodes a PNG whose IDAT CRC is wrong, libpng (OpenCV in the crop stage) refuses it:
    ``verify`` is the check that keeps such a file out of the successes."""
    at = PNG.index(b"IDAT")
    crc = at + 4 + struct.unpack(">I", PNG[at - 4 : at])[0]
    bad = PNG[:crc] + bytes(b ^ 0xFF for b in PNG[crc : crc + 4]) + PNG[crc + 4 :]
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR) is None
    with pytest.raises(FetchFailure, match=r"^truncated: SyntaxError: broken PNG file \(bad header checksum"):
        inspect(bad, MAX_PIXELS)


def test_an_exif_block_pillow_cannot_parse_leaves_the_image_as_stored() -> None:
    """A damaged EXIF header has no orientation: OpenCV decodes the image as stored, and so is it kept,
    at its stored size, not refused as truncated."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG", exif=b"Exif\0\0XX\0*\0\0\0\x08")
    height, width = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR).shape[:2]
    assert inspect(buf.getvalue(), MAX_PIXELS) == (".jpg", width, height) == (".jpg", 40, 30)


def _full_decode(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:
        return False


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_is_checked_at_an_eighth_of_its_size_with_a_full_decode_s_verdict(
    monkeypatch: pytest.MonkeyPatch, progressive: bool
) -> None:
    """inspect decoded every JPEG whole to find a cut or damaged one: about half the fetch process's CPU
    per image (`mcf bench fetch`). At 1/8 scale libjpeg still reads every coefficient, so it finds the same
    damage, and skips most of the inverse DCT, upsampling and colour conversion."""
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    noisy = cv2.resize(coarse, (256, 192)) + rng.normal(0, 8, (192, 256, 3))  # a photo's coefficients
    pixels = np.clip(noisy, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, progressive=progressive)
    data = buf.getvalue()
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        decoded.append(self.size)
        return load(self)

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", spy)
        assert inspect(data, MAX_PIXELS) == (".jpg", 256, 192)
    assert decoded == [(32, 24)]
    cuts = [data[: int(len(data) * f)] for f in np.linspace(0.1, 0.995, 25)] + [data[:-2]]
    damaged = []
    for _ in range(25):
        bad = bytearray(data)
        bad[int(rng.integers(len(data) // 4, len(data)))] = int(rng.integers(0, 256))
        damaged.append(bytes(bad))
    for case in cuts + damaged:
        try:
            inspect(case, MAX_PIXELS)
            ok = True
        except FetchFailure as failure:
            assert failure.status in ("truncated", "not_image")
            ok = False
        assert ok == _full_decode(case)
    assert not any(_full_decode(cut) for cut in cuts[:-1])  # the cuts are caught

XMP = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
       '</rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("where", ["JPEG xmp", "PNG xmp", "WEBP xmp", "PNG text profile"])
def test_an_orientation_outside_the_exif_block_is_not_applied(tmp_path: Path, where: str) -> None:
    """OpenCV turns an image by its EXIF block alone; Pillow's getexif also takes XMP's tiff:Orientation
    and ImageMagick's "Raw profile type exif" PNG text (a JPEG converted to PNG), so the manifest gave such
    an image's size turned while the crop stage reads it as stored."""
    fmt = where.split()[0]
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    buf = io.BytesIO()
    text = PngImagePlugin.PngInfo()
    if where == "PNG xmp":
        text.add_itxt("XML:com.adobe.xmp", XMP)
    elif where == "PNG text profile":
        exif = Image.Exif()
        exif[0x0112] = 6
        raw = exif.tobytes()[6:]  # the TIFF block, without JPEG's "Exif" prefix
        text.add_text("Raw profile type exif", f"\nexif\n{len(raw)}\n{raw.hex()}\n", zip=True)
    im.save(buf, format=fmt, **({"pnginfo": text} if fmt == "PNG" else {"xmp": XMP.encode()}))
    with Image.open(io.BytesIO(buf.getvalue())) as pil:
        assert pil.getexif().get(0x0112) == 6  # Pillow's view
    (tmp_path / "img").write_bytes(buf.getvalue())
    height, width = cv2.imread(str(tmp_path / "img"), cv2.IMREAD_COLOR).shape[:2]
    assert inspect(buf.getvalue(), MAX_PIXELS)[1:] == (width, height) == (40, 30)


def test_the_byte_and_pixel_bounds_are_inclusive() -> None:
    """``too_large`` is more than max_bytes and a bomb more than max_pixels: a file at the bound passes."""
    assert read_bounded([b"ab", b"c"], 3) == b"abc"
    with pytest.raises(FetchFailure, match="too_large: more than 3 bytes"):
        read_bounded([b"ab", b"cd"], 3)
    assert inspect(JPEG, 40 * 30) == (".jpg", 40, 30)
    with pytest.raises(FetchFailure, match="decompression_bomb: 40x30 is over 1199 pixels"):
        inspect(JPEG, 40 * 30 - 1)


def test_a_file_longer_than_its_stat_size_is_still_bounded() -> None:
    """The size check trusts st_size; a file that grows after it (here a /proc file, whose size reads 0)
    is read one byte past max_bytes and refused, not returned cut to max_bytes."""
    with pytest.raises(FetchFailure, match="too_large: more than 16 bytes"):
        FileReader(Path("/proc/self"), 16)({"file": "maps"})


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    first = {"sample_id": "a", "path": "images/a.jpg"}
    (tmp_path / "journal.jsonl").write_text(json.dumps(first) + "\n" + '{"sample_id": "b", "pa')
    Journal(tmp_path).append({"sample_id": "c", "path": "images/c.jpg"})
    assert [e["sample_id"] for e in Journal(tmp_path).load()] == ["a", "c"]
    Journal(tmp_path, "part-000001").append({"sample_id": "d", "path": "images/d.jpg"})  # a Dask slice's
    assert [e["sample_id"] for e in Journal(tmp_path).load()] == ["d", "a", "c"]  # every writer's file


def test_error_texts_are_the_same_every_run() -> None:
    """An object's memory address in an exception text would make each run's manifest (and its DVC
    hash) differ."""
    pil = "UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f3b2ffb3380>"
    assert Record("not_image", pil).error.endswith("cannot identify image file <_io.BytesIO>")
    urllib3 = "NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f0e1c2d3a90>: refused')"
    assert Record("connection_error", urllib3).error.endswith("HTTPConnection>: refused')")


@pytest.mark.parametrize("url", ["ftp://user:pa@55word@host/x.jpg", "http://user:pa@55word@[::1/x.jpg"])
def test_a_password_with_an_at_sign_is_redacted_whole(url: str) -> None:
    """An invalid URL is quoted whole in the manifest's error; a password holding a raw ``@`` (URL parsers
    split userinfo at the last one, so such URLs authenticate) lost only its part up to the first ``@``."""
    fetcher = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    with pytest.raises(laion.FetchFailure) as failure:
        fetcher({"url": url})
    error = Record(failure.value.status, failure.value.error).error
    assert failure.value.status == "invalid_url" and "55word" not in error and "user" not in error
    assert "://<redacted>@host/x.jpg" in error or "://<redacted>@[::1/x.jpg" in error


@pytest.mark.parametrize("url", ["http://user:pa/55word@127.0.0.1:1/x.jpg", "http://user:pa?55word@127.0.0.1:1/x",
                                 "http://user:pa#55word@127.0.0.1:1/x", "ftp://user:pa 55word@host/x.jpg",
                                 "ftp://user:pa'55\"word@host/x.jpg"])
def test_a_password_with_a_delimiter_is_redacted_whole(url: str) -> None:
    """A raw ``/``, ``?`` or ``#`` in a password ends the authority for some parsers and not for others, and
    a space or a quote ended the text the redaction searched: the whole URL, password included, reached the
    manifest in requests' "Failed to parse" or in our own invalid_url message."""
    fetcher = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    with pytest.raises(laion.FetchFailure) as failure:
        fetcher({"url": url})
    error = Record(failure.value.status, failure.value.error).error
    assert failure.value.status == "invalid_url" and "55" not in error and "user" not in error


def test_redaction_errs_on_the_side_of_removing_too_much() -> None:
    """urllib3 quotes the request target alone (no ``://``) when a ``/`` in a password moved the authority's
    end: everything up to a run's last ``@`` goes, as it does after a scheme."""
    text = "Max retries exceeded with url: /er:pa55@host/x.jpg (Caused by ...)"
    assert redact(text) == "Max retries exceeded with url: <redacted>@host/x.jpg (Caused by ...)"
    assert redact("see https://u:p/a@55@host/a@2x.png") == "see https://<redacted>@2x.png"
    assert redact("http://host/x.jpg and me@mail") == "http://host/x.jpg and <redacted>@mail"
    start = time.monotonic()  # a Location header of "://" repeated took quadratic time (11 s for 200 KB)
    assert redact("http://" * 30_000) == "http://" * 30_000 and time.monotonic() - start < 3.0


@pytest.mark.parametrize("text", [
    "https://cdn.example/a.jpg?user=me@mail.example&sig=s3cret",
    "Max retries exceeded with url: /a.jpg?user=me@mail.example&sig=s3cret (Caused by ...)",
    "https://cdn.example/a.jpg?sig=s3@cret",
])
def test_a_query_holding_an_at_sign_is_redacted_whole(text: str) -> None:
    """A query value may hold a raw ``@`` (an e-mail address): everything up to it went, the query's ``?``
    with it, so the rest of the query (a signature after it) was no longer a query and stayed."""
    url = text.split()[-4] if " " in text else text
    assert "cret" not in redact(text) and "cret" not in redact_url(url)
    assert "(Caused by ...)" in redact(text) or " " not in text
    assert redact("see https://cdn.example/me@2x.png?w=1") == "see https://<redacted>@2x.png?<redacted>"


def test_a_long_url_is_redacted_before_it_is_cut_short(server: str) -> None:
    """Error texts are cut to 200 characters; cut first, a password crossing the cut (in a redirect's
    Location, which requests quotes) lost its ``@`` and with it the redaction."""
    fetcher = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    with pytest.raises(laion.FetchFailure) as failure:
        fetcher({"url": server + "/leak"})
    error = Record(failure.value.status, failure.value.error).error
    assert failure.value.status == "invalid_url" and "s3cret" not in error and "uuu" not in error


def test_no_netrc_login_goes_to_image_hosts(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """requests reads ~/.netrc (or $NETRC) for every host it is sent to, a ``default`` entry matching any:
    the user's login went to each LAION host, and again after each redirect, over plain http too."""
    netrc = tmp_path / "netrc"
    netrc.write_text("default login me password s3cret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    fetcher = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    assert fetcher({"url": server + "/good.jpg"}) == JPEG
    assert fetcher({"url": server + "/a1"}) == PNG  # /a1 -> /a0 -> /good.png
    assert Handler.authorization == [None] * 4


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8/a b/\u00e4.jpg?q=\u00fc&x=1#part",
    "https://me:p%40ss@B\u00fccher.example/x.jpg",
    "http://[::1]:8/x.jpg?",
])
def test_a_bare_get_is_prepared_as_requests_prepares_it(url: str) -> None:
    """The fetcher prepares its GET itself (requests' generic merges cost a tenth of its CPU per image):
    the same URL, headers, login, cookies and hooks as requests' ``prepare_request``."""
    session = laion._Session(MAX_BYTES)
    session.headers["User-Agent"] = "mcf-test"
    session.cookies.set("seen", "1")
    ours, theirs = session.prepare_get(url), session.prepare_request(requests.Request("GET", url))
    for name in ("method", "url", "headers", "body", "hooks"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours._cookies.get_dict() == theirs._cookies.get_dict() == {"seen": "1"}


_CA, _PROXY = "/etc/ssl/a-bundle.pem", "http://me:s3cret@127.0.0.1:9"


@pytest.mark.parametrize("env", [
    {},
    {"REQUESTS_CA_BUNDLE": _CA},
    {"CURL_CA_BUNDLE": _CA},
    {"HTTP_PROXY": _PROXY},
    {"https_proxy": _PROXY},
    {"Http_Proxy": _PROXY},  # urllib takes a proxy variable in any case
    {"ALL_PROXY": _PROXY, "no_proxy": "www.example.com"},
    {"NO_PROXY": "*", "HTTPS_PROXY": _PROXY, "REQUESTS_CA_BUNDLE": _CA},
    {"HTTPS_PROXY": ""},
])
def test_settings_from_the_environment_are_requests_own(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetcher skips requests' proxy lookups where no variable names a proxy (they read the whole
    environment four times per image): the proxies, CA bundle and proxy login are still requests' own."""
    for name in os.environ:
        if name.lower().endswith("_proxy") or name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    session = laion._Session(MAX_BYTES)
    for url in ("http://www.example.com/x.jpg", "https://www.example.com/x.jpg", "http://cdn.example.org/y"):
        ours = session.merge_environment_settings(url, {}, True, None, None)
        assert ours == requests.Session.merge_environment_settings(session, url, {}, True, None, None)
        hops = [session.prepare_get(url), session.prepare_get(url)]
        for hop in hops:
            hop.headers["Proxy-Authorization"] = "from the last hop"
        assert session.rebuild_proxies(hops[0], ours["proxies"]) == requests.Session.rebuild_proxies(
            session, hops[1], ours["proxies"])
        assert hops[0].headers == hops[1].headers


def test_a_connect_that_never_returns_holds_no_other() -> None:
    """Connects run on kept threads (a thread start each cost 0.3 ms of CPU); one whose name lookup hangs
    holds its own thread only, and a thread idle for a while ends."""
    workers, hung, done = laion._Workers(), threading.Event(), [threading.Event() for _ in range(2)]
    workers.run(done[0].set)
    assert done[0].wait(2.0)
    time.sleep(0.1)  # the thread is idle again
    workers.run(lambda: hung.wait(10.0))  # takes the idle thread
    workers.run(done[1].set)
    try:
        assert done[1].wait(5.0)  # on a thread of its own, not queued behind the hung one (10 s)
    finally:
        hung.set()
    deadline = time.monotonic() + 5 * laion._Workers.IDLE_S
    while any(t.name == "fetch-connect" and t.is_alive() for t in threading.enumerate()):
        assert time.monotonic() < deadline, "idle connect threads did not end"
        time.sleep(0.05)


def test_a_connect_thread_ending_idle_still_runs_the_call_it_was_handed() -> None:
    """An idle thread that ends as a call is handed to it: the call still runs (else its fetch waited
    for the deadline). Threads that idle a few microseconds make the race frequent."""

    class Brief(laion._Workers):
        IDLE_S = 0.0003

    workers = Brief()
    for i in range(300):
        done = threading.Event()
        workers.run(done.set)
        assert done.wait(5.0), f"call {i} never ran"
        time.sleep(0.0003 * (i % 3))


def test_the_watchdog_shuts_each_socket_at_its_own_deadline() -> None:
    """One thread holds every response head to its deadline (a Timer thread each cost 0.3 ms of CPU): a
    deadline sooner than those it already waits for is still met, and a released socket is left alone."""
    watchdog, pairs = laion._Watchdog(), [socket.socketpair() for _ in range(3)]
    try:
        late = watchdog.hold(pairs[0][0], time.monotonic() + 30.0)
        time.sleep(0.1)  # its thread now waits for that deadline
        start = time.monotonic()
        watchdog.hold(pairs[1][0], start + 0.3)
        watchdog.release(watchdog.hold(pairs[2][0], start + 0.2))
        pairs[1][1].settimeout(5.0)
        assert pairs[1][1].recv(1) == b"" and time.monotonic() - start < 2.0  # shut at 0.3 s, not 30 s
        for ours, theirs in (pairs[0], pairs[2]):
            theirs.settimeout(0.2)
            with pytest.raises(TimeoutError):
                theirs.recv(1)
            ours.sendall(b"x")  # still open both ways
            assert theirs.recv(1) == b"x"
        watchdog.release(late)
    finally:
        for pair in pairs:
            for end in pair:
                end.close()


@pytest.mark.parametrize("host", ["www..example.com", "a" * 64 + ".example.com"])
def test_a_host_urllib3_cannot_parse_is_an_invalid_url(host: str) -> None:
    """An empty or over-long DNS label fails in urllib3's parser, before any connection: not a
    connection error, and not retried."""
    fetcher = laion.HttpFetcher(laion.LaionFaceConfig(), MAX_BYTES)
    with pytest.raises(laion.FetchFailure) as failure:
        fetcher({"url": f"http://{host}/x.jpg"})
    assert (failure.value.status, failure.value.retryable) == ("invalid_url", False)
    assert failure.value.error.startswith("LocationParseError: Failed to parse")


def test_laion_metadata_without_url_column_fails_clearly(tmp_path: Path) -> None:
    parquet = tmp_path / "part.parquet"
    pd.DataFrame({"SAMPLE_ID": [1], "TEXT": ["x"], "NSFW": ["UNLIKELY"]}).to_parquet(parquet)
    with pytest.raises(StageError, match=r"part\.parquet: no column URL; check fetch\.laion_face\.parquet"):
        main(Common(), _laion_config(parquet))
    assert not Path("out").exists()


def test_fetch_data_must_hold_what_the_source_reads(tmp_path: Path) -> None:
    """dvc.yaml watches ``fetch.data``: a value that misses the photos or the parts would leave fetch up to
    date in DVC's eyes after they change."""
    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(ParamsError, match=r"fetch\.data: must be local\.root '.*photos' \(not 'mcf/synth'\)"):
        _config(source="local", local={"root": str(photos)}, data="mcf/synth")
    assert _config(source="local", local={"root": str(photos)}, data=f"{photos}/").data == f"{photos}/"
    parts = tmp_path / "laion"
    parts.mkdir()
    part = str(_laion_parquet(parts / "part.parquet", ["ftp://a"]))
    (tmp_path / "det.json").write_text("{}")
    laion_face = {"parquet": [part], "detections": [str(tmp_path / "det.json")]}
    with pytest.raises(ParamsError, match=r"fetch\.data: must hold every laion_face.* not \['.*det\.json'\]"):
        _config(source="laion-face", laion_face=laion_face, data=str(parts))
    assert _config(source="laion-face", laion_face=laion_face, data=str(tmp_path)).data == str(tmp_path)
    assert _config(source="synthetic", data="anything").data == "anything"  # reads no local file


def test_dvc_sees_a_new_photo_as_a_change_to_fetch(tmp_path: Path) -> None:
    """The wiring itself: the repository's dvc.yaml, params with the local source, a real ``dvc repro`` of
    fetch, then one more photo: ``dvc status`` reports fetch's input changed."""
    repo, root = tmp_path / "repo", Path(__file__).resolve().parents[1]
    shutil.copytree(root / "mcf", repo / "mcf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fetch"] |= {"source": "local", "data": "photos", "local": {"root": "photos"}}
    for stage, tree in (("finetune_alignment", "data/AFLW"), ("finetune_parsing", "data/lapa")):
        params[stage]["data"]["root"] = tree  # fetch of photos writes no SynthFace tree to fine-tune on
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / "photos").mkdir()
    cv2.imwrite(str(repo / "photos" / "a.jpg"), np.full((40, 40, 3), 128, np.uint8))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    dvc("repro", "fetch")
    assert "changed" not in dvc("status", "fetch")
    cv2.imwrite(str(repo / "photos" / "b.jpg"), np.full((40, 40, 3), 64, np.uint8))
    assert "modified:           photos" in dvc("status", "fetch")


def test_params_check_the_active_source(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"fetch\.laion_face\.parquet\[0\]: path does not exist"):
        _config(source="laion-face", laion_face={"parquet": ["nowhere.parquet"]})
    with pytest.raises(ParamsError, match=r"fetch\.laion_face\.parquet: give at least one"):
        _config(source="laion-face")
    with pytest.raises(ParamsError, match=r"fetch\.s3\.bucket"):
        _config(source="s3")
    # the manifest's own columns: pyarrow refused the duplicate names only after every download
    parquet, extra = str(_laion_parquet(tmp_path / "part.parquet", ["ftp://a"])), ["NSFW", "width", "status"]
    with pytest.raises(ParamsError, match=r"fetch\.laion_face\.extra_columns: \['status', 'width'\] are "):
        _config(source="laion-face", laion_face={"parquet": [parquet], "extra_columns": extra})
    extra = ["url", "caption", "source", "sample_id"]  # the caption's column replaced the TEXT read into it
    with pytest.raises(ParamsError, match=r"\['caption', 'sample_id', 'source', 'url'\] are columns of the"):
        _config(source="laion-face", laion_face={"parquet": [parquet], "extra_columns": extra})
    Path("det.txt").write_text("{}")  # JSON, but no detections format's ending
    with pytest.raises(ParamsError, match=r"detections\[0\]: expected a \.pth, \.json or \.parquet file"):
        _config(source="laion-face", laion_face={"parquet": [parquet], "detections": ["det.txt"]})
    with pytest.raises(ParamsError, match=r"fetch\.s3\.endpoint_url: takes no user, password or query"):
        _config(source="s3", s3={"bucket": "b", "endpoint_url": "http://minio:s3cret@127.0.0.1:9000"})
    with pytest.raises(ParamsError, match=r"fetch\.s3\.endpoint_url: expected http\(s\)://host\[:port\]"):
        _config(source="s3", s3={"bucket": "b", "endpoint_url": "127.0.0.1:9000"})
    with pytest.raises(ParamsError, match=r"fetch\.max_pixels: must be >= 1"):
        _config(max_pixels=0)
    with pytest.raises(ParamsError, match=r"fetch\.threads: must be >= 1"):  # a pool of 0: ValueError mid-run
        _config(threads=0)
    with pytest.raises(ParamsError, match=r"fetch\.max_bytes: must be >= 1"):  # every image too_large
        _config(max_bytes=0)
    with pytest.raises(ParamsError, match=r"fetch\.max_pixels: must be <= 178956970"):  # Pillow opens no more
        _config(max_pixels=200_000_000)
    with pytest.raises(ParamsError, match=r"fetch\.source: must be one of"):
        _config(source="ftp")
    # "jpg" matches no Path.suffix: the run would end in "lists no rows ... (files ending in jpg)"
    with pytest.raises(ParamsError, match=r"fetch\.local\.extensions: each must be one suffix .*\['jpg'\]"):
        _config(source="local", local={"root": str(tmp_path), "extensions": [".png", "jpg"]})
    with pytest.raises(ParamsError, match=r"fetch\.s3\.extensions: each must be one suffix .*\['.tar.gz'\]"):
        _config(source="s3", s3={"bucket": "b", "extensions": [".tar.gz"]})
    photos = tmp_path / "photos"  # beside out/, not around it
    photos.mkdir()
    assert _config(source="local", local={"root": str(photos), "extensions": []}).local.extensions == []
    # every rerun listed the previous output's images as photos: 1, 2, then 3 copies of one photo
    with pytest.raises(ParamsError, match=r"fetch\.out: .*/fetched is inside local\.root .*: each run would"):
        _config(source="local", out=str(photos / "fetched"), local={"root": str(photos)})
    with pytest.raises(ParamsError, match=r"fetch\.out: fetched is inside local\.root \.: each run would"):
        _config(source="local", out="fetched", local={"root": "."})
    assert _config(source="local", local={"root": str(photos)}).local.root == str(photos)


def test_a_local_root_that_is_a_file_is_a_params_error(tmp_path: Path) -> None:
    """``local.root`` naming one photo (or any file) passed the params check, and the stage then ended in
    "cannot list ...: Not a directory", exit 1 instead of 2."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    with pytest.raises(ParamsError, match=r"fetch\.local\.root: not a folder: .*photo\.jpg \(name the"):
        _config(source="local", local={"root": str(photo)})


@pytest.mark.parametrize(
    "endpoint",
    ["s3://AKIAEXAMPLE:s3cret@127.0.0.1:9000", "http://AKIAEXAMPLE:s3cret@", "AKIAEXAMPLE:s3cret/x@127.0.0.1",
     "ftp://127.0.0.1/?X-Amz-Signature=s3cret"],
)
def test_an_endpoint_refused_for_its_form_does_not_quote_its_credentials(endpoint: str) -> None:
    """The scheme check ran first and quoted the whole value, password or signature included."""
    with pytest.raises(ParamsError) as err:
        _config(source="s3", s3={"bucket": "b", "endpoint_url": endpoint})
    assert "s3cret" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
    assert "takes no user, password or query" in str(err.value)


def test_credentials_in_an_unused_s3_section_are_refused_too() -> None:
    """dvc.yaml's fetch stage records the whole fetch section in dvc.lock: a password left in s3's
    endpoint_url while another source runs passed the check, and went into a committed file."""
    with pytest.raises(ParamsError, match=r"fetch\.s3\.endpoint_url: takes no user, password or query"):
        _config(s3={"endpoint_url": "http://minio:s3cret@127.0.0.1:9000"})
    assert _config(s3={"endpoint_url": "http://127.0.0.1:9000"}).source == "synthetic"  # unused, not checked


@pytest.mark.parametrize("endpoint", ["http://[::1", "http://mini o:9000", "http://127.0.0.1:9OOO",
                                      "http://127.0.0.1:90000", "", "ftp://127.0.0.1:9000"])
def test_an_endpoint_boto3_cannot_use_is_a_params_error(endpoint: str) -> None:
    """These passed the check, then ended the stage in a ValueError traceback (exit 1, not 2) or in a
    listing error after the stage had started. ``""`` (as bucket's and prefix's defaults are written) is
    no endpoint: AWS's is null."""
    with pytest.raises(ParamsError, match=r"fetch\.s3\.endpoint_url: expected http\(s\)://host\[:port\]"):
        _config(source="s3", s3={"bucket": "b", "endpoint_url": endpoint})
    assert _config(source="s3", s3={"bucket": "b", "endpoint_url": "http://[::1]:9000"}).s3.endpoint_url


@pytest.mark.parametrize(
    ("bucket", "message"),
    [("s3://my-bucket", "not a URL (bucket: my-bucket)"),
     ("s3://AKIAEXAMPLE:s3cret@my-bucket/faces/", "not a URL (bucket: my-bucket, prefix: faces/)"),
     ("my-bucket/faces", "not a path: the rest goes in prefix (bucket: my-bucket, prefix: faces)")],
)
def test_an_s3_bucket_given_as_a_url_or_a_path_is_a_params_error(bucket: str, message: str) -> None:
    """``bucket: s3://my-bucket`` or ``my-bucket/faces`` passed the params check, and boto3's "Invalid
    bucket name" ended the stage once it listed, exit 1 instead of 2, with no word of ``prefix``."""
    with pytest.raises(ParamsError, match=rf"^fetch\.s3\.bucket: takes a bucket name, {re.escape(message)}$"):
        _config(source="s3", s3={"bucket": bucket, "endpoint_url": "http://127.0.0.1:9000"})
    arn = "arn:aws:s3:us-east-1:123456789012:accesspoint/faces"  # boto3 takes an access point for a bucket
    assert _config(source="s3", s3={"bucket": arn}).s3.bucket == arn


@pytest.mark.parametrize(
    ("bucket", "message"),
    [("https://my-bucket.s3.amazonaws.com/faces/a.jpg?X-Amz-Signature=f00d", "not a URL (its server goes in "
      "endpoint_url, null for AWS's; the bucket's name here and the folder in prefix)"),
     ("http://127.0.0.1:9000/my-bucket/faces", "not a URL (its server goes in endpoint_url, null for AWS's; "
      "the bucket's name here and the folder in prefix)"),
     ("s3://my-bucket/faces/a.jpg?X-Amz-Signature=f00d", "not a URL"),
     ("s3://AKIAEXAMPLE:s3/cret@my-bucket/faces", "not a URL"),
     ("s3a://my-bucket/faces", "not a URL (bucket: my-bucket, prefix: faces)")],
)
def test_an_s3_bucket_hint_quotes_no_secret_and_no_server_as_the_bucket(bucket: str, message: str) -> None:
    """The hint quoted a signed URL's query (``X-Amz-Signature``) and both halves of a password holding a
    ``/``, which the manifest's errors and endpoint_url's check never quote; and it named an http(s) URL's
    server as the bucket (a MinIO ``http://127.0.0.1:9000/my-bucket/faces`` as ``bucket: 127.0.0.1:9000``);
    Hadoop's s3a:// names the bucket as s3:// does."""
    with pytest.raises(ParamsError, match=rf"^fetch\.s3\.bucket: takes a bucket name, {re.escape(message)}$"):
        _config(source="s3", s3={"bucket": bucket})

def test_a_region_boto3_refuses_is_a_params_error() -> None:
    """A region with a space or a slash passed the params check, then boto3's InvalidRegionError ended
    the stage in a traceback (exit 1, not 2); ``""`` passed botocore's check and its client raised a
    ValueError on the endpoint https://s3..amazonaws.com."""
    with pytest.raises(ParamsError, match=r"fetch\.s3\.region: 'us east 1' is not a region name"):
        _config(source="s3", s3={"bucket": "b", "region": "us east 1"})
    with pytest.raises(ParamsError, match=r"fetch\.s3\.region: '' is not a region name"):
        _config(source="s3", s3={"bucket": "b", "region": ""})
    assert _config(source="s3", s3={"bucket": "b", "region": "auto"}).s3.region == "auto"  # R2's


def test_an_aws_set_up_boto3_refuses_ends_the_stage_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile that no AWS config file defines made boto3's client raise ProfileNotFound outside
    list_rows' handler: a traceback, not the one-line stage error."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    cfg = _config(source="s3", s3={"bucket": "b", "endpoint_url": f"http://127.0.0.1:{_closed_port()}"})
    with pytest.raises(AccessError, match=r"fetch\.s3: cannot set up an S3 client: .*\(no-such-profile\)"):
        s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_local_folder(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _write(root / "a.jpg", JPEG)
    _write(root / "sub" / "b.PNG", PNG)
    _write(root / "sub" / "fake.jpg", b"GIF89a... or rather not")
    _write(root / "big.jpeg", BODIES["/huge.bin"])
    _write(root / "notes.txt", b"skipped: not an image extension")
    _write(root / ".hidden" / "c.jpg", JPEG)
    _write(root / ".thumb.jpg", JPEG)  # a hidden file (a viewer's cache) is no photo either
    _write(root / "exact.jpg", JPEG + b"\0" * (MAX_BYTES - len(JPEG)))  # max_bytes itself is allowed
    os.mkfifo(root / "pipe.jpg")  # would block a plain open until a writer came
    (root / "zero.jpg").symlink_to("/dev/zero")  # a stat size of 0, and endless bytes
    (root / "link.jpg").symlink_to(root / "a.jpg")  # a link to a regular file is read
    (root / "gone.jpg").symlink_to(root / "deleted.jpg")  # a dangling link: a row, not a crash
    main(Common(), _config(source="local", local={"root": str(root)}))
    manifest = pd.read_parquet("out/manifest.parquet").set_index("sample_id")
    assert manifest["status"].to_dict() == {
        "a.jpg": "success",
        "big.jpeg": "too_large",
        "exact.jpg": "success",
        "gone.jpg": "error",
        "link.jpg": "success",
        "pipe.jpg": "error",
        "sub/b.PNG": "success",
        "sub/fake.jpg": "not_image",
        "zero.jpg": "error",
    }
    assert manifest.loc["zero.jpg", "error"] == "zero.jpg is not a regular file"
    assert manifest.loc["gone.jpg", "error"].startswith("cannot read gone.jpg: [Errno 2]")
    assert Path("out", manifest.loc["sub/b.PNG", "path"]).read_bytes() == PNG
    assert not Path("out/detections.parquet").exists()


def test_a_local_name_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """A Latin-1 name (an old archive's) reached image_path's sha1 as a lone surrogate: the stage ended in
    a UnicodeEncodeError traceback mid-run; the listing now names it before any work. UTF-8 names pass."""
    root = tmp_path / "photos"
    _write(root / "café.jpg", JPEG)
    os.mkdir(os.fsencode(root) + b"/caf\xe9")
    with open(os.fsencode(root) + b"/caf\xe9/a.jpg", "wb") as f:
        f.write(JPEG)
    with pytest.raises(StageError, match=r"1 file names under .*photos are not UTF-8.*\): caf\\xe9/a\.jpg$"):
        main(Common(), _config(source="local", local={"root": str(root)}))
    assert not Path("out").exists()
    os.rename(os.fsencode(root) + b"/caf\xe9", root / "cafe")
    main(Common(), _config(source="local", local={"root": str(root)}))
    assert pd.read_parquet("out/manifest.parquet")["sample_id"].tolist() == ["café.jpg", "cafe/a.jpg"]


def test_a_local_folder_that_cannot_be_listed_ends_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.walk skipped a folder it could not read (no permission, an NFS error): its images had no row and
    the run passed. A scandir failure stands in for chmod 000, which root (CI containers) reads anyway."""
    root = tmp_path / "photos"
    _write(root / "a.jpg", JPEG)
    _write(root / "locked" / "b.jpg", JPEG)
    scandir, error = os.scandir, PermissionError(13, "Permission denied")

    def refuse_locked(path: Any = ".") -> Any:  # shutil.rmtree passes file descriptors
        if isinstance(path, str) and Path(path).name == "locked":
            error.filename = path
            raise error
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    # no access, which the flow does not retry (exit 4); another error may pass on a rerun (exit 1)
    with pytest.raises(AccessError, match=r"fetch\.local: cannot list .*photos/locked: Permission denied$"):
        main(Common(), _config(source="local", local={"root": str(root)}))
    assert not Path("out").exists()
    error = OSError(5, "Input/output error")
    with pytest.raises(StageError, match=r"cannot list .*photos/locked: Input/output error$") as failed:
        main(Common(), _config(source="local", local={"root": str(root)}))
    assert failed.value.exit_code == 1


def test_a_local_listing_is_in_sorted_order_whatever_the_folder_s(tmp_path: Path) -> None:
    """The manifest keeps the listing's order, and its bytes are hashed by DVC: os.walk hands names over
    in the file system's order (ext4's is by hash), so an unsorted listing changed the manifest from one
    machine, or one copy of the photos, to the next. Default endings are the four image ones, any case;
    ``extensions: []`` keeps every file."""
    from mcf.data.sources.local import LocalConfig, list_rows

    root = tmp_path / "photos"
    names = ["m/z.jpg", "b.webp", "z/a.png", "q/y.png", "d.txt", "a.jpeg", "m/a.JPG", "c.jpg", "b/x.png",
             "k/w.png"]
    for name in names:  # neither in sorted order nor its reverse, for a folder that lists by creation
        _write(root / name, JPEG)
    folders = ["b/x.png", "k/w.png", "m/a.JPG", "m/z.jpg", "q/y.png", "z/a.png"]
    listed = list_rows(LocalConfig(root=str(root)))["sample_id"].tolist()
    assert listed == ["a.jpeg", "b.webp", "c.jpg", *folders]
    everything = list_rows(LocalConfig(root=str(root), extensions=[]))["sample_id"].tolist()
    assert everything == ["a.jpeg", "b.webp", "c.jpg", "d.txt", *folders]


@pytest.mark.parametrize("changed", ["mtime", "size"])
def test_a_local_file_replaced_in_place_is_read_again(tmp_path: Path, changed: str) -> None:
    """The stored copy's sha256 is of the old bytes: the file's size and mtime alone tell it changed, each
    on its own (an edit that keeps the length, a copy that keeps the mtime: cp -p, rsync -a)."""
    photo = tmp_path / "photos" / "a.jpg"
    _write(photo, JPEG)
    main(Common(), _config(source="local", local={"root": str(photo.parent)}))
    new, mtime_ns = _image("JPEG", (30, 20)), photo.stat().st_mtime_ns
    if changed == "mtime":
        new += b"\0" * (len(JPEG) - len(new))  # trailing bytes after the JPEG's end: the same length
        mtime_ns += 10**9
    _write(photo, new)
    assert (len(new) == len(JPEG)) == (changed == "mtime")
    os.utime(photo, ns=(photo.stat().st_atime_ns, mtime_ns))
    main(Common(), _config(source="local", local={"root": str(photo.parent)}))
    manifest = pd.read_parquet("out/manifest.parquet")
    assert Path("out", manifest.loc[0, "path"]).read_bytes() == new and manifest.loc[0, "width"] == 30


def test_a_local_file_replaced_after_listing_is_not_stored_under_its_listed_stat(tmp_path: Path) -> None:
    """The row keeps the listed size and mtime, the bytes were the file's at read time: a file replaced in
    between was stored as a success under the old stat, which a later run reused once the original came
    back with its mtime (rsync -a, cp -p). The read must find the listed stat; the next run lists anew."""
    photo = tmp_path / "photos" / "a.jpg"
    _write(photo, JPEG)
    cfg = _config(source="local", local={"root": str(photo.parent)})
    source = remote_source(cfg)
    new = _image("JPEG", (30, 20))
    _write(photo, new)
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    staging = tmp_path / "staging"
    staging.mkdir()
    [record] = fetch_records(source, tmp_path / "out", tmp_path / "journal", staging, limits(cfg))
    assert record.status == "error" and "a.jpg changed after it was listed" in str(record.error)
    main(Common(), cfg)
    row = pd.read_parquet("out/manifest.parquet").iloc[0]
    assert Path("out", row["path"]).read_bytes() == new and row["size"] == len(new)


def test_a_stored_path_outside_the_folder_is_not_reused(tmp_path: Path) -> None:
    """An earlier manifest is data: a path in it that leaves the output folder is fetched again."""
    _write(tmp_path / "photos" / "a.jpg", JPEG)
    main(Common(), _config(source="local", local={"root": str(tmp_path / "photos")}))
    manifest = pd.read_parquet("out/manifest.parquet")
    stored = Path("out") / manifest.loc[0, "path"]
    Path("outside.jpg").write_bytes(stored.read_bytes())  # the same bytes: the sha256 still matches
    manifest.loc[0, "path"] = "../outside.jpg"
    manifest.to_parquet("out/manifest.parquet", index=False)
    main(Common(), _config(source="local", local={"root": str(tmp_path / "photos")}))
    path = pd.read_parquet("out/manifest.parquet").loc[0, "path"]
    assert path.startswith("images/") and (Path("out") / path).read_bytes() == JPEG


def test_a_stored_file_deleted_since_is_fetched_again(tmp_path: Path) -> None:
    """A previous output's image that is gone (cleaned up by hand) is missing, so fetched again: its stat
    raised FileNotFoundError in the worker and ended the stage."""
    _write(tmp_path / "photos" / "a.jpg", JPEG)
    cfg = _config(source="local", local={"root": str(tmp_path / "photos")})
    main(Common(), cfg)
    stored = Path("out") / pd.read_parquet("out/manifest.parquet").loc[0, "path"]
    stored.unlink()
    main(Common(), cfg)
    assert pd.read_parquet("out/manifest.parquet").loc[0, "status"] == "success"
    assert stored.read_bytes() == JPEG


def test_a_stored_file_over_lowered_limits_is_not_reused(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _write(root / "small.png", _image("PNG", (10, 10)))
    flat = io.BytesIO()
    Image.new("RGB", (200, 10)).save(flat, "PNG")
    _write(root / "wide.png", flat.getvalue())  # 2,000 pixels in a few bytes
    _write(root / "heavy.jpg", _image("JPEG", (30, 30)))  # under the lowered pixel bound: bytes alone
    main(Common(), _config(source="local", local={"root": str(root)}))
    assert set(pd.read_parquet("out/manifest.parquet")["status"]) == {"success"}
    assert pq.read_schema("out/manifest.parquet").field("error").type == pa.string()  # all null, a string
    heavy = (root / "heavy.jpg").stat().st_size
    main(Common(), _config(source="local", local={"root": str(root)}, max_pixels=1_000, max_bytes=heavy - 1))
    status = pd.read_parquet("out/manifest.parquet").set_index("sample_id")["status"].to_dict()
    assert status == {"small.png": "success", "wide.png": "decompression_bomb", "heavy.jpg": "too_large"}


def test_empty_local_folder_fails_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(StageError, match=r"local source lists no rows: nothing in .*empty \(files ending in"):
        main(Common(), _config(source="local", local={"root": str(tmp_path / "empty")}))
    assert not Path("out").exists()


def test_a_fetch_where_no_row_succeeds_says_why_before_the_gate_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate says no row has 'success' and the log gave status counts alone: why every download failed
    (a dead proxy, a wrong bucket, a folder of text files) was in the manifest only, which is not written.
    Grouped by status: an error quoting its row (a size here) would make each row a group of one."""
    for name, body in (("a.jpg", b"plain text"), ("b.jpg", b"plain text"), ("c.png", _image("PNG")),
                       ("d.png", _image("PNG", (20, 20))), ("e.png", _image("PNG", (30, 30)))):
        _write(tmp_path / "photos" / name, body)
    with caplog.at_level("WARNING", logger="mcf.data.sources.download"), \
            pytest.raises(StageError, match="no row has"):
        main(Common(), _config(source="local", local={"root": str(tmp_path / "photos")}, max_bytes=20))
    found = r"too_large \(3 rows\), e\.g\. \d+ bytes is over 20; not_image \(2 rows\), e\.g\. Unidentified"
    assert re.search(rf"no row succeeded; the most common failures: {found}", caplog.text)


def test_out_naming_the_photos_folder_deletes_nothing(tmp_path: Path) -> None:
    """fetch.out = fetch.local.root would have replaced the user's photos by the fetch output."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "me.jpg").write_bytes(_image("JPEG"))
    with pytest.raises(StageError, match="holds no manifest.parquet, so it is not an earlier output"):
        main(Common(), _config(source="local", out=str(photos), local={"root": str(photos)}))
    assert [p.name for p in photos.iterdir()] == ["me.jpg"]
    main(Common(), _config(source="local", local={"root": str(photos)}))  # into out/: new
    main(Common(), _config(source="local", local={"root": str(photos)}))  # an earlier output: replaced
    assert (Path("out") / "manifest.parquet").is_file()


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    yield f"http://{host}:{port}"
    moto.stop()


def test_s3_prefix(s3_endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="faces")
    objects = {
        "raw/a.jpg": JPEG,
        "raw/UP.JPG": PNG,  # an ending in capitals (a camera's) is an image ending too
        "raw/deep/b.png": PNG,
        "raw/fake.jpg": b"plain text",
        "raw/big.jpg": BODIES["/huge.bin"],
        "raw/readme.txt": b"skipped",
        "raw/sub/": b"",  # a "folder" as the S3 console creates one
        "other/c.jpg": JPEG,
    }
    for key, body in objects.items():
        client.put_object(Bucket="faces", Key=key, Body=body)
    section = {"bucket": "faces", "prefix": "raw/", "endpoint_url": s3_endpoint, "region": "us-east-1"}
    main(Common(), _config(source="s3", s3=section))
    manifest = pd.read_parquet("out/manifest.parquet").set_index("key")
    assert manifest["status"].to_dict() == {
        "raw/UP.JPG": "success",
        "raw/a.jpg": "success",
        "raw/big.jpg": "too_large",
        "raw/deep/b.png": "success",
        "raw/fake.jpg": "not_image",
    }
    assert Path("out", manifest.loc["raw/a.jpg", "path"]).read_bytes() == JPEG
    assert (manifest["source"] == "s3").all()
    everything = s3.list_rows(client, s3.S3Config(bucket="faces", prefix="raw/", extensions=[]))
    assert everything["key"].tolist() == ["raw/UP.JPG", "raw/a.jpg", "raw/big.jpg", "raw/deep/b.png",
                                          "raw/fake.jpg", "raw/readme.txt"]  # no folder marker, every ending
    assert len(s3.list_rows(client, s3.S3Config(bucket="faces", prefix="raw/", max_objects=2))) == 2
    with pytest.raises(StageError, match=r"s3 source lists no rows: nothing in s3://faces/none/ \(keys"):
        main(Common(), _config(source="s3", s3=section | {"prefix": "none/"}))


def test_an_s3_object_replaced_after_listing_is_not_stored_under_its_listed_etag(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """The row keeps the listed ETag, but the bytes came from whatever the key held at download time: a
    replaced object was stored as a success under the old ETag, and a later run reused those bytes
    wherever the key held that ETag again (the original put back). The download's ETag must be the
    listing's; the next run lists the new object and fetches it."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="replaced")
    client.put_object(Bucket="replaced", Key="raw/a.jpg", Body=JPEG)
    section = {"bucket": "replaced", "prefix": "raw/", "endpoint_url": s3_endpoint, "region": "us-east-1"}
    cfg = _config(source="s3", s3=section)
    source = remote_source(cfg)
    client.put_object(Bucket="replaced", Key="raw/a.jpg", Body=PNG)  # between the listing and the download
    staging = tmp_path / "staging"
    staging.mkdir()  # a bucket of its own: moto's objects outlive a test's server
    [record] = fetch_records(source, tmp_path / "out", tmp_path / "journal", staging, limits(cfg))
    assert record.status == "error" and "changed after it was listed" in str(record.error)
    main(Common(), cfg)
    row = pd.read_parquet("out/manifest.parquet").iloc[0]
    assert row["status"] == "success" and Path("out", row["path"]).read_bytes() == PNG
    assert row["etag"] == client.head_object(Bucket="replaced", Key="raw/a.jpg")["ETag"]


def test_s3_without_access_ends_the_stage_with_exit_4(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials, or a bucket the store does not have, failed as a 5xx does (exit 1), so the flow
    retried fetch twice, 30 s apart, to fail the same way; exit 4 names what is missing instead."""
    section = {"bucket": "nobody", "endpoint_url": s3_endpoint, "region": "us-east-1"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": {"source": "s3", "s3": section}}))
    done = subprocess.run([sys.executable, "-m", "mcf.cli", "fetch"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 4, done.stderr[-2000:]
    assert re.fullmatch(r"mcf fetch: fetch\.s3: cannot list s3://nobody/: .*\(NoSuchBucket\).*\n",
                        done.stderr)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "BOTO_CONFIG"):  # not the user's own
        monkeypatch.setenv(key, str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.boto, ~/.aws
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never 169.254.169.254, the instance role's
    for key in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(AccessError, match=r"Unable to locate credentials \(boto3 reads AWS_ACCESS_KEY_ID"):
        main(Common(), _config(source="s3", s3=section | {"bucket": "faces"}))
    assert not Path("out").exists()


def test_verbose_logs_keep_s3_credentials_out(s3_endpoint: str, tmp_path: Path) -> None:
    """`mcf -v` turned every library's DEBUG on: botocore's shows each request's headers, the access key
    id in its Authorization and the session token. -v is mcf's own debug log now."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="faces")
    client.put_object(Bucket="faces", Key="raw/a.jpg", Body=JPEG)
    section = {"bucket": "faces", "prefix": "raw/", "endpoint_url": s3_endpoint, "region": "us-east-1"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"fetch": {"source": "s3", "s3": section}}))
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAVERBOSE0TEST0KEY", "AWS_SECRET_ACCESS_KEY": "verbose-secret",
               "AWS_SESSION_TOKEN": "verbose-session-token"}
    done = subprocess.run([sys.executable, "-m", "mcf.cli", "-v", "fetch"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **secrets})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO mcf" in done.stderr and "DEBUG botocore" not in done.stderr
    assert "Found credentials" not in done.stderr  # botocore's INFO line about where they came from
    assert not [v for v in secrets.values() if v in done.stderr + done.stdout]


class Throttling(BaseHTTPRequestHandler):
    """An S3-compatible endpoint that answers every request 429 Too Many Requests (GCS's XML API, R2)."""

    requests = 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests += 1
        body = b"<Error><Code>TooManyRequests</Code><Message>slow down</Message></Error>"
        self.send_response(429)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_s3_throttling_is_retried(tmp_path: Path) -> None:
    """fetch.retries covers HTTP 429 for every source: an S3 store's throttling was given up at once."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        section = {"bucket": "faces", "endpoint_url": f"http://127.0.0.1:{httpd.server_address[1]}"}
        cfg = _config(source="s3", s3=section, retries=2)
        rows = pd.DataFrame([{"sample_id": "a.jpg", "caption": "", "key": "a.jpg", "etag": "e", "size": 10}])
        source = s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries, rows)
        (record,) = fetch_records(source, tmp_path / "old", tmp_path / "part", tmp_path / "new", limits(cfg))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (record.status, record.error) == ("http_error", "HTTP 429 TooManyRequests")
    assert Throttling.requests == 3


class SlowDown(BaseHTTPRequestHandler):
    """An S3 endpoint that answers its first ``fail`` requests 503 SlowDown (S3's own transient throttling,
    which botocore retries by itself), then a listing of one object (``"e"``, 10 bytes), also as any
    object's body, with the ETag unquoted as some S3-compatible stores send it."""

    requests, fail = 0, 0

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests += 1
        if type(self).requests <= type(self).fail:
            status, body = 503, b"<Error><Code>SlowDown</Code><Message>Slow down</Message></Error>"
        else:
            status, body = 200, (
                b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>faces</Name><Prefix></Prefix>'
                b"<KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated><Contents>"
                b'<Key>a.jpg</Key><ETag>"e"</ETag><Size>10</Size></Contents></ListBucketResult>'
            )
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if status == 200:
            self.send_header("ETag", "e")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def slow_down() -> Iterator[str]:
    SlowDown.requests, SlowDown.fail = 0, 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowDown)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_s3_listing_takes_fetch_retries(slow_down: str) -> None:
    """The listing, which no loop of ours retries, is retried fetch.retries times: botocore's
    ``max_attempts: 1`` (retries after the first try, not tries) gave it one retry whatever the params."""
    SlowDown.fail = 2
    cfg = _config(source="s3", s3={"bucket": "faces", "endpoint_url": slow_down}, retries=2)
    source = s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries)
    assert source.rows[["key", "size"]].to_dict("records") == [{"key": "a.jpg", "size": 10}]
    assert SlowDown.requests == 3


def test_s3_download_is_tried_once_per_fetch_retry(slow_down: str, tmp_path: Path) -> None:
    """A download is retried by our loop only: botocore's own retry doubled each try, so fetch.retries: 0
    still fetched a 503-ing object twice."""
    SlowDown.fail = 10
    cfg = _config(source="s3", s3={"bucket": "faces", "endpoint_url": slow_down}, retries=0)
    rows = pd.DataFrame([{"sample_id": "a.jpg", "caption": "", "key": "a.jpg", "etag": "e", "size": 10}])
    source = s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries, rows)
    (record,) = fetch_records(source, tmp_path / "old", tmp_path / "part", tmp_path / "new", limits(cfg))
    assert (record.status, record.error) == ("http_error", "HTTP 503 SlowDown")
    assert SlowDown.requests == 1


def test_an_s3_listing_that_fails_ends_the_stage_naming_the_prefix(slow_down: str) -> None:
    """A listing error is one line naming where fetch looked, not botocore's traceback; fetch.retries
    reaches the listing's client through the stage (threads is the argument beside it)."""
    SlowDown.fail = 1
    cfg = _config(source="s3", s3={"bucket": "faces", "prefix": "raw/", "endpoint_url": slow_down}, retries=0)
    with pytest.raises(StageError, match=r"^fetch\.s3: cannot list s3://faces/raw/: .*\(SlowDown\)") as err:
        main(Common(), cfg)
    assert SlowDown.requests == 1 and not Path("out").exists()
    assert err.value.exit_code == 1  # a 5xx may pass on a rerun: the flow retries it


def test_s3_downloads_obey_the_listed_size_and_retry_a_5xx(slow_down: str, tmp_path: Path) -> None:
    """An object listed over max_bytes is too_large without a request, one of max_bytes exactly is
    fetched; a 503 is retried (here the retry's body, not an image, is not_image); an ETag listed with
    quotes matches the same one sent without them (a replaced object's would not)."""
    SlowDown.fail = 1
    cfg = _config(source="s3", s3={"bucket": "faces", "endpoint_url": slow_down}, retries=1, threads=1)
    rows = pd.DataFrame([{"sample_id": k, "caption": "", "key": k, "etag": '"e"', "size": n}
                         for k, n in (("over.jpg", MAX_BYTES + 1), ("at.jpg", MAX_BYTES))])
    source = s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries, rows)
    over, at = fetch_records(source, tmp_path / "old", tmp_path / "part", tmp_path / "new", limits(cfg))
    assert (over.status, over.error) == ("too_large", f"{MAX_BYTES + 1} bytes is over {MAX_BYTES}")
    assert at.status == "not_image" and SlowDown.requests == 2


def test_an_s3_store_that_refuses_connections_gives_connection_error_rows(tmp_path: Path) -> None:
    """A refused connect is a transfer failure of its own status, as laion-face's are, not an ``error``."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = _config(source="s3", s3={"bucket": "faces", "endpoint_url": endpoint}, retries=0)
    rows = pd.DataFrame([{"sample_id": "a.jpg", "caption": "", "key": "a.jpg", "etag": "e", "size": 10}])
    source = s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries, rows)
    (record,) = fetch_records(source, tmp_path / "old", tmp_path / "part", tmp_path / "new", limits(cfg))
    assert record.status == "connection_error"
    assert record.error == f'Could not connect to the endpoint URL: "{endpoint}/faces/a.jpg"'


class Dripping(BaseHTTPRequestHandler):
    """An S3 endpoint whose objects arrive 64 bytes every 0.1 s: each read is in time, the whole takes 6 s;
    ``late.jpg`` sends its first bytes 2 s after its headers."""

    protocol_version = "HTTP/1.1"  # kept alive, as S3 does

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(60 * 64))
        self.end_headers()
        try:
            if self.path.endswith("/late.jpg"):
                time.sleep(2.0)
            for _ in range(60):
                self.wfile.write(b"\xff" * 64)
                self.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.mark.parametrize("key", ["a.jpg", "late.jpg"])
def test_s3_total_timeout_holds_while_the_body_drips(tmp_path: Path, key: str) -> None:
    """The read timeout restarts with every byte: a store trickling an object held a worker for as long as
    it liked, where laion-face's downloads end at their total_timeout. A body cut before its first byte
    (``late.jpg``) ends in botocore's IncompleteReadError, not in a chunk: a timeout too, not a
    connection_error."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Dripping)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        section = {"bucket": "faces", "endpoint_url": f"http://127.0.0.1:{httpd.server_address[1]}",
                   "timeout": 3.0, "total_timeout": 1.0}  # the read timeout outlasts late.jpg's 2 s wait
        cfg = _config(source="s3", s3=section, retries=0)
        row = {"sample_id": key, "caption": "", "key": key, "etag": "e", "size": 60 * 64}
        source = s3.source(cfg.s3, cfg.max_bytes, 1, cfg.retries, pd.DataFrame([row]))
        start = time.monotonic()
        (record,) = fetch_records(source, tmp_path / "old", tmp_path / "part", tmp_path / "new", limits(cfg))
        took = time.monotonic() - start
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (record.status, record.error) == ("timeout", "total time per image exceeded")
    assert took < 2.5  # about 1 s, not the 6 s drip (8 s for late.jpg)


def test_synthetic_source_end_to_end() -> None:
    tiny = {
        "n_scenes": 4,
        "scene_size": 96,
        "n_identities": 3,
        "aflw": {"n_train": 2, "n_test": 2, "image_size": 64},
        "lapa": {"n_train": 2, "n_val": 1, "n_test": 1, "image_size": 64},
    }
    main(Common(seed=3), _config(synthetic=tiny))
    manifest = pd.read_parquet("out/manifest.parquet")
    assert len(manifest) == 4 and (manifest["status"] == "success").all()
    assert all(
        file_sha256(Path("out", p)) == h for p, h in zip(manifest["path"], manifest["sha256"], strict=True)
    )
    detections = pd.read_parquet("out/detections.parquet")
    assert set(detections["sample_id"]) == set(manifest["sample_id"])
    assert Path("out/aflw19/AFLWinfo_release.mat").is_file()
    assert len(list(Path("out/lapa/LaPa/test/images").glob("*.jpg"))) == 1


def test_an_unforeseen_source_error_reaches_the_debug_log_redacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The row keeps a redacted error (Record); the debug log's traceback must not quote the signature."""
    signed = "https://user:pw@bucket.example/a.jpg?X-Amz-Signature=s3cr3t"

    def fetch(row: dict[str, Any]) -> bytes:
        raise RuntimeError(f"surprise on {signed}")

    rows = pd.DataFrame({"sample_id": ["a"], "url": [signed]})
    source = Source("test", rows, fetch, ("url",), "a test")
    limits = Limits(threads=1, retries=0, max_bytes=1 << 20, max_pixels=1 << 20)
    with caplog.at_level("DEBUG", logger="mcf.data.sources.download"):
        (record,) = fetch_records(source, tmp_path / "old", tmp_path / "journal", tmp_path / "new", limits)
    assert record.status == "error" and "s3cr3t" not in record.error
    assert record.error == "RuntimeError: surprise on https://<redacted>@bucket.example/a.jpg?<redacted>"
    assert "unexpected error on a" in caplog.text and "RuntimeError: surprise on" in caplog.text
    assert "s3cr3t" not in caplog.text and "pw@" not in caplog.text


def test_detections_without_a_fetched_face_keep_the_documented_types(server: str, tmp_path: Path) -> None:
    """No fetched image in the released detections: the table is empty, its columns still typed as
    docs/CONTRACTS.md says (pandas would write an empty object column as Arrow's `null`)."""
    parquet = _laion_parquet(tmp_path / "part.parquet", [server + "/good.jpg"])
    (tmp_path / "det.json").write_text(json.dumps({"999": [[[1, 2, 30, 28], [[5, 6]] * 5, 0.99]]}))
    main(Common(), _laion_config(parquet, detections=[str(tmp_path / "det.json")]))
    schema = pq.read_schema("out/detections.parquet")
    assert pq.read_table("out/detections.parquet").num_rows == 0
    assert {name: str(schema.field(name).type) for name in schema.names} == {
        "sample_id": "string", "face": "int64", "box": "list<element: double>",
        "landmarks": "list<element: double>", "score": "double",
    }


@pytest.mark.parametrize("killed_resolved", [False, True], ids=["mcf-fetch-then-dask", "dask-then-mcf-fetch"])
def test_a_killed_run_into_a_linked_out_resumes_under_either_runner(
    tmp_path: Path, killed_resolved: bool
) -> None:
    """``out -> scratch/out``: `mcf fetch` kept its journal beside the link, fetch_dask (which resolves
    ``out``) beside the folder it names, so a run killed under one and resumed under the other fetched
    everything again and left the first journal forever. Both keep it where atomic_dir writes."""
    root = tmp_path / "photos"
    for i in range(3):
        _write(root / f"{i}.png", _image("PNG", (10 + i, 10)))
    (tmp_path / "scratch" / "out").mkdir(parents=True)
    Path("out").symlink_to(tmp_path / "scratch" / "out", target_is_directory=True)
    killed, resumed = Path("out"), Path("out").resolve()  # as `mcf fetch` and as fetch_dask name it
    if killed_resolved:
        killed, resumed = resumed, killed
    cfg = _config(source="local", local={"root": str(root)})
    fetch_records(remote_source(cfg), killed, journal_dir(killed), tmp_path / "staged", limits(cfg))  # killed
    assert (tmp_path / "scratch" / ".out.partial" / "journal.jsonl").is_file()  # the name docs give
    for path in root.iterdir():  # unreadable now, same size and mtime: only a reused row succeeds
        stat = path.stat()
        path.write_bytes(b"x" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    main(Common(), dataclasses.replace(cfg, out=str(resumed)))
    assert set(pd.read_parquet("out/manifest.parquet")["status"]) == {"success"}
    assert Path("out").is_symlink()
    left = [p for folder in (tmp_path, tmp_path / "scratch") for p in folder.glob(".out*")]
    assert left == []  # neither runner's journal, nor a staging folder


FETCH_BAR = """
import sys
from pathlib import Path
import pandas as pd
from mcf.data.sources import download
from mcf.data.sources.image import FetchFailure

class Recorded(download.tqdm):
    def close(self):
        print("mininterval", self.mininterval)
        super().close()


def fetch(row):
    raise FetchFailure("failed_to_download", "404")

download.tqdm = Recorded
rows = pd.DataFrame({"sample_id": ["a"], "url": ["u/a"]})
source = download.Source("test", rows, fetch, ("url",), "a test")
limits = download.Limits(threads=1, retries=0, max_bytes=1 << 20, max_pixels=1 << 20)
root = Path(sys.argv[1])
download.fetch_records(source, root / "old", root / "journal", root / "new", limits)
"""


def test_the_fetch_bar_takes_its_refresh_interval_from_the_environment(tmp_path: Path) -> None:
    """The Prefect flow sets TQDM_MININTERVAL=30 so that a bar is a log line every 30 s: fetch's bar, the
    longest at paper scale (hours of downloads), set its own 1 s and wrote a line a second there. tqdm
    reads its environment on import, hence a process of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "TQDM_MININTERVAL")}
    for setting, expected in ((None, "1.0"), ("30", "30.0")):
        if setting is not None:
            env["TQDM_MININTERVAL"] = setting
        done = subprocess.run([sys.executable, "-c", FETCH_BAR, str(tmp_path / str(setting))],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"mininterval {expected}" in done.stdout


def test_a_refresh_interval_tqdm_cannot_read_is_one_line_naming_it(tmp_path: Path) -> None:
    """README names TQDM_MININTERVAL; tqdm converts it on import and raises a bare "could not convert
    string to float" traceback, naming no variable, before fetch's own reading of it. `mcf` says which
    variable, exit 2 (a rerun fails the same way, so the flow does not retry it), before any work."""
    env = {**os.environ, "TQDM_MININTERVAL": "30s", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    done = subprocess.run([sys.executable, "-m", "mcf.cli", "fetch", "--params", str(params)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()  # every TQDM_* variable set is named (the tests set DISABLE)
    assert line.startswith("mcf: tqdm cannot read its environment (") and "TQDM_MININTERVAL='30s'" in line
    assert line.endswith("): could not convert string to float: '30s'")
    assert list(tmp_path.iterdir()) == []


def test_the_fetch_bench_downloads_every_row_over_http(capsys: pytest.CaptureFixture[str]) -> None:
    """`mcf bench fetch` runs the stage's laion-face path against its own server on 127.0.0.1."""
    argv = ["--images", "24", "--threads", "4", "--latency", "0", "--image-size", "64"]
    assert fetch_bench.bench_fetch(argv) == 0
    out = capsys.readouterr().out
    assert "24 of 24 images fetched" in out and "threads=4" in out and "0 s latency" in out
    assert "wait out the latency" not in out  # no bound on what threads hide at no latency (nor a / 0)
    assert "ms an image in the fetch process" in out and "20,000,000 images at this rate" in out


def test_the_fetch_bench_counts_only_the_rows_it_fetched(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Half the served payloads are not images, so the downloader rejects every other row: images/s and MB/s
    must count the fetched rows alone (row i was served payload i % 8), the 20M-image hours follow that
    rate, the server must wait out its latency on every request, and the failures make the bench exit 1.
    Rates over every row read twice what the stage fetched, and failed rows passed as a clean run."""
    good = fetch_bench.payloads(512)
    served = [body if i % 2 == 0 else b"not a jpeg" for i, body in enumerate(good)]
    monkeypatch.setattr(fetch_bench, "payloads", lambda size: served)
    assert fetch_bench.bench_fetch(["--images", "16", "--threads", "4", "--latency", "0.1"]) == 1  # 512 px
    out = capsys.readouterr().out
    found = re.search(r"(\d+) of 16 images fetched .* ([\d.]+) s = ([\d.]+) images/s, ([\d.]+) MB/s", out)
    assert found, out
    fetched, wall, rate, mb_s = int(found[1]), *map(float, found.groups()[1:])
    assert fetched == 8 and wall >= 16 / 4 * 0.1  # 4 rounds of 4 threads, each request 0.1 s late
    assert rate == pytest.approx(8 / wall, rel=0.03)  # the wall is printed to 10 ms
    # printed to 0.1 MB/s (0.05 off) and divided here by the wall as printed, to 10 ms (about 0.01 more)
    assert mb_s == pytest.approx(2 * sum(map(len, good[::2])) / 1e6 / wall, rel=0.03, abs=0.07)
    assert "wait out the latency at up to 40 images/s" in out and "fetch bench: failures {" in out
    hours = float(re.search(r"20,000,000 images at this rate: ([\d.]+) h", out)[1])
    assert hours == pytest.approx(20e6 / rate / 3600, rel=0.01)


@pytest.mark.parametrize(("flag", "value"), [("--images", "0"), ("--threads", "0"), ("--image-size", "0"),
                                           ("--latency", "-0.01")])
def test_the_fetch_bench_refuses_a_bad_setting_before_starting_its_server(
    flag: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bound at its edge is a usage error naming the flag, before the payloads are made and the server
    started: ``-1`` passed with a bound moved to 0, and exit 2 alone is argparse's for any bad command."""

    def payloads(size: int) -> list[bytes]:
        raise AssertionError("the bench went on to make its payloads")

    monkeypatch.setattr(fetch_bench, "payloads", payloads)
    with pytest.raises(SystemExit) as exit_:
        fetch_bench.bench_fetch([flag, value])
    assert exit_.value.code == 2 and f"{flag} must be" in capsys.readouterr().err


@pytest.mark.parametrize("latency", ["nan", "inf"])
def test_the_fetch_bench_refuses_a_latency_that_is_not_a_finite_number(
    latency: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--latency nan`` or ``inf`` passed ``< 0``: the server's sleep raised in every request thread, a
    traceback per image (thousands), and the bench ended in exit 1. A usage error, before the server."""
    with pytest.raises(SystemExit) as exit_:
        fetch_bench.bench_fetch(["--latency", latency])
    assert exit_.value.code == 2 and "--latency must be a finite number of seconds" in capsys.readouterr().err
