"""``mcf bench fetch``: download throughput of the laion-face path, from an HTTP server on 127.0.0.1.

The paper fetches about 20M LAION-Face images. What one fetch process reaches is set by two things: how
long each host takes to answer (threads hide it) and the CPU the process spends on every image (the
connection, the byte and time bounds, the header inspection, the file and its journal line), which
threads cannot hide. The bench times the stage's own code (:func:`mcf.data.fetch.fetch_remote`: the
parquet part read, :class:`~mcf.data.sources.laion.HttpFetcher`, :func:`~mcf.data.sources.download.download`)
against a server in another process that answers each request after ``--latency`` seconds, on a new
connection each time as thousands of hosts do, and prints images/s and the fetch process's CPU time per
image, which bounds its rate whatever the thread count.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from mcf.cli import describe
from mcf.data.fetch import FetchConfig, fetch_remote
from mcf.data.sources.laion import LaionFaceConfig
from mcf.pools import exit_with_parent

PAPER_IMAGES = 20_000_000  # LAION-Face images the paper pre-trains on (docs/PROTOCOL.md)
PAYLOADS = 8  # distinct JPEGs served in turn: the downloader hashes and stores each response anyway


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # every thread's connection waits in the backlog, none is refused

    def __init__(self, latency: float, payloads: list[bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.latency, self.payloads = latency, payloads


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one connection per image: LAION's URLs are on different hosts
    server: _Server

    def do_GET(self) -> None:
        time.sleep(self.server.latency)
        index = int("".join(c for c in self.path if c.isdigit()) or 0)
        body = self.server.payloads[index % len(self.server.payloads)]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet: the bench prints its own lines
        pass


def _serve(latency: float, payloads: list[bytes], conn: Connection) -> None:
    """The server process: sends its port, then serves until terminated, or until the bench dies."""
    exit_with_parent()
    with _Server(latency, payloads) as server:
        conn.send(server.server_address[1])
        server.serve_forever()


def payloads(size: int, seed: int = 0) -> list[bytes]:
    """:data:`PAYLOADS` JPEGs of ``size`` px, smooth random colour fields (about a photo's bytes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(PAYLOADS):
        coarse = rng.integers(0, 256, (max(size // 32, 2), max(size // 32, 2), 3), dtype=np.uint8)
        field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        noisy = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_fetch(argv: list[str]) -> int:
    """Fetch ``--images`` JPEGs listed in a LAION-Face metadata part from a local server with
    ``--latency``, on ``--threads`` threads; print images/s, MB/s and CPU time per image."""
    p = argparse.ArgumentParser(prog="mcf bench fetch", description=describe(__doc__))
    p.add_argument("--images", type=int, default=2000, help="rows to fetch (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=512, help="served JPEGs' side (default: %(default)s)")
    p.add_argument("--threads", type=int, default=16,
                   help="fetch.threads (default: %(default)s)")
    p.add_argument("--latency", type=float, default=0.2,
                   help="seconds the server waits before each answer (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("images", "image_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.latency < math.inf:  # nan or inf: the server's sleep raises in every request
        p.error(f"--latency must be a finite number of seconds, at least 0, got {args.latency}")

    served = payloads(args.image_size)
    spawn = multiprocessing.get_context("spawn")  # no thread or lock of this process goes with it
    ours, theirs = spawn.Pipe()
    server = spawn.Process(target=_serve, args=(args.latency, served, theirs), daemon=True)
    server.start()
    try:
        if not ours.poll(60):
            raise RuntimeError("the bench's HTTP server did not start within 60 s")
        port = ours.recv()
        with tempfile.TemporaryDirectory(prefix="mcf-bench-fetch-") as tmp:
            root = Path(tmp)
            (root / "data").mkdir()
            part = root / "data" / "part-00000.parquet"
            pd.DataFrame({
                "SAMPLE_ID": np.arange(args.images, dtype=np.int64),
                "URL": [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(args.images)],
                "TEXT": "a face",
            }).to_parquet(part)
            cfg = FetchConfig(source="laion-face", data=str(root / "data"), out=str(root / "out"),
                              threads=args.threads, laion_face=LaionFaceConfig(parquet=[str(part)]))
            (root / "staging").mkdir()
            wall, cpu = time.perf_counter(), time.process_time()
            manifest, _ = fetch_remote(cfg, Path(cfg.out), root / "staging")
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        server.terminate()
        server.join()
    ok = manifest["status"] == "success"
    mb = sum(len(served[i % PAYLOADS]) for i in np.flatnonzero(ok)) / 1e6  # row i was served payload i % 8
    rate = ok.sum() / wall
    print(f"fetch bench: {int(ok.sum())} of {args.images} images fetched "
          f"({sum(map(len, served)) / len(served) / 1e3:.0f} KB JPEGs, {args.image_size} px) from 127.0.0.1 "
          f"with {args.latency:g} s latency, threads={args.threads}: {wall:.2f} s = {rate:.1f} images/s, "
          f"{mb / wall:.1f} MB/s")
    hidden = f"; its threads wait out the latency at up to {args.threads / args.latency:.0f} images/s" \
        if args.latency > 0 else ""
    print(f"fetch bench: CPU {1e3 * cpu / args.images:.2f} ms an image in the fetch process "
          f"({cpu / wall:.2f} cores busy){hidden}")
    if rate > 0:
        print(f"fetch bench: {PAPER_IMAGES:,} images at this rate: {PAPER_IMAGES / rate / 3600:.1f} h")
    failed = manifest.loc[~ok, "status"].value_counts().to_dict()
    if failed:
        print(f"fetch bench: failures {failed}")
        return 1
    return 0
