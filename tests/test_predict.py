"""``mcf predict`` on tiny fine-tuned models: a face goes the evaluated path (same crops, same points and
maps as the evaluate stage scores), and the command runs on a real photo with the Haar detector."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from test_finetune import tiny_configs, write_fixture

from mcf.cli import main as cli_main
from mcf.data.aflw19 import AFLW19, AFLW19Config, read_mat, read_rgb
from mcf.data.detect import DetectorConfig, Face
from mcf.data.lapa import ALIGN_POINTS, LaPa, LaPaConfig, read_landmarks
from mcf.errors import StageError
from mcf.evaluate.plots import read_png
from mcf.evaluate.scoring import predict_landmarks, predict_parsing
from mcf.params import Common
from mcf.predict import _box, align_face, list_images, load_task, parse_face, predict, read_image, under
from mcf.train.finetune import main_alignment, main_parsing


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The fixture root and the mcf variant's alignment and parsing ``model.pt``."""
    root = write_fixture(tmp_path_factory.mktemp("predict"))
    align, parse = tiny_configs(root)
    main_alignment(Common(seed=0), align, "mcf")
    main_parsing(Common(seed=0), parse, "mcf")
    return root, Path(align.out) / "mcf" / "model.pt", Path(parse.out) / "mcf" / "model.pt"


def test_alignment_is_the_evaluated_path(models: tuple[Path, Path, Path]) -> None:
    _, align_pt, _ = models
    model, meta = load_task(align_pt, "alignment")
    cfg = AFLW19Config(**meta["data"])
    dataset = AFLW19(cfg, "full")
    torch.manual_seed(0)
    want = predict_landmarks(model, dataset, batch_size=4)["pred"]
    after = torch.rand(1)  # scoring, which fine-tunes run after each epoch, draws nothing from the global RNG
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))
    boxes = read_mat(cfg.root).boxes[dataset.indices]  # left, right, top, bottom
    for i, (left, right, top, bottom) in enumerate(boxes):
        got = align_face(model, cfg, read_rgb(dataset.image_path(i)), (left, top, right, bottom))
        np.testing.assert_allclose(got, want[i], atol=1e-3)


def test_parsing_is_the_evaluated_path(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, parse_pt = models
    model, meta = load_task(parse_pt, "parsing")
    cfg = LaPaConfig(**meta["data"])
    dataset = LaPa(cfg, "test")
    torch.manual_seed(0)
    _, names = predict_parsing(model, dataset, 2, tmp_path)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))
    for name in names:
        stem = name.split("/")[1]
        rgb = read_rgb(dataset.dir / "images" / f"{stem}.jpg")
        points5 = read_landmarks(dataset.dir / "landmarks" / f"{stem}.txt")[list(ALIGN_POINTS)]
        got, want = parse_face(model, cfg, rgb, points5), read_png(tmp_path / f"{name}.png")
        assert got.shape == rgb.shape[:2]
        assert (got == want).mean() > 0.999  # batch-size rounding may flip a tie


def test_cli_on_a_photo_with_the_haar_detector(models: tuple[Path, Path, Path], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    _, align_pt, parse_pt = models
    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut = skdata.astronaut()
    cv2.imwrite(str(photos / "astronaut.jpg"), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(photos / "wall.png"), np.full((80, 120, 3), 128, np.uint8))
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    (photos / "dead.jpg").symlink_to(tmp_path / "gone.jpg")  # odd entries are listed, not fatal
    (photos / "folder.png").mkdir()
    out = tmp_path / "out"
    models_ = ["--alignment", str(align_pt), "--parsing", str(parse_pt)]
    argv = ["predict", str(photos), *models_, "--out", str(out)]
    assert cli_main(argv) == 0
    faces = pd.read_csv(out / "faces.csv")
    assert set(faces["image"]) == {str(photos / "astronaut.jpg")}  # the grey wall has no face
    assert "wall.png: no face found" in caplog.text
    images = pd.read_csv(out / "images.csv", keep_default_na=False).set_index("image")
    assert images.loc[str(photos / "wall.png"), "faces"] == 0
    assert images.loc[str(photos / "astronaut.jpg"), "faces"] == len(faces)
    assert "cannot decode image" in images.loc[str(photos / "broken.jpg"), "error"]
    for odd in ("dead.jpg", "folder.png"):
        assert "image not found" in images.loc[str(photos / odd), "error"]
    best = faces[faces["face"] == 0].iloc[0]
    assert best["detector"] == "haar" and 150 < best["box_x1"] < best["box_x2"] < 300  # her face
    xs, ys = best[[f"x{i}" for i in range(19)]], best[[f"y{i}" for i in range(19)]]
    assert np.isfinite(xs.to_numpy(float)).all() and np.isfinite(ys.to_numpy(float)).all()
    labels = read_png(out / "parsing" / "astronaut_0.png")
    assert labels.shape == astronaut.shape[:2] and labels.max() <= 10
    assert len(list((out / "parsing").glob("astronaut_*.png"))) == len(faces)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["astronaut.png", "wall.png"]


def test_cli_with_a_given_box_and_alignment_only(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    out = tmp_path / "out"
    argv = ["predict", str(image), "--alignment", str(align_pt), "--box", "4,6,60,62", "--out", str(out),
            "--no-overlays"]
    assert cli_main(argv) == 0 and cli_main(argv) == 0  # an earlier predict output is replaced
    faces = pd.read_csv(out / "faces.csv")
    assert len(faces) == 1 and faces.loc[0, "detector"] == "given" and faces.loc[0, "box_y2"] == 62
    assert "y18" in faces.columns and not (out / "parsing").exists() and not (out / "overlays").exists()


@pytest.mark.parametrize("odd", ["image", "out"])
def test_a_name_that_is_not_utf8_is_refused_not_a_crash(
    models: tuple[Path, Path, Path], tmp_path: Path, odd: str
) -> None:
    """A Latin-1 ``caf\\xe9.jpg`` in a photo folder, or such an --out: Python hands the name over with lone
    surrogates, on which cv2.imread and cv2.imwrite segfault, so the run died with no message and no
    output. Refused before any work instead, naming the path with its byte escaped."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(image.read_bytes())
    if odd == "image":
        (photos / os.fsdecode(b"caf\xe9.jpg")).write_bytes(image.read_bytes())
    else:
        out = tmp_path / os.fsdecode(b"r\xe9sultats")
    argv = [sys.executable, "-m", "mcf.cli", "predict", str(photos), "--alignment", str(align_pt),
            "--box", "4,6,60,62", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, errors="backslashreplace")
    assert done.returncode == 1, done.stderr[-500:]
    assert "caf\\xe9.jpg" in done.stderr if odd == "image" else "r\\xe9sultats is not UTF-8" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]  # no output, no temporary folder


def test_a_box_outside_an_image_is_warned_of(
    models: tuple[Path, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One --box serves images of every size: one it misses gets points and a map of the black padding
    around the image, which reads like any other row of faces.csv unless the log says so (a box partly
    out, a face at the edge, is not warned of)."""
    root, align_pt, _ = models
    image = tmp_path / "wide.png"  # not square: the image's width and height cannot stand in for each other
    cv2.imwrite(str(image), cv2.imread(str(next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))))[:40])
    h, w = read_image(image).shape[:2]
    for box, warned in ((f"{w},0,{w + 50},50", True), ("-50,-50,10,10", False), (f"0,{h},50,{w}", True)):
        caplog.clear()
        argv = ["predict", str(image), "--alignment", str(align_pt), f"--box={box}", "--out",
                str(tmp_path / "out"), "--no-overlays"]
        assert cli_main(argv) == 0
        assert (f"--box lies outside the {w}x{h} image" in caplog.text) is warned


def test_a_box_far_beyond_an_image_still_gives_an_overlay(
    models: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Points mapped from an absurd box are far outside the image, past what OpenCV's circle takes."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    out = tmp_path / "out"
    assert cli_main(["predict", str(image), "--alignment", str(align_pt), "--box=-1e20,-1e20,1e20,1e20",
                     "--out", str(out)]) == 0
    assert np.array_equal(read_png(out / "overlays" / f"{image.stem}.png"), read_image(image))  # no dot lands
    assert pd.read_csv(out / "faces.csv").filter(regex=r"^[xy]\d+$").abs().to_numpy().max() > 1e15


def test_a_jpeg_cut_short_is_listed_as_unreadable(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """OpenCV decodes the part of a truncated JPEG there is (grey below it) and only warns on stderr."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    out = tmp_path / "out"
    argv = ["predict", str(image), str(cut), "--alignment", str(align_pt), "--box", "4,6,60,62", "--out",
            str(out), "--no-overlays"]
    assert cli_main(argv) == 0  # the other image is still predicted
    assert set(pd.read_csv(out / "faces.csv")["image"]) == {str(image)}
    images = pd.read_csv(out / "images.csv", keep_default_na=False)
    assert list(images.columns) == ["image", "faces", "error"]  # as the module docstring lists them
    images = images.set_index("image")
    assert images.loc[str(cut), "faces"] == 0 and "image file is truncated" in images.loc[str(cut), "error"]
    assert images.loc[str(image), "error"] == ""


def test_a_jpeg_cut_short_within_twice_pillows_size_limit_is_still_checked(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow decodes, with a warning, images up to twice its MAX_IMAGE_PIXELS, and refuses only those
    past it: a JPEG cut short of 1.5× the limit is still decoded strictly and listed as truncated."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    h, w = read_rgb(image).shape[:2]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", h * w * 2 // 3)
    with pytest.warns(Image.DecompressionBombWarning):
        images = _predict_beside(image, cut, align_pt, tmp_path / "out")
    assert images.loc[str(cut), "faces"] == 0 and "image file is truncated" in images.loc[str(cut), "error"]


def test_an_image_past_pillows_size_limit_is_still_predicted(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The strict truncation check decodes with Pillow, which refuses images over ~179 MP that OpenCV
    reads: such an image keeps OpenCV's pixels instead of stopping the run (the limit lowered here)."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    out = tmp_path / "out"
    argv = ["predict", str(image), "--alignment", str(align_pt), "--box", "4,6,60,62", "--out", str(out),
            "--no-overlays"]
    assert cli_main(argv) == 0
    assert list(pd.read_csv(out / "faces.csv")["image"]) == [str(image)]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["IMG", "--alignment", "PARSE", "--out", "OUT"], 1, "fine-tuned for 'parsing', not 'alignment'"),
        (["IMG", "--parsing", "PARSE", "--out", "OUT"], 1, "parsing aligns each face by five landmarks"),
        (["IMG", "--parsing", "PARSE", "--box", "4,6,60,62", "--out", "OUT"], 1,
         "a box gives no landmarks: with --box, parsing needs --alignment MODEL"),
        (["IMG", "--out", "OUT"], 1, "nothing to predict"),
        (["missing.jpg", "--alignment", "ALIGN", "--out", "OUT"], 1, "missing.jpg: no such image or folder"),
        (["IMG", "--alignment", "missing.pt", "--out", "OUT"], 1, "missing.pt: no such file"),
        (["IMG", "--alignment", "ALIGN_DIR", "--out", "OUT"], 1,
         "a folder, not a model: give the fine-tuned model.pt itself: "),  # was "no such file"
        (["IMG", "--alignment", "CUT", "--out", "OUT"], 1, "cut.pt: cannot be read as a PyTorch checkpoint"),
        (["IMG", "--alignment", "OTHER", "--out", "OUT"], 1, "other.pt: not a fine-tuned model.pt (KeyError"),
        (["IMG", "--alignment", "ALIGN", "--box", "5,5,1,9", "--out", "OUT"], 2, "need x2 > x1"),
        (["IMG", "--alignment", "ALIGN", "--box", "0,0,inf,9", "--out", "OUT"], 2, "expected finite numbers"),
        (["IMG", "--alignment", "ALIGN", "--box=-1e308,0,1e308,9", "--out", "OUT"], 2,
         "expected pixels within ±1e+20"),  # the side overflowed: a LinAlgError traceback
        (["IMG", "--alignment", "ALIGN", "--box", "0.2,0.3,0.6,0.9", "--out", "OUT"], 2,
         "need sides of 1 px or more (pixels, not fractions"),  # a side of 1e-306 px: NaN landmarks
        (["IMG", "--alignment", "ALIGN", "--yunet", "nope.onnx", "--out", "OUT"], 2,
         "--yunet nope.onnx: expected an existing YuNet .onnx file"),
        (["IMG", "--alignment", "ALIGN", "--yunet", "DAMAGED.onnx", "--out", "OUT"], 1,
         "damaged.onnx: not a YuNet model OpenCV can load"),
        (["IMG", "--alignment", "ALIGN", "--out", "PHOTOS"], 1, "holds no faces.csv, so it is not"),
        (["IMG", "--alignment", "ALIGN", "--out", "UNDER_A_FILE"], 1, "cannot write"),
    ],
)
def test_cli_errors_leave_no_output(
    models: tuple[Path, Path, Path], tmp_path: Path, args: list[str], code: int, message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, align_pt, parse_pt = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    names = {"IMG": str(image), "ALIGN": str(align_pt), "ALIGN_DIR": str(align_pt.parent),
             "PARSE": str(parse_pt), "OUT": str(tmp_path / "out"),
             "missing.jpg": str(tmp_path / "missing.jpg"), "missing.pt": str(tmp_path / "missing.pt"),
             "PHOTOS": str(image.parent), "CUT": str(tmp_path / "cut.pt"),
             "OTHER": str(tmp_path / "other.pt"), "UNDER_A_FILE": str(tmp_path / "cut.pt" / "out"),
             "DAMAGED.onnx": str(tmp_path / "damaged.onnx")}
    (tmp_path / "cut.pt").write_bytes(align_pt.read_bytes()[:1000])
    (tmp_path / "damaged.onnx").write_bytes(b"not an ONNX model")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    before = sorted(image.parent.iterdir())
    argv = ["predict", *(names.get(a, a) for a in args)]
    if code == 2:  # argparse's usage error
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2
    else:
        assert cli_main(argv) == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(image.parent.iterdir()) == before


def test_an_out_under_a_file_is_refused_before_any_model_loads(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An --out under a file was refused only by the final rename, after every image's prediction."""

    def loaded(*args: object) -> None:
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr("mcf.predict.load_task", loaded)
    (tmp_path / "afile").write_text("")
    with pytest.raises(StageError, match="cannot write .*afile is a file"):
        predict([tmp_path], tmp_path / "afile" / "out", alignment=models[1])


@pytest.mark.parametrize("out", [".", ".."])
def test_an_out_holding_the_working_folder_is_refused(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--out .`` in a new folder, or an earlier output's parent from inside it: replacing --out whole would
    delete the folder the command runs in (``.`` was a ValueError traceback after the models loaded)."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    earlier = tmp_path / "earlier"
    argv = ["predict", str(image), "--alignment", str(align_pt), "--box", "4,6,60,62", "--no-overlays"]
    assert cli_main([*argv, "--out", str(earlier)]) == 0
    (earlier / "here").mkdir()
    monkeypatch.chdir(earlier / "here")
    before = sorted(earlier.rglob("*"))
    assert cli_main([*argv, "--out", out]) == 1
    assert f"{out} holds the working folder, which replacing it would delete" in capsys.readouterr().err
    assert sorted(earlier.rglob("*")) == before


def test_help_states_which_refusals_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """The exit codes test_cli_errors_leave_no_output pins: a missing image or no model is 1, not 2."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", "--help"])
    assert exit_.value.code == 0
    help_ = " ".join(capsys.readouterr().out.split())
    for case in ("no model given", "parsing without --alignment or --yunet",
                 "a missing image path or one that is a pipe or a device",
                 "image names too long for their outputs",
                 "two images whose stems differ only in letter case or accent encoding",
                 "a model missing, damaged or of the other task", "a --yunet file OpenCV cannot load",
                 "an --out that is not a predict output, holds an input image or cannot be written",
                 "2 a usage error (a bad --box, a --yunet that is no .onnx file, no --out, an empty "
                 "argument)"):
        assert case in help_


def test_a_photo_is_read_upright_by_its_exif_tag(tmp_path: Path) -> None:
    """Your own photo is predicted as a viewer shows it; the datasets' files are read as stored."""
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the EXIF Orientation tag: rotate 90° clockwise to view
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(path, exif=exif.tobytes())
    assert read_image(path).shape == (40, 20, 3) and read_rgb(path).shape == (20, 40, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tiff_is_read_upright_by_its_orientation_tag(orientation: int, tmp_path: Path) -> None:
    """A portrait TIFF (tags 5-8) was "cannot decode image": OpenCV 4.14's imread fails on it. Every tag
    gives the pixels a viewer shows."""
    stored = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    flipped = {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 4: stored[::-1]}  # turned in place
    turned = {5: stored, 6: stored[::-1], 7: stored[::-1, ::-1], 8: stored[:, ::-1]}  # these, then transposed
    upright = flipped[orientation] if orientation < 5 else turned[orientation].transpose(1, 0, 2)
    path = tmp_path / "scan.tif"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif)
    assert np.array_equal(read_image(path), upright)


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_16_bit_grey_tiff_reads_as_opencv_reads_it_whatever_its_orientation_tag(
    orientation: int, tmp_path: Path
) -> None:
    """A portrait 16-bit grey scan (tags 5-8), which Pillow decodes for OpenCV, read all white: Pillow's
    RGB conversion clips 16-bit values at 255. Its pixels are OpenCV's of the same scan stored upright."""
    stored = np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "scan.tif", exif=exif)
    upright = stored if orientation == 1 else stored[::-1].T  # 6: rotate 90° clockwise to view
    cv2.imwrite(str(tmp_path / "upright.tif"), np.ascontiguousarray(upright))
    assert np.array_equal(read_image(tmp_path / "scan.tif"), read_rgb(tmp_path / "upright.tif"))


def test_image_folders_are_listed_in_order_whatever_the_suffix_case(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A camera's ``IMG_0001.JPG`` is an image; a subfolder is not searched but named (its photos were left
    out without a word); a folder with none, or two images sharing a stem (their outputs would overwrite
    each other), is refused before any model loads."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.JPG", "a.png", "c.Jpeg", "d.jfif", "e.TIF", "notes.txt"):
        (photos / name).touch()
    assert list_images([photos]) == [photos / n for n in ("a.png", "b.JPG", "c.Jpeg", "d.jfif", "e.TIF")]
    for name, kind in (("d.jfif", "JPEG"), ("e.TIF", "TIFF")):  # a browser's JPEG save, a scanner's TIFF
        Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(photos / name, format=kind)
        assert read_image(photos / name).shape == (20, 30, 3)
        (photos / name).unlink()
    (photos / "2023").mkdir()
    (photos / "2023" / "d.jpg").touch()
    with caplog.at_level(logging.WARNING):
        assert list_images([photos]) == [photos / "a.png", photos / "b.JPG", photos / "c.Jpeg"]
    assert f"{photos}: subfolders not searched (give each as an input of its own): 2023" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no images in .*empty"):
        list_images([tmp_path / "empty"])
    (tmp_path / "a.jpg").touch()
    with pytest.raises(StageError, match=r"images share a file stem.*\['a.jpg', 'a.png'\]"):
        list_images([photos, tmp_path / "a.jpg"])
    (tmp_path / "B.png").touch()  # overlays/B.png and overlays/b.png are one file on a case-blind disk
    with pytest.raises(StageError, match=r"letter case and accent encoding aside.*\['B.png', 'b.JPG'\]"):
        list_images([photos, tmp_path / "B.png"])
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "Café.png")
    (photos / nfc).touch()
    (tmp_path / nfd).touch()  # two files here, one overlays/café.png on macOS
    with pytest.raises(StageError, match="would collide"):
        list_images([photos, tmp_path / nfd])


def test_a_full_disk_is_one_line_and_leaves_nothing(
    models: tuple[Path, Path, Path], tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OpenCV's imwrite says only False when the disk fills: predict's first overlay raised an OSError
    without an errno, a traceback, where the CLI has one line for a full disk."""
    _, align_pt, _ = models
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)  # ~480 KiB as a PNG
    cv2.imwrite(str(tmp_path / "noise.png"), noise)
    argv = ["predict", str(tmp_path / "noise.png"), "--alignment", str(align_pt), "--box", "10,10,200,200"]
    assert cli_main([*argv, "--out", str(full_disk / "out")]) == 1
    assert capsys.readouterr().err.endswith(": free some space and run it again\n")
    assert list(full_disk.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_pipe_under_an_image_name_is_a_row_not_a_hang(tmp_path: Path) -> None:
    """A folder's entries are listed by suffix: a named pipe ``pipe.jpg`` among them blocked predict for ever
    (Pillow's open waits for a writer). read_image refuses it, so it becomes its images.csv row and the other
    images are predicted."""
    os.mkfifo(tmp_path / "pipe.jpg")
    assert list_images([tmp_path]) == [tmp_path / "pipe.jpg"]
    with pytest.raises(StageError, match=r"pipe.jpg: not a regular file \(a pipe or a device\)"):
        read_image(tmp_path / "pipe.jpg")


@pytest.mark.timeout(60)
def test_a_pipe_given_as_an_input_is_named_so_not_missing(tmp_path: Path) -> None:
    """A named pipe given by name (``mcf predict <(cat face.jpg)``, /dev/stdin) was "no such image or
    folder", though it exists: it is refused as what it is, before any work and without opening it."""
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(StageError, match=r"pipe.jpg: not a regular file \(a pipe or a device\)"):
        list_images([tmp_path / "pipe.jpg"])
    with pytest.raises(StageError, match="gone.jpg: no such image or folder"):
        list_images([tmp_path / "gone.jpg"])


@pytest.mark.parametrize("args", [
    ["", "--out", "x"], ["a.jpg", "--out", " "], ["a.jpg", "--out", "x", "--alignment", ""],
    ["a.jpg", "--out", "x", "--parsing", ""], ["a.jpg", "--out", "x", "--yunet", ""],
])
def test_an_empty_argument_is_a_usage_error_naming_it(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset variable (``mcf predict "$IMG"``, ``--out "$OUT"``) read as a path: "no images in " or the
    image's "no such image or folder" named the wrong argument. Each is argparse's exit 2 naming it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["predict", *args])
    named = next((flag for flag, value in zip(args, args[1:], strict=False) if not value.strip()), "images")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"argument {named}: an empty value (an unset variable?)\n")
    assert list(tmp_path.iterdir()) == []


def test_an_image_name_too_long_for_its_outputs_is_refused_before_the_work(tmp_path: Path) -> None:
    """A 247-byte stem is a valid file name, but parsing/<stem>_9999.png (256 bytes) is not: the write
    failed with an OSError traceback after every image was predicted, and nothing was kept. 246 bytes
    is the longest stem that fits."""
    fits, too_long = tmp_path / f"{'a' * 246}.jpg", tmp_path / f"{'b' * 247}.jpg"
    fits.touch()
    too_long.touch()
    assert list_images([fits]) == [fits]
    with pytest.raises(StageError, match=r"1 image names are too long for their outputs .*: b{247}\.jpg"):
        list_images([tmp_path])
    accents = tmp_path / f"{'é' * 124}.jpg"  # 128 characters, but 252 bytes: 257 for parsing/<stem>_9999.png
    accents.touch()
    with pytest.raises(StageError, match="1 image names are too long"):
        list_images([accents])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "0,5,9,5"], "need x2 > x1 and y2 > y1"),  # no height
        (["--box", "0,5,9,5.5"], "need sides of 1 px or more"),  # half a pixel high
        (["--box", "4,6,60,62", "--yunet", "YUNET"], "--box and --yunet exclude each other"),
        (["--yunet", "NOT_ONNX"], "expected an existing YuNet .onnx file"),
    ],
)
def test_usage_errors_are_exit_2_before_any_work(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "y.onnx").touch()
    (tmp_path / "y.txt").touch()
    names = {"YUNET": str(tmp_path / "y.onnx"), "NOT_ONNX": str(tmp_path / "y.txt")}
    argv = ["predict", str(tmp_path / "x.jpg"), "--alignment", "a.pt", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, *(names.get(a, a) for a in args)])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_box_of_one_pixel_is_taken() -> None:
    """``--box`` needs "sides of 1 px or more": a side of exactly 1 px is a valid box."""
    assert _box("3,4,4,5") == (3.0, 4.0, 4.0, 5.0)


def test_faces_csv_holds_x0_to_x18_then_y0_to_y18_and_the_overlay_draws_them(
    models: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """Each column is the point the module docstring names (x then y, not interleaved pairs), and the
    overlay of an alignment-only run shows the points."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    out = tmp_path / "out"
    assert cli_main(["predict", str(image), "--alignment", str(align_pt), "--box", "4,6,60,62", "--out",
                     str(out)]) == 0
    model, meta = load_task(align_pt, "alignment")
    rgb = read_image(image)
    want = align_face(model, AFLW19Config(**meta["data"]), rgb, (4, 6, 60, 62))
    row = pd.read_csv(out / "faces.csv").iloc[0]
    for axis, c in enumerate("xy"):
        got = row[[f"{c}{i}" for i in range(19)]].to_numpy(float)
        np.testing.assert_allclose(got, want[:, axis], atol=1e-4)
    assert (read_png(out / "overlays" / f"{image.stem}.png") != rgb).any()


def test_parsing_alone_aligns_by_the_detectors_five_points(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --alignment, a YuNet face's five landmarks align the parsing warp, and faces.csv has no
    landmark columns (none were predicted)."""
    _, _, parse_pt = models
    model, meta = load_task(parse_pt, "parsing")
    cfg = LaPaConfig(**meta["data"])
    dataset = LaPa(cfg, "test")
    image = sorted((dataset.dir / "images").glob("*.jpg"))[0]
    points5 = read_landmarks(dataset.dir / "landmarks" / f"{image.stem}.txt")[list(ALIGN_POINTS)]
    face = Face(0, (1.0, 2.0, 30.0, 40.0), tuple(points5.ravel().tolist()), 0.9, "yunet")
    monkeypatch.setattr("mcf.predict.make_detector", lambda _: lambda rgb: [face])
    (tmp_path / "y.onnx").touch()
    table = predict([image], tmp_path / "out", parsing=parse_pt,
                    detector=DetectorConfig(yunet_model=str(tmp_path / "y.onnx")), overlays=False)
    assert list(table.columns) == ["image", "face", "detector", "box_x1", "box_y1", "box_x2", "box_y2"]
    assert list(pd.read_csv(tmp_path / "out" / "faces.csv").columns) == list(table.columns)
    want = parse_face(model, cfg, read_image(image), points5)
    assert np.array_equal(read_png(tmp_path / "out" / "parsing" / f"{image.stem}_0.png"), want)


def test_parsing_aligns_every_face_by_the_alignment_models_five_points_over_yunets(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --alignment, parsing aligns by its AFLW-19 points 7, 10, 13, 15 and 17 (docs/PROTOCOL.md), not by
    YuNet's five (mirrored here, so using them shows); --yunet's config reaches the detector; and a second
    face is predicted on the photo itself, not on the overlay the first face's colours and dots were
    drawn on."""
    _, align_pt, parse_pt = models
    (aligner, align_meta), (parser, parse_meta) = (load_task(align_pt, "alignment"),
                                                    load_task(parse_pt, "parsing"))
    acfg, pcfg = AFLW19Config(**align_meta["data"]), LaPaConfig(**parse_meta["data"])
    image = sorted((LaPa(pcfg, "test").dir / "images").glob("*.jpg"))[0]
    rgb = read_image(image)
    h, w = rgb.shape[:2]
    box = (0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h)
    mirrored = tuple(v for x, y in ((0.8 * w, 0.3 * h), (0.2 * w, 0.3 * h), (0.5 * w, 0.5 * h),
                                    (0.7 * w, 0.7 * h), (0.3 * w, 0.7 * h)) for v in (x, y))
    faces = [Face(i, box, mirrored, 0.9, "yunet") for i in range(2)]
    (tmp_path / "y.onnx").touch()
    yunet = DetectorConfig(yunet_model=str(tmp_path / "y.onnx"))
    built = []
    monkeypatch.setattr("mcf.predict.make_detector", lambda cfg: built.append(cfg) or (lambda rgb: faces))
    table = predict([image], tmp_path / "out", alignment=align_pt, parsing=parse_pt, detector=yunet)
    assert built == [yunet]
    # Haar gives no points to align parsing by
    with pytest.raises(StageError, match="give --alignment MODEL .* or a YuNet detector"):
        predict([image], tmp_path / "haar", parsing=parse_pt, detector=DetectorConfig())
    points = align_face(aligner, acfg, rgb, box)
    want = parse_face(parser, pcfg, rgb, points[[7, 10, 13, 15, 17]])
    assert not np.array_equal(want, parse_face(parser, pcfg, rgb, np.reshape(mirrored, (5, 2))))
    for i in range(2):
        assert np.array_equal(read_png(tmp_path / "out" / "parsing" / f"{image.stem}_{i}.png"), want)
        np.testing.assert_allclose(table.iloc[i][[f"x{j}" for j in range(19)]].to_numpy(float), points[:, 0],
                                   atol=1e-4)


def test_an_image_too_wide_for_opencvs_warps_is_listed_not_a_crash(
    models: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """cv2.warpAffine and cv2.remap assert sides under 32767 px: a wide panorama was a traceback that lost
    every other image's prediction. It is listed in images.csv instead, and the rest are predicted."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    pano = tmp_path / "pano.png"
    cv2.imwrite(str(pano), np.zeros((1, 32767, 3), np.uint8))
    images = _predict_beside(image, pano, align_pt, tmp_path / "out")
    assert images.loc[str(pano), "faces"] == 0 and "32767x1 px" in images.loc[str(pano), "error"]


def _predict_beside(image: Path, bad: Path, align_pt: Path, out: Path) -> pd.DataFrame:
    """``mcf predict`` of a good image beside a ``bad`` one: the good one's faces are predicted; the
    images.csv rows, by image."""
    argv = ["predict", str(image), str(bad), "--alignment", str(align_pt), "--box", "4,6,60,62", "--out",
            str(out), "--no-overlays"]
    assert cli_main(argv) == 0
    assert set(pd.read_csv(out / "faces.csv")["image"]) == {str(image)}
    return pd.read_csv(out / "images.csv", keep_default_na=False).set_index("image")


def test_a_header_declaring_a_huge_size_is_listed_not_a_crash(
    models: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """OpenCV's imread raises (no None) for a header declaring over 2^30 pixels, as a JPEG whose size field
    was damaged does: the cv2.error passed read_rgb and predict's per-image handling, a traceback that lost
    every other image's prediction (and, in the AFLW-19 and LaPa readers, one that named no file)."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    data = bytearray(image.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = b"\xff\x00\xff\x00"  # height, width: 65280 x 65280 (libjpeg takes up to 65500)
    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(bytes(data))
    with pytest.raises(StageError, match=f"^cannot decode image: {damaged} "):
        read_rgb(damaged)
    images = _predict_beside(image, damaged, align_pt, tmp_path / "out")
    assert images.loc[str(damaged), "faces"] == 0
    assert images.loc[str(damaged), "error"].startswith(f"cannot decode image: {damaged} ")


def test_an_image_or_out_reached_through_a_link_is_still_found_under_out(tmp_path: Path) -> None:
    """``link/mine.jpg``, with ``link`` a symlink to --out (or --out given as the link), is deleted when --out
    is replaced all the same: ``under`` resolves both each image's folder and --out. A photo given as a
    link whose file lies in --out was not found (only its folder was resolved), and replacing --out
    deleted the file."""
    (tmp_path / "work").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "work")
    assert under([tmp_path / "link" / "mine.jpg", tmp_path / "other.jpg"], tmp_path / "work") == [
        tmp_path / "link" / "mine.jpg"]
    assert under([tmp_path / "work" / "mine.jpg"], tmp_path / "link") == [tmp_path / "work" / "mine.jpg"]
    (tmp_path / "photos").mkdir()  # a photo kept in --out, given through a link beside it: replacing --out
    (tmp_path / "photos" / "a.jpg").symlink_to(tmp_path / "work" / "mine.jpg")  # deletes the photo itself
    assert under([tmp_path / "photos" / "a.jpg"], tmp_path / "work") == [tmp_path / "photos" / "a.jpg"]
    (tmp_path / "work" / "b.jpg").symlink_to(tmp_path / "elsewhere.jpg")  # an entry in --out all the same
    assert under([tmp_path / "work" / "b.jpg"], tmp_path / "work") == [tmp_path / "work" / "b.jpg"]


def test_an_image_under_out_is_refused_not_deleted(
    models: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Photos copied into an earlier output and predicted into it again (``mcf predict work/ --out work/``)
    were deleted without a word when --out was replaced whole; refused before any work instead."""
    root, align_pt, _ = models
    image = next((root / "aflw19" / "data" / "flickr").rglob("*.jpg"))
    work = tmp_path / "work"
    argv = ["--alignment", str(align_pt), "--box", "4,6,60,62", "--no-overlays", "--out", str(work)]
    assert cli_main(["predict", str(image), *argv]) == 0
    (work / "mine.jpg").write_bytes(image.read_bytes())
    before = sorted(work.rglob("*"))
    assert cli_main(["predict", str(work), *argv]) == 1
    assert f"{work / 'mine.jpg'} lies in --out {work}" in capsys.readouterr().err
    assert sorted(work.rglob("*")) == before


def _predict_boxes(*args: str) -> subprocess.CompletedProcess[str]:
    """``python tools/predict_boxes.py ARGS``, as the README has a user run it after ``dvc repro``."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "predict_boxes.py"
    return subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=300)


def test_predict_boxes_names_synthface_data_as_synthface(models: tuple[Path, Path, Path]) -> None:
    """The tool's numbers on the default run are SynthFace's: they must say so, not pass for AFLW-19's
    (the data root is .../aflw19, and the figures go into the README)."""
    _, align_pt, _ = models
    done = _predict_boxes(str(align_pt))
    assert done.returncode == 0, done.stderr
    assert "SynthFace-AFLW19" in done.stdout.splitlines()[0]


@pytest.mark.parametrize("which", ["missing", "parsing"])
def test_predict_boxes_refuses_a_bad_model_on_one_line(which: str, models: tuple[Path, Path, Path],
                                                       tmp_path: Path) -> None:
    """A missing model or one of the other task: one line naming it, exit 1, no traceback."""
    _, _, parse_pt = models
    path = str(tmp_path / "nope.pt") if which == "missing" else str(parse_pt)
    done = _predict_boxes(path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and path in done.stderr


def test_every_faces_points_are_drawn_over_every_faces_class_colours(
    models: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two faces in one photo (a group, or a detector's second box on the same face): each face's class map
    covers pixels beyond it, and the second face's colours were blended over the first face's points,
    fading them to half their red."""
    _, align_pt, parse_pt = models
    aligner, meta = load_task(align_pt, "alignment")
    image = sorted((LaPa(LaPaConfig(**load_task(parse_pt, "parsing")[1]["data"]), "test").dir / "images")
                   .glob("*.jpg"))[0]
    rgb = read_image(image)
    h, w = rgb.shape[:2]
    boxes = [(0.1 * w, 0.1 * h, 0.7 * w, 0.7 * h), (0.3 * w, 0.3 * h, 0.9 * w, 0.9 * h)]
    faces = [Face(i, box, None, None, "haar") for i, box in enumerate(boxes)]
    monkeypatch.setattr("mcf.predict.make_detector", lambda cfg: lambda rgb: faces)
    predict([image], tmp_path / "out", alignment=align_pt, parsing=parse_pt)
    overlay = read_png(tmp_path / "out" / "overlays" / f"{image.stem}.png")
    for box in boxes:
        points = align_face(aligner, AFLW19Config(**meta["data"]), rgb, box)
        cols, rows = np.round(points - 0.5).astype(int).T  # the pixel each dot is centred on
        inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        assert inside.sum() > 10
        assert (overlay[rows[inside], cols[inside]] == (255, 0, 0)).all()
