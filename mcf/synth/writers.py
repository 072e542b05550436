"""Write SynthFace sets in the real on-disk formats: LAION-Face-like scenes with detections, an
AFLW-19 ``AFLWinfo_release.mat`` tree and a LaPa tree (PROTOCOL.md §3-4).

Each image is rendered from ``default_rng([seed, kind, index])`` alone, so any image can be regenerated
by itself and the output does not depend on how the work is split. The renderer puts pixel centres at
integers (pixel (i, j) centred at x = j, y = i); the files follow the loaders' convention
(:mod:`mcf.data.transforms`: pixel j spans [j, j + 1)), so every coordinate written is shifted by
:data:`PIXEL_CENTRE`. "Left" means image-left. The synthetic AFLW and LaPa images cycle through the
identity pool (image i shows identity i mod n_identities); the name → identity map (and, for AFLW-19,
each image's split) is written to ``synthface_identities.csv`` beside each tree.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pandas as pd
import scipy.io
from tqdm import tqdm

from mcf.pools import cancelled_on_error, submit_in_order, worker_init, workers_ignore_ctrl_c
from mcf.synth.config import SynthConfig
from mcf.synth.identity import KIND_AFLW, KIND_CORPUS, KIND_LAPA, KIND_SPLIT, sample_identity
from mcf.synth.render import FaceSample, Scene, render_face, render_scene

log = logging.getLogger(__name__)
T = TypeVar("T")
IDENTITIES_CSV = "synthface_identities.csv"
PIXEL_CENTRE = 0.5  # renderer coordinates (centres at integers) + this = file coordinates
AFLW_FOLDERS = ("0", "2", "3")  # the real tree's data/flickr sub-folders
LAPA_SPLITS = ("train", "val", "test")
AFLW_MAT = "AFLWinfo_release.mat"
# a MAT v5 file opens with 116 bytes of free text (then subsystem offset, version, endianness)
MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, written by mcf.synth (SynthFace)".ljust(116)


def is_synthface(root: str | Path) -> bool:
    """Whether the AFLW-19 or LaPa data root ``root`` was written by SynthFace. Three marks say so (the
    identities table, the AFLW-19 file's header text, LaPa's ``synth_`` names), so a tree that lost its
    table still cannot pass for the real dataset."""
    root = Path(root)
    if (root / IDENTITIES_CSV).is_file():
        return True
    mat = root / AFLW_MAT
    if mat.is_file():
        with mat.open("rb") as f:
            if f.read(len(MAT_HEADER)) == MAT_HEADER:
                return True
    return any(next((root / "LaPa" / s / "images").glob("synth_*"), None) for s in LAPA_SPLITS)


def names_synthface(label: str) -> bool:
    """Whether a metric's dataset label says SynthFace: it must exactly when :func:`is_synthface`."""
    return "synthface" in label.lower()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return buf.tobytes()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


RENDER_CHUNK = 8  # images a worker renders per task


def _render_range(render: Callable[[int], T], start: int, stop: int) -> list[T]:
    """One task: consecutive images, so that results cross between processes a chunk at a time."""
    return [render(i) for i in range(start, stop)]


def _ordered(render: Callable[[int], T], n: int, workers: int, desc: str) -> Iterator[T]:
    """``render(i)`` for i in 0..n-1, in order, on ``workers`` processes (each image is independent).

    A ProcessPoolExecutor, not a multiprocessing.Pool: a Pool replaces a worker killed outright (the
    out-of-memory killer) and waits for its lost task for ever, where the executor breaks, which
    :func:`cancelled_on_error` turns into the stage's one-line error.
    """
    bar = functools.partial(tqdm, total=n, desc=desc, unit="img")
    if workers == 1 or n < 2:
        yield from bar(map(render, range(n)))
        return
    fork = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=fork, initializer=worker_init)
    calls = ((_render_range, render, i, min(i + RENDER_CHUNK, n)) for i in range(0, n, RENDER_CHUNK))
    with cancelled_on_error(pool, desc):
        chunks = submit_in_order(pool.submit, calls, 2 * workers)
        with workers_ignore_ctrl_c():  # the first submit starts the workers; a Ctrl-C meanwhile waits
            first = next(chunks)
        yield from bar(image for chunk in itertools.chain([first], chunks) for image in chunk)


def _render_scene(cfg: SynthConfig, seed: int, i: int) -> tuple[bytes, Scene]:
    rng = np.random.default_rng([seed, KIND_CORPUS, i])
    ids = rng.integers(0, cfg.n_identities, int(rng.integers(1, cfg.max_faces + 1)))
    scene = render_scene(cfg, rng, [sample_identity(seed, int(j)) for j in ids], cfg.scene_size)
    return _jpeg(scene.image, scene.jpeg_quality), scene


def write_corpus(cfg: SynthConfig, seed: int, out_dir: Path,
                 image_subdir: str = "images") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render the pre-training scenes to ``out_dir/<image_subdir>/<sample_id>.jpg``.

    Returns ``(manifest, detections)``: manifest columns ``sample_id, path`` (relative to ``out_dir``),
    ``status`` ("success"), ``error`` (None), ``sha256, width, height, caption, source`` ("synthetic"),
    ``identities`` (list of ints, one per face, in detection ``face`` order); detections columns
    ``sample_id, face, box`` ([x1, y1, x2, y2]), ``landmarks`` (10 floats: left eye, right eye, nose tip,
    left and right mouth corner, x then y each), ``score`` (1.0: exact ground truth).
    """
    out_dir = Path(out_dir)
    rows, dets = [], []
    render = functools.partial(_render_scene, cfg, seed)
    for i, (data, scene) in enumerate(_ordered(render, cfg.n_scenes, cfg.workers, "synth corpus")):
        sample_id = f"synth-{i:07d}"
        rel = f"{image_subdir}/{sample_id}.jpg"
        _write(out_dir / rel, data)
        rows.append({
            "sample_id": sample_id, "path": rel, "status": "success", "error": None,
            "sha256": hashlib.sha256(data).hexdigest(), "width": cfg.scene_size, "height": cfg.scene_size,
            "caption": scene.caption, "source": "synthetic", "identities": list(scene.identities),
        })
        for f, (box, lm5) in enumerate(zip(scene.boxes, scene.landmarks5, strict=True)):
            dets.append({"sample_id": sample_id, "face": f, "box": [float(v) + PIXEL_CENTRE for v in box],
                         "landmarks": [float(v) + PIXEL_CENTRE for v in lm5.reshape(-1)], "score": 1.0})
    log.info("synthetic corpus: %d scenes, %d faces in %s", len(rows), len(dets), out_dir)
    return pd.DataFrame(rows), pd.DataFrame(dets, columns=["sample_id", "face", "box", "landmarks", "score"])


def _render_face(cfg: SynthConfig, seed: int, kind: int, size: int, i: int) -> FaceSample:
    rng = np.random.default_rng([seed, kind, i])
    return render_face(cfg, rng, sample_identity(seed, i % cfg.n_identities), size)


def _faces(cfg: SynthConfig, seed: int, kind: int, n: int, size: int,
           desc: str) -> Iterator[tuple[int, FaceSample]]:
    """Yield ``(index, FaceSample)`` for the ``n`` images of one set."""
    render = functools.partial(_render_face, cfg, seed, kind, size)
    yield from enumerate(_ordered(render, n, cfg.workers, desc))


def write_aflw19(cfg: SynthConfig, seed: int, out_dir: Path) -> None:
    """Write ``out_dir/AFLWinfo_release.mat`` and the images at ``out_dir/data/flickr/<nameList entry>``.

    The .mat holds the real file's five fields: ``bbox`` N×4 (left, right, top, bottom), ``data`` N×38
    (19 x, then 19 y), ``mask_new`` N×19 (1 visible), ``nameList`` N×1 cell of relative paths, ``ra``
    1×N 1-based permutation. The first ``aflw.n_train`` entries of ``ra`` are the training rows, the
    rest the test rows (the real file's split at 20000, scaled).
    """
    out_dir, a = Path(out_dir), cfg.aflw
    n = a.n_train + a.n_test
    bbox, data, mask = np.zeros((n, 4)), np.zeros((n, 38)), np.zeros((n, 19))
    names = np.empty((n, 1), dtype=object)
    ids = []
    for i, s in _faces(cfg, seed, KIND_AFLW, n, a.image_size, "synth AFLW-19"):
        name = f"{AFLW_FOLDERS[i % len(AFLW_FOLDERS)]}/image{i:05d}.jpg"
        _write(out_dir / "data" / "flickr" / name, _jpeg(s.image, s.jpeg_quality))
        bbox[i] = s.box[[0, 2, 1, 3]] + PIXEL_CENTRE
        data[i] = np.concatenate([s.landmarks19[:, 0], s.landmarks19[:, 1]]) + PIXEL_CENTRE
        mask[i] = s.visible19
        names[i, 0] = name
        ids.append((name, s.identity))
    ra = np.random.default_rng([seed, KIND_SPLIT, KIND_AFLW]).permutation(n) + 1
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"bbox": bbox, "data": data, "mask_new": mask, "nameList": names,
                           "ra": ra[None, :].astype(np.float64)})
    # savemat stamps the creation time into the header text; a fixed text keeps the file (and DVC's
    # hash of fetch's output) identical from run to run
    (out_dir / AFLW_MAT).write_bytes(MAT_HEADER + buf.getvalue()[len(MAT_HEADER):])
    train = set(ra[: a.n_train] - 1)
    split = ["train" if i in train else "test" for i in range(n)]
    pd.DataFrame(ids, columns=["name", "identity"]).assign(split=split).to_csv(
        out_dir / IDENTITIES_CSV, index=False)
    log.info("synthetic AFLW-19: %d images (%d train) in %s", n, a.n_train, out_dir)


def _lapa_files(root: Path, split: str, stem: str, s: FaceSample) -> None:
    _write(root / split / "images" / f"{stem}.jpg", _jpeg(s.image, s.jpeg_quality))
    ok, png = cv2.imencode(".png", s.labels)
    if not ok:
        raise ValueError(f"PNG encoding failed for labels of shape {s.labels.shape}")
    _write(root / split / "labels" / f"{stem}.png", png.tobytes())
    lines = ["106", *(f"{x:.3f} {y:.3f}" for x, y in s.landmarks106 + PIXEL_CENTRE)]
    _write(root / split / "landmarks" / f"{stem}.txt", ("\n".join(lines) + "\n").encode())


def write_lapa(cfg: SynthConfig, seed: int, out_dir: Path) -> None:
    """Write ``out_dir/LaPa/{train,val,test}/{images/<stem>.jpg, labels/<stem>.png, landmarks/<stem>.txt}``.

    Labels are single-channel uint8 PNGs with the 11 LaPa classes (occluders are background, 0);
    landmark files hold "106" then 106 "x y" lines (layout in ``mcf.synth.geometry``).
    """
    out_dir, c = Path(out_dir), cfg.lapa
    counts = {"train": c.n_train, "val": c.n_val, "test": c.n_test}
    bounds = np.cumsum([0, *counts.values()])
    ids = []
    for i, s in _faces(cfg, seed, KIND_LAPA, int(bounds[-1]), c.image_size, "synth LaPa"):
        split = LAPA_SPLITS[int(np.searchsorted(bounds, i, side="right")) - 1]
        stem = f"synth_{i:06d}"
        _lapa_files(out_dir / "LaPa", split, stem, s)
        ids.append((f"{split}/{stem}", s.identity))
    pd.DataFrame(ids, columns=["name", "identity"]).to_csv(out_dir / IDENTITIES_CSV, index=False)
    log.info("synthetic LaPa: %s images in %s", counts, out_dir / "LaPa")
