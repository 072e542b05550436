"""``mcf bench synth``: SynthFace rendering throughput on one core (render + JPEG encode)."""

from __future__ import annotations

import argparse
import logging
import time

import cv2
import numpy as np

from mcf.cli import describe
from mcf.synth.config import SynthConfig
from mcf.synth.identity import KIND_AFLW, sample_identity
from mcf.synth.render import render_face

log = logging.getLogger(__name__)


def bench_synth(argv: list[str]) -> int:
    """Render ``--n`` faces of ``--size`` px with OpenCV on one thread and log images per second."""
    p = argparse.ArgumentParser(prog="mcf bench synth", description=describe(__doc__))
    p.add_argument("--n", type=int, default=500, help="images to render (default: %(default)s)")
    p.add_argument("--size", type=int, default=160, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="SynthFace seed (default: %(default)s)")
    args = p.parse_args(argv)
    if args.n < 1 or args.size < 32 or args.seed < 0:  # numpy's seed sequences take no negative seed
        p.error(f"need --n >= 1, --size >= 32 and --seed >= 0, got --n {args.n} --size {args.size} "
                f"--seed {args.seed}")
    cv2.setNumThreads(1)
    cfg = SynthConfig()
    wall, cpu = time.perf_counter(), time.process_time()
    n_bytes = 0
    for i in range(args.n):
        rng = np.random.default_rng([args.seed, KIND_AFLW, i])
        s = render_face(cfg, rng, sample_identity(args.seed, i % cfg.n_identities), args.size)
        ok, buf = cv2.imencode(".jpg", s.image, [cv2.IMWRITE_JPEG_QUALITY, s.jpeg_quality])
        if not ok:
            raise ValueError(f"JPEG encoding failed for image {i}")
        n_bytes += len(buf)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    log.info("synth: %d images of %d px in %.2f s wall (%.2f s CPU): %.0f images/s wall, %.0f images/s "
             "per CPU-second, %.1f KiB/image", args.n, args.size, wall, cpu, args.n / wall, args.n / cpu,
             n_bytes / args.n / 1024)
    return 0
