"""AFLW-19 loader on a .mat fixture written in the real field layout (scipy.io.savemat, cell nameList)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from conftest import frame_types, suite_types
from PIL import Image

from mcf.data import transforms as T
from mcf.data.aflw19 import (
    AFLW19,
    AFLW19Config,
    AlignmentAugment,
    check_written_split,
    image_size,
    read_mat,
    table,
    to_original,
)
from mcf.errors import GateError, StageError
from mcf.evaluate.probe import read_identities
from mcf.params import ParamsError
from mcf.synth.writers import IDENTITIES_CSV
from mcf.validate.gate import run_gate

N, N_TRAIN, SIZE = 12, 8, 64
NO_PHOTO = T.Photometric(gray_p=0.0, gamma_p=0.0, blur_p=0.0)


def _write_tree(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N images with a box and 19 landmarks inside it; landmark 0 is drawn as a white dot."""
    boxes, data, names = np.zeros((N, 4)), np.zeros((N, 38)), np.empty((N, 1), dtype=object)
    mask = np.ones((N, 19))
    for i in range(N):
        w, h = int(rng.integers(120, 200)), int(rng.integers(120, 200))
        left, top = rng.uniform(10, 30), rng.uniform(10, 30)
        right, bottom = left + rng.uniform(60, w - 50), top + rng.uniform(60, h - 50)
        pts = np.stack([rng.uniform(left + 8, right - 8, 19), rng.uniform(top + 8, bottom - 8, 19)], 1)
        pts[17], pts[18] = (left, top), (right, bottom)  # on the box corners
        boxes[i], data[i] = (left, right, top, bottom), np.concatenate([pts[:, 0], pts[:, 1]])
        names[i, 0] = f"{i % 3 * (i % 3 != 1) }/image{i:05d}.jpg"  # folders 0, 2 as in the release
        img = np.full((h, w, 3), 20, np.uint8)
        # a dot centred on landmark 0 (OpenCV puts pixel centres at j, this package at j + 0.5)
        cx, cy = (int(round((v - 0.5) * 16)) for v in pts[0])
        cv2.circle(img, (cx, cy), 3 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
        path = root / "data" / "flickr" / names[i, 0]
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 98])
    mask[[N_TRAIN, N_TRAIN + 2], 5] = 0  # two test rows are not frontal
    ra = np.concatenate([rng.permutation(N_TRAIN), N_TRAIN + np.arange(N - N_TRAIN)]) + 1.0
    fields = {"bbox": boxes, "data": data, "mask_new": mask, "nameList": names, "ra": ra[None, :]}
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), fields)
    return fields


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, _write_tree(tmp_path, np.random.default_rng(0))


def _cfg(root: Path, **kw: object) -> AFLW19Config:
    return AFLW19Config(root=str(root), n_train=N_TRAIN, size=SIZE, **kw)


def test_read_mat_and_splits(tree: tuple[Path, dict]) -> None:
    root, fields = tree
    ann = read_mat(root)
    assert ann.names[3] == fields["nameList"][3, 0]
    np.testing.assert_allclose(ann.points[4, :, 1], fields["data"][4, 19:])
    train, full = AFLW19(_cfg(root), "train"), AFLW19(_cfg(root), "full")
    frontal = AFLW19(_cfg(root), "frontal")
    assert (len(train), len(full), len(frontal)) == (N_TRAIN, N - N_TRAIN, N - N_TRAIN - 2)
    assert set(train.indices) == set(range(N_TRAIN))
    np.testing.assert_array_equal(train.indices, fields["ra"][0, :N_TRAIN].astype(int) - 1)
    assert set(frontal.indices) == {N_TRAIN + 1, N_TRAIN + 3}
    val = AFLW19(_cfg(root, n_val=2), "val")
    assert len(val) == 2 and len(AFLW19(_cfg(root, n_val=2), "train")) == N_TRAIN - 2
    with pytest.raises(ParamsError, match=f"data.n_train: {N + 1} exceeds the {N} samples"):  # exit 2
        AFLW19(dataclasses.replace(_cfg(root), n_train=N + 1), "train")


def test_sample_keys_and_box_maps_to_crop(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    ds = AFLW19(_cfg(root), "full")
    s = ds[1]
    assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
    assert s["landmarks"].shape == (19, 2) and s["matrix"].dtype == torch.float64
    assert s["gt"].shape == (19, 2) and s["visible"].shape == (19,) and s["box"].shape == (4,)
    np.testing.assert_allclose(s["landmarks"][17:].numpy(), [[0, 0], [1, 1]], atol=1e-6)
    left, right, top, bottom = ds.ann.boxes[ds.indices[1]]
    corners = T.apply(s["matrix"].numpy(), np.array([[left, top], [right, bottom]])) / SIZE
    np.testing.assert_allclose(corners, [[0, 0], [1, 1]], atol=1e-12)
    assert 0 <= s["landmarks"].min() and s["landmarks"].max() <= 1


def test_inverse_mapping_is_exact_with_augmentation(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    torch.manual_seed(1)
    ds = AFLW19(_cfg(root), "train", augment=True)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    back = to_original(batch["landmarks"].double(), batch["matrix"], SIZE)
    np.testing.assert_allclose(back, batch["gt"].double().numpy(), atol=1e-3)  # float32 landmarks
    exact = to_original(T.apply(batch["matrix"].numpy(), batch["gt"].double().numpy()) / SIZE,
                        batch["matrix"], SIZE)
    np.testing.assert_allclose(exact, batch["gt"].double().numpy(), atol=1e-9)


def _dot_centre(image: torch.Tensor) -> np.ndarray:
    """Intensity-weighted centre of the bright dot, in continuous crop pixels."""
    gray = (image * torch.tensor(T.IMAGENET_STD)[:, None, None]).sum(0).numpy()
    weight = np.clip(gray - gray.max() / 2, 0, None)
    ys, xs = np.mgrid[: gray.shape[0], : gray.shape[1]] + 0.5
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_augmentation_keeps_landmarks_on_the_image(tree: tuple[Path, dict]) -> None:
    """Geometric augmentation at full strength: the drawn dot stays under landmark 0."""
    root, _ = tree
    aug = AlignmentAugment(shift=0.05, rotation=10.0, occlusion_p=0.0, noise_p=0.0, photometric=NO_PHOTO)
    torch.manual_seed(3)
    ds, plain = AFLW19(_cfg(root, augment=aug), "train", augment=True), AFLW19(_cfg(root), "train")
    moved = 0.0
    for i in range(len(ds)):
        s = ds[i]
        moved = max(moved, float((s["landmarks"][0] - plain[i]["landmarks"][0]).abs().max() * SIZE))
        err = np.abs(_dot_centre(s["image"]) - s["landmarks"][0].numpy() * SIZE).max()
        assert err < 0.2, f"sample {i}: dot {err:.2f} px away from the transformed landmark"
    assert moved > 1.0  # the augmentation really moved the points


def test_an_exif_orientation_tag_leaves_the_stored_pixels_as_annotated(tree: tuple[Path, dict]) -> None:
    """The .mat's boxes and points are on the JPEG's stored grid (MATLAB's imread ignores EXIF, as does
    the gate's header size): with a rotate-180 tag OpenCV turned the image, so the crop showed the
    wrong part of the picture under correct-looking landmarks."""
    root, _ = tree
    ds = AFLW19(_cfg(root), "full")
    path = ds.image_path(0)
    exif = Image.Exif()
    exif[0x0112] = 3  # the EXIF Orientation tag: rotate 180°
    Image.fromarray(cv2.imread(str(path))[..., ::-1]).save(path, quality=98, exif=exif.tobytes())
    s = ds[0]
    err = np.abs(_dot_centre(s["image"]) - s["landmarks"][0].numpy() * SIZE).max()
    assert err < 0.3, f"the dot is {err:.2f} px away from its landmark"


def test_photometric_augmentation_runs(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    full = T.Photometric(gray_p=1.0, gamma_p=1.0, blur_p=1.0)
    aug = AlignmentAugment(occlusion_p=1.0, noise_p=1.0, photometric=full)
    torch.manual_seed(0)
    s = AFLW19(_cfg(root, augment=aug), "train", augment=True)[0]
    std, mean = (torch.tensor(v)[:, None, None] for v in (T.IMAGENET_STD, T.IMAGENET_MEAN))
    img = s["image"] * std + mean
    assert torch.isfinite(img).all() and img.shape == (3, SIZE, SIZE)
    assert (img.max(0).values - img.min(0).values).abs().max() < 0.02  # gray: channels agree


@pytest.mark.parametrize(("noise", "gray_after_noise"), [("blend", True), ("gaussian", False)])
def test_noise_kind_sets_its_place_among_the_augmentations(
    tree: tuple[Path, dict], noise: str, gray_after_noise: bool
) -> None:
    """FaRL's blend noise comes before gray (its order: occlusion, noise, gray, gamma, blur), so a grayed
    crop stays gray; our gaussian noise is added last, to each channel apart."""
    root, _ = tree
    gray = T.Photometric(gray_p=1.0, gamma_p=0.0, blur_p=0.0)
    aug = AlignmentAugment(occlusion_p=0.0, noise_p=1.0, noise=noise, noise_std=20.0, photometric=gray)
    s = AFLW19(_cfg(root, augment=aug), "train", augment=True)[0]
    spread = (s["image"] * torch.tensor(T.IMAGENET_STD)[:, None, None]
              + torch.tensor(T.IMAGENET_MEAN)[:, None, None]).aminmax(dim=0)
    channels_agree = bool((spread.max - spread.min).abs().max() < 1e-5)
    assert channels_agree == gray_after_noise


def test_bad_files_fail_naming_the_file(tree: tuple[Path, dict]) -> None:
    root, fields = tree
    ds = AFLW19(_cfg(root), "train")
    name = ds.ann.names[ds.indices[0]]
    (root / "data" / "flickr" / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace("/", ".")):
        ds[0]
    name = ds.ann.names[ds.indices[1]]
    (root / "data" / "flickr" / name).write_bytes(b"not a jpeg")
    with pytest.raises(StageError, match=name.replace("/", ".")):
        ds[1]
    with pytest.raises(StageError, match="AFLWinfo_release.mat .is data.root an AFLW-19 tree"):
        AFLW19(_cfg(root / "nowhere"), "train")
    bad = dict(fields, data=fields["data"][:, :30])
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), bad)
    with pytest.raises(StageError, match="data"):
        read_mat(root)
    # ra written 0-based (or with a repeat) would silently drop a sample and train on another twice
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, ra=fields["ra"] - 1))
    with pytest.raises(StageError, match=f"ra is not a 1-based permutation of 1..{N}"):
        read_mat(root)


@pytest.mark.parametrize("data", [b"", b"MATLAB 5.0 MAT-file", b"version https://git-lfs.github.com/spec/v1\n"],
                         ids=["empty", "header-text", "text-line"])
def test_a_mat_file_cut_short_or_of_zeros_fails_naming_it(tmp_path: Path, data: bytes) -> None:
    """An empty file (a copy or download cut off at once), a short text in its place or a file of zeros
    made scipy raise MatReadError, IndexError or TypeError: a traceback instead of the StageError naming
    the file."""
    (tmp_path / "AFLWinfo_release.mat").write_bytes(data)
    with pytest.raises(StageError, match=rf"AFLWinfo_release.mat: .*{len(data)} bytes"):
        read_mat(tmp_path)
    # zeros where the bytes never arrived (a preallocated copy) were scipy's MatReadError
    (tmp_path / "AFLWinfo_release.mat").write_bytes(bytes(4096))
    with pytest.raises(StageError, match=r"AFLWinfo_release.mat: cannot read as a MATLAB file: .*corrupt"):
        read_mat(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, 2.0, -1.0, 0.5])
def test_a_visibility_flag_other_than_0_or_1_fails_naming_the_row(
    tree: tuple[Path, dict], bad: float
) -> None:
    """``mask_new`` holds 0/1 flags; a NaN, -1, 2 or 0.5 was read as visible (``astype(bool)``), so a
    damaged test row counted as frontal (the release's frontal subset is the rows whose flags all equal
    1) and passed the gate's visible count."""
    root, fields = tree
    mask = fields["mask_new"].copy()
    mask[N_TRAIN + 1, 4] = bad
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, mask_new=mask))
    with pytest.raises(StageError, match=rf"\.mat: mask_new must hold 0 or 1, .* row {N_TRAIN + 1}"):
        read_mat(root)


def test_a_name_that_is_no_string_fails_naming_the_file_and_row(tree: tuple[Path, dict]) -> None:
    """An empty ``nameList`` cell (MATLAB's ``[]``) was a bare ValueError traceback naming neither."""
    root, fields = tree
    names = fields["nameList"].copy()
    names[3, 0] = np.zeros((0, 0))
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, nameList=names))
    with pytest.raises(StageError, match=r"AFLWinfo_release.mat: nameList row 3 is not a string"):
        read_mat(root)


@pytest.mark.parametrize("name", ["../outside.jpg", "0/../../outside.jpg", "ABSOLUTE"])
def test_a_name_leading_out_of_the_image_folder_is_refused(tree: tuple[Path, dict], name: str) -> None:
    """Names are joined under data/flickr: an absolute one, or one climbing out with "..", had a downloaded
    .mat read any image this user can (its crops then in the gate's table, the fine-tune, the evaluate
    overlays)."""
    root, fields = tree
    outside = root.parent / "outside.jpg"
    cv2.imwrite(str(outside), np.full((120, 120, 3), 20, np.uint8))
    names = fields["nameList"].copy()
    names[3, 0] = str(outside) if name == "ABSOLUTE" else name
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, nameList=names))
    with pytest.raises(StageError, match=r"AFLWinfo_release.mat: nameList row 3 .* inside data/flickr"):
        read_mat(root)


def test_table_passes_the_gate_and_catches_bad_rows(tree: tuple[Path, dict]) -> None:
    root, fields = tree
    df = table(_cfg(root), "full")
    assert len(df) == N - N_TRAIN and df["exists"].all()
    points = read_mat(root).points[fields["ra"][0, N_TRAIN:].astype(int) - 1]  # x over width, y over height
    np.testing.assert_allclose(df["x_max"] * df["width"], points[:, :, 0].max(1))
    np.testing.assert_allclose(df["y_min"] * df["height"], points[:, :, 1].min(1))
    assert (df["width"] != df["height"]).any()
    run_gate(df, "aflw19", stage="test")
    data = fields["data"].copy()
    data[N_TRAIN:, 0] = -50.0  # landmark 0 of every test image left of the image
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, data=data))
    with pytest.raises(StageError, match="x_min"):
        run_gate(table(_cfg(root), "full"), "aflw19", stage="test")


def test_gate_catches_a_box_that_misses_its_landmarks(tree: tuple[Path, dict]) -> None:
    """A bbox in another column order (left, top, right, bottom) passed while its sides stayed positive,
    and the 512 crop around it missed the face: the landmarks' mean must lie in the box."""
    root, fields = tree
    assert table(_cfg(root), "full")["centre_in_box"].all()
    boxes = fields["bbox"][:, [0, 2, 1, 3]]
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, bbox=boxes))
    df = table(_cfg(root), "full")
    assert not df["centre_in_box"].any()
    with pytest.raises(GateError, match=r"column=centre_in_box\)"):
        run_gate(df, "aflw19", stage="test")


@pytest.mark.parametrize(("bad", "checks"), [
    (np.nan, ["expect_column_values_to_not_be_null(column=x_min): 1 unexpected",
              "expect_column_values_to_not_be_null(column=box_w): 1 unexpected",
              "expect_column_values_to_be_in_set(column=finite): 2 unexpected"]),
    (np.inf, ["expect_column_values_to_be_in_set(column=finite): 2 unexpected"]),
])
def test_gate_fails_a_non_finite_landmark_or_box(
    tree: tuple[Path, dict], bad: float, checks: list[str]
) -> None:
    """A NaN passes every range check (GX skips nulls), so the gate names it as a null. An inf is no
    null, a box reaching to inf is wide, and a landmark at inf is one row within the range checks'
    ``mostly``: the ``finite`` column catches both (the L1 loss would be NaN or inf)."""
    root, fields = tree
    data, boxes = fields["data"].copy(), fields["bbox"].copy()
    data[N_TRAIN, 3], boxes[N_TRAIN + 1, 1] = bad, bad  # one landmark x, one box right
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, data=data, bbox=boxes))
    with pytest.raises(GateError) as err:
        run_gate(table(_cfg(root), "full"), "aflw19", stage="test")
    assert all(check in str(err.value) for check in checks), str(err.value)


def test_gate_names_a_missing_image(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    name = read_mat(root).names[N_TRAIN + 1]
    (root / "data" / "flickr" / name).unlink()
    with pytest.raises(GateError) as err:
        run_gate(table(_cfg(root), "full"), "aflw19", stage="test")
    msg = str(err.value)
    assert f"(column=exists): 1 unexpected of {N - N_TRAIN}, e.g. [False] (name: ['{name}'])" in msg


def test_gate_names_an_image_cut_short(tree: tuple[Path, dict]) -> None:
    """OpenCV, which the loader reads with, decodes a JPEG cut short in part (grey below the cut, a
    libjpeg warning on stderr only), and its header still gives the full size: a half-copied test image
    was scored as a whole one."""
    root, _ = tree
    name = read_mat(root).names[N_TRAIN + 1]
    path = root / "data" / "flickr" / name
    data = path.read_bytes()
    path.write_bytes(data[: (data.index(b"\xff\xda") + len(data)) // 2])  # half the scan
    df = table(_cfg(root), "full")
    assert df["exists"].all() and df["decodes"].sum() == N - N_TRAIN - 1
    with pytest.raises(GateError) as err:
        run_gate(df, "aflw19", stage="test")
    msg = str(err.value)
    assert f"(column=decodes): 1 unexpected of {N - N_TRAIN}, e.g. [False] (name: ['{name}'])" in msg


@pytest.mark.parametrize("shape", [(100, 4), (4, 100), (1, 1)])
def test_a_jpeg_under_8_pixels_a_side_is_measured_not_a_crash(
    tree: tuple[Path, dict], shape: tuple[int, int]
) -> None:
    """The full decode runs at 1/8 scale (Pillow's draft at w // 8, h // 8): a side under 8 pixels (a
    placeholder thumbnail, or a header whose size field was damaged) asked for 0 and raised
    ZeroDivisionError out of table(), so the gate never ran; the row is measured and the gate fails it."""
    root, _ = tree
    name = read_mat(root).names[N_TRAIN + 1]
    cv2.imwrite(str(root / "data" / "flickr" / name), np.full((*shape, 3), 128, np.uint8))
    df = table(_cfg(root), "full").set_index("name")
    assert (df.loc[name, "height"], df.loc[name, "width"]) == shape and df.loc[name, "decodes"]
    with pytest.raises(GateError, match=name.replace("/", ".")):
        run_gate(df.reset_index(), "aflw19", stage="test")


def test_a_header_declaring_a_huge_size_is_unreadable_not_a_crash(tree: tuple[Path, dict]) -> None:
    """Pillow refuses to open an image whose header declares more than twice its MAX_IMAGE_PIXELS with a
    DecompressionBombError, which is no OSError: a JPEG whose size field was damaged (here to 65535 x
    65535) stopped table() with that traceback before the gate could name it."""
    root, _ = tree
    name = read_mat(root).names[N_TRAIN + 1]
    path = root / "data" / "flickr" / name
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"  # height, width
    path.write_bytes(bytes(data))
    assert image_size(path) == (0, 0, False)
    df = table(_cfg(root), "full").set_index("name")
    assert df.loc[name, "width"] == 0 and not df.loc[name, "decodes"]
    with pytest.raises(GateError, match=name.replace("/", ".")):
        run_gate(df.reset_index(), "aflw19", stage="test")


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    from mcf.params import ParamsError, build

    with pytest.raises(ParamsError, match="n_val"):
        build(AFLW19Config, {"root": str(tmp_path), "n_train": 5, "n_val": 5})
    with pytest.raises(ParamsError, match="augment.scale_max"):
        build(AFLW19Config, {"augment": {"scale_min": 1.2, "scale_max": 1.0}})
    assert dataclasses.asdict(build(AFLW19Config, {}))["augment"]["rotation"] == 10.0


@pytest.mark.parametrize(("text", "cause"), [
    (b"", "EmptyDataError"),
    (b"name,identity\nimage_0.jpg,3\n", "ValueError: Usecols do not match columns"),
    (b"\xff\xfe\x00garbage", "UnicodeDecodeError"),
])
def test_a_damaged_identities_table_is_one_line(tmp_path: Path, text: bytes, cause: str) -> None:
    """SynthFace's identities table cut short or damaged after fetch wrote it was pandas' traceback from
    every AFLW-19 read (finetune_alignment, evaluate) and from the identity probe."""
    (tmp_path / IDENTITIES_CSV).write_bytes(text)
    path = tmp_path / IDENTITIES_CSV
    message = rf"^{path}: not a readable identities table \({cause}[^\n]*rerun `mcf fetch`$"
    with pytest.raises(StageError, match=message):
        check_written_split(tmp_path, 5)
    if cause != "ValueError: Usecols do not match columns":  # the probe reads no split
        with pytest.raises(StageError, match=message):
            read_identities(tmp_path)
    (tmp_path / IDENTITIES_CSV).write_text("name,identity,split\nimage_0.jpg,x,train\n")
    with pytest.raises(StageError, match="an identity that is not a whole number; rerun `mcf fetch`"):
        read_identities(tmp_path)  # int()'s ValueError


def test_an_empty_split_fails_the_gate_on_its_row_count_alone(tree: tuple[Path, dict]) -> None:
    """n_train equal to the number of samples leaves the test split empty: table() gave a frame without
    columns and the gate listed every expectation, 41 as 'column ... does not exist', not the row count."""
    root, _ = tree
    with pytest.raises(GateError) as err:
        run_gate(table(AFLW19Config(root=str(root), n_train=N, size=SIZE), "full"), "aflw19", stage="test",
                 keep=False)
    assert str(err.value).endswith("expectations on 0 rows:\n"
                                   "  - expect_table_row_count_to_be_between(): observed 0"), str(err.value)


def test_splits_are_slices_of_ra_in_its_order(tree: tuple[Path, dict]) -> None:
    """train = ra[:n_train - n_val], val = ra[n_train - n_val:n_train] (carved from train, never from the
    test rows), full = ra[n_train:] and frontal its all-visible rows, each in ra's order (the gate's table
    too); the fixture's ra keeps the test rows in file order, so shuffle them here."""
    root, fields = tree
    ra = fields["ra"].copy()
    ra[0, N_TRAIN:] = ra[0, N_TRAIN:][[2, 0, 3, 1]]
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, ra=ra))
    order = ra[0].astype(int) - 1
    cfg = _cfg(root, n_val=2)
    splits = {split: AFLW19(cfg, split).indices for split in ("train", "val", "full", "frontal")}
    np.testing.assert_array_equal(splits["train"], order[: N_TRAIN - 2])
    np.testing.assert_array_equal(splits["val"], order[N_TRAIN - 2 : N_TRAIN])
    np.testing.assert_array_equal(splits["full"], order[N_TRAIN:])
    frontal = [i for i in order[N_TRAIN:] if fields["mask_new"][i].all()]
    np.testing.assert_array_equal(splits["frontal"], frontal)
    assert not set(splits["val"]) & set(splits["full"])
    names = [fields["nameList"][i, 0] for i in order[N_TRAIN:]]
    assert table(cfg, "full")["name"].tolist() == names


def test_table_counts_visible_points_and_checks_the_centre_on_each_axis(tree: tuple[Path, dict]) -> None:
    """``visible`` is the count of points mask_new flags 1; ``centre_in_box`` tests the landmarks' mean x
    against left..right and its y against top..bottom: a face moved down with its box stays in it, a box
    moved right by its width alone misses it."""
    root, fields = tree
    df = table(_cfg(root), "full")
    assert df["visible"].tolist() == [18, 19, 18, 19]  # rows N_TRAIN and N_TRAIN + 2 hide point 5
    data, boxes = fields["data"].copy(), fields["bbox"].copy()
    data[N_TRAIN, 19:] += 300.0  # every y of the first test face, and its box's top and bottom
    boxes[N_TRAIN, 2:] += 300.0
    row = N_TRAIN + 1
    boxes[row, :2] += boxes[row, 1] - boxes[row, 0]  # left and right, by the width
    scipy.io.savemat(str(root / "AFLWinfo_release.mat"), dict(fields, data=data, bbox=boxes))
    assert table(_cfg(root), "full")["centre_in_box"].tolist() == [True, False, True, True]


def test_table_builds_each_column_as_its_suite_types_it(tree: tuple[Path, dict]) -> None:
    """The suite's type checks and table() must name the same columns with the same types: a type check
    dropped, renamed or changed in aflw19.json (``width`` as float64, a flag as int64) passed every other
    test, and a table() column left untyped lets a 0/1 int pass ``in [true]`` as a flag."""
    assert frame_types(table(_cfg(tree[0]), "full")) == suite_types("aflw19")
