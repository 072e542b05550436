"""Stage ``crop``: detections, geometry, filters with reasons, shards, determinism and the data gate.

Inputs are a small fetch-like folder built here from photographs that scikit-image ships.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from conftest import contract_types, tmpfs
from pytest import MonkeyPatch
from skimage import data as skdata

from mcf.cli import main as cli_main
from mcf.data import crop as crop_mod
from mcf.data.crop import CropConfig, Source, bench_crop, crop, crop_chunk, crop_id, face_transform, warp_crop
from mcf.data.detect import (
    DetectorConfig,
    Face,
    HaarDetector,
    YuNetDetector,
    _downscale,
    _ordered,
    box_misses,
    load_detections,
    make_detector,
)
from mcf.data.quality import bench_duplicates, blur_score, duplicates, phash
from mcf.data.shards import iter_samples, shard_urls
from mcf.errors import GateError, StageError
from mcf.io import atomic_dir, atomic_file, check_replaceable, read_table, unwritable
from mcf.params import ParamsError, build
from mcf.validate.gate import SUITES_DIR

ASTRO_FACE = (175.0, 60.0, 275.0, 165.0)  # her face in skimage's 512×512 astronaut, checked by eye
ASTRO_LANDMARKS = (204.0, 105.0, 243.0, 103.0, 224.0, 124.0, 208.0, 142.0, 243.0, 141.0)
SIZE = 48


def _rgb(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else img[..., :3]


def _box_face(box: tuple[float, ...], score: float = 0.99) -> dict:
    return {"box": list(box), "landmarks": None, "score": score}


# sample_id -> (image or None for an undecodable file, detections or None when the table has no entry,
# expected reason or "kept")
def _samples() -> dict[str, tuple[np.ndarray | None, list[dict] | None, str]]:
    astro = _rgb("astronaut")
    blurred = cv2.resize(cv2.resize(_rgb("chelsea"), (28, 19), interpolation=cv2.INTER_AREA), (451, 300))
    astro_face = {"box": list(ASTRO_FACE), "landmarks": list(ASTRO_LANDMARKS), "score": 0.99}
    return {  # listed out of sample_id order: crop reads them sorted, so "astro" is the first copy
        "astro-again": (astro, [astro_face], "duplicate"),
        "astro": (astro, [astro_face], "kept"),
        "blurry": (blurred, [_box_face((110, 40, 260, 190))], "blurry"),
        "camera": (_rgb("camera"), [_box_face((180, 40, 330, 190))], "kept"),
        "chelsea": (_rgb("chelsea"), [_box_face((110, 40, 260, 190))], "kept"),
        "coffee": (_rgb("coffee"), [_box_face((200, 100, 360, 260))], "kept"),
        "low-score": (_rgb("rocket"), [_box_face((250, 50, 400, 200), score=0.5)], "low_score"),
        "mirror": (np.ascontiguousarray(astro[:, ::-1]), None, "kept"),  # no table entry: Haar runs
        "tiny": (_rgb("immunohistochemistry"), [_box_face((10, 10, 20, 22))], "too_small"),
        "broken": (None, [_box_face((10, 10, 90, 90))], "undecodable"),
        "broken-no-table": (None, None, "undecodable"),  # the detector would have run
    }


def make_fetch_dir(root: Path, samples: dict) -> Path:
    """A fetch output in the docs/CONTRACTS.md layout: images/, manifest.parquet, detections.parquet."""
    (root / "images").mkdir(parents=True)
    manifest, detections = [], []
    for sample_id, (rgb, faces, _) in samples.items():
        path = f"images/{sample_id}.jpg"
        if rgb is None:
            (root / path).write_bytes(b"\xff\xd8\xff not a decodable JPEG")
        else:
            bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / path), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        manifest.append(
            {
                "sample_id": sample_id,
                "path": path,
                "status": "success",
                "error": None,
                "width": 0 if rgb is None else rgb.shape[1],
                "height": 0 if rgb is None else rgb.shape[0],
                "caption": "",
                "source": "test",
            }
        )
        for i, face in enumerate(faces or []):
            detections.append({"sample_id": sample_id, "face": i, **face})
    manifest.append(
        {
            "sample_id": "gone",
            "path": None,
            "status": "http_error",
            "error": "404",
            "width": 0,
            "height": 0,
            "caption": "",
            "source": "test",
        }
    )
    pd.DataFrame(manifest).to_parquet(root / "manifest.parquet")
    pd.DataFrame(detections).to_parquet(root / "detections.parquet")
    return root


@pytest.fixture(scope="module")
def fetch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fetch_dir(tmp_path_factory.mktemp("fetch"), _samples())


def _cfg(fetch: Path, out: Path, **kw: object) -> CropConfig:
    base = {
        "input": str(fetch),
        "out": str(out),
        "size": SIZE,
        "chunk_size": 3,
        "workers": 1,
        "shard_size": 4,
        "min_blur": 50.0,
    }
    return CropConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def serial(fetch_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CropConfig, pd.DataFrame]:
    cfg = _cfg(fetch_dir, tmp_path_factory.mktemp("serial") / "crop")
    return cfg, crop(cfg)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return w * h / (area - w * h)


def test_haar_finds_the_astronaut_face() -> None:
    faces = HaarDetector(DetectorConfig())(_rgb("astronaut"))
    assert len(faces) >= 1
    best = max(faces, key=lambda f: _iou(f.box, ASTRO_FACE))
    assert _iou(best.box, ASTRO_FACE) > 0.5, best.box
    assert best.detector == "haar" and best.score is None and best.landmarks is None


def test_each_thread_builds_its_own_detector() -> None:
    """OpenCV's cascade keeps the image it scans in the object: one detector shared by a Dask worker's
    threads (crop_dask with processes=False, a `dask worker` with several threads) failed an assertion
    in detectMultiScale or crashed the process. Each thread now builds its own, once, and threads
    detecting at once find what one thread finds."""
    cfg = DetectorConfig()
    images = [_rgb("astronaut"), cv2.resize(_rgb("astronaut"), (400, 300)), _rgb("chelsea")]
    alone = [[f.box for f in make_detector(cfg)(rgb)] for rgb in images]
    with ThreadPoolExecutor(3) as pool:
        built = list(pool.map(lambda _: (make_detector(cfg), make_detector(cfg)), range(3)))
        assert all(a is b for a, b in built) and make_detector(cfg) is make_detector(cfg)
        assert not {id(a) for a, _ in built} & {id(make_detector(cfg))}
        together = list(pool.map(lambda i: [f.box for f in make_detector(cfg)(images[i % 3])], range(60)))
    assert together == alone * 20


def test_detector_runs_on_a_thin_strip(tmp_path: Path) -> None:
    """A 3000x2 banner is a valid image: downscaled to 640 wide it must keep a pixel row, not crash
    the stage in cv2.resize (its height rounded to 0)."""
    cv2.imwrite(str(tmp_path / "strip.png"), np.full((2, 3000, 3), 128, np.uint8))
    result = crop_chunk([Source("strip", str(tmp_path / "strip.png"), None)], _cfg(tmp_path, tmp_path / "o"),
                        tmp_path / "part")
    assert result.rows.empty


def test_yunet_model_path_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="yunet_model"):
        build(CropConfig, {"detector": {"yunet_model": str(tmp_path / "missing.onnx")}}, "crop")
    (tmp_path / "damaged.onnx").write_bytes(b"not a model")
    cfg = build(CropConfig, {"detector": {"yunet_model": str(tmp_path / "damaged.onnx")}}, "crop")
    with pytest.raises(StageError, match=r"damaged.onnx: not a YuNet model OpenCV can load \(Failed to"):
        YuNetDetector(cfg.detector)
    (tmp_path / "yunet.tar").touch()  # an existing file that is no .onnx: refused before any image is read
    with pytest.raises(ParamsError, match=r"yunet_model: expected a YuNet .onnx file, got .*yunet.tar"):
        build(CropConfig, {"detector": {"yunet_model": str(tmp_path / "yunet.tar")}}, "crop")


def test_the_detector_defaults_are_the_crop_stages() -> None:
    """``mcf predict`` runs "the crop stage's OpenCV detector" but reads no params.yaml: it builds
    ``DetectorConfig()``, so a default that drifted from params.yaml's ``crop.detector`` would make its
    Haar (or YuNet) faces silently differ from the ones the pipeline crops."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    assert build(DetectorConfig, params["crop"]["detector"], "crop.detector") == DetectorConfig()


class _FakeYuNet:
    """What ``cv2.FaceDetectorYN.detect`` returns: one float32 row per face (box, 5 points, score)."""

    def setInputSize(self, size: tuple[int, int]) -> None:  # noqa: N802 (OpenCV's name)
        pass

    def detect(self, bgr: np.ndarray) -> tuple[int, np.ndarray]:
        x1, y1, x2, y2 = ASTRO_FACE
        row = [x1, y1, x2 - x1, y2 - y1, *ASTRO_LANDMARKS]
        return 1, np.array([[*row, 0.95]], np.float32)


class _ManyYuNet(_FakeYuNet):
    """Three faces, not in size order: one with its shorter side just under min_size (24), one at it, and
    a large one whose score is a hair over 1 (float32 rounding)."""

    def detect(self, bgr: np.ndarray) -> tuple[int, np.ndarray]:
        rows = [[50, 0, 40, 23, *[60.0] * 10, 0.9], [0, 0, 24, 30, *[10.0] * 10, 0.8],
                [100, 0, 60, 60, *[120.0] * 10, 1.0000001]]
        return 3, np.array(rows, np.float32)


def test_yunet_keeps_faces_of_min_size_largest_first_with_scores_in_0_1(tmp_path: Path) -> None:
    """crop.detector.min_size is the smallest shorter side YuNet's faces keep (as Haar's search), faces are
    indexed largest first as Haar's are, and a score is clipped into the table's 0..1; a config naming a
    YuNet model must build YuNet, not Haar (a damaged model fails to load instead of being ignored)."""
    yunet = YuNetDetector.__new__(YuNetDetector)
    yunet.cfg, yunet.model = DetectorConfig(), _ManyYuNet()
    faces = yunet(np.zeros((200, 300, 3), np.uint8))
    assert [(f.face, f.box, f.score) for f in faces] == [
        (0, (100.0, 0.0, 160.0, 60.0), 1.0), (1, (0.0, 0.0, 24.0, 30.0), pytest.approx(0.8))]
    (tmp_path / "damaged.onnx").write_bytes(b"not a model")
    with pytest.raises(StageError, match="not a YuNet model"):
        make_detector(DetectorConfig(yunet_model=str(tmp_path / "damaged.onnx")))


def test_yunet_faces_crop_and_shard(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    """YuNet gives float32 rows: its boxes must reach the manifest and the shard's json as plain floats
    (numpy 2 keeps ``float32 * float`` a float32, which ``json.dumps`` refuses)."""
    detector = YuNetDetector.__new__(YuNetDetector)
    detector.cfg, detector.model = DetectorConfig(), _FakeYuNet()
    monkeypatch.setattr(crop_mod, "make_detector", lambda cfg: detector)
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(_rgb("astronaut"), cv2.COLOR_RGB2BGR))
    result = crop_chunk([Source("a", str(tmp_path / "a.jpg"), None)], CropConfig(size=SIZE, min_blur=0.0),
                        tmp_path / "part")
    assert result.rows[["status", "detector"]].values.tolist() == [["kept", "yunet"]]
    [(_, _, meta)] = list(iter_samples(shard_urls(tmp_path / "part")))
    assert meta["box"] == list(ASTRO_FACE) and meta["score"] == pytest.approx(0.95)


def test_rejections_carry_reasons(serial: tuple[CropConfig, pd.DataFrame]) -> None:
    """Also the row order docs/CONTRACTS.md gives (sorted ``sample_id``s, not the fetch listing's), which
    decides which of two identical crops is the duplicate."""
    _, manifest = serial
    assert manifest["sample_id"].tolist() == sorted(manifest["sample_id"])
    got = manifest.set_index("sample_id")["reason"].fillna("kept").to_dict()
    assert got == {sid: expected for sid, (_, _, expected) in _samples().items()}
    assert (manifest["status"] == "kept").eq(manifest["reason"].isna()).all()
    mirror = manifest.set_index("sample_id").loc["mirror"]
    assert mirror["detector"] == "haar" and np.isnan(mirror["score"])
    assert "gone" not in set(manifest["sample_id"])  # failed fetches have no faces
    broken = manifest.set_index("sample_id").loc[["broken", "broken-no-table"]]
    assert broken["detector"].tolist() == ["table", None] and broken["face"].tolist() == [0, 0]


def test_manifest_keeps_its_documented_types_when_a_column_is_all_null(tmp_path: Path) -> None:
    # all kept (no reason) and no landmarks (a box-only table face, a Haar face): pandas would write
    # both columns with Arrow's null type
    samples = {k: v for k, v in _samples().items() if k in ("camera", "mirror")}
    cfg = _cfg(make_fetch_dir(tmp_path / "fetch", samples), tmp_path / "crop")
    manifest = crop(cfg)
    assert manifest["reason"].isna().all() and manifest["landmarks"].isna().all()
    schema = pq.read_schema(Path(cfg.out) / "manifest.parquet")
    documented = contract_types("crop: `manifest.parquet`")
    assert {name: str(schema.field(name).type) for name in schema.names} == documented


def test_reasons_match_the_gate_suite() -> None:
    suite = json.loads((SUITES_DIR / "crop.json").read_text())["expectations"]
    (allowed,) = [e["kwargs"]["value_set"] for e in suite if e["kwargs"].get("column") == "reason"
                  and e["type"] == "expect_column_values_to_be_in_set"]
    assert allowed == list(crop_mod.REASONS)
    (detected,) = [e["kwargs"]["row_condition"]["parameter"] for e in suite
                   if e["kwargs"].get("column") == "detector"
                   and e["kwargs"].get("row_condition", {}).get("column", {}).get("name") == "reason"]
    assert detected == [r for r in crop_mod.REASONS if r != "undecodable"]  # a detector ran on all but those


def test_the_filters_keep_a_face_at_their_bounds(tmp_path: Path) -> None:
    """``min_face_size`` and ``min_score`` are the smallest values kept: a face exactly at them passes.
    The size is the box's shorter side (docs/CONTRACTS.md), whichever side that is."""
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(_rgb("astronaut"), cv2.COLOR_RGB2BGR))
    x1, y1 = ASTRO_FACE[:2]
    faces = (Face(0, (x1, y1, x1 + 100.0, y1 + 120.0), None, 0.9, "table"),  # shorter side 100
             Face(1, (x1, y1, x1 + 120.0, y1 + 99.0), None, 0.9, "table"))  # shorter side 99
    cfg = CropConfig(size=SIZE, min_face_size=100.0, min_score=0.9, min_blur=0.0)
    result = crop_chunk([Source("a", str(tmp_path / "a.jpg"), faces)], cfg, tmp_path / "part")
    assert result.rows["status"].tolist() == ["kept", "rejected"]
    assert result.rows["reason"].tolist() == [None, "too_small"]
    assert result.rows["face_size"].tolist() == [100.0, 99.0]


def test_a_face_failing_several_checks_gets_the_first_one_in_reasons_order(tmp_path: Path) -> None:
    """docs/CONTRACTS.md: a rejected crop's reason is the first check it fails, in REASONS' order."""
    rgb = _rgb("astronaut")
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    h, w = rgb.shape[:2]
    x1, y1 = ASTRO_FACE[:2]
    tiny, big = (x1, y1, x1 + 10.0, y1 + 10.0), (x1, y1, x1 + 120.0, y1 + 120.0)
    one_point = (x1 + 5.0, y1 + 5.0) * 5  # all five landmarks at one point
    faces = (Face(0, (w + 1.0, 0.0, w + 11.0, 10.0), one_point, 0.1, "table"),  # off the image, and all
             Face(1, tiny, one_point, 0.1, "table"),  # bad landmarks, small, low score
             Face(2, tiny, None, 0.1, "table"),  # small and low score
             Face(3, big, None, 0.1, "table"),  # low score, and blurry by min_blur
             Face(4, big, None, 0.99, "table"))  # blurry alone
    cfg = CropConfig(size=SIZE, align=True, min_face_size=24.0, min_score=0.5, min_blur=1e12)
    result = crop_chunk([Source("a", str(tmp_path / "a.jpg"), faces)], cfg, tmp_path / "part")
    reasons = result.rows["reason"].tolist()
    assert reasons == ["outside_image", "bad_landmarks", "too_small", "low_score", "blurry"]
    assert [crop_mod.REASONS.index(r) for r in reasons] == sorted(crop_mod.REASONS.index(r) for r in reasons)


def test_a_crop_exactly_as_sharp_as_min_blur_is_kept(tmp_path: Path) -> None:
    """``min_blur`` is the smallest blur kept, as ``min_face_size`` and ``min_score`` (the gate's
    ``blur_margin`` is at least 0 for a kept crop): a crop whose blur equals it passes."""
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(_rgb("astronaut"), cv2.COLOR_RGB2BGR))
    source = Source("a", str(tmp_path / "a.jpg"), (Face(0, ASTRO_FACE, None, 0.99, "table"),))
    blur = crop_chunk([source], CropConfig(size=SIZE, min_blur=0.0), tmp_path / "p0").rows.loc[0, "blur"]
    at = crop_chunk([source], CropConfig(size=SIZE, min_blur=float(blur)), tmp_path / "p1").rows
    above = crop_chunk([source], CropConfig(size=SIZE, min_blur=float(np.nextafter(blur, np.inf))),
                       tmp_path / "p2").rows
    assert at[["status", "reason"]].values.tolist() == [["kept", None]]
    assert above[["status", "reason"]].values.tolist() == [["rejected", "blurry"]]


@pytest.mark.parametrize("pad", ["constant", "reflect"])
def test_a_box_wholly_outside_the_image_is_rejected_as_such(tmp_path: Path, pad: str) -> None:
    """A detection that misses the image (released for another version of it, say) is no face: constant
    padding made it a black crop rejected as ``blurry``, reflect padding kept a mirrored crop of no face.
    A box reaching partly outside is still cropped."""
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(_rgb("astronaut"), cv2.COLOR_RGB2BGR))  # 512 × 512
    boxes = [(600.0, 100.0, 700.0, 200.0), (-150.0, -150.0, -20.0, -20.0), (100.0, 512.0, 200.0, 600.0),
             (-50.0, 150.0, 80.0, 280.0)]
    faces = tuple(Face(i, box, None, 0.99, "table") for i, box in enumerate(boxes))
    cfg = CropConfig(size=SIZE, min_blur=0.0, pad=pad)
    result = crop_chunk([Source("a", str(tmp_path / "a.jpg"), faces)], cfg, tmp_path / "part")
    assert result.rows["reason"].fillna("kept").tolist() == ["outside_image"] * 3 + ["kept"]


def test_crops_keep_the_images_colours(tmp_path: Path) -> None:
    """OpenCV decodes BGR: the crop in the shard must be RGB, as pre-training reads it."""
    rgb = np.zeros((200, 200, 3), np.uint8)
    rgb[..., 0] = np.random.default_rng(0).integers(150, 256, (200, 200))  # a textured red image
    cv2.imwrite(str(tmp_path / "red.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    face = Face(0, (50.0, 50.0, 150.0, 150.0), None, 0.99, "table")
    cfg = CropConfig(size=SIZE, min_blur=0.0)
    crop_chunk([Source("red", str(tmp_path / "red.png"), (face,))], cfg, tmp_path / "part")
    [(_, crop_rgb, _)] = list(iter_samples(shard_urls(tmp_path / "part")))
    red, green, blue = crop_rgb.reshape(-1, 3).mean(axis=0)
    assert red > 100 and green < 20 and blue < 20


def test_detected_faces_are_indexed_largest_first_then_left_to_right() -> None:
    boxes = [(0.0, 0.0, 10.0, 10.0), (50.0, 0.0, 80.0, 30.0), (20.0, 0.0, 50.0, 30.0)]
    faces = _ordered([Face(0, box, None, None, "haar") for box in boxes])
    assert [(f.face, f.box) for f in faces] == [(0, boxes[2]), (1, boxes[1]), (2, boxes[0])]
    # largest by area, not width; an equal area goes left to right before top to bottom
    boxes = [(0.0, 0.0, 30.0, 10.0), (50.0, 0.0, 70.0, 20.0), (10.0, 0.0, 20.0, 10.0),
             (0.0, 50.0, 10.0, 60.0)]
    faces = _ordered([Face(0, box, None, None, "haar") for box in boxes])
    assert [f.box for f in faces] == [boxes[1], boxes[0], boxes[3], boxes[2]]


def test_haar_searches_with_the_configured_parameters(monkeypatch: MonkeyPatch) -> None:
    """``crop.detector``'s haar_scale_factor, haar_min_neighbors and min_size must reach OpenCV's search (a
    constant in their place went unseen), and the cascade's rectangles, which OpenCV lists in no size
    order, come back indexed largest first."""
    haar = HaarDetector(DetectorConfig(haar_scale_factor=1.3, haar_min_neighbors=2, min_size=30))
    seen: dict = {}

    def search(gray: np.ndarray, **kw: object) -> np.ndarray:
        seen.update(kw)
        return np.array([[0, 0, 10, 10], [20, 0, 40, 40]])

    cascade = type("Cascade", (), {"detectMultiScale": lambda _, gray, **kw: search(gray, **kw)})()
    monkeypatch.setattr(haar, "cascade", cascade)
    faces = haar(np.zeros((100, 200, 3), np.uint8))
    assert seen == {"scaleFactor": 1.3, "minNeighbors": 2, "minSize": (30, 30)}
    assert [(f.face, f.box) for f in faces] == [(0, (20.0, 0.0, 60.0, 40.0)), (1, (0.0, 0.0, 10.0, 10.0))]


def test_detection_input_is_downscaled_to_max_side() -> None:
    small, scale = _downscale(np.zeros((1000, 500, 3), np.uint8), 640)
    assert small.shape == (640, 320, 3) and scale == pytest.approx((1000 / 640, 1000 / 640))
    image = np.zeros((600, 300, 3), np.uint8)
    same, one = _downscale(image, 640)
    assert same is image and one == (1.0, 1.0)


class _CornerYuNet(_FakeYuNet):
    """A face filling the whole (downscaled) input, its five points all at the bottom-right corner."""

    def setInputSize(self, size: tuple[int, int]) -> None:  # noqa: N802 (OpenCV's name)
        self.size = size

    def detect(self, bgr: np.ndarray) -> tuple[int, np.ndarray]:
        w, h = self.size
        return 1, np.array([[0, 0, w, h, *[w, h] * 5, 0.95]], np.float32)


def test_detections_map_back_to_source_pixels_on_each_axis(monkeypatch: MonkeyPatch) -> None:
    """Downscaled to 640 wide, a 1000x701 image is 449 rows (448.6 rounded): each axis has its own factor
    back. With the longer side's for both, a face at the bottom reached y = 701.6, past the image (YuNet's
    box and points, Haar's box)."""
    yunet = YuNetDetector.__new__(YuNetDetector)
    yunet.cfg, yunet.model = DetectorConfig(min_size=8), _CornerYuNet()
    [face] = yunet(np.zeros((701, 1000, 3), np.uint8))
    assert face.box == pytest.approx((0.0, 0.0, 1000.0, 701.0))
    assert face.landmarks == pytest.approx((1000.0, 701.0) * 5)
    haar = HaarDetector(DetectorConfig())
    wide = np.zeros((701, 1000, 3), np.uint8)
    cascade = type("Cascade", (), {"detectMultiScale": lambda self, gray, **_: np.array(
        [[0, 0, gray.shape[1], gray.shape[0]]])})()
    monkeypatch.setattr(haar, "cascade", cascade)
    assert [f.box for f in haar(wide)] == [pytest.approx((0.0, 0.0, 1000.0, 701.0))]


@pytest.mark.parametrize("points", [[0.0] * 10, [30.0, 40.0] * 5, [30.0, float("nan")] + [50.0] * 8])
def test_degenerate_landmarks_are_rejected_when_aligning(tmp_path: Path, points: list[float]) -> None:
    cv2.imwrite(str(tmp_path / "a.jpg"), _rgb("astronaut"))
    face = Face(0, ASTRO_FACE, tuple(points), 0.99, "table")
    cfg = CropConfig(size=SIZE, align=True, min_blur=0.0)
    result = crop_chunk([Source("a", str(tmp_path / "a.jpg"), (face,))], cfg, tmp_path / "part")
    assert result.rows["reason"].tolist() == ["bad_landmarks"]


def test_shards_stream_with_webdataset(serial: tuple[CropConfig, pd.DataFrame]) -> None:
    cfg, manifest = serial
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "shards"]
    urls = shard_urls(out / "shards")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    kept = manifest[manifest["status"] == "kept"]
    assert [s["__key__"] for s in samples] == list(kept["crop_id"])
    assert all(s["jpg"].shape == (SIZE, SIZE, 3) and s["jpg"].dtype == np.uint8 for s in samples)
    assert len(urls) == -(-len(kept) // cfg.shard_size)
    for sample, (_, row) in zip(samples, kept.iterrows(), strict=True):  # docs/CONTRACTS.md's json member
        lms = row["landmarks"]
        assert sample["json"] == {
            "crop_id": row["crop_id"], "sample_id": row["sample_id"], "face": row["face"],
            "box": list(row["box"]),
            "landmarks": None if lms is None else [list(lms[i:i + 2]) for i in (0, 2, 4, 6, 8)],
            "score": None if np.isnan(row["score"]) else row["score"],
        }, row["crop_id"]
    metas = [s["json"] for s in samples]  # both kinds are there: a table face's landmarks, Haar's no score
    assert any(m["landmarks"] for m in metas) and any(m["score"] is None for m in metas)
    assert pd.read_parquet(out / "manifest.parquet")["crop_id"].tolist() == manifest["crop_id"].tolist()


def test_validate_by_hand_passes_the_output(serial: tuple[CropConfig, pd.DataFrame], tmp_path: Path) -> None:
    cfg, _ = serial
    manifest = str(Path(cfg.out) / "manifest.parquet")
    thresholds = {"min_face_size": cfg.min_face_size, "min_score": cfg.min_score, "min_blur": cfg.min_blur}
    # width_off/height_off come from crop.size, the margins from the thresholds (a blurry crop is rejected)
    for change, status in (({}, 0), ({"size": SIZE + 1}, 3), ({"min_blur": 0.0}, 3)):
        section = {"size": SIZE, **thresholds, **change}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"crop": section}))
        assert cli_main(["validate", "--params", str(tmp_path / "params.yaml"), "crop", manifest]) == status


def test_parallel_run_matches_serial(
    fetch_dir: Path, tmp_path: Path, serial: tuple, monkeypatch: MonkeyPatch
) -> None:
    """The chunks cropped in the pool's processes give the serial run's manifest and shards, byte for
    byte; the pool really ran them (a run that fell back to serial would match trivially)."""
    cfg, manifest = serial
    submitted: list[object] = []

    class Watched(crop_mod.ProcessPoolExecutor):  # the real pool, its submits counted
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(crop_mod, "ProcessPoolExecutor", Watched)
    parallel = crop(dataclasses.replace(cfg, out=str(tmp_path / "crop"), workers=2, chunk_size=2))
    assert len(submitted) == -(-len(crop_mod.load_sources(cfg)) // 2) > 1  # every chunk, in the pool
    pd.testing.assert_frame_equal(parallel, manifest)
    ours, theirs = shard_urls(tmp_path / "crop/shards"), shard_urls(Path(cfg.out) / "shards")
    assert [Path(u).read_bytes() for u in ours] == [Path(u).read_bytes() for u in theirs]


@pytest.mark.parametrize("mode", ["auto", "table", "detector"])
def test_sources_are_the_fetched_images_with_their_table_faces(fetch_dir: Path, mode: str) -> None:
    """The image list is arrays; a slice builds its chunk's Sources: every fetched image in sample_id
    order, table faces in face order, None where the detector runs ('auto' for an image the table
    lacks), none where the table is the only source."""
    sources = crop_mod.load_sources(_cfg(fetch_dir, fetch_dir.parent / "o", detections=mode))
    samples = _samples()
    assert len(sources) == len(samples) and [c for c in sources.chunks(4)][-1] == sources[8:]
    for src in sources[:]:
        _, faces, _ = samples[src.sample_id]
        assert src.path == str(fetch_dir / "images" / f"{src.sample_id}.jpg")
        if mode == "detector" or (mode == "auto" and faces is None):
            assert src.faces is None
        else:
            assert [(f.face, list(f.box), f.landmarks and list(f.landmarks), f.score, f.detector)
                    for f in src.faces] == [(i, f["box"], f["landmarks"], f["score"], "table")
                                            for i, f in enumerate(faces or [])]
    assert [s.sample_id for s in sources[:]] == sorted(samples)


def test_the_pool_builds_two_chunks_a_worker_ahead(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    """Executor.map submits every chunk at once: at the paper's 20M images, each chunk's Source objects
    (some 24 GB) were built before the first crop. Now four chunks (two workers) are built ahead of the
    first result, and the rest as results come back, in order."""
    fetch = crop_mod._bench_images(tmp_path / "fetch", 12, 64)
    cfg = CropConfig(input=str(fetch), out=str(tmp_path / "crop"), size=SIZE, chunk_size=1, workers=2)
    built, seen = [], []
    slice_ = crop_mod.Sources.__getitem__
    monkeypatch.setattr(crop_mod.Sources, "__getitem__", lambda self, i: built.append(i) or slice_(self, i))

    class Bar:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        def update(self, n: int) -> None:
            seen.append((len(built), n))

        def close(self) -> None:
            pass

    monkeypatch.setattr(crop_mod, "tqdm", Bar)
    results = crop_mod.run_chunks(crop_mod.load_sources(cfg), cfg, tmp_path / "parts")
    assert seen[0] == (4, 1) and sum(n for _, n in seen) == 12 and len(built) == 12
    assert [r.rows["sample_id"].iloc[0] for r in results] == [f"bench-{i:06d}" for i in range(12)]


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_gate_rejects_wrong_crop_size(fetch_dir: Path, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    real = crop_mod.warp_crop
    monkeypatch.setattr(crop_mod, "warp_crop", lambda rgb, m, size, pad: real(rgb, m, size + 1, pad))
    cfg = _cfg(fetch_dir, tmp_path / "crop")
    with pytest.raises(StageError, match=r"expect_column_values_to_be_between\(column=width_off\)") as err:
        crop(cfg)
    assert "gate 'crop' failed" in str(err.value)
    _assert_no_output(tmp_path / "crop")


def test_gate_rejects_nan_blur(fetch_dir: Path, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    calls = itertools.count()
    real = crop_mod.blur_score
    monkeypatch.setattr(crop_mod, "blur_score", lambda rgb: float("nan") if next(calls) == 0 else real(rgb))
    failed = r"expect_column_values_to_not_be_null\(column=blur, where status == kept"
    with pytest.raises(StageError, match=failed):
        crop(_cfg(fetch_dir, tmp_path / "crop"))
    _assert_no_output(tmp_path / "crop")


def test_gate_rejects_dark_crops(fetch_dir: Path, tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    real = crop_mod.warp_crop
    monkeypatch.setattr(crop_mod, "warp_crop", lambda rgb, m, size, pad: real(rgb, m, size, pad) // 64)
    with pytest.raises(StageError, match=r"expect_column_values_to_be_between\(column=mean\)"):
        crop(_cfg(fetch_dir, tmp_path / "crop", min_blur=0.0))
    _assert_no_output(tmp_path / "crop")


@pytest.mark.parametrize("bad", [{"box": [1.0, 2.0, 30.0, float("inf")]}, {"landmarks": [float("nan")] * 10}])
def test_non_finite_detection_fails_naming_the_face(tmp_path: Path, bad: dict) -> None:
    good = {"sample_id": "s1", "face": 0, "box": [1.0, 2.0, 30.0, 28.0], "landmarks": None, "score": 1.0}
    pd.DataFrame([good, good | {"face": 1} | bad]).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(StageError, match="d.parquet: sample s1 face 1: box or landmarks not finite"):
        load_detections(tmp_path / "d.parquet")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"box": [30.0, 2.0, 1.0, 28.0]}, r"box \[30.0, 2.0, 1.0, 28.0\] is not x1, y1, x2, y2"),
        ({"score": 1.5}, "score 1.5 is outside 0..1"),
        ({"box": None}, "box needs 4 values and landmarks 10, got 0"),
        ({"face": 0}, "face indices must be unique"),
        ({"face": -1}, "face indices must be unique"),
        ({"box": [1.0, 28.0, 30.0, 2.0]}, r"box \[1.0, 28.0, 30.0, 2.0\] is not x1, y1, x2, y2"),
        ({"score": -0.5}, r"score -0.5 is outside 0..1"),
        ({"landmarks": [1.0] * 4}, "box needs 4 values and landmarks 10, got 4 and 4"),
    ],
)
def test_detection_the_gate_would_reject_fails_at_load(tmp_path: Path, bad: dict, message: str) -> None:
    """The crop gate rejects these rows (face_size < 0, score, crop_id unique, face >= 0), but only
    after every image was cropped: loading the table refuses them, naming the face."""
    good = {"sample_id": "s1", "face": 0, "box": [1.0, 2.0, 30.0, 28.0], "landmarks": None, "score": 1.0}
    pd.DataFrame([good, good | {"face": 1} | bad]).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(StageError, match=f"d.parquet: sample s1 face -?[01]: {message}"):
        load_detections(tmp_path / "d.parquet")


def test_detections_at_the_contracts_bounds_load_in_sample_and_face_order(tmp_path: Path) -> None:
    """docs/CONTRACTS.md: a null score or null/empty landmarks mean none, scores 0 and 1 are in range and a
    box may be a point (the size filter rejects it later, with a reason); rows come back sorted by
    sample_id, then face, whatever the file's order, so ``spans`` finds each image's faces in face order."""
    lms = [float(v) for v in range(10)]
    rows = [("s1", 2, [5.0, 5.0, 5.0, 5.0], [], 1.0), ("s1", 0, [1.0, 2.0, 30.0, 28.0], lms, None),
            ("s0", 0, [0.0, 0.0, 9.0, 9.0], None, 0.5), ("s1", 1, [3.0, 4.0, 20.0, 24.0], None, 0.0)]
    pd.DataFrame(rows, columns=["sample_id", "face", "box", "landmarks", "score"]).to_parquet(
        tmp_path / "d.parquet")
    table = load_detections(tmp_path / "d.parquet")
    starts, stops = table.spans(np.array(["s0", "s1", "s2"], dtype=object))
    assert (starts.tolist(), stops.tolist()) == ([0, 1, 4], [1, 4, 4])
    assert [(f.face, f.box, f.landmarks, f.score, f.detector) for f in table.faces(1, 4)] == [
        (0, (1.0, 2.0, 30.0, 28.0), tuple(lms), None, "table"),
        (1, (3.0, 4.0, 20.0, 24.0), None, 0.0, "table"), (2, (5.0, 5.0, 5.0, 5.0), None, 1.0, "table")]


def test_a_detection_table_with_several_bad_rows_names_the_first_in_sample_order(tmp_path: Path) -> None:
    """The table is checked in (sample_id, face) order, so the row named is the first a reader of the
    sorted table meets, not the file's last or first bad row."""
    good = {"box": [1.0, 2.0, 30.0, 28.0], "landmarks": None, "score": 1.0}
    rows = [{"sample_id": "s2", "face": 0} | good | {"score": 2.0}, {"sample_id": "s1", "face": 0} | good,
            {"sample_id": "s1", "face": 1} | good | {"box": [9.0, 2.0, 3.0, 28.0]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(StageError, match=r"d.parquet: sample s1 face 1: box \[9.0, 2.0, 3.0, 28.0\] is not"):
        load_detections(tmp_path / "d.parquet")


@pytest.mark.parametrize(
    ("box", "misses"),
    [
        ((30.0, 0.0, 40.0, 10.0), True), ((29.5, 0.0, 40.0, 10.0), False),  # x1 at / inside the width
        ((-10.0, 0.0, 0.0, 10.0), True), ((-10.0, 0.0, 0.5, 10.0), False),  # x2 at / past 0
        ((0.0, 20.0, 10.0, 30.0), True), ((0.0, 19.5, 10.0, 30.0), False),  # y1 at / inside the height
        ((0.0, -10.0, 10.0, 0.0), True), ((0.0, -10.0, 10.0, 0.5), False),  # y2 at / past 0
    ],
)
def test_a_box_misses_an_image_only_when_it_covers_none_of_its_pixels(box: tuple, misses: bool) -> None:
    """On a 30 x 20 image (not square, so width and height cannot stand in for each other), a box ending
    at an edge covers no pixel and is ``outside_image`` (and warned of by ``mcf predict``); half a pixel
    in, it is cropped."""
    assert box_misses(box, 30, 20) is misses


@pytest.mark.parametrize("out", [".", "..", "../.."])
def test_atomic_dir_refuses_the_working_folder(tmp_path: Path, monkeypatch: MonkeyPatch, out: str) -> None:
    """An ``out`` of ``.`` (an empty new folder passes the sign check) was a ValueError traceback, and the
    folder the command runs in would be replaced whole; each one is refused, naming the path."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    refused = pytest.raises(StageError, match=rf"^{re.escape(out)} holds the working folder")
    with refused, atomic_dir(out, "x"):
        pass
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def test_atomic_dir_removes_what_killed_writers_left(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".crop.tmp-{dead.pid}", tmp_path / f".crop.tmp-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "crops-000000.tar").write_bytes(b"half written")
    with atomic_dir(tmp_path / "crop", sign="manifest.parquet") as tmp:
        (tmp / "manifest.parquet").write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["crop", live.name])


def test_atomic_dir_puts_back_the_output_a_writer_killed_mid_swap_had_moved_aside(tmp_path: Path) -> None:
    """Killed between renaming the old output aside and moving the new one in: the old one returns."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    old, done = tmp_path / f".crop.old-{dead.pid}", tmp_path / f".crop.tmp-{dead.pid}"
    for folder, content in ((old, b"previous"), (done, b"new")):
        folder.mkdir()
        (folder / "manifest.parquet").write_bytes(content)
    failing = pytest.raises(RuntimeError, match="^this writer fails too$")
    with failing, atomic_dir(tmp_path / "crop", sign="manifest.parquet"):
        raise RuntimeError("this writer fails too")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop"]
    assert (tmp_path / "crop" / "manifest.parquet").read_bytes() == b"previous"
    (tmp_path / f".crop.old-{dead.pid}").mkdir()  # killed after the swap: the stale copy goes
    with atomic_dir(tmp_path / "crop", sign="manifest.parquet") as tmp:
        (tmp / "manifest.parquet").write_bytes(b"newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop"]


def test_a_killed_writer_whose_pid_this_run_reuses_is_dead(tmp_path: Path) -> None:
    """In a container each run can get the same pid: what the killed one left is tidied all the same."""
    old = tmp_path / f".crop.old-{os.getpid()}"
    old.mkdir()
    (old / "manifest.parquet").write_bytes(b"previous")
    failing = pytest.raises(RuntimeError, match="^this writer fails$")
    with failing, atomic_dir(tmp_path / "crop", sign="manifest.parquet"):
        raise RuntimeError("this writer fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop"]
    assert (tmp_path / "crop" / "manifest.parquet").read_bytes() == b"previous"


KILLED_IN_CLEANUP = """
import os, shutil, signal, sys
from pathlib import Path
from mcf.io import atomic_dir

out = Path(sys.argv[1])
real = shutil.rmtree

def killed_half_way(path, *args, **kwargs):
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    if len(files) > 1:  # the previous output, being deleted: the kill comes after its first file
        files[0].unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, *args, **kwargs)

shutil.rmtree = killed_half_way
with atomic_dir(out, sign="manifest.parquet") as tmp:
    (tmp / "manifest.parquet").write_bytes(b"new")
"""


def test_a_previous_output_killed_half_deleted_is_never_put_back(tmp_path: Path) -> None:
    """Killed while deleting the previous output after the swap (minutes for a large one), then the new
    output deleted (`dvc repro` deletes a stage's outputs before running it): what is left of the previous
    output must not return to its name as if whole."""
    out = tmp_path / "crop"
    out.mkdir()
    for name in ("a.tar", "manifest.parquet", "z.tar"):
        (out / name).write_bytes(b"previous")
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_CLEANUP, str(out)], env=os.environ)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "manifest.parquet").read_bytes() == b"new"
    shutil.rmtree(out)
    with pytest.raises(RuntimeError, match="^this run fails$"), atomic_dir(out, sign="manifest.parquet"):
        raise RuntimeError("this run fails")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_file_removes_the_temporary_files_killed_writers_left(tmp_path: Path) -> None:
    """A kill between writing ``.<name>.tmp-<pid>`` and renaming it leaves it: the next write of the same
    file removes it (metrics/ would gather one per kill), a live writer's is left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".evaluate.json.tmp-{dead.pid}", tmp_path / f".evaluate.json.tmp-{os.getppid()}"
    other = tmp_path / f".other.json.tmp-{dead.pid}"  # another file's: not this write's to judge
    for path in (stale, live, other):
        path.write_text('{"half')
    with atomic_file(tmp_path / "evaluate.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["evaluate.json", live.name, other.name])


def test_an_output_folder_that_is_a_link_stays_one(tmp_path: Path) -> None:
    """``outputs/crop -> /scratch/crop``: the run replaced the link with a real folder on the checkout's
    disk, left the previous output on the other one, and left the link behind as ``.crop.tmp-<pid>``,
    which no later run removes (rmtree refuses a link) and which a run given the same pid, as in a
    container, cannot create its folder over. The folder the link names is replaced instead."""
    scratch, outputs = tmp_path / "scratch", tmp_path / "outputs"
    (scratch / "crop").mkdir(parents=True)
    (scratch / "crop" / "manifest.parquet").write_bytes(b"previous")
    outputs.mkdir()
    (outputs / "crop").symlink_to(scratch / "crop", target_is_directory=True)
    for content in (b"new", b"newer"):
        with atomic_dir(outputs / "crop", sign="manifest.parquet") as tmp:
            (tmp / "manifest.parquet").write_bytes(content)
        assert (outputs / "crop").is_symlink() and [p.name for p in outputs.iterdir()] == ["crop"]
        assert (scratch / "crop" / "manifest.parquet").read_bytes() == content
        assert [p.name for p in scratch.iterdir()] == ["crop"]


def test_out_guard_counts_files_not_folders(tmp_path: Path) -> None:
    """dvc repro deletes a stage's declared files but may leave their folders: those are no one's data."""
    live = tmp_path / "live"
    (live / "plots" / "metrics").mkdir(parents=True)
    check_replaceable(live, "metrics.json")
    (live / "plots" / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match="holds no metrics.json"):
        check_replaceable(live, "metrics.json")
    (live / "metrics.json").write_text("{}")
    check_replaceable(live, "metrics.json")


def test_out_guard_passes_the_gitignore_dvc_leaves(tmp_path: Path) -> None:
    """pretrain's outs are files in its folder: where git does not ignore them already, DVC writes
    ``<out>/.gitignore`` naming them, and leaves it when it deletes them before a rerun."""
    out = tmp_path / "pretrain"
    out.mkdir()
    (out / ".gitignore").write_text("/checkpoint.pt\n/backbone\n/backbone_init\n")
    check_replaceable(out, "checkpoint.pt")
    with atomic_dir(out, sign="checkpoint.pt") as tmp:
        (tmp / "checkpoint.pt").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_a_file_where_the_output_folder_goes_is_refused_and_kept(tmp_path: Path) -> None:
    """An ``out`` naming one of your files: refused, not renamed aside and deleted with the old output."""
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(StageError, match="notes.txt exists and holds no manifest.parquet"):
        with atomic_dir(mine, sign="manifest.parquet"):
            pass
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_outputs_in_folders_not_made_yet(tmp_path: Path) -> None:
    """A first run writes ``outputs/<stage>/...`` and ``metrics/<file>`` where no parent exists yet."""
    with atomic_dir(tmp_path / "outputs" / "crop", sign="manifest.parquet") as tmp:
        (tmp / "manifest.parquet").write_bytes(b"new")
    with atomic_file(tmp_path / "metrics" / "m.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "outputs" / "crop" / "manifest.parquet").exists()
    assert (tmp_path / "metrics" / "m.json").read_text() == "{}"


def test_ctrl_c_in_an_atomic_dir_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "crop", sign="manifest.parquet") as tmp:
        (tmp / "crops-000000.tar").write_bytes(b"half written")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_another_users_live_writer_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.kill(pid, 0) on another user's process raises PermissionError: it is alive, its folder stays."""
    other = tmp_path / ".crop.tmp-4000000"
    other.mkdir()

    def kill(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    with atomic_dir(tmp_path / "crop", sign="manifest.parquet") as tmp:
        (tmp / "manifest.parquet").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["crop", other.name])


def test_an_output_folder_under_a_file_is_one_line_naming_it(tmp_path: Path) -> None:
    """An ``out`` below one of your files (a mistyped parent) is one line naming the ``out``, the file kept:
    listing that file for killed writers' leftovers, or making the folder, raises NotADirectoryError, which
    would end the stage in a traceback."""
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    line = rf"^cannot write {re.escape(str(mine / 'crop'))}: Not a directory$"
    refused = pytest.raises(StageError, match=line)
    with refused, atomic_dir(mine / "crop", sign="manifest.parquet"):
        pass
    assert mine.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


SWAP_THEN = """
import os, signal, sys
from pathlib import Path
from mcf.io import atomic_dir

out, then = Path(sys.argv[1]), sys.argv[2]
real = Path.rename

def killed_before_the_new_output_moves_in(self, target):
    if self.name.startswith(f".{out.name}.tmp-"):  # the previous output is aside, the new one not in yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, target)

if then == "killed":
    Path.rename = killed_before_the_new_output_moves_in
with atomic_dir(out, sign="manifest.parquet") as tmp:
    (tmp / "manifest.parquet").write_bytes(b"new")
    if then == "fails":
        sys.exit(3)
"""


def test_a_writer_killed_mid_swap_leaves_the_previous_output_for_the_next_run(tmp_path: Path) -> None:
    """Killed after renaming the previous output aside and before moving the new one in: the next run, a
    process of its own, puts the previous output back. The aside copy must carry the killed writer's pid:
    named after a process still alive (its parent, the shell), it would be left aside for good, the output
    gone though dvc.lock still describes it."""
    out = tmp_path / "crop"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"previous")

    def writer(then: str) -> int:
        return subprocess.run([sys.executable, "-c", SWAP_THEN, str(out), then], env=os.environ).returncode

    assert writer("killed") == -signal.SIGKILL and not out.exists()
    assert writer("fails") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop"]
    assert (out / "manifest.parquet").read_bytes() == b"previous"


def test_ctrl_c_in_an_atomic_file_keeps_the_previous_file_and_no_temporary_one(tmp_path: Path) -> None:
    """Removed on an Exception only, the temporary file of a Ctrl-C (KeyboardInterrupt) would stay, half
    written, beside the metrics file, and in a dvclive folder be published with the curves."""
    path = tmp_path / "m.json"
    path.write_text("previous")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as tmp:
        tmp.write_text('{"half')
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"] and path.read_text() == "previous"


def test_atomic_file_syncs_the_file_before_the_rename_and_its_folder_after(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """Without the first sync a power cut can leave the new name on an empty file (the rename reached the
    disk, the data did not); without the second the rename itself can be lost. Reading the file back
    cannot tell, so the real calls are recorded as they are made."""
    calls: list[tuple[str, int | str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: Path, dst: Path) -> None:
        calls.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_file(tmp_path / "m.json") as tmp:
        tmp.write_text("{}")
    inode = (tmp_path / "m.json").stat().st_ino
    assert calls == [("fsync", inode), ("replace", "m.json"), ("fsync", tmp_path.stat().st_ino)]


def test_unwritable_names_a_read_only_folder(tmp_path: Path) -> None:
    """evaluate and the gate check where they write before their long work: a read-only folder (a
    read-only mount; chmod 555 for a user) taken as writable would fail the write at the end. Mounting
    needs root, as on CI; skipped elsewhere."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        assert unwritable(ro / "metrics" / "evaluate.json") == f"{ro} is not writable"
    assert unwritable(ro / "metrics" / "evaluate.json") is None


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """File permissions as an ordinary user sees them (root reads a chmod 000 file)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_read_table_reads_the_named_columns_once_or_every_column(tmp_path: Path) -> None:
    """``only`` reads just the named columns (a LAION part has 15+), each once though named twice (laion's
    extra_columns may name its caption column again: a doubled column reads as a frame, not a Series);
    without ``only`` every column is read."""
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1], "b": [2], "c": [3]}).to_parquet(path)
    assert list(read_table(path, ["c", "a", "c"], "fix it", only=True).columns) == ["c", "a"]
    assert list(read_table(path, ["c"], "fix it").columns) == ["a", "b", "c"]


@pytest.mark.parametrize(("damage", "problem"), [
    ("columns", "no column b, c"),
    ("cut short", r"not a readable parquet table \(ArrowInvalid: .+\)"),
    ("footer", r"not a readable parquet table \(OSError: Couldn't deserialize thrift: .+\)"),
], ids=["columns", "cut short", "footer"])
def test_read_table_names_the_file_what_is_wrong_and_the_fix_on_one_line(
    tmp_path: Path, damage: str, problem: str
) -> None:
    """Every missing column is named, not the first alone. A damaged footer is pyarrow's plain OSError, not
    an Arrow error, and its message ends in a line break: it must neither escape as a traceback nor split
    the CLI's one line."""
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(path)
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[:20])
    elif damage == "footer":
        path.write_bytes(path.read_bytes()[:-8] + b"\0\0\0\0PAR1")  # the footer's length zeroed
    with pytest.raises(StageError) as err:
        read_table(path, ["a", "b", "c"], "rerun `mcf fetch`")
    assert re.fullmatch(rf"{re.escape(str(path))}: {problem}; rerun `mcf fetch`", str(err.value))


def test_read_table_leaves_an_unreadable_file_to_the_clis_permission_line(tmp_path: Path) -> None:
    """A table the user may not read is a PermissionError, which the CLI prints as "Permission denied:
    <file>"; taken for a damaged table, it would say "not a readable parquet table; rerun `mcf fetch`",
    and rerunning fetch does not fix a permission."""
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(path)
    path.chmod(0)
    with _as_nobody(), pytest.raises(PermissionError):
        read_table(path, ["a"], "rerun `mcf fetch`")


def test_missing_inputs_fail_clearly(fetch_dir: Path, tmp_path: Path) -> None:
    missing = r"crop.input: path does not exist: .*manifest.parquet \(run `mcf fetch` first\)"
    with pytest.raises(ParamsError, match=missing):
        crop(_cfg(tmp_path / "nowhere", tmp_path / "crop"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.parquet").write_bytes((fetch_dir / "manifest.parquet").read_bytes())
    with pytest.raises(StageError, match="detections.parquet"):
        crop(_cfg(bare, tmp_path / "crop", detections="table"))


def test_a_fetch_output_without_a_fetched_image_fails_the_gate(tmp_path: Path) -> None:
    """No image to crop hands merge no chunk, so no parts folder was made: removing it was a
    FileNotFoundError naming the staging folder. Now the gate names the empty output, as for images
    without a face."""
    (tmp_path / "fetch").mkdir()
    pd.DataFrame({"sample_id": ["a"], "path": [None], "status": ["http_error"]}).to_parquet(
        tmp_path / "fetch" / "manifest.parquet")
    with pytest.raises(GateError, match=r"expect_table_row_count_to_be_between\(\): observed 0"):
        crop(_cfg(tmp_path / "fetch", tmp_path / "crop"))
    _assert_no_output(tmp_path / "crop")


@pytest.mark.parametrize("name", ["manifest.parquet", "detections.parquet"])
@pytest.mark.parametrize("damage", ["not parquet", "a column gone"])
def test_a_fetch_table_the_stage_cannot_read_is_one_line(
    name: str, damage: str, fetch_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The fetch stage's manifest and detections table, damaged after its gate passed them, were
    pyarrow's ArrowInvalid traceback (a missing manifest column with the whole schema in it). Each is
    exit 1 on one line naming the file and the stage that writes it."""
    fetch = tmp_path / "fetch"
    shutil.copytree(fetch_dir, fetch)
    path = fetch / name
    if damage == "not parquet":
        path.write_text("sample_id,path,status\n")
    else:
        column = "status" if name == "manifest.parquet" else "box"
        pd.read_parquet(path).drop(columns=[column]).to_parquet(path)
    params = tmp_path / "params.yaml"
    section = {"input": str(fetch), "out": str(tmp_path / "crop"), "size": SIZE, "workers": 1}
    params.write_text(yaml.safe_dump({"crop": section | {"detections": "table"}}))
    assert cli_main(["crop", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mcf crop: {path}: ") and err.count("\n") == 1, err
    assert err.rstrip().endswith("rerun `mcf fetch`"), err
    assert not (tmp_path / "crop").exists()

def test_alignment_puts_landmarks_on_the_template() -> None:
    cfg = CropConfig(size=64, margin=0.25, align=True)
    face = Face(0, ASTRO_FACE, ASTRO_LANDMARKS, 0.99, "table")
    m = face_transform(face, cfg)
    mapped = np.asarray(ASTRO_LANDMARKS).reshape(5, 2) @ m[:, :2].T + m[:, 2]
    template = ((crop_mod.TEMPLATE - 0.5) / 1.5 + 0.5) * 64
    assert np.abs(mapped - template).max() < 4.0  # 5 points, 4 dof: close, not exact
    assert np.linalg.det(m[:, :2]) > 0  # a similarity, no mirror


def test_alignment_follows_a_tilted_face_onto_the_template() -> None:
    """Landmarks that are the template rotated, scaled and shifted (a tilted face) land on it exactly,
    whatever the box says: the crop is aligned by the points, not cut from the box."""
    cfg = CropConfig(size=64, margin=0.25, align=True)
    template = ((crop_mod.TEMPLATE - 0.5) / 1.5 + 0.5) * 64
    angle, scale, shift = 0.5, 2.5, np.array([180.0, 70.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = template @ rot.T + shift
    face = Face(0, ASTRO_FACE, tuple(points.reshape(-1)), 0.99, "table")
    m = face_transform(face, cfg)
    np.testing.assert_allclose(points @ m[:, :2].T + m[:, 2], template, atol=1e-9)


@pytest.mark.parametrize("box", [(40.0, 30.0, 100.0, 150.0), (10.0, 200.0, 250.0, 260.0)])
@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_the_box_and_its_margin_fill_the_crop_along_the_longer_side(
    box: tuple[float, ...], margin: float
) -> None:
    """Unaligned, the crop is the face box grown by ``margin`` of its size on each side (CropConfig),
    squared on the longer side and centred: the longer side spans the crop less the margins, the
    shorter side sits in the middle, x stays x."""
    size = 60
    m = face_transform(Face(0, box, None, 0.99, "table"), CropConfig(size=size, margin=margin))
    x1, y1, x2, y2 = box
    s = size / ((1 + 2 * margin) * max(x2 - x1, y2 - y1))
    corners = np.array([[x1, y1], [x2, y2]]) @ m[:, :2].T + m[:, 2]
    centre = size / 2
    expected = [[centre - s * (x2 - x1) / 2, centre - s * (y2 - y1) / 2],
                [centre + s * (x2 - x1) / 2, centre + s * (y2 - y1) / 2]]
    np.testing.assert_allclose(corners, expected, atol=1e-9)
    longer = int(np.argmax([x2 - x1, y2 - y1]))
    np.testing.assert_allclose(corners[:, longer], [size * margin / (1 + 2 * margin),
                                                    size * (1 + margin) / (1 + 2 * margin)])


def test_padding_outside_the_image() -> None:
    rgb = np.full((100, 100, 3), 200, np.uint8)
    rgb[:, :50] = 100
    m = face_transform(Face(0, (-40.0, 20.0, 20.0, 80.0), None, None, "haar"), CropConfig(size=32, margin=0))
    constant = warp_crop(rgb, m, 32, "constant")
    reflect = warp_crop(rgb, m, 32, "reflect")
    assert constant.shape == reflect.shape == (32, 32, 3)
    assert constant[:, :10].max() == 0 and constant[:, -8:].min() == 100
    assert reflect.min() == 100  # the left edge mirrored in


def test_reflect_padding_mirrors_the_image_not_the_region_cropped() -> None:
    """A crop reaching further outside the image than inside mirrors image pixels beyond the region it
    covers: warping only that region would bounce the mirror off a cut that is no image edge."""
    rgb = np.repeat(np.repeat(np.arange(0, 200, 2, dtype=np.uint8)[None, :, None], 60, 0), 3, 2)
    m = face_transform(Face(0, (80.0, 0.0, 140.0, 60.0), None, None, "haar"), CropConfig(size=60, margin=0))
    centres = m.copy()
    centres[:, 2] += m[:, :2].sum(axis=1) * 0.5 - 0.5
    whole = cv2.warpAffine(rgb, centres, (60, 60), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    got = warp_crop(rgb, m, 60, "reflect")
    assert got[0, :, 0].tolist() == whole[0, :, 0].tolist() == [*range(160, 200, 2), *range(196, 116, -2)]


@pytest.mark.parametrize(("shape", "box", "offset"), [
    ((40, 33000), (-10.0, 4.0, 30.0, 36.0), (0, 0)),  # a banner's left edge
    ((40, 33000), (32970.0, 4.0, 33010.0, 36.0), (32800, 0)),  # its right edge
    ((33000, 40), (4.0, 32970.0, 36.0, 33010.0), (0, 32800)),  # a tall image's bottom edge
])
def test_a_reflect_padded_crop_at_an_edge_of_a_huge_image_reads_only_what_the_mirror_needs(
    shape: tuple[int, int], box: tuple[float, ...], offset: tuple[int, int]
) -> None:
    """OpenCV's warps refuse a side of 32767 px or more: a face at an edge of an image that long, with
    crop.pad reflect, failed the whole stage, as the crop warped the image's full width or height to
    mirror it. The mirror reads only as far inside the edge as the crop reaches outside, so the crop is
    the one of the 200-px piece at that edge."""
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    m = face_transform(Face(0, box, None, 0.99, "table"), CropConfig(size=32, margin=0.25))
    (x, y), (h, w) = offset, shape
    piece = rgb[y : min(y + 200, h), x : min(x + 200, w)]
    in_piece = m.copy()
    in_piece[:, 2] += m[:, :2] @ np.array(offset, np.float64)
    assert np.array_equal(warp_crop(rgb, m, 32, "reflect"), warp_crop(piece, in_piece, 32, "reflect"))


def test_a_crop_wholly_outside_a_huge_image_is_all_pad() -> None:
    """An aligned crop goes where the landmarks are, which may be off the image: it is black, and was
    OpenCV's assertion on an image with a side of 32767 px or more, the whole of which was warped."""
    rgb = np.full((40, 33000, 3), 200, np.uint8)
    m = np.array([[1.0, 0.0, 100.0], [0.0, 1.0, 0.0]])  # the crop sees x -100..-68, left of the image
    assert not warp_crop(rgb, m, 32, "constant").any()


def test_downscaled_crop_matches_area_resize() -> None:
    rgb = _rgb("astronaut")
    m = face_transform(Face(0, (0.0, 0.0, 512.0, 512.0), None, None, "haar"), CropConfig(size=64, margin=0))
    expected = cv2.resize(rgb, (64, 64), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(warp_crop(rgb, m, 64, "constant") - expected).mean() < 2.0


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_phash_and_duplicates() -> None:
    astro = cv2.resize(_rgb("astronaut"), (64, 64), interpolation=cv2.INTER_AREA)
    noisy = np.clip(astro + np.random.default_rng(0).normal(0, 4, astro.shape), 0, 255).astype(np.uint8)
    assert hamming(phash(astro), phash(noisy)) <= 4
    assert hamming(phash(astro), phash(np.ascontiguousarray(astro[:, ::-1]))) > 10
    rng = np.random.default_rng(1)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300)]
    hashes += [h ^ (1 << int(rng.integers(64))) ^ (1 << int(rng.integers(64))) for h in hashes[:50]]
    for d in (0, 2, 5):
        assert duplicates(hashes, d) == _greedy(hashes, d)
    assert sum(duplicates(hashes, 2)) >= 50


def _greedy(hashes: list[int], d: int) -> list[bool]:
    """The definition: a duplicate is within ``d`` bits of an earlier kept hash (a quadratic scan)."""
    kept: list[int] = []
    flags = []
    for h in hashes:
        flags.append(any(hamming(h, k) <= d for k in kept))
        if not flags[-1]:
            kept.append(h)
    return flags


def test_blur_score_is_the_laplacian_variance_of_the_grey_crop() -> None:
    """docs/CONTRACTS.md: ``blur`` is the variance of the Laplacian of the grey crop, which
    ``crop.min_blur`` is set against. One-pixel stripes of 0 and v have a Laplacian of ±2v everywhere, a
    variance of 4v²; red stripes are grey 76 (0.299 × 255), where reading the crop as BGR made them 29."""
    stripes = np.zeros((8, 8, 3), np.uint8)
    stripes[:, 1::2] = 100
    assert blur_score(stripes) == 4 * 100**2
    red = np.zeros((8, 8, 3), np.uint8)
    red[:, 1::2, 0] = 255
    assert blur_score(red) == 4 * 76**2


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: row k is frequency k sampled at the n pixel centres."""
    k, x = np.arange(n)[:, None], np.arange(n)[None, :]
    c = np.sqrt(2 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    c[0] /= np.sqrt(2)
    return c


def test_phash_follows_its_definition() -> None:
    """The pHash as documented, written out in NumPy on 96-px crops: the grey image averaged down to 32 × 32,
    its 8 × 8 lowest DCT frequencies (row-major, the first the most significant bit) above the median of
    all but the DC term. The robustness checks above pass for many variants (BGR grey, a bilinear
    thumbnail, ``>=``, another bit order), each of which changes every manifest's hashes."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    corner = np.zeros((96, 96, 3), np.uint8)  # dark but its corner: every low frequency beats the DC term
    corner[:3, :6], corner[3:6, :3] = (255, 40, 0), (90, 90, 90)
    c = _dct_matrix(32)
    for rgb in (noise, corner):
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(float)
        low = (c @ gray.reshape(32, 3, 32, 3).mean(axis=(1, 3)) @ c.T)[:8, :8].reshape(-1)
        bits = "".join("1" if v > np.median(low[1:]) else "0" for v in low)
        assert f"{phash(rgb):064b}" == bits


@pytest.mark.parametrize("d", [0, 1, 2, 3, 7])
def test_duplicates_in_clusters_and_chains(d: int) -> None:
    """Face hashes cluster: crowded blocks, exact repeats, chains (A kept, B near A dropped, C near B
    but not A kept), and the full 64-bit range."""
    rng = np.random.default_rng(d)
    centres = [int(c) for c in rng.integers(0, 2**64, 12, dtype=np.uint64)]
    hashes = []
    for _ in range(1500):
        h = centres[int(rng.integers(len(centres)))]
        for bit in rng.integers(0, 64, int(rng.integers(0, 6))):
            h ^= 1 << int(bit)
        hashes.append(h)
    hashes += hashes[:40]  # exact repeats, late
    flags = duplicates(hashes, d)
    assert flags == _greedy(hashes, d)
    assert 0 < sum(flags) < len(hashes)


@pytest.mark.parametrize(("bits", "status"), [(2, "rejected"), (3, "kept")])
def test_merge_counts_a_phash_distance_of_dup_hamming_as_a_duplicate(
    tmp_path: Path, bits: int, status: str
) -> None:
    """``crop.dup_hamming`` is the largest pHash distance counted as a duplicate (params.yaml), so a crop
    exactly that far from an earlier kept one is rejected and one bit further is kept; the earlier
    stays."""
    cv2.imwrite(str(tmp_path / "a.jpg"), cv2.cvtColor(_rgb("astronaut"), cv2.COLOR_RGB2BGR))
    boxes = (ASTRO_FACE, (300.0, 300.0, 420.0, 420.0))
    faces = tuple(Face(i, box, None, 0.99, "table") for i, box in enumerate(boxes))
    cfg = CropConfig(size=SIZE, min_blur=0.0, dup_hamming=2)
    result = crop_chunk([Source("a", str(tmp_path / "a.jpg"), faces)], cfg, tmp_path / "part")
    assert result.rows["status"].tolist() == ["kept", "kept"]
    near = int(result.rows.loc[0, "phash"], 16) ^ ((1 << bits) - 1)  # the first `bits` bits flipped
    result.rows.loc[1, "phash"] = f"{near:016x}"
    manifest = crop_mod.merge([result], cfg, tmp_path / "out")
    assert manifest["status"].tolist() == ["kept", status]
    assert manifest["reason"].tolist() == [None, None if status == "kept" else "duplicate"]


def test_duplicates_bench_prints_its_numbers(
    capsys: pytest.CaptureFixture[str], monkeypatch: MonkeyPatch
) -> None:
    """Its distance defaults to the crop stage's ``crop.dup_hamming``, and its rate is the hashes over the
    timed seconds, not the duplicates found over them."""
    from mcf.data import quality

    ticks = itertools.count(0.0, 2.0)
    monkeypatch.setattr(quality, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    bench_duplicates(["--hashes", "3000", "--spread", "0.05"])
    out = capsys.readouterr().out
    assert out.startswith("duplicates bench: 3000 hashes from 2000 parents") and "hashes/s" in out
    assert f", distance {CropConfig().dup_hamming}: " in out
    assert re.search(r": \d+ duplicates in 2\.00 s = 1,500 hashes/s$", out.strip()), out
    with pytest.raises(SystemExit):
        bench_duplicates(["--spread", "0.7"])


@pytest.mark.parametrize(("table", "message"), [
    (None, "not a readable parquet table"),
    (pd.DataFrame({"crop_id": ["a_000"]}), "no column phash; rerun `mcf crop`"),
    (pd.DataFrame({"phash": [None, None]}), "no crop has a phash"),
    (pd.DataFrame({"phash": ["00ff00ff00ff00fg"]}), "a phash that is not 16 hex digits"),
    (pd.DataFrame({"phash": ["00ff"]}), "a phash that is not 16 hex digits"),
    (pd.DataFrame({"phash": ["00ff00ff00ff00f"]}), "a phash that is not 16 hex digits"),  # the gate's regex
    (pd.DataFrame({"phash": ["00FF00FF00FF00FF"]}), "a phash that is not 16 hex digits"),  # lower case only
])
def test_duplicates_bench_on_a_damaged_manifest_is_one_line(
    tmp_path: Path, table: pd.DataFrame | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--manifest` read the parquet unguarded: pyarrow's ArrowInvalid, a KeyError, numpy's ValueError
    ("high <= 0") or int()'s ValueError ended it in a traceback. Now one line, exit 1; no file, exit 2."""
    manifest = tmp_path / "manifest.parquet"
    if table is None:
        manifest.write_bytes(b"PAR1 cut short")
    else:
        table.to_parquet(manifest)
    assert cli_main(["bench", "duplicates", "--hashes", "10", "--manifest", str(manifest)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mcf bench: {manifest}: ") and message in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        bench_duplicates(["--manifest", str(tmp_path / "nope.parquet")])
    assert exit_.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # crop's output folder, not its manifest: not "no such file"
        bench_duplicates(["--manifest", str(tmp_path)])
    assert exit_.value.code == 2 and "a folder, not a parquet file" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--hashes", "0"], ["--spread", "-0.1"], ["--distance", "32"]])
def test_duplicates_bench_refuses_arguments_out_of_range(args: list[str]) -> None:
    """The ranges its usage error states: no hashes ended in numpy's "need at least one array to
    concatenate" traceback, and a negative spread or a distance past 31 ran on as if valid."""
    with pytest.raises(SystemExit) as exit_:
        bench_duplicates(["--hashes", "10", *args])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "args", [["--hashes", "1"], ["--spread", "0.5"], ["--distance", "0"], ["--distance", "31"]]
)
def test_duplicates_bench_takes_the_ends_of_its_ranges(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The ranges its usage error states are closed: 0.5 (every bit a coin toss), distance 0 (exact
    repeats alone, as ``crop.dup_hamming: 0``) and 31 run."""
    bench_duplicates(["--hashes", "10", *args])
    assert capsys.readouterr().out.startswith("duplicates bench: ")


def test_duplicates_bench_draws_as_many_hashes_as_asked_the_same_each_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With no bit flipped, 2,500 hashes drawn from 2,000 parents repeat some parents and no more than
    2,500 are duplicates; a second run, seeded, finds the same count (a bench compared across commits)."""
    counts = []
    for _ in range(2):
        bench_duplicates(["--hashes", "2500", "--spread", "0"])
        counts.append(int(re.search(r": (\d+) duplicates in", capsys.readouterr().out)[1]))
    assert 0 < counts[0] < 2500 and counts[0] == counts[1]


def test_duplicates_bench_takes_its_parents_from_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pd.DataFrame({"phash": ["00ff00ff00ff00ff", None, "0123456789abcdef"]}).to_parquet(tmp_path / "m.parquet")
    bench_duplicates(["--hashes", "50", "--manifest", str(tmp_path / "m.parquet")])
    assert capsys.readouterr().out.startswith("duplicates bench: 50 hashes from 2 parents")


def test_crop_id_is_a_safe_shard_key() -> None:
    assert crop_id("synth-000001", 2) == "synth-000001_002"
    odd = crop_id("photos/a.b.jpg", 0)
    assert "." not in odd and "/" not in odd and odd != crop_id("photos/a_b.jpg", 0)
    # every id that needed a character replaced gets the hash, so it cannot take a safe id's key
    for unsafe, safe in (("a.b", "a_b"), ("x y", "x_y"), ("é", "_")):
        assert crop_id(unsafe, 1) != crop_id(safe, 1) and re.fullmatch(r"[A-Za-z0-9_-]+", crop_id(unsafe, 1))


def test_bench_rates_faces_and_kept_crops_apart(fetch_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On real input some faces are rejected: the rate of faces cropped is not a rate of crops kept."""
    bench_crop(["--input", str(fetch_dir), "--workers", "1"])
    line = capsys.readouterr().out
    faces, kept = map(int, re.search(r"(\d+) faces, (\d+) crops kept", line).groups())
    face_rate, kept_rate = map(float, re.search(r"([\d.]+) faces/s \(([\d.]+) crops kept/s\)", line).groups())
    assert 0 < kept < faces and kept_rate / face_rate == pytest.approx(kept / faces, rel=0.05)
    # and why the others went, each reason counted
    rejected = re.search(r"crops kept \(rejected: ([^)]+)\)", line).group(1).split(", ")
    assert sum(int(part.split()[0]) for part in rejected) == faces - kept, line


def test_bench_says_why_no_crop_was_kept(capsys: pytest.CaptureFixture[str]) -> None:
    """At 10-px images every face is too small to crop: "0 crops kept" alone left the user guessing."""
    bench_crop(["--images", "3", "--image-size", "10", "--workers", "1"])
    assert re.search(r"3 faces, 0 crops kept \(rejected: 3 too_small\)", capsys.readouterr().out)


def test_an_image_the_stage_may_not_read_fails_it_naming_the_file(
    tmp_path: Path, monkeypatch: MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenCV returns None for a file it may not open as for bytes it cannot decode, so a chmod 000 image
    was filed as `undecodable` and the stage passed without it. That is the environment, not the data: the
    stage fails (exit 1) on one line naming the file, as for its other unreadable inputs, and publishes
    nothing. Root (CI containers) reads a chmod 000 file, so there OpenCV and the read are denied here."""
    samples = {k: v for k, v in _samples().items() if k in ("camera", "coffee")}
    fetch = make_fetch_dir(tmp_path / "fetch", samples)
    locked = fetch / "images" / "coffee.jpg"
    locked.chmod(0)
    if os.geteuid() == 0:
        imread, path_open = cv2.imread, Path.open

        def denied(self: Path, *args: object, **kwargs: object) -> object:
            if self == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return path_open(self, *args, **kwargs)

        monkeypatch.setattr(cv2, "imread", lambda p, *args: None if Path(p) == locked else imread(p, *args))
        monkeypatch.setattr(Path, "open", denied)
    params = {"crop": {"input": str(fetch), "out": str(tmp_path / "crop"), "size": SIZE, "workers": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli_main(["crop", "--params", str(tmp_path / "params.yaml")]) == 1
    assert capsys.readouterr().err == f"mcf crop: Permission denied: {locked}\n"
    assert not (tmp_path / "crop").exists()


def test_writing_the_shards_shows_progress(fetch_dir: Path, tmp_path: Path, monkeypatch: MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """merge copies every kept crop into the final shards: an hour or more at the paper's 20M (about 0.3 ms
    a crop here) with no bar, after the crop bar had reached 100%."""
    monkeypatch.setattr(crop_mod, "tqdm", functools.partial(crop_mod.tqdm, disable=False))
    manifest = crop(_cfg(fetch_dir, tmp_path / "crop"))
    kept = int((manifest["status"] == "kept").sum())
    assert f"write shards: 100%|██████████| {kept}/{kept} " in capsys.readouterr().err


def test_an_out_that_is_the_fetch_output_is_refused(tmp_path: Path) -> None:
    """The fetch output holds manifest.parquet, the sign of an earlier crop output, so ``crop.out`` naming
    the ``crop.input`` folder would replace the fetched images with their crops."""
    (tmp_path / "fetch" / "images").mkdir(parents=True)
    for out in (tmp_path / "fetch", tmp_path / "fetch" / "images" / ".."):
        with pytest.raises(ParamsError, match=r"crop.out: is crop.input, the fetch stage's output .*replace"):
            build(CropConfig, {"input": str(tmp_path / "fetch"), "out": str(out)}, "crop")
    build(CropConfig, {"input": str(tmp_path / "fetch"), "out": str(tmp_path / "crop")}, "crop")


def test_a_crop_size_past_the_bound_is_a_params_error() -> None:
    """An unbounded ``crop.size`` (a typo'd 64000) passed the params check, and the stage then died in
    OpenCV's out-of-memory traceback on its first face, exit 1 instead of 2."""
    with pytest.raises(ParamsError, match=r"^crop\.size: must be <= 1024, got 64000$"):
        build(CropConfig, {"size": 64000}, "crop")
    assert build(CropConfig, {"size": 1024}, "crop").size == 1024


def test_bench_sizes_the_image_list_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--list-only``: the image list's load time and bytes an image, on tables without JPEGs (the
    paper's 20M images cannot be generated here, their list can)."""
    bench_crop(["--list-only", "--images", "3000"])
    out = capsys.readouterr().out.strip()
    held = int(re.fullmatch(r"crop bench: image list of 3000 images loaded in [\d.]+ s, (\d+) B an image "
                            r"held", out).group(1))
    assert 100 < held < 1000


def test_bench_input_without_a_manifest_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was reported as the params key ``crop.input`` (run mcf fetch first), though the user gave a flag."""
    with pytest.raises(SystemExit) as exit_:
        bench_crop(["--input", str(tmp_path / "nope")])
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and f"--input {tmp_path / 'nope'}: no manifest.parquet there" in err


@pytest.mark.parametrize(("flags", "message"), [
    (["--size", "100000"], "--size must be <= 1024, got 100000"),
    (["--size", "8"], "--size must be >= 16, got 8"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_bench_takes_the_stage_s_bounds_on_size_and_workers(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bench built its CropConfig past the params check: --size 100000 ended in OpenCV's out-of-memory
    traceback once the images were generated, and --size 8 ran a size the stage refuses."""
    with pytest.raises(SystemExit) as exit_:
        bench_crop(["--images", "1", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_refuses_generated_images_too_small_to_texture(capsys: pytest.CaptureFixture[str]) -> None:
    """The generated images are an (image-size / 8)² noise upscaled: below 8 px that is empty, and
    OpenCV's resize raised an assertion traceback (exit 1) once the bench ran. A usage error instead."""
    with pytest.raises(SystemExit) as exit_:
        bench_crop(["--images", "1", "--image-size", "7"])
    assert exit_.value.code == 2 and "--image-size must be at least 8" in capsys.readouterr().err
