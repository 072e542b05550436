"""params.paper.yaml's code paths end to end, in miniature: every stage through ``python -m mcf.cli``.

SynthFace stands in for the user-supplied data/: its scenes are served over HTTP on 127.0.0.1 and listed
in LAION-Face metadata parts with released-format ``sample2detect_<part>.pth`` detections, its AFLW-19
and LaPa trees lie where the paper profile reads them (padded to non-square photos, some grey, as the
real sets' are), and a random tiny ViT is saved as a MoCo v3 checkpoint. The params are the paper file's
with sizes, counts and the number of parts changed only (:func:`miniature`, pinned by
:func:`test_the_miniature_changes_sizes_only`): source, detector, teacher source, objective, schedules,
splits and torchrun stay as the paper runs them. The one other change is evaluate's labels: the trees
are SynthFace, and evaluate refuses to file SynthFace numbers as AFLW-19 or LaPa (check_label), so they
say SynthFace, as the code intends.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mcf.models.backbone import BackboneConfig, create_backbone
from mcf.synth.config import AflwSynthConfig, LapaSynthConfig, SynthConfig
from mcf.synth.writers import write_aflw19, write_corpus, write_lapa

pytestmark = pytest.mark.slow
PAPER = Path(__file__).resolve().parents[1] / "params.paper.yaml"
PARTS = 2  # the paper's first two parts (0 and 2)
PER_PART = 16
# the tests' tiny ViT, 12 blocks deep so that the paper's feature_layers and fine-tune blocks exist
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 12, "num_heads": 2}
# Scenes of 512 px with one face: about half of the faces pass the paper's 128 px minimum as they are.
SYNTH = SynthConfig(n_scenes=PARTS * PER_PART, scene_size=512, max_faces=1, n_identities=20, workers=1,
                    aflw=AflwSynthConfig(n_train=24, n_test=8, image_size=96),
                    lapa=LapaSynthConfig(n_train=16, n_val=4, n_test=8, image_size=96))
FIRST_ID = 1581282016264  # a LAION SAMPLE_ID
# the keys the miniature may change: sizes, counts, the parts listed; anything else is a code path
SIZES = {
    "threads", "size", "shard_size", "chunk_size", "workers", "backbone",
    "decoder_dim", "decoder_depth", "decoder_heads", "proj_hidden", "proj_dim", "pred_hidden", "epochs",
    "batch_size", "accum_steps", "processes", "effective_batch", "num_workers", "ckpt_every", "log_every",
    "channels", "n_train", "crop_size", "label_size", "warp_size", "overlays",
}
LISTS = {("fetch", "laion_face", "parquet"), ("fetch", "laion_face", "detections")}  # fewer parts


def miniature(paper: dict[str, Any]) -> dict[str, Any]:
    """params.paper.yaml at the miniature's sizes (a deep copy)."""
    p = json.loads(json.dumps(paper))
    lf = p["fetch"]["laion_face"]
    lf["parquet"], lf["detections"] = lf["parquet"][:PARTS], lf["detections"][:PARTS]
    p["fetch"]["threads"] = 4
    p["crop"].update(size=TINY["img_size"], shard_size=8, chunk_size=8, workers=2)
    p["subset"].update(shard_size=8, workers=2)  # n stays 20M: all kept crops, with a warning
    p["teacher"].update(backbone=dict(TINY), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    p["pretrain"]["model"].update(backbone=dict(TINY), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                                  proj_hidden=64, proj_dim=32, pred_hidden=64)
    # torchrun with 2 processes (gloo on the CPU), accumulation, the effective-batch check
    p["pretrain"]["train"].update(epochs=2, batch_size=2, accum_steps=2, processes=2, effective_batch=8,
                                  num_workers=1, ckpt_every=5, log_every=1)
    for key in ("finetune_alignment", "finetune_parsing"):
        p[key].update(channels=16, epochs=2, batch_size=4, num_workers=1)
    p["finetune_alignment"]["data"].update(n_train=SYNTH.aflw.n_train, size=64, crop_size=72)
    p["finetune_parsing"]["data"].update(size=64, label_size=72, warp_size=72)
    p["evaluate"].update(batch_size=4, overlays=1)
    return p


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict) and not (path and path[-1] in SIZES):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, (*path, key)).items()}
    return {path: tree}


def test_the_miniature_changes_sizes_only() -> None:
    paper = yaml.safe_load(PAPER.read_text())
    mini, full = _leaves(miniature(paper)), _leaves(paper)
    assert mini.keys() == full.keys()
    changed = {path for path in full if mini[path] != full[path]}
    assert changed and all(path[-1] in SIZES or path in LISTS for path in changed), sorted(changed)


def _reencode(path: Path, image: np.ndarray, suffix: str, *flags: int) -> str:
    ok, buf = cv2.imencode(suffix, image, list(flags))
    assert ok
    path.unlink()
    path.with_suffix(suffix).write_bytes(buf.tobytes())
    return path.with_suffix(suffix).name


def _pad_photos(images: list[Path], rng: np.random.Generator) -> None:
    """Non-square photos (padded right and bottom: annotations unchanged), every 7th grey; LaPa's label
    PNGs padded with background alike."""
    for i, path in enumerate(images):
        right, bottom = (int(v) for v in rng.integers(0, 60, 2))
        image = cv2.copyMakeBorder(cv2.imread(str(path)), 0, bottom, 0, right, cv2.BORDER_REFLECT)
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if i % 7 == 0 else image)
        label = path.parent.parent / "labels" / f"{path.stem}.png"
        if label.is_file():
            padded = cv2.copyMakeBorder(cv2.imread(str(label), cv2.IMREAD_UNCHANGED), 0, bottom, 0, right,
                                        cv2.BORDER_CONSTANT, value=0)
            cv2.imwrite(str(label), padded)


def write_data(root: Path, www: Path, url: str, paper: dict[str, Any]) -> None:
    """data/ as the paper profile reads it, and the images its parts list under ``www``."""
    manifest, detections = write_corpus(SYNTH, 0, www)
    names = [Path(p).name for p in manifest["path"]]
    images = www / "images"
    # the web's other kinds: a grey JPEG, an RGBA PNG, a WebP, a non-square photo
    names[2] = _reencode(images / names[2], cv2.imread(str(images / names[2]), cv2.IMREAD_GRAYSCALE), ".jpg")
    rgba = cv2.cvtColor(cv2.imread(str(images / names[3])), cv2.COLOR_BGR2BGRA)
    names[3] = _reencode(images / names[3], rgba, ".png")
    names[4] = _reencode(images / names[4], cv2.copyMakeBorder(
        cv2.imread(str(images / names[4])), 0, 40, 0, 200, cv2.BORDER_CONSTANT), ".jpg")
    names[5] = _reencode(images / names[5], cv2.imread(str(images / names[5])), ".webp",
                         cv2.IMWRITE_WEBP_QUALITY, 90)
    lf = paper["fetch"]["laion_face"]
    for k, (parquet, pth) in enumerate(zip(lf["parquet"][:PARTS], lf["detections"][:PARTS], strict=True)):
        rows = slice(k * PER_PART, (k + 1) * PER_PART)
        ids = [FIRST_ID + 2000 * k + i for i in range(PER_PART)]
        (root / parquet).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({  # a LAION-Face part's columns; two rows more: a 404 and no URL
            "SAMPLE_ID": pd.Series([*ids, ids[-1] + 1, ids[-1] + 2], dtype="int64"),
            "URL": [*(f"{url}/images/{n}" for n in names[rows]), f"{url}/images/gone.jpg", None],
            "TEXT": [*manifest["caption"][rows], "gone", None], "HEIGHT": 512, "WIDTH": 512,
            "LICENSE": "?", "NSFW": "UNLIKELY", "similarity": 0.31,
        }).to_parquet(root / parquet, index=False)
        released: dict[int, list[Any]] = {}
        for sample_id, synth_id in zip(ids, manifest["sample_id"][rows], strict=True):
            faces = detections[detections["sample_id"] == synth_id]
            released[sample_id] = [  # batch-face's RetinaFace faces, as tests/test_fetch.py's _released_pth
                (np.asarray(b, np.float32), np.asarray(m, np.float32).reshape(5, 2), np.float32(0.999))
                for b, m in zip(faces["box"], faces["landmarks"], strict=True)]
        box = np.array([10, 10, 200, 200], np.float32)  # a large face under the 0.98 score
        released[ids[0]].append((box, np.tile(box[:2] + 50, (5, 1)), np.float32(0.6)))
        released[ids[1]] = []  # an image without a face: no crop, never a Haar face
        torch.save(released, root / pth)
    write_aflw19(SYNTH, 0, root / paper["finetune_alignment"]["data"]["root"])
    write_lapa(SYNTH, 0, root / paper["finetune_parsing"]["data"]["root"])
    rng = np.random.default_rng(0)
    _pad_photos(sorted((root / paper["finetune_alignment"]["data"]["root"]).rglob("*.jpg")), rng)
    _pad_photos(sorted((root / paper["finetune_parsing"]["data"]["root"]).rglob("*.jpg")), rng)
    torch.manual_seed(0)
    vit = create_backbone(BackboneConfig(**TINY), num_classes=10)
    state = {f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v.clone() for k, v in vit.state_dict().items()}
    teacher = root / paper["teacher"]["data"]
    teacher.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 300, "arch": "vit_tiny", "state_dict": state}, teacher)  # vit_base: 12 heads


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "www")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _stage(cwd: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mcf.cli", *args, "--params", "params.mini.yaml"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"mcf {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"


def test_paper_profile_end_to_end(tmp_path: Path, served: str) -> None:
    paper = yaml.safe_load(PAPER.read_text())
    write_data(tmp_path, tmp_path / "www", served, paper)
    params = miniature(paper)
    params["evaluate"].update(alignment_label="SynthFace-AFLW19", parsing_label="SynthFace-LaPa")
    (tmp_path / "params.mini.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("fetch", "crop", "subset", "teacher", "pretrain"):
        _stage(tmp_path, stage)
    for task in ("finetune_alignment", "finetune_parsing"):
        for variant in ("mcf", "scratch"):
            _stage(tmp_path, task, "--variant", variant)
    _stage(tmp_path, "evaluate")

    fetched = pd.read_parquet(tmp_path / params["fetch"]["out"] / "manifest.parquet")
    n = PARTS * PER_PART
    assert fetched["status"].value_counts().to_dict() == {"success": n, "http_error": PARTS,
                                                          "invalid_url": PARTS}
    crops = pd.read_parquet(tmp_path / params["crop"]["out"] / "manifest.parquet")
    assert set(crops["detector"]) == {"table"} and str(FIRST_ID + 1) not in set(crops["sample_id"])
    reasons = crops["reason"].fillna("kept").value_counts().to_dict()
    assert reasons.keys() == {"kept", "too_small", "low_score"} and reasons["low_score"] == PARTS
    picked = pd.read_parquet(tmp_path / params["subset"]["out"] / "manifest.parquet")
    assert len(picked) == reasons["kept"]
    metrics = json.loads((tmp_path / params["evaluate"]["metrics"]).read_text())
    assert metrics["dataset"] == {"alignment": "SynthFace-AFLW19", "parsing": "SynthFace-LaPa"}
    for variant in ("mcf", "scratch"):
        assert math.isfinite(metrics["alignment"][variant]["full"]["nme_diag"])
        assert metrics["alignment"][variant]["full"]["images"] == SYNTH.aflw.n_test
        assert math.isfinite(metrics["parsing"][variant]["f1_mean"])
        assert math.isfinite(metrics["probe"][variant]["nme_diag"])
