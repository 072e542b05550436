"""LaPa loader and tanh warp on a fixture tree written in the real LaPa layout."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import frame_types, suite_types
from PIL import Image

from mcf.data import transforms as T
from mcf.data.lapa import (
    ALIGN_POINTS,
    TEMPLATE,
    LaPa,
    LaPaConfig,
    ParsingAugment,
    read_label,
    read_landmarks,
    sample_augment,
    sample_params,
    table,
    warp_to_original,
)
from mcf.errors import StageError
from mcf.params import build
from mcf.validate.gate import run_gate

SIZE = 128


def _unpack(params: dict[str, torch.Tensor]) -> tuple[np.ndarray, float, int]:
    return params["matrix"].double().numpy(), float(params["warp_factor"]), round(float(params["warp_size"]))


def points_from_original(points: np.ndarray, params: dict[str, torch.Tensor], size: int) -> np.ndarray:
    """Original-image pixels ``[K, 2]`` → warped pixels at resolution ``size``: the sample's warp."""
    m, wf, ws = _unpack(params)
    return T.tanh_warp_forward(T.apply(m, points), wf, ws) * (size / ws)


def points_to_original(points: np.ndarray, params: dict[str, torch.Tensor], size: int) -> np.ndarray:
    """Warped pixels at resolution ``size`` ``[K, 2]`` → original-image pixels, through the inverse warp."""
    m, wf, ws = _unpack(params)
    return T.apply(T.invert(m), T.tanh_warp_inverse(np.asarray(points, np.float64) * (ws / size), wf, ws))
# one distinct colour per class, so an image pixel tells which label it should carry
PALETTE = np.array([[0, 0, 0], [230, 180, 150], [120, 60, 20], [20, 60, 120], [0, 200, 0], [0, 0, 230],
                    [230, 0, 230], [230, 0, 0], [250, 250, 0], [0, 230, 230], [120, 120, 120]], np.uint8)


def _face(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A label map, its colour image and 106 landmarks with the 5 alignment points on the face."""
    angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.33, 0.4)
    m = T.around((256, 256), angle, scale, (w / 2 - 256 + rng.uniform(-8, 8), h / 2 - 256))
    five = T.apply(m, TEMPLATE)
    label = np.zeros((h, w), np.uint8)
    centre = T.apply(m, np.array([[256.0, 290.0]]))[0]
    deg = float(np.rad2deg(angle))

    def ellipse(c: np.ndarray, axes: tuple[float, float], value: int) -> None:
        box = ((float(c[0]), float(c[1])), (2 * axes[0] * scale, 2 * axes[1] * scale), deg)
        cv2.ellipse(label, box, value, -1)

    ellipse(T.apply(m, np.array([[256.0, 170.0]]))[0], (190, 130), 10)  # hair
    ellipse(centre, (150, 190), 1)  # skin
    for pt, cls in zip(five, (4, 5, 6), strict=False):  # eyes, nose
        ellipse(pt, (26, 16), cls)
    ellipse(five[3:].mean(0) - [0, 8 * scale], (40, 9), 7)
    ellipse(five[3:].mean(0) + [0, 8 * scale], (40, 9), 9)
    points = rng.uniform(0, min(w, h), (106, 2))
    points[list(ALIGN_POINTS)] = five
    return label, PALETTE[label], points


def _write(root: Path, split: str, stem: str, rng: np.random.Generator) -> np.ndarray:
    w, h = int(rng.integers(220, 280)), int(rng.integers(230, 290))
    label, rgb, points = _face(rng, w, h)
    base = root / "LaPa" / split
    for sub in ("images", "labels", "landmarks"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(base / "images" / f"{stem}.jpg"), rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 97])
    cv2.imwrite(str(base / "labels" / f"{stem}.png"), label)
    lines = ["106"] + [f"{x:.3f} {y:.3f}" for x, y in points]
    (base / "landmarks" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return label


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for i in range(n):
            _write(tmp_path, split, f"{split}_{i:04d}", rng)
    return tmp_path


def _cfg(root: Path, **kw: object) -> LaPaConfig:
    return LaPaConfig(root=str(root), **{"size": SIZE, "label_size": SIZE, **kw})


def test_sample_keys_and_alignment(root: Path) -> None:
    ds = LaPa(_cfg(root), "test")
    assert len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (3, SIZE, SIZE) and s["label"].shape == (SIZE, SIZE)
    assert s["label"].dtype == torch.int64 and s["name"] == "test/test_0000"
    h, w = cv2.imread(str(root / "LaPa/test/labels/test_0000.png"), cv2.IMREAD_UNCHANGED).shape
    assert tuple(s["orig_size"].tolist()) == (h, w)
    _, _, points = ds.read(0)
    aligned = T.apply(s["params"]["matrix"].numpy(), points[list(ALIGN_POINTS)])
    np.testing.assert_allclose(aligned, TEMPLATE, atol=5e-3)  # the file keeps 3 decimals
    half = LaPa(_cfg(root, warp_size=256), "test")[0]  # the template, given on 512², scales with the square
    aligned = T.apply(half["params"]["matrix"].numpy(), points[list(ALIGN_POINTS)])
    np.testing.assert_allclose(aligned, TEMPLATE / 2, atol=5e-3)
    assert set(np.unique(s["label"].numpy())) >= {0, 1, 4, 5, 6, 7, 9, 10}


def test_point_round_trip_inside_and_at_roi_edge(root: Path) -> None:
    s = LaPa(_cfg(root), "train")[1]
    params = s["params"]
    inv = T.invert(params["matrix"].numpy())
    rng = np.random.default_rng(1)
    inside = rng.uniform(100, 412, (200, 2))  # aligned square: the face
    angles = rng.uniform(0, 2 * np.pi, 200)
    edge = 256 + 256 * np.stack([np.cos(angles), np.sin(angles)], 1) * rng.uniform(0.95, 1.3, (200, 1))
    for aligned in (inside, edge):
        orig = T.apply(inv, aligned)
        back = points_to_original(points_from_original(orig, params, SIZE), params, SIZE)
        assert np.abs(back - orig).max() < 0.5
        assert np.abs(back - orig).max() < 1e-6  # in fact analytic
    # the ROI's edges land at 1 - w + w tanh(1) half sides (FaRL's warp, w = 0.8)
    warped = points_from_original(T.apply(inv, np.array([[512.0, 256.0], [256.0, 0.0]])), params, 512)
    reach = 256 * (0.2 + 0.8 * np.tanh(1.0))
    np.testing.assert_allclose(warped, [[256 + reach, 256], [256, 256 - reach]], atol=1e-6)


def test_label_warp_and_back_keeps_the_face(root: Path) -> None:
    cfg = _cfg(root, size=64, label_size=512)
    ds = LaPa(cfg, "test")
    batch = torch.utils.data.default_collate([ds[i] for i in range(2)])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["label"].shape == (2, 512, 512)
    for i in range(2):
        label = ds.read(i)[1]
        onehot = torch.nn.functional.one_hot(batch["label"][i], 11).permute(2, 0, 1).float()
        back = warp_to_original(onehot, sample_params(batch["params"], i), batch["orig_size"][i])
        assert back.shape == (11, *label.shape)
        h, w = label.shape
        grid = np.stack(np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5), -1)
        aligned = T.apply(batch["params"]["matrix"][i].numpy(), grid)
        face = (aligned > 0).all(-1) & (aligned < 512).all(-1)  # inside the aligned square
        agree = (back.argmax(0).numpy() == label)[face].mean()
        assert face.sum() > 10000 and agree >= 0.99, f"{agree:.4f} of {face.sum()} face pixels kept"


def test_augmentation_moves_image_and_label_together(root: Path) -> None:
    aug = ParsingAugment(photometric=T.Photometric(gray_p=0.0, gamma_p=0.0, blur_p=0.0))
    torch.manual_seed(0)
    ds = LaPa(_cfg(root, augment=aug), "train", augment=True)
    plain = LaPa(_cfg(root), "train")
    for i in range(len(ds)):
        s = ds[i]
        rgb = (s["image"] * torch.tensor(T.IMAGENET_STD)[:, None, None]
               + torch.tensor(T.IMAGENET_MEAN)[:, None, None]).permute(1, 2, 0).numpy() * 255
        nearest = np.linalg.norm(rgb[:, :, None] - PALETTE[None, None].astype(float), axis=-1).argmin(-1)
        label = s["label"].numpy()
        agree = (nearest == label)[(nearest > 0) | (label > 0)].mean()  # over the face, not the black
        assert agree > 0.94, f"sample {i}: image colour matches its label on {agree:.3f} of the face"
        assert not torch.equal(s["label"], plain[i]["label"])  # the augmentation did move things
        nose = points_from_original(ds.read(i)[2][[54]], s["params"], SIZE)[0]
        ys, xs = np.nonzero(s["label"].numpy() == 6)
        np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], nose, atol=1.0)


def _save_jpeg(path: Path, rgb: np.ndarray, orientation: int | None) -> None:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # the EXIF Orientation tag
    Image.fromarray(rgb).save(path, quality=97, exif=exif.tobytes())


def test_an_exif_orientation_tag_leaves_the_stored_pixels_as_labelled(root: Path) -> None:
    """The label PNG and the landmarks are on the JPEG's stored grid (as the gate's header sizes): a
    rotate-90 tag made OpenCV turn the image, so the sample failed with a size mismatch after the
    gate had passed the tree (and a rotate-180 tag would have paired a turned image with its label)."""
    path = root / "LaPa/train/images/train_0000.jpg"
    rgb = cv2.imread(str(path))[..., ::-1]
    ds = LaPa(_cfg(root), "train")
    _save_jpeg(path, rgb, None)
    plain = ds[0]
    for orientation in (6, 3):
        _save_jpeg(path, rgb, orientation)
        run_gate(table(_cfg(root), "train"), "lapa", stage="test")
        s = ds[0]
        assert torch.equal(s["image"], plain["image"]) and torch.equal(s["label"], plain["label"])


def test_bad_files_fail_naming_the_file(root: Path) -> None:
    ds = LaPa(_cfg(root), "train")
    (root / "LaPa/train/images/train_0000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="train_0000.jpg"):
        ds[0]
    cv2.imwrite(str(root / "LaPa/train/labels/train_0001.png"), np.zeros((10, 12), np.uint8))
    with pytest.raises(StageError, match="train_0001.png"):
        ds[1]
    (root / "LaPa/train/landmarks/train_0002.txt").write_text("106\n1 2\n")
    with pytest.raises(StageError, match="train_0002.txt"):
        ds[2]
    path = root / "LaPa/train/labels/train_0002.png"
    cv2.imwrite(str(path), np.dstack([cv2.imread(str(path), cv2.IMREAD_UNCHANGED)] * 3))  # scoring reads it
    with pytest.raises(StageError, match=r"train_0002.png: label must have one channel, got shape"):
        read_label(path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LaPa(_cfg(root / "nowhere"), "train")
    with pytest.raises(StageError, match=r"no LaPa train split at .*nowhere/LaPa/train"):
        table(_cfg(root / "nowhere"), "train")  # what the fine-tune's gate reads first


@pytest.mark.parametrize(("mode", "bits", "kind"), [("L", 4, "4-bit grayscale"), ("P", 8, "8-bit palette")])
def test_a_low_bit_depth_or_palette_label_png_fails_naming_it(
    root: Path, mode: str, bits: int, kind: str
) -> None:
    """LaPa's labels are 8-bit grayscale PNGs of class ids. OpenCV scales a 4-bit grey PNG (what a PNG
    optimiser makes of values 0..10) up to 0..255, so class 10 read as 170 with no error, and expands a
    palette PNG into colours; both must fail naming the file and its format."""
    path = root / "LaPa/train/labels/train_0001.png"
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert 0 < label.max() <= 10
    image = Image.fromarray(label, mode)
    if mode == "P":
        image.putpalette([c for i in range(256) for c in (i, i, i)])
    image.save(path, bits=bits)
    with pytest.raises(StageError, match=rf"train_0001\.png: a {kind}.* PNG; a LaPa label is an 8-bit"):
        read_label(path)
    with pytest.raises(StageError, match=r"train_0001\.png: a "):
        LaPa(_cfg(root), "train")[1]
    df = table(_cfg(root), "train")  # the gate says why, not only that a label value is out of range
    assert df["label_format_ok"].tolist() == [True, False, True]
    with pytest.raises(StageError, match=r"column=label_format_ok\): 1 unexpected .*train_0001"):
        run_gate(df, "lapa", stage="test")
    cv2.imwrite(str(path), label.astype(np.uint16))  # a 16-bit grey PNG keeps its values as stored
    np.testing.assert_array_equal(read_label(path), label)


def test_binary_landmark_file_fails_naming_it(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(StageError, match=r"x\.txt: malformed landmark file: 'utf-8' codec"):
        read_landmarks(tmp_path / "x.txt")


@pytest.mark.parametrize(("body", "cause"), [
    ("extra", r"107 point lines for header 106"),  # 106 points and one more: the first 106 were read
    ("short", r"105 point lines for header 106"),
    ("three", r"line 6: expected 'x y', got 3 values"),
])
def test_a_landmark_file_that_disagrees_with_its_header_fails_naming_it(
    root: Path, body: str, cause: str
) -> None:
    """A file is "106" then 106 lines "x y" (blank lines aside). Lines past the 106th were ignored, so a
    file with a point too many passed the loader and the gate as its first 106; one short, or with a
    ragged line, failed with numpy's "inhomogeneous shape" in place of the line at fault."""
    path = root / "LaPa/train/landmarks/train_0001.txt"
    lines = [ln for ln in path.read_text().split("\n")[1:] if ln]
    if body == "extra":
        lines.append("12.5 40.0")
    elif body == "short":
        lines = lines[:-1]
    else:
        lines[4] += " 1.0"
    path.write_text("\n".join(["106", *lines]) + "\n\n")
    with pytest.raises(StageError, match=rf"train_0001\.txt: malformed landmark file: {cause}"):
        read_landmarks(path)
    assert table(_cfg(root), "train")["n_landmarks"].tolist() == [106, -1, 106]


def test_a_landmark_file_with_crlf_and_blank_lines_reads(tmp_path: Path) -> None:
    points = np.arange(212, dtype=np.float64).reshape(106, 2) / 4
    text = "106 \r\n" + "".join(f"{x} {y} \r\n" for x, y in points) + "\r\n\r\n"
    (tmp_path / "x.txt").write_text(text)
    np.testing.assert_array_equal(read_landmarks(tmp_path / "x.txt"), points)


def test_a_non_finite_landmark_fails_at_the_gate_naming_the_file(root: Path) -> None:
    """``float`` reads "nan" and "inf", so such a file passed the gate's 106-point count and stopped the
    fine-tune later, at that image, with numpy's "SVD did not converge" (the AFLW-19 gate and the
    detections table refuse non-finite coordinates already)."""
    path = root / "LaPa/train/landmarks/train_0001.txt"
    lines = path.read_text().split("\n")
    lines[1 + ALIGN_POINTS[0]] = "nan 12.5"
    path.write_text("\n".join(lines))
    with pytest.raises(StageError, match=r"train_0001\.txt: landmark coordinates must be finite.*\[104\]"):
        read_landmarks(path)
    df = table(_cfg(root), "train")
    assert df["n_landmarks"].tolist() == [106, -1, 106]
    with pytest.raises(StageError, match="n_landmarks"):
        run_gate(df, "lapa", stage="test")


def test_table_passes_the_gate_and_catches_bad_rows(root: Path) -> None:
    df = table(_cfg(root), "train")
    assert len(df) == 3 and df["size_match"].all() and (df["label_max"] == 10).all()
    run_gate(df, "lapa", stage="test")
    cv2.imwrite(str(root / "LaPa/train/labels/train_0001.png"), np.full((40, 40), 12, np.uint8))
    (root / "LaPa/train/landmarks/train_0002.txt").unlink()
    with pytest.raises(StageError) as err:
        run_gate(table(_cfg(root), "train"), "lapa", stage="test")
    for column in ("label_max", "size_match", "has_landmarks", "n_landmarks"):
        assert column in str(err.value)


def test_gate_catches_landmarks_that_miss_their_images(root: Path) -> None:
    """A tree whose images were halved without its landmark files: the labels still match the images, so
    only the landmarks' extent shows it, and the parsing fine-tune aligned every face by points off it."""
    df = table(_cfg(root), "train")
    assert (df[["x_min", "y_min"]].to_numpy() >= 0).all() and (df[["x_max", "y_max"]].to_numpy() <= 1).all()
    for split in ("images", "labels"):
        for path in (root / "LaPa/train" / split).iterdir():
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            size = (image.shape[1] // 2, image.shape[0] // 2)
            cv2.imwrite(str(path), cv2.resize(image, size, interpolation=cv2.INTER_NEAREST))
    df = table(_cfg(root), "train")
    assert df["size_match"].all() and (df["x_max"] > 1.1).all()
    with pytest.raises(StageError, match=r"column=x_max"):
        run_gate(df, "lapa", stage="test")


def test_gate_names_an_image_cut_short(root: Path) -> None:
    """A JPEG cut short decodes in part with OpenCV and keeps its header size, so it passed the gate and
    was trained or scored on with grey below the cut."""
    path = root / "LaPa/test/images/test_0001.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: (data.index(b"\xff\xda") + len(data)) // 2])  # half the scan
    df = table(_cfg(root), "test")
    assert df["size_match"].all() and df["image_decodes"].tolist() == [True, False]
    with pytest.raises(StageError, match=r"column=image_decodes\): 1 unexpected .*test_0001"):
        run_gate(df, "lapa", stage="test")


@pytest.mark.parametrize("scale_std", [1 / 3, 0.4])
def test_a_scale_spread_whose_clip_reaches_zero_is_refused(scale_std: float) -> None:
    """The scale is clipped to 1 ± 3 std: at std 1/3 a draw can be 0 (a singular matrix, LinAlgError in
    the middle of training) and above it negative (the face turned upside down), so both are bad params."""
    from mcf.params import ParamsError, build

    with pytest.raises(ParamsError, match="augment.scale_std"):
        build(LaPaConfig, {"augment": {"scale_std": scale_std}})
    with pytest.raises(ParamsError, match="augment.scale_std: must be < 1 / 8"):  # unclipped: 8 std
        build(LaPaConfig, {"augment": {"scale_std": 0.125, "scale_clip": 0}})
    rng, widest = np.random.default_rng(0), ParsingAugment(scale_std=0.33)
    assert min(np.linalg.det(sample_augment(widest, 512, rng)[:, :2]) for _ in range(5000)) > 0


class _Draws:
    """A stand-in for the generator: ``normal`` and ``uniform`` give the values queued, in order."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def normal(self, loc: float = 0.0, scale: float = 1.0) -> float:
        return loc + scale * self.values.pop(0)  # queued as standard normal draws

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | None = None) -> object:
        u = np.array([self.values.pop(0) for _ in range(size or 1)])  # queued as shares of [low, high)
        return low + (high - low) * (u if size else u[0])


def _farl_random_transform(angle: float, scale: float, shift: tuple[float, float], size: int) -> np.ndarray:
    """FaRL's (blueprint's UpdateRandomTransformMatrix) aligned → aligned matrix, in our pixel convention:
    rotation and scale about the centre ((size - 1) / 2 with OpenCV's pixel centres at integers), then a
    shift of ``shift`` × size pixels."""
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    rot = np.array([[c, -s], [s, c]])
    centre = np.full(2, (size - 1) / 2.0)
    farl = np.hstack([rot, (centre - rot @ centre + np.asarray(shift) * size)[:, None]])
    to_cv = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5]])  # ours (pixel j centred at j + 0.5) → OpenCV's
    return T.compose(T.invert(to_cv), farl, to_cv)


def test_the_paper_profile_draws_farl_augmentation_with_an_unclipped_scale() -> None:
    """FaRL's LaPa augmentation (lapa/train.yaml; blueprint's defaults rot_normal and scale_normal true,
    no clip): scale ~ N(1, 0.1) unclipped, rotation ~ N(0, 0.314), shift ~ U(±0.01) × 512 per axis, about
    the aligned square's centre. params.paper.yaml clipped the scale to 1 ± 3 std (0.27% of draws moved);
    the CPU default keeps that clip."""
    section = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.paper.yaml").read_text())
    paper = build(LaPaConfig, section["finetune_parsing"]["data"]).augment
    queued = (4.5, 0.9, 0.2, -1.5)  # scale z, shift shares (x, y), rotation z
    expected = _farl_random_transform(-1.5 * 0.314, 1.45, (0.008, -0.006), 512)
    np.testing.assert_allclose(sample_augment(paper, 512, _Draws(*queued)), expected, atol=1e-9)
    clipped = sample_augment(LaPaConfig().augment, 512, _Draws(*queued))
    np.testing.assert_allclose(clipped, _farl_random_transform(-1.5 * 0.314, 1.3, (0.008, -0.006), 512),
                               atol=1e-9)


def test_table_marks_what_it_cannot_read(root: Path) -> None:
    """CONTRACTS: the landmark extent is NaN without a readable image (dividing by a width of 0 gave
    pixels as shares), label_min and label_max are -1 for a label of more than one channel, and a missing
    label's format is no fault of its format (has_label says it is missing)."""
    base = root / "LaPa" / "train"
    (base / "images" / "train_0000.jpg").unlink()
    (base / "labels" / "train_0001.png").unlink()
    path = base / "labels" / "train_0002.png"
    cv2.imwrite(str(path), np.dstack([cv2.imread(str(path), cv2.IMREAD_UNCHANGED)] * 3))
    df = table(_cfg(root), "train").set_index("stem")
    assert df["has_image"].tolist() == [False, True, True] and df["has_label"].tolist() == [True, False, True]
    assert df.loc["train_0000", ["x_min", "x_max", "y_min", "y_max"]].isna().all()
    assert df.loc["train_0000", "n_landmarks"] == 106
    assert df.loc["train_0002", ["x_min", "x_max", "y_min", "y_max"]].notna().all()
    assert df["label_format_ok"].all()
    assert df["label_min"].tolist() == [0, -1, -1] and df["label_max"].tolist() == [10, -1, -1]


def test_training_samples_get_the_photometric_augmentations(root: Path) -> None:
    """§4's gray, gamma and blur run on the warped training image: gray at probability 1 leaves its
    channels equal, and the plain sample's are not."""
    gray = ParsingAugment(photometric=T.Photometric(gray_p=1.0, gamma_p=0.0, blur_p=0.0))
    std, mean = (torch.tensor(v)[:, None, None] for v in (T.IMAGENET_STD, T.IMAGENET_MEAN))
    torch.manual_seed(0)
    for augment, channels_agree in ((True, True), (False, False)):
        rgb = LaPa(_cfg(root, augment=gray), "train", augment=augment)[0]["image"] * std + mean
        assert bool((rgb.amax(0) - rgb.amin(0)).max() < 0.02) == channels_agree


def test_table_builds_each_column_as_its_suite_types_it(root: Path) -> None:
    """The suite's type checks and table() must name the same columns with the same types: a type check
    dropped, renamed or changed in lapa.json (``label_max`` as float64, a flag as int64) passed every other
    test, and a table() column left untyped lets a 0/1 int pass ``in [true]`` as a flag."""
    assert frame_types(table(_cfg(root), "train")) == suite_types("lapa")
