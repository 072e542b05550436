"""SynthFace: determinism, ground truth that agrees with the drawn image, and the real on-disk formats."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.io

from mcf.data.aflw19 import AFLW19, AFLW19Config
from mcf.errors import StageError
from mcf.params import ParamsError, build
from mcf.synth import (
    AflwSynthConfig,
    FaceSample,
    LapaSynthConfig,
    SynthConfig,
    render_face,
    sample_identity,
    write_aflw19,
    write_corpus,
    write_lapa,
)
from mcf.synth.bench import bench_synth
from mcf.synth.geometry import face_shapes, inside_face, sample_expression
from mcf.synth.head import Pose, project_surface
from mcf.synth.identity import KIND_AFLW, KIND_LAPA
from mcf.synth.texture import hair_streaks, paint_texture
from mcf.synth.writers import _render_face, _render_scene, is_synthface, names_synthface

SMALL = SynthConfig(
    n_scenes=6, scene_size=128, n_identities=4, aflw=AflwSynthConfig(n_train=5, n_test=3, image_size=96),
    lapa=LapaSynthConfig(n_train=3, n_val=2, n_test=2, image_size=96), difficulty=1.0,
)


def _face(seed: int, index: int, size: int = 128, cfg: SynthConfig = SMALL) -> FaceSample:
    rng = np.random.default_rng([seed, 2, index])
    return render_face(cfg, rng, sample_identity(seed, index % 7), size)


def test_render_face_is_deterministic_and_seed_dependent() -> None:
    a, b, c = _face(1, 5), _face(1, 5), _face(2, 5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.landmarks106, b.landmarks106) and np.array_equal(a.visible19, b.visible19)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
    assert a.labels.shape == (128, 128) and a.labels.dtype == np.uint8


@pytest.mark.parametrize("size", [96, 160])
def test_ground_truth_matches_the_drawn_face(size: int) -> None:
    eyes_checked = 0
    for i in range(20):
        s = _face(3, i, size)
        for pts in (s.landmarks19, s.landmarks106, s.landmarks5, s.box.reshape(2, 2)):
            assert (pts >= 0).all() and (pts <= size - 1).all(), f"face {i}: a point leaves the image"
        assert set(np.unique(s.labels)) <= set(range(11))
        assert np.array_equal(s.landmarks106[[104, 105, 54, 84, 90]], s.landmarks19[[7, 10, 13, 15, 17]])
        assert np.array_equal(s.landmarks5, s.landmarks19[[7, 10, 13, 15, 17]])
        eyes = ((s.landmarks19[7], 4, s.visible19[7]), (s.landmarks19[10], 5, s.visible19[10]),
                (s.landmarks106[104], 4, s.visible19[7]), (s.landmarks106[105], 5, s.visible19[10]))
        for pt, label, visible in eyes:
            if visible:
                x, y = np.round(pt).astype(int)
                assert s.labels[y, x] == label, f"face {i}: eye centre on label {s.labels[y, x]}"
                eyes_checked += 1
        assert (s.box[:2] <= s.landmarks19.min(0)).all() and (s.landmarks19.max(0) <= s.box[2:]).all()
    assert eyes_checked >= 40  # most eyes are visible even at difficulty 1


def test_yaw_shifts_features_and_compresses_the_far_side() -> None:
    ident = sample_identity(0, 1)
    shapes = face_shapes(ident, sample_expression(np.random.default_rng(0), 0.0))
    frontal = Pose(0.0, 0.0, 0.0, 50.0, 100.0, 100.0, (0.0, 0.0, 1.0), 0.6)
    turned = Pose(np.radians(30), 0.0, 0.0, 50.0, 100.0, 100.0, (0.0, 0.0, 1.0), 0.6)
    pix, facing = project_surface(ident, turned, shapes.lm19)
    front, _ = project_surface(ident, frontal, shapes.lm19)
    assert facing.all()
    assert pix[13, 0] > (pix[6, 0] + pix[11, 0]) / 2  # the nose tip moves towards the turn
    assert pix[11, 0] - pix[9, 0] < pix[8, 0] - pix[6, 0]  # the right eye is foreshortened
    assert pix[11, 0] - pix[9, 0] < front[11, 0] - front[9, 0]  # it turned away from the camera


def test_aflw19_mat_reads_like_the_real_file(tmp_path: Path) -> None:
    write_aflw19(SMALL, 0, tmp_path)
    mat = scipy.io.loadmat(tmp_path / "AFLWinfo_release.mat")
    header = (tmp_path / "AFLWinfo_release.mat").read_bytes()[:116]
    assert header.startswith(b"MATLAB 5.0 MAT-file") and b"Created on" not in header  # no clock: same bytes
    n = SMALL.aflw.n_train + SMALL.aflw.n_test
    assert mat["bbox"].shape == (n, 4) and mat["data"].shape == (n, 38) and mat["mask_new"].shape == (n, 19)
    assert mat["nameList"].shape == (n, 1) and mat["ra"].shape == (1, n)
    assert sorted(mat["ra"][0].astype(int)) == list(range(1, n + 1))
    assert set(np.unique(mat["mask_new"])) <= {0.0, 1.0}
    for row in range(n):
        name = str(mat["nameList"][row, 0][0])
        assert name.split("/")[0] in {"0", "2", "3"}
        img = cv2.imread(str(tmp_path / "data" / "flickr" / name))
        assert img.shape == (96, 96, 3)
        left, right, top, bottom = mat["bbox"][row]
        xs, ys = mat["data"][row, :19], mat["data"][row, 19:]
        assert 0 <= left < right <= 96 and 0 <= top < bottom <= 96
        w, h = right - left, bottom - top  # the face box is tight: landmarks inside, margin under 10%
        assert (xs >= left - 0.1 * w).all() and (xs <= right + 0.1 * w).all()
        assert (ys >= top - 0.1 * h).all() and (ys <= bottom + 0.1 * h).all()
    ids = pd.read_csv(tmp_path / "synthface_identities.csv")
    assert list(ids.columns) == ["name", "identity", "split"] and len(ids) == n
    assert ids["identity"].tolist() == [i % SMALL.n_identities for i in range(n)]  # the corpus's pool
    train = set(mat["ra"][0, : SMALL.aflw.n_train].astype(int) - 1)  # the first n_train of ra train
    assert ids["split"].tolist() == ["train" if i in train else "test" for i in range(n)]
    assert len(AFLW19(AFLW19Config(root=str(tmp_path), n_train=5, size=32, crop_size=32), "full")) == 3
    with pytest.raises(StageError, match="n_train = 4, but .* was written with 5 training images"):
        AFLW19(AFLW19Config(root=str(tmp_path), n_train=4), "full")  # would test on a training image


def test_files_put_pixel_centres_where_the_loaders_do(tmp_path: Path) -> None:
    """Pixel j spans [j, j + 1) in the files (mcf.data.transforms): an eye-centre landmark sits at the
    centroid of its drawn eye's pixel centres j + 0.5 (the renderer's own centres are at j)."""
    cfg = dataclasses.replace(SMALL, lapa=dataclasses.replace(SMALL.lapa, n_train=40, image_size=96))
    write_lapa(cfg, 0, tmp_path)
    offsets = []
    for txt in sorted((tmp_path / "LaPa" / "train" / "landmarks").glob("*.txt")):
        points = np.loadtxt(txt, skiprows=1)
        labels = cv2.imread(str(txt.parent.parent / "labels" / f"{txt.stem}.png"), cv2.IMREAD_UNCHANGED)
        for index, cls in ((104, 4), (105, 5)):  # eye centres, eye classes
            xs = np.nonzero(labels == cls)[1]
            if len(xs) > 20:
                offsets.append(xs.mean() + 0.5 - points[index, 0])
    assert len(offsets) > 10 and abs(np.mean(offsets)) < 0.25, np.mean(offsets)  # 0.55 before the shift


def test_written_coordinates_are_the_renderer_s_plus_half_a_pixel(tmp_path: Path) -> None:
    """The AFLW-19 box and points and the corpus boxes and 5 points: the renderer's (pixel centres at j)
    moved by PIXEL_CENTRE into the loaders' frame, each one (a box left behind sits half a pixel off)."""
    write_aflw19(SMALL, 0, tmp_path / "aflw")
    mat = scipy.io.loadmat(tmp_path / "aflw" / "AFLWinfo_release.mat")
    face = _render_face(SMALL, 0, KIND_AFLW, SMALL.aflw.image_size, 1)
    np.testing.assert_allclose(mat["bbox"][1], face.box[[0, 2, 1, 3]] + 0.5)  # left, right, top, bottom
    np.testing.assert_allclose(mat["data"][1], np.r_[face.landmarks19[:, 0], face.landmarks19[:, 1]] + 0.5)
    np.testing.assert_array_equal(mat["mask_new"][1], face.visible19)  # 1 = visible, as rendered
    _, dets = write_corpus(SMALL, 0, tmp_path / "corpus")
    _, scene = _render_scene(SMALL, 0, 0)
    first = dets[dets.sample_id == "synth-0000000"]
    np.testing.assert_allclose(np.stack(first.box), np.asarray(scene.boxes, np.float64) + 0.5)
    points = np.stack([np.asarray(lm, np.float64).reshape(-1) for lm in scene.landmarks5])
    np.testing.assert_allclose(np.stack(first.landmarks), points + 0.5)


def test_lapa_tree_has_matching_files(tmp_path: Path) -> None:
    write_lapa(SMALL, 0, tmp_path)
    for split, first, count in (("train", 0, 3), ("val", 3, 2), ("test", 5, 2)):  # in order, as counted
        root = tmp_path / "LaPa" / split
        stems = {d: sorted(p.stem for p in (root / d).iterdir()) for d in ("images", "labels", "landmarks")}
        assert stems["images"] == [f"synth_{i:06d}" for i in range(first, first + count)]
        assert stems["images"] == stems["labels"] == stems["landmarks"]
        for stem in stems["images"]:
            img = cv2.imread(str(root / "images" / f"{stem}.jpg"))
            lab = cv2.imread(str(root / "labels" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            assert lab.ndim == 2 and lab.dtype == np.uint8 and lab.shape == img.shape[:2]
            assert lab.max() <= 10 and (lab == 1).any()
            lines = (root / "landmarks" / f"{stem}.txt").read_text().split("\n")
            assert lines[0] == "106" and len([ln for ln in lines[1:] if ln]) == 106
            pts = np.array([[float(v) for v in ln.split()] for ln in lines[1:] if ln])
            assert (pts >= 0).all() and (pts <= 95).all()


def test_a_tree_that_lost_its_identities_table_is_still_synthface(tmp_path: Path) -> None:
    """evaluate refuses a SynthFace number labelled AFLW-19 or LaPa: the .mat header and LaPa's names
    keep saying SynthFace when the table is gone, and AFLW-19 then refuses to guess its split."""
    aflw, lapa = tmp_path / "aflw", tmp_path / "lapa"
    write_aflw19(SMALL, 0, aflw)
    write_lapa(SMALL, 0, lapa)
    for root in (aflw, lapa):
        (root / "synthface_identities.csv").unlink()
        assert is_synthface(root)
    with pytest.raises(StageError, match="without its synthface_identities.csv"):
        AFLW19(AFLW19Config(root=str(aflw), n_train=5), "full")
    real = tmp_path / "real"  # scipy's own header and real LaPa names: not SynthFace
    real.mkdir()
    scipy.io.savemat(real / "AFLWinfo_release.mat", {"bbox": np.zeros((1, 4))})
    (real / "LaPa" / "test" / "images").mkdir(parents=True)
    (real / "LaPa" / "test" / "images" / "10042.jpg").write_bytes(b"")
    assert not is_synthface(real) and not is_synthface(tmp_path / "missing")


def test_corpus_manifest_and_detections_agree(tmp_path: Path) -> None:
    manifest, dets = write_corpus(SMALL, 0, tmp_path)
    assert list(manifest.columns) == ["sample_id", "path", "status", "error", "sha256", "width", "height",
                                      "caption", "source", "identities"]
    assert manifest.sample_id.is_unique and (manifest.status == "success").all()
    assert set(dets.sample_id) == set(manifest.sample_id)
    for row in manifest.itertuples():
        data = (tmp_path / row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        faces = dets[dets.sample_id == row.sample_id]
        assert sorted(faces.face) == list(range(len(row.identities))) and 1 <= len(faces) <= 3
        for box, lm in zip(faces.box, faces.landmarks, strict=True):
            assert len(box) == 4 and len(lm) == 10 and box[0] < box[2] and box[1] < box[3]
            assert all(0.5 <= v <= 127.5 for v in [*box, *lm])  # pixel centres at j + 0.5 (the loaders')
    assert (dets.score == 1.0).all()
    _, _ = write_corpus(SynthConfig(n_scenes=2, scene_size=128, n_identities=4, difficulty=1.0), 0,
                        tmp_path / "again")
    for i in range(2):  # an image depends on (seed, index) only, not on the set size
        name = f"images/synth-{i:07d}.jpg"
        assert (tmp_path / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    other, _ = write_corpus(SynthConfig(n_scenes=1, scene_size=128), 1, tmp_path / "other")
    assert other.sha256[0] != manifest.sha256[0]


def test_config_builds_from_params_and_rejects_bad_values() -> None:
    cfg = build(SynthConfig, {"n_scenes": 10, "aflw": {"n_train": 4}, "jpeg_quality": [60, 90]}, "synthetic")
    assert cfg.aflw.n_train == 4 and cfg.aflw.n_test == 200 and cfg.jpeg_quality == (60, 90)
    with pytest.raises(ParamsError, match="synthetic.jpeg_quality"):
        build(SynthConfig, {"jpeg_quality": [95, 70]}, "synthetic")
    with pytest.raises(ParamsError, match="synthetic.difficulty"):
        build(SynthConfig, {"difficulty": 1.5}, "synthetic")


def test_identities_are_stable_and_distinct() -> None:
    assert sample_identity(0, 3) == sample_identity(0, 3)
    assert sample_identity(0, 3) != sample_identity(0, 4) and sample_identity(0, 3) != sample_identity(1, 3)
    with pytest.raises(ValueError, match="identity_id"):
        sample_identity(0, -1)


def test_bench_runs() -> None:
    assert bench_synth(["--n", "2", "--size", "64"]) == 0


def test_bench_refuses_a_negative_seed_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """``--seed -1`` passed the checks and numpy's seed sequence raised a ValueError traceback (exit 1)
    after the bench started; the params file refuses a negative seed the same way (exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        bench_synth(["--n", "1", "--seed", "-1"])
    assert exit_.value.code == 2 and "--seed >= 0" in capsys.readouterr().err


def test_any_worker_count_writes_the_same_files(tmp_path: Path) -> None:
    outputs = []
    for workers in (1, 2):
        cfg = dataclasses.replace(SMALL, workers=workers)
        out = tmp_path / f"w{workers}"
        manifest, dets = write_corpus(cfg, 0, out)
        write_aflw19(cfg, 0, out / "aflw19")
        files = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        outputs.append((manifest, dets, files))
    (m1, d1, f1), (m2, d2, f2) = outputs
    pd.testing.assert_frame_equal(m1, m2)
    pd.testing.assert_frame_equal(d1, d2)
    assert f1.keys() == f2.keys() and all(f1[k] == f2[k] for k in f1)


MIRROR19 = [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 14, 13, 12, 17, 16, 15, 18]
MIRROR106 = [
    *range(32, -1, -1),  # contour
    *range(46, 41, -1), *range(50, 46, -1), *range(37, 32, -1), *range(41, 37, -1),  # brows
    51, 52, 53, 54, *range(59, 54, -1),  # bridge, base
    72, 71, 70, 69, 68, 75, 74, 73, 64, 63, 62, 61, 60, 67, 66, 65,  # eyes
    *range(80, 84), *range(76, 80),  # nose sides
    90, 89, 88, 87, 86, 85, 84, 95, 94, 93, 92, 91,  # outer lips
    100, 99, 98, 97, 96, 103, 102, 101,  # inner lips
    105, 104,  # pupils
]


def test_canonical_layouts_mirror_and_run_image_left_to_right() -> None:
    """geometry's documented orders: with the gaze straight ahead a canonical face is its own mirror
    image under the left↔right pairing of each layout, and each row of points runs image-left → right."""
    for i in range(8):
        ident = sample_identity(0, i)
        expr = dataclasses.replace(sample_expression(np.random.default_rng(i), 1.0), gaze=(0.0, 0.0))
        s = face_shapes(ident, expr)
        for pts, mirror in ((s.lm19, MIRROR19), (s.lm106, MIRROR106)):
            assert sorted(mirror) == list(range(len(pts)))
            np.testing.assert_allclose(pts[mirror] * [-1.0, 1.0], pts, atol=1e-9)
        x19 = s.lm19[:, 0]
        for row in ((0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11), (12, 13, 14), (15, 16, 17), (2, 3)):
            assert (np.diff(x19[list(row)]) > 0).all(), f"identity {i}: AFLW points {row} not left → right"
        x106 = s.lm106[:, 0]
        for row in (range(33, 38), range(42, 47), range(55, 60), range(60, 65), range(68, 73), range(84, 91),
                    range(96, 101), (76, 80), (104, 105)):
            assert (np.diff(x106[list(row)]) > 0).all(), f"identity {i}: 106 points {row} not left → right"
        for row in ((37, 38, 39, 40, 41, 33), (64, 65, 66, 67, 60), (72, 73, 74, 75, 68),
                    (90, 91, 92, 93, 94, 95, 84), (100, 101, 102, 103, 96)):  # lower edges: right → left
            assert (np.diff(x106[list(row)]) < 0).all(), f"identity {i}: 106 points {row} not right → left"
        assert (np.diff(x106[:17]) > -0.02).all() and s.lm106[16, 1] == s.lm106[:33, 1].max()  # chin at 16


def test_region_labels_sit_on_their_own_side() -> None:
    """LaPa's left brow (2) and eye (4) are image-left of the right ones (3, 5) along the face's eye axis,
    its upper lip (7) above the lower (9) across it, whatever the pose."""
    checked = 0
    for i in range(24):
        s = _face(3, i, 160)
        across = s.landmarks19[10] - s.landmarks19[7]  # left eye → right eye
        down = np.array([-across[1], across[0]])  # the face's down in image coordinates (y down)
        for a, b, axis in ((2, 3, across), (4, 5, across), (7, 9, down)):
            ya, xa = np.nonzero(s.labels == a)
            yb, xb = np.nonzero(s.labels == b)
            if min(len(xa), len(xb)) < 5:
                continue  # occluded or turned away
            gap = (np.array([xb.mean() - xa.mean(), yb.mean() - ya.mean()]) @ axis) / np.hypot(*axis)
            assert gap > 0, f"face {i}: class {a} is not before class {b} along {axis}"
            checked += 1
    assert checked >= 50


def test_difficulty_scales_pose_and_occluders(monkeypatch: pytest.MonkeyPatch) -> None:
    """difficulty 0: yaw within ±10°, pitch ±6°, roll ±8° and no occluder; difficulty 1 goes beyond."""
    import mcf.synth.render as render

    drawn = []
    real = render.draw_occluder
    monkeypatch.setattr(render, "draw_occluder", lambda *a: drawn.append(real(*a)))
    easy, hard = (dataclasses.replace(SMALL, difficulty=d) for d in (0.0, 1.0))
    poses = np.array([_face(4, i, 64, easy).pose for i in range(30)])
    assert (np.abs(poses) <= [10, 6, 8]).all() and not drawn
    poses = np.array([_face(4, i, 64, hard).pose for i in range(30)])
    assert (np.abs(poses).max(0) > [10, 6, 8]).all() and 8 <= len(drawn) <= 28  # p = 0.6


def test_an_occluder_is_background_and_hides_the_landmarks_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Occluder pixels are labelled 0 (LaPa) and every landmark under one, the chin too, is invisible."""
    import mcf.synth.render as render
    from mcf.synth.scenery import draw_occluder

    s = _face(0, 1, 96)
    lab, occ = np.ones((96, 96), np.uint8), np.zeros((96, 96), np.uint8)
    for seed in range(8):
        draw_occluder(s.image.copy(), lab, occ, s.landmarks19, s.landmarks106, s.box,
                      np.random.default_rng(seed))
    assert occ.any() and (lab[occ == 1] == 0).all() and (lab[occ == 0] == 1).all()

    def everywhere(img: np.ndarray, lab: np.ndarray, occ: np.ndarray, *rest: object) -> str:
        occ[:] = 1
        return "block"

    monkeypatch.setattr(render, "draw_occluder", everywhere)
    faces = [_face(0, i, 64) for i in range(12)]
    assert sum(1 for f in faces if not f.visible19.any()) >= 4  # each face given an occluder (p = 0.6)


def test_lapa_split_sizes_and_identities_table(tmp_path: Path) -> None:
    """Each split gets its own count (val and test differ here) and the table names each image's
    identity, image i showing identity i mod n_identities."""
    cfg = dataclasses.replace(SMALL, lapa=LapaSynthConfig(n_train=2, n_val=1, n_test=3, image_size=64))
    write_lapa(cfg, 0, tmp_path)
    counts = {s: len(list((tmp_path / "LaPa" / s / "images").iterdir())) for s in ("train", "val", "test")}
    assert counts == {"train": 2, "val": 1, "test": 3}
    ids = pd.read_csv(tmp_path / "synthface_identities.csv")
    assert ids["name"].tolist() == ["train/synth_000000", "train/synth_000001", "val/synth_000002",
                                    "test/synth_000003", "test/synth_000004", "test/synth_000005"]
    assert ids["identity"].tolist() == [i % SMALL.n_identities for i in range(6)]


def test_jpeg_quality_range_is_inclusive_and_bounded() -> None:
    for q in ((90, 90), (70, 71)):
        cfg = dataclasses.replace(SMALL, jpeg_quality=q)
        assert {_face(0, i, 64, cfg).jpeg_quality for i in range(16)} == set(range(q[0], q[1] + 1))
    for bad in ([0, 90], [70, 101]):
        with pytest.raises(ParamsError, match="synthetic.jpeg_quality"):
            build(SynthConfig, {"jpeg_quality": bad}, "synthetic")


def _slow_first(i: int) -> int:
    import time

    time.sleep(0.03 if i < 8 else 0.0)
    return i


def test_ordered_keeps_the_order_when_later_images_finish_first() -> None:
    from mcf.synth.writers import _ordered

    assert list(_ordered(_slow_first, 24, 2, "t")) == list(range(24))


def _killed_at_5(i: int) -> int:
    import os
    import signal

    if i == 5:  # as the out-of-memory killer ends a render worker
        os.kill(os.getpid(), signal.SIGKILL)
    return i


@pytest.mark.timeout(60)
def test_a_render_worker_killed_outright_fails_the_stage_on_one_line() -> None:
    """A multiprocessing.Pool replaces a worker that was SIGKILLed and waits for its lost task for ever:
    `mcf fetch` hung, silent, with its staging folder. The stage now fails at once, saying why."""
    from mcf.synth.writers import _ordered

    with pytest.raises(StageError, match="a worker process of synth corpus died"):
        list(_ordered(_killed_at_5, 64, 2, "synth corpus"))


def test_scenes_hold_one_to_max_faces() -> None:
    """Faces per scene are drawn from 1..max_faces inclusive (a face with no free spot is left out)."""
    one = dataclasses.replace(SMALL, max_faces=1, scene_size=64)
    assert all(len(_render_scene(one, 0, i)[1].identities) == 1 for i in range(4))
    three = dataclasses.replace(SMALL, scene_size=64)
    assert {len(_render_scene(three, 0, i)[1].identities) for i in range(40)} == {1, 2, 3}


def test_a_pose_s_centre_is_where_the_head_s_centre_lands() -> None:
    """cx is the x and cy the y of the head centre: draw_body's layers and the landmarks use it alike."""
    ident = sample_identity(0, 1)
    pose = Pose(0.0, 0.0, 0.0, 50.0, 30.0, 70.0, (0.0, 0.0, 1.0), 0.6)
    pix, _ = project_surface(ident, pose, np.array([[0.0, 0.0], [0.2, 0.1]]))
    np.testing.assert_allclose(pix, [[30.0, 70.0], [40.0, 75.0]])


def test_each_set_draws_from_its_own_random_stream(tmp_path: Path) -> None:
    """AFLW-19 and LaPa image i at the same size are different pictures, not one picture twice."""
    cfg = dataclasses.replace(SMALL, aflw=AflwSynthConfig(n_train=1, n_test=1, image_size=64),
                              lapa=LapaSynthConfig(n_train=1, n_val=1, n_test=1, image_size=64))
    write_aflw19(cfg, 0, tmp_path / "aflw")
    write_lapa(cfg, 0, tmp_path / "lapa")
    aflw = (tmp_path / "aflw" / "data" / "flickr" / "0" / "image00000.jpg").read_bytes()
    lapa = (tmp_path / "lapa" / "LaPa" / "train" / "images" / "synth_000000.jpg").read_bytes()
    assert aflw != lapa


def test_a_scene_of_more_than_three_faces_gets_a_caption() -> None:
    """render_scene takes any number of identities (max_faces only bounds the corpus); a scene that
    placed four faces raised IndexError in its caption."""
    from mcf.synth import render_scene

    cfg = dataclasses.replace(SMALL, difficulty=0.0)
    scene = render_scene(cfg, np.random.default_rng(8), [sample_identity(0, j) for j in range(4)], 256)
    assert len(scene.identities) == 4 and scene.caption.startswith("a synthetic photo of four people (")


def _as_documented(cfg: SynthConfig, seed: int, kind: int, index: int, size: int) -> FaceSample:
    """Image ``index`` of a set as writers.py documents it: ``default_rng([seed, kind, index])`` alone,
    showing identity ``index mod n_identities`` of the pool of ``seed``."""
    ident = sample_identity(seed, index % cfg.n_identities)
    return render_face(cfg, np.random.default_rng([seed, kind, index]), ident, size)


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def test_aflw_files_are_their_images_rendered_and_encoded_as_drawn(tmp_path: Path) -> None:
    """Row i's image is face (seed, AFLW, i) of seed's identity pool, at its own JPEG quality, under the
    real tree's folders 0, 2, 3 in turn: an identity drawn from seed 0's pool whatever the seed (seeds 1
    and 2 then shared seed 0's people), a fixed quality (jpeg_quality unused) or one folder for all (the
    real loader's sub-folder paths untried) passed every other test, as did ``ra`` or ``mask_new`` stored
    as integers where the real file holds doubles."""
    cfg = dataclasses.replace(SMALL, aflw=AflwSynthConfig(n_train=2, n_test=2, image_size=64))
    write_aflw19(cfg, 1, tmp_path)
    mat = scipy.io.loadmat(tmp_path / "AFLWinfo_release.mat")
    assert all(mat[key].dtype == np.float64 for key in ("bbox", "data", "mask_new", "ra"))  # MATLAB doubles
    names = [str(n[0]) for n in mat["nameList"][:, 0]]
    assert names == ["0/image00000.jpg", "2/image00001.jpg", "3/image00002.jpg", "0/image00003.jpg"]
    for i, name in enumerate(names):
        s = _as_documented(cfg, 1, KIND_AFLW, i, 64)
        assert (tmp_path / "data" / "flickr" / name).read_bytes() == _jpeg(s.image, s.jpeg_quality)


def test_lapa_files_hold_each_render_exactly(tmp_path: Path) -> None:
    """Each stem's JPEG (at its own quality), label PNG (lossless) and 106 points (to 3 decimals, + half a
    pixel) are face (seed, LaPa, i): points written at one decimal (0.05 px off), a fixed JPEG quality or
    another seed's identities passed the tree and pixel-centre tests."""
    cfg = dataclasses.replace(SMALL, lapa=LapaSynthConfig(n_train=1, n_val=1, n_test=1, image_size=64))
    write_lapa(cfg, 1, tmp_path)
    for i, split in enumerate(("train", "val", "test")):
        s, base, stem = _as_documented(cfg, 1, KIND_LAPA, i, 64), tmp_path / "LaPa" / split, f"synth_{i:06d}"
        assert (base / "images" / f"{stem}.jpg").read_bytes() == _jpeg(s.image, s.jpeg_quality)
        labels = cv2.imread(str(base / "labels" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(labels, s.labels)
        points = np.loadtxt(base / "landmarks" / f"{stem}.txt", skiprows=1)
        np.testing.assert_allclose(points, s.landmarks106 + 0.5, atol=5.1e-4, rtol=0)


def test_corpus_rows_describe_their_own_scene(tmp_path: Path) -> None:
    """A manifest row's file, size, identities (in detection ``face`` order) and caption are its scene's:
    a fixed JPEG quality, a height one off, identities sorted (the probe's labels on the wrong faces) or an
    empty caption passed the manifest test, which checked their count alone."""
    cfg = dataclasses.replace(SMALL, n_scenes=4, scene_size=64)
    manifest, _ = write_corpus(cfg, 1, tmp_path)
    for i, row in enumerate(manifest.itertuples()):
        _, scene = _render_scene(cfg, 1, i)
        data = (tmp_path / row.path).read_bytes()
        assert data == _jpeg(scene.image, scene.jpeg_quality)
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (row.height, row.width, 3)
        assert row.identities == list(scene.identities) and row.caption == scene.caption


def test_scenes_draw_the_pool_top_down_without_overlaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scene faces come from the whole identity pool, never overlap, are drawn (and listed) top down so a
    body covers no face drawn before it, get occluders at difficulty 1 and a caption that counts them:
    the last identity never drawn, overlapping faces, drawing in placing order, scenes without
    occluders or two faces captioned "a person" passed every other test."""
    import mcf.synth.render as render

    drawn = []
    real = render.draw_occluder
    monkeypatch.setattr(render, "draw_occluder", lambda *a: drawn.append(real(*a)))
    cfg, seen = dataclasses.replace(SMALL, scene_size=64), set()
    for i in range(12):
        scene = _render_scene(cfg, 0, i)[1]
        boxes = scene.boxes
        seen |= set(scene.identities)
        assert (np.diff(boxes[:, 3]) >= 0).all(), f"scene {i}: faces not in top-down order"
        for a in range(len(boxes)):
            for b in range(a):
                assert not (boxes[a, :2] < boxes[b, 2:]).all() or not (boxes[b, :2] < boxes[a, 2:]).all()
        who = {1: "a person", 2: "two people", 3: "three people"}[len(boxes)]
        assert scene.caption.startswith(f"a synthetic photo of {who} (")
    assert seen == set(range(SMALL.n_identities)) and drawn


def test_texture_labels_are_lapa_s_class_ids() -> None:
    """PROTOCOL §4's ids, painted where each region is: 1 skin, 2/3 left/right brow, 4/5 eyes, 6 nose,
    7 upper lip, 8 inner mouth, 9 lower lip, 10 hair. Nose, inner mouth and hair ids swapped, the inner
    mouth left skin-labelled or the forehead's hair left skin passed every other test, and the parsing
    fine-tune learned the wrong classes against real LaPa."""
    for i in range(6):
        ident = sample_identity(0, i)
        expr = dataclasses.replace(sample_expression(np.random.default_rng(i), 1.0), mouth_open=0.8)
        s = face_shapes(ident, expr)
        rng = np.random.default_rng(i)
        tex = paint_texture(ident, s, 40.0, hair_streaks(rng), rng)
        lm = s.lm106
        where = {1: (0.6, 0.15), 2: s.lm19[1], 3: s.lm19[4], 4: s.lm19[7], 5: s.lm19[10], 6: s.lm19[13],
                 7: (lm[87] + lm[98]) / 2, 8: s.lm19[16], 9: (lm[92] + lm[102]) / 2}
        if ident.hair_style != "bald":
            where[10] = (0.0, ident.hairline_at(np.zeros(1))[0] - 0.05)  # above the hairline's middle
        for label, (x, y) in where.items():
            col, row = (int(np.round(v[0])) for v in tex.coords(np.array([x]), np.array([y])))
            assert tex.label[row, col] == label, f"identity {i}: {tex.label[row, col]} where {label} belongs"


def test_chin_contour_and_mouth_points_sit_where_their_names_say() -> None:
    """The chin (AFLW 18) and the 33 contour points lie on the face, inside its outline; AFLW's mouth
    centre (16) is midway between the inner lips' middles (98, 102); the inner lip corners (96, 100)
    lie inside the outer ones (84, 90). A chin moved below the outline (onto the neck, labelled
    background), a mouth centre on the upper lip or inner corners on the outer ones passed the
    layout tests."""
    for i in range(8):
        ident = sample_identity(0, i)
        s = face_shapes(ident, sample_expression(np.random.default_rng(i), 1.0))
        outline = np.concatenate([s.lm106[:33], s.lm19[[18]]])
        assert inside_face(ident, outline[:, 0], outline[:, 1]).all(), f"identity {i}: a point off the face"
        np.testing.assert_allclose(s.lm19[16], (s.lm106[98] + s.lm106[102]) / 2, atol=1e-12)
        x = s.lm106[:, 0]
        assert x[84] < x[96] < x[100] < x[90], f"identity {i}: inner lip corners not inside the outer"


def test_a_label_names_synthface_in_any_case() -> None:
    """evaluate refuses a SynthFace number whose label does not say SynthFace (and the reverse): the
    check must not depend on case, or 'synthface-aflw19' on a SynthFace tree was refused."""
    assert all(names_synthface(label) for label in ("SynthFace-AFLW19", "synthface-lapa", "SYNTHFACE"))
    assert not names_synthface("AFLW-19") and not names_synthface("LaPa")


@pytest.mark.parametrize("kept", ["train", "val", "test"])
def test_a_lapa_tree_of_one_split_without_its_table_is_still_synthface(tmp_path: Path, kept: str) -> None:
    """Any one split's ``synth_`` names say SynthFace: a copy of the test split alone, its table left
    behind, is what evaluate reads, and looking at one split (train or not test) only passed it as
    real LaPa (writers.py mutation-testing gaps)."""
    write_lapa(SMALL, 0, tmp_path)
    (tmp_path / "synthface_identities.csv").unlink()
    for split in {"train", "val", "test"} - {kept}:
        shutil.rmtree(tmp_path / "LaPa" / split)
    assert is_synthface(tmp_path)


def test_lapa_landmark_lines_are_x_space_y(tmp_path: Path) -> None:
    """LaPa's landmark file (PROTOCOL §4): a "106" line, then one "x y" line per point, the two numbers
    split by one space as in the real files; a tab passed the tests that read the files with
    ``np.loadtxt`` (writers.py mutation-testing gaps)."""
    cfg = dataclasses.replace(SMALL, lapa=LapaSynthConfig(n_train=1, n_val=1, n_test=1, image_size=64))
    write_lapa(cfg, 0, tmp_path)
    lines = (tmp_path / "LaPa" / "val" / "landmarks" / "synth_000001.txt").read_text().splitlines()
    assert lines[0] == "106" and len(lines) == 107
    assert all(re.fullmatch(r"\d+\.\d{3} \d+\.\d{3}", line) for line in lines[1:]), lines[1:3]


def test_corpus_faces_are_people_of_the_seed_s_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scene's faces are identities of ``seed``'s pool, the people the AFLW-19 and LaPa sets of that seed
    show: people of seed 0's pool whatever the seed passed every other test, since the manifest holds
    the identity numbers only (writers.py mutation-testing gaps)."""
    import mcf.synth.writers as writers

    drawn = []
    real = writers.render_scene
    monkeypatch.setattr(writers, "render_scene", lambda cfg, rng, people, size: drawn.extend(people) or
                        real(cfg, rng, people, size))
    write_corpus(dataclasses.replace(SMALL, n_scenes=3, scene_size=64, workers=1), 1, tmp_path)
    assert drawn and all(person == sample_identity(1, person.id) for person in drawn)
