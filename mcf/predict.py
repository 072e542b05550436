"""``mcf predict``: 19 landmarks and an 11-class parsing map for every face in your own images.

The fine-tuned models' outputs come back in the image's own pixels, upright as a viewer shows it: a
phone photo's EXIF orientation is applied (as ``cv2.imread`` does, so draw the points on its image;
Pillow's ``Image.open`` applies none, and ``ImageOps.exif_transpose`` also an XMP one that OpenCV
ignores), and ``--box`` is read in the same pixels.

One face goes the way the evaluate stage takes a test image, so a prediction here is what the
metrics scored:

- **box**: ``--box`` for every image, or the crop stage's OpenCV detector (Haar; YuNet with ``--yunet``,
  which also gives five landmarks);
- **alignment** (``--alignment model.pt``): the box is mapped onto the model's square crop exactly as
  an AFLW-19 box is, and the 19 points are mapped back to the image. The model learnt the framing of
  its training boxes (AFLW-19's), so a detector box that frames the face differently costs accuracy;
- **parsing** (``--parsing model.pt``): the face is aligned by its eye centres, nose tip and mouth
  corners (LaPa's five points), taken from the alignment model's prediction (AFLW-19 points 7, 10,
  13, 15, 17) or else from YuNet, then tanh-warped; the class map is warped back onto the image.

Outputs in ``--out`` (written whole or not at all): ``images.csv`` (image, faces found, error for a file
that cannot be decoded whole, a JPEG cut short included, or with a side of 32767 px or more),
``faces.csv`` (image, face, detector, box_x1, box_y1, box_x2, box_y2, then x0..x18, y0..y18 in pixels
when aligned), ``parsing/<image stem>_<face>.png`` (class ids 0..10 at the image's size, one per face;
classes in :data:`mcf.evaluate.scoring.CLASSES`) and ``overlays/<image stem>.png``.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import ExifTags, Image
from tqdm import tqdm

from mcf.cli import describe, given
from mcf.data import transforms as T
from mcf.data.aflw19 import AFLW19Config, crop_matrix, read_rgb, to_original
from mcf.data.detect import DetectorConfig, Face, box_misses, make_detector
from mcf.data.lapa import LaPaConfig, align_matrix, warp_to_original
from mcf.data.shards import decode_jpeg
from mcf.data.sources.image import TRANSPOSED
from mcf.errors import StageError
from mcf.evaluate import plots
from mcf.io import atomic_dir, check_output
from mcf.models.heads import DenseFaceModel, parsing_logits, soft_argmax
from mcf.synth.geometry import FIVE_FROM_19
from mcf.train.finetune import Task, load_finetuned

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff")  # both decode
BOX_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2")
LANDMARK_COLUMNS = tuple(f"{c}{i}" for c in "xy" for i in range(19))  # x0..x18, then y0..y18
MAX_SIDE = 32767  # SHRT_MAX: cv2.warpAffine and cv2.remap take smaller images only
MAX_BOX = 1e20  # |--box| in px: a box side past float64's range made the crop's matrix singular


@torch.no_grad()
def align_face(model: DenseFaceModel, cfg: AFLW19Config, rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """19 landmarks ``[19, 2]`` in image pixels for the face in ``box`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    m = T.box_matrix(np.array([x1, x2, y1, y2]), cfg.crop_size)  # AFLW-19's (left, right, top, bottom)
    crop = T.resize_square(T.warp_affine(rgb, m, cfg.crop_size), cfg.size)
    points = soft_argmax(model(T.to_tensor(crop)[None]))
    return to_original(points, crop_matrix(m, cfg)[None], cfg.size)[0]


@torch.no_grad()
def parse_face(model: DenseFaceModel, cfg: LaPaConfig, rgb: np.ndarray, points5: np.ndarray) -> np.ndarray:
    """Class ids ``[H, W]`` (uint8) on the image's grid for the face with these five points (LaPa's
    order: image-left eye centre, image-right eye centre, nose tip, left and right mouth corners)."""
    matrix = align_matrix(np.asarray(points5, dtype=np.float64), cfg.warp_size)
    warped = T.tanh_warp_warp(rgb, matrix, cfg.warp_factor, cfg.warp_size, cfg.warp_size)
    warped = T.resize_square(warped, cfg.size)
    logits = parsing_logits(model(T.to_tensor(warped)[None]), (cfg.label_size, cfg.label_size))[0]
    params = {"matrix": matrix, "warp_factor": cfg.warp_factor, "warp_size": float(cfg.warp_size)}
    return warp_to_original(logits, params, rgb.shape[:2]).argmax(dim=0).numpy().astype(np.uint8)


def load_task(path: str | Path, task: Task) -> tuple[DenseFaceModel, dict]:
    """A fine-tuned ``model.pt`` that must be of ``task`` (alignment or parsing)."""
    if Path(path).is_dir():  # the fine-tune's output folder: "no such file" read as a wrong path
        such = f": {Path(path) / 'model.pt'}" if (Path(path) / "model.pt").is_file() else ""
        raise StageError(f"--{task} {path}: a folder, not a model: give the fine-tuned model.pt itself{such}")
    if not Path(path).is_file():
        raise StageError(f"--{task} {path}: no such file (a fine-tune writes <out>/<variant>/model.pt)")
    return load_finetuned(path, task)


def not_utf8(paths: Iterable[Path]) -> list[str]:
    """Those of ``paths`` whose bytes are not UTF-8 (a Latin-1 ``caf\\xe9.jpg``), shown escaped. Python hands
    such bytes over as lone surrogates, and OpenCV's imread and imwrite crash the process on them (a
    segfault, no message, no output), so they are refused before any work, as fetch.local refuses them."""
    odd = []
    for path in paths:
        try:
            str(path).encode()
        except UnicodeEncodeError:
            odd.append(os.fsencode(path).decode(errors="backslashreplace"))
    return odd


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted; subfolders are named in a warning, not
    searched, so a photo under one is not silently left out); a missing path, or a pipe or a device
    given by name, is an error."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            entries = sorted(item.iterdir())
            listed = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]  # odd entries fail as rows
            images += listed
            if subfolders := [p.name for p in entries if p.is_dir() and p not in listed]:
                log.warning("%s: subfolders not searched (give each as an input of its own): %s", item,
                            ", ".join(subfolders))
        elif item.is_file():
            images.append(item)
        else:
            refuse_special(item)  # one given by name (/dev/stdin, a shell's <(...)) exists all the same
            raise StageError(f"{item}: no such image or folder")
    if not images:
        raise StageError(f"no images in {', '.join(map(str, inputs))} ({', '.join(IMAGE_SUFFIXES)})")
    if odd := not_utf8(images):
        raise StageError(f"{len(odd)} image paths are not UTF-8, which OpenCV cannot open; rename them "
                         f"(convmv): {', '.join(odd[:5])}")
    # Face.jpg and face.png are one file on macOS and Windows, and so are é.jpg written as one code point
    # (NFC) and as e plus a combining accent (NFD, as macOS names files): their overlays would be one too
    stems = [unicodedata.normalize("NFD", p.stem.casefold()) for p in images]
    counts = Counter(stems)
    if clash := sorted({p.name for p, s in zip(images, stems, strict=True) if counts[s] > 1}):
        raise StageError(f"images share a file stem (letter case and accent encoding aside); their outputs "
                         f"would collide: {clash}")
    # parsing/<stem>_<face>.png must fit a file name's 255 bytes: found only at the write, after the work
    if long := [p.name for p in images if len(f"{p.stem}_9999.png".encode()) > 255]:
        raise StageError(f"{len(long)} image names are too long for their outputs (parsing/<stem>_<face>.png "
                         f"must fit 255 bytes); shorten them: {long[0]}")
    return images


def refuse_special(path: Path) -> None:
    """Refuse a named pipe or a device, unopened: Pillow's open of a pipe waits for a writer for ever."""
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise StageError(f"{path}: not a regular file (a pipe or a device)")


def read_image(path: Path) -> np.ndarray:
    """:func:`read_rgb`'s pixels, turned upright by EXIF as a viewer shows them, of a file Pillow decodes
    whole: OpenCV decodes a JPEG cut short in part, with only libjpeg's warning on stderr, so it would
    pass for a whole image. An image with a side of 32767 px or more (a panorama) is refused: OpenCV's
    warps, which crop and align every face, assert sides below that."""
    refuse_special(path)  # a folder's entry named like an image may be a named pipe
    if _turned_tiff(path):  # OpenCV 4.14 cannot read these; Pillow turns them upright as it decodes
        rgb = _read_turned_tiff(path)
    else:
        rgb = read_rgb(path, exif_orientation=True)  # names a missing or undecodable file as evaluate does
    h, w = rgb.shape[:2]
    if max(h, w) >= MAX_SIDE:
        raise StageError(f"{path}: {w}x{h} px; OpenCV warps images under {MAX_SIDE} px a side: downscale it")
    limit = Image.MAX_IMAGE_PIXELS  # Pillow opens nothing past twice it; there OpenCV's read stands
    if limit is None or rgb.shape[0] * rgb.shape[1] <= 2 * limit:
        decode_jpeg(path.read_bytes(), str(path))  # strict: "image file is truncated"
    return rgb


def _read_turned_tiff(path: Path) -> np.ndarray:
    """Pillow's upright pixels of a TIFF OpenCV cannot read, at OpenCV's 8 bits: a 16-bit grey scan keeps
    each value's high byte, as ``cv2.imread`` does, where Pillow's RGB conversion clipped all but the
    darkest values to white."""
    data = path.read_bytes()
    try:  # from bytes, as decode_jpeg: Pillow 13 turns a TIFF opened by its path as stored
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I;16"):  # I;16, I;16B, I;16L...: uint16 in any byte order
                im.load()  # turns it upright (np.asarray would take the shape first)
                grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # as decode_jpeg
        raise StageError(f"{path}: not a decodable image ({type(err).__name__}: {err})") from None
    return decode_jpeg(data, str(path))


def _turned_tiff(path: Path) -> bool:
    """A TIFF whose orientation tag swaps width and height (5-8, a scanner's or camera's portrait):
    ``cv2.imread`` fails on it ("Internal imread issue"). OpenCV and Pillow both apply tags 1-4."""
    try:
        with Image.open(path) as im:
            return im.format == "TIFF" and im.getexif().get(ExifTags.Base.Orientation) in TRANSPOSED
    except Exception:  # whatever Pillow cannot open is left to read_rgb to name
        return False


def under(images: Sequence[Path], out: Path) -> list[Path]:
    """Those of ``images`` inside ``out`` (through any symlinks), as an entry there or a link to a file
    there: replacing an earlier output would delete them (photos copied into it, its own overlays)."""
    target = Path(os.path.realpath(out))
    return [p for p in images
            if any(q.is_relative_to(target) for q in (Path(os.path.realpath(p.parent), p.name),
                                                      Path(os.path.realpath(p))))]


Aligner = tuple[DenseFaceModel, AFLW19Config]
Parser = tuple[DenseFaceModel, LaPaConfig]


def predict_face(
    rgb: np.ndarray, face: Face, aligner: Aligner | None, parser: Parser | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One face's 19 points ``[19, 2]`` and class map ``[H, W]`` (``None`` for a model not given).

    Parsing aligns by the alignment model's five points when there is one, else by the detector's.
    """
    points = align_face(*aligner, rgb, face.box) if aligner is not None else None
    if parser is None:
        return points, None
    points5 = points[list(FIVE_FROM_19)] if points is not None else np.reshape(face.landmarks, (5, 2))
    return points, parse_face(*parser, rgb, points5)


def predict(
    images: Sequence[Path], out: str | Path, *, alignment: str | Path | None = None,
    parsing: str | Path | None = None, box: Sequence[float] | None = None,
    detector: DetectorConfig | None = None, overlays: bool = True,
) -> pd.DataFrame:
    """Run the models on every face of every image; write ``out`` (see the module docstring).

    Returns the ``faces.csv`` table. An image without a face, or one that cannot be decoded whole, is logged,
    has no row there and says so in ``images.csv``.
    """
    if alignment is None and parsing is None:
        raise StageError("nothing to predict: give --alignment and/or --parsing")
    out = Path(out)
    if not_utf8([out]):
        raise StageError(f"--out {not_utf8([out])[0]} is not UTF-8, which OpenCV cannot write under; name "
                         "another folder")
    check_output(out, "faces.csv")  # before any model is loaded or image read
    if inside := under(images, out):
        raise StageError(f"{inside[0]} lies in --out {out}, which is replaced whole and would delete it "
                         f"({len(inside)} images in all); name another folder")
    if parsing is not None and alignment is None and box is not None:
        raise StageError("parsing aligns each face by five landmarks, and a box gives no landmarks: with "
                         "--box, parsing needs --alignment MODEL (its eye, nose and mouth points)")
    if parsing is not None and alignment is None and (detector is None or detector.yunet_model is None):
        raise StageError("parsing aligns each face by five landmarks: give --alignment MODEL (its eye, nose "
                         "and mouth points) or a YuNet detector (--yunet FILE)")
    aligner = parser = None
    if alignment is not None:
        model, meta = load_task(alignment, "alignment")
        aligner = model, AFLW19Config(**meta["data"])
    if parsing is not None:
        model, meta = load_task(parsing, "parsing")
        parser = model, LaPaConfig(**meta["data"])
    detect = make_detector(detector or DetectorConfig()) if box is None else None
    rows, status = [], []
    with atomic_dir(out, sign="faces.csv") as tmp:
        for path in tqdm(images, desc="predict", unit="image"):
            try:
                rgb = read_image(path)
            except (StageError, OSError) as err:  # one bad entry (undecodable, a dead link) spares the rest
                log.warning("%s", err)
                status.append({"image": str(path), "faces": 0, "error": str(err)})
                continue
            faces = detect(rgb) if detect is not None else [Face(0, tuple(box), None, None, "given")]
            status.append({"image": str(path), "faces": len(faces), "error": ""})
            if not faces:
                log.warning("%s: no face found", path)
            h, w = rgb.shape[:2]
            if box is not None and box_misses(box, w, h):
                log.warning("%s: --box lies outside the %dx%d image; its prediction is of blank padding",
                            path, w, h)
            canvas, dots = rgb.copy(), []
            for face in faces:
                points, labels = predict_face(rgb, face, aligner, parser)
                row = {"image": str(path), "face": face.face, "detector": face.detector,
                       **dict(zip(BOX_COLUMNS, face.box, strict=True))}
                if labels is not None:
                    (tmp / "parsing").mkdir(exist_ok=True)
                    plots.write_png(tmp / "parsing" / f"{path.stem}_{face.face}.png", labels)
                    canvas = plots.blend_labels(canvas, labels)
                if points is not None:
                    row |= dict(zip(LANDMARK_COLUMNS, points.T.ravel(), strict=True))
                    dots.append(points)
                rows.append(row)
            if overlays:
                if dots:  # over every face's class colours: a face's map reaches past it, over the others
                    canvas = plots.draw_landmarks(canvas, np.concatenate(dots))
                (tmp / "overlays").mkdir(exist_ok=True)
                plots.write_png(tmp / "overlays" / f"{path.stem}.png", canvas)
        landmarks = LANDMARK_COLUMNS if aligner is not None else ()
        table = pd.DataFrame(rows, columns=["image", "face", "detector", *BOX_COLUMNS, *landmarks])
        table.to_csv(tmp / "faces.csv", index=False)
        pd.DataFrame(status, columns=["image", "faces", "error"]).to_csv(tmp / "images.csv", index=False)
    log.info("%d faces in %d images → %s", len(table), len(images), out)
    return table


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x1,y1,x2,y2 in pixels, got {text!r}") from None
    if not all(map(math.isfinite, (x1, y1, x2, y2))):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    if max(map(abs, (x1, y1, x2, y2))) > MAX_BOX:
        raise argparse.ArgumentTypeError(f"expected pixels within ±{MAX_BOX:g}, got {text!r}")
    if not (x2 > x1 and y2 > y1):
        raise argparse.ArgumentTypeError(f"need x2 > x1 and y2 > y1, got {text!r}")
    if x2 - x1 < 1 or y2 - y1 < 1:  # a side of 1e-306 px gave NaN landmarks; under 1 px, no face at all
        raise argparse.ArgumentTypeError(f"need sides of 1 px or more (pixels, not fractions of the "
                                         f"image), got {text!r}")
    return x1, y1, x2, y2


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mcf predict", description=describe(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  mcf predict photos/ --alignment outputs/finetune_alignment/mcf/model.pt \\\n"
               "      --parsing outputs/finetune_parsing/mcf/model.pt --out outputs/predict/\n\n"
               "exit status: 0 done (an unreadable image is listed in images.csv),\n"
               "  1 the inputs refused: no model given, parsing without --alignment or --yunet, a missing\n"
               "    image path or one that is a pipe or a device, an image or --out path that is not UTF-8,\n"
               "    image names too long for their outputs, two images whose stems differ only in letter\n"
               "    case or accent encoding, a model missing, damaged or of the other task, a --yunet file\n"
               "    OpenCV cannot load, an --out that is not a predict output, holds an input image or\n"
               "    cannot be written;\n"
               "  2 a usage error (a bad --box, a --yunet that is no .onnx file, no --out, an empty\n"
               "    argument)",
    )
    p.add_argument("images", nargs="+", type=given, help="image files or folders of images")
    p.add_argument("--out", required=True, type=given, metavar="DIR",
                   help="output folder: new, or an earlier predict output (then replaced)")
    p.add_argument("--alignment", type=given, metavar="MODEL",
                   help="finetune_alignment's model.pt: 19 landmarks a face")
    p.add_argument("--parsing", type=given, metavar="MODEL",
                   help="finetune_parsing's model.pt: a class map a face")
    p.add_argument("--box", type=_box, metavar="X1,Y1,X2,Y2",
                   help="one face box in pixels for every image, instead of the detector "
                        "(a negative first value needs the = form: --box=-5,10,90,120)")
    p.add_argument("--yunet", type=given, metavar="ONNX",
                   help="detect with this YuNet model (boxes and five landmarks) instead of Haar")
    p.add_argument("--no-overlays", action="store_true", help="skip overlays/<stem>.png")
    args = p.parse_args(argv)
    if args.box is not None and args.yunet is not None:
        p.error("--box and --yunet exclude each other")
    if args.yunet is not None and (not Path(args.yunet).is_file() or not args.yunet.endswith(".onnx")):
        p.error(f"--yunet {args.yunet}: expected an existing YuNet .onnx file")
    detector = DetectorConfig(yunet_model=args.yunet) if args.yunet is not None else None
    predict(list_images(args.images), args.out, alignment=args.alignment, parsing=args.parsing, box=args.box,
            detector=detector, overlays=not args.no_overlays)
    return 0
