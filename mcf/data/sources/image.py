"""Bytes from any source to a validated image file plus a per-row status: one piece of code for all.

Every fetched row ends as a :class:`Record`. A failure is a status with a message, never an
exception out of the stage (link rot on LAION-Face reaches 25-99%). Statuses:

- ``success``: a decodable JPEG/PNG/WebP, saved byte for byte as received (an MPO, a JPEG with a second
  image such as a phone's depth map, is a JPEG: OpenCV reads its first image).
- ``http_error`` (``error`` holds the code), ``timeout``, ``connection_error``, ``invalid_url``: transfer.
- ``disallowed``: the server opts out of AI use (``X-Robots-Tag: noai`` ..., as img2dataset honours).
- ``not_image``: the bytes are not an image of a supported format.
- ``truncated``: an image header, but the pixel data does not decode (cut short or corrupt).
- ``too_large``: more than ``max_bytes`` bytes.
- ``decompression_bomb``: more than ``max_pixels`` pixels declared in the header, or a JPEG of more than
  :data:`MAX_JPEG_SCANS` scans, or a JPEG header of more than :data:`MAX_JPEG_HEADER_STEPS` segments and
  stray bytes, or a PNG of more than :data:`MAX_PNG_DATA_CHUNKS` image data chunks or
  :data:`MAX_PNG_CHUNKS` others; nothing is decoded.
- ``error``: anything unexpected, with the exception in ``error``; the row is kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import ExifTags, Image

from mcf.params import ParamsError

STATUSES = (
    "success",
    "http_error",
    "timeout",
    "connection_error",
    "invalid_url",
    "disallowed",
    "not_image",
    "truncated",
    "too_large",
    "decompression_bomb",
    "error",
)
# what OpenCV in the crop stage reads; MPO is a JPEG with more images after the first
FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}
# A progressive JPEG's decoder passes over every coefficient in each scan: a 31-byte scan that changes
# nothing cost 12 ms at 16 megapixels, so max_bytes of them held a thread for hours (djpeg's -maxscans is
# for this). Encoders write about 10.
MAX_JPEG_SCANS = 500
# Pillow parses a JPEG's header in Python, a turn of its loop per segment and per stray byte between
# segments, and keeps every segment: 4 MB of empty comments took 15 s and 130 MB, opened thrice. Real
# headers have tens of segments (a few hundred with a large ICC profile or extended XMP).
MAX_JPEG_HEADER_STEPS = 10_000
# Pillow walks a PNG's chunks in Python: those up to the image data on each of three opens, all of them in
# verify, the IDATs and those after them in load. Empty ones took 2-2.6 s per 300,000 (3.6 MB) ahead of the
# image data, 1 s behind it or as IDATs: 20 MB (max_bytes) 5-13 s; at both bounds 0.5 s. Real PNGs have tens
# of chunks besides their image data; that comes in IDATs of 8 KB (libpng) or less (some encoders write one
# a row), and an APNG adds two chunks a frame.
MAX_PNG_CHUNKS = 10_000
MAX_PNG_DATA_CHUNKS = 100_000
PNG_DATA_CHUNKS = (b"IDAT", b"fcTL", b"fdAT")  # an APNG's frame is an fcTL and its fdATs (or the IDATs)
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Pillow refuses to open a larger image, whatever max_pixels
IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp"]  # file names the s3 and local sources list
# a run of text up to its last @, after a scheme's :// if any: a password may hold a raw / ? # : or @, and
# parsers disagree on where its authority ends (urllib3 may quote "url: /rest:of:pass@host/x.jpg")
_USERINFO = re.compile(r"(?<!\S)([^\s:]*://)?(\S*@)(\S*)")  # a scheme holds no ":": linear time
_QUERY = re.compile(r"\?[^\s\"'<>()]*=[^\s\"'<>()]*")
_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f3b2ffb3380>"


def check_extensions(extensions: list[str]) -> None:
    """Endings are compared with a name's last suffix (``.jpg``): ``jpg`` or ``.tar.gz`` would match no
    file, and the run would end in an empty listing that quotes them as if they had been looked for."""
    bad = [e for e in extensions if PurePosixPath(f"x{e}").suffix != e]
    if bad:
        raise ParamsError("extensions", f"each must be one suffix with its dot, as in .jpg; got {bad}")


def redact(text: str) -> str:
    """``text`` without URL credentials (``user:pass@``) or query strings (``?X-Amz-Signature=...``).

    Transfer errors quote the URL they failed on, and their text is kept in the manifest, the gate's
    report and stderr; a signed URL or an endpoint with a password must not travel with it.

    Everything up to the last ``@`` of a run of text goes: a ``/`` in a path (``logo@2x.png``) costs some
    of the message, a ``/`` in a password would have left the rest of it. When that took a ``?``, the rest
    of the run goes too: it may be the rest of a query whose value held the ``@`` (``?to=me@x&sig=...``).
    """
    return _QUERY.sub("?<redacted>", _USERINFO.sub(_without_userinfo, text))


def _without_userinfo(match: re.Match[str]) -> str:
    """A :data:`_USERINFO` match without what may be secret (see :func:`redact`)."""
    scheme, removed, rest = match.group(1) or "", match[2], match[3]
    return f"{scheme}<redacted>" + ("" if "?" in removed else f"@{rest}")


def redact_url(url: str) -> str:
    """One URL for a message, redacted as a whole: a space or a quote in its password would end the run
    that :func:`redact` looks at before the password's ``@``."""
    head, at, tail = url.rpartition("@")
    scheme = head.partition("://")[0] + "://" if "://" in head else ""
    if at and "?" in head:  # as in redact: the @ may be in a query's value, whose rest is the tail
        return f"{scheme}<redacted>"
    return redact(f"{scheme}<redacted>@{tail}" if at else url)


class FetchFailure(Exception):
    """A row that could not be fetched: ``status`` is one of :data:`STATUSES`."""

    def __init__(self, status: str, error: str, *, retryable: bool = False) -> None:
        super().__init__(f"{status}: {error}")
        self.status, self.error, self.retryable = status, error, retryable


@dataclass(frozen=True)
class Record:
    """The manifest columns that every source fills for every row."""

    status: str
    error: str | None = None
    path: str | None = None
    sha256: str | None = None
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        if self.error:  # the one way into the manifest's error column: no secrets, and no memory
            # addresses (PIL's and urllib3's messages quote objects), which would change the manifest
            # from run to run and so its DVC hash
            object.__setattr__(self, "error", _ADDRESS.sub("", redact(self.error)))

    def columns(self) -> dict[str, Any]:
        return asdict(self)


def check_deadline(deadline: float) -> None:
    """Fail once the image's total time (``deadline``, monotonic) has passed."""
    if time.monotonic() > deadline:
        raise FetchFailure("timeout", "total time per image exceeded", retryable=True)


def read_bounded(chunks: Iterable[bytes], max_bytes: int, deadline: float | None = None) -> bytes:
    """Join ``chunks``, failing as soon as they pass ``max_bytes`` or ``deadline`` (monotonic)."""
    buf, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailure("too_large", f"more than {max_bytes} bytes")
        if deadline is not None:
            check_deadline(deadline)
        buf.append(chunk)
    return b"".join(buf)


def image_path(sample_id: str, suffix: str) -> str:
    """A stable relative path for a sample: ``images/<2 hex>/<readable id>_<hash><suffix>``.

    The readable part is the sanitised id's last 60 characters, where the keys of one S3 prefix or local
    folder differ (their file names); the hash, 64 bits, keeps ids unique that the readable part does not
    tell apart: 40 bits gave some 180 files overwritten by others among 20M keys sharing a long prefix.
    The two-level fan-out keeps folders small at 20M images.
    """
    digest = hashlib.sha1(sample_id.encode()).hexdigest()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id)[-60:]
    return f"images/{digest[:2]}/{readable}_{digest[:16]}{suffix}"


def exif_orientation(im: Image.Image) -> int | None:
    """The orientation tag of a loaded image's EXIF block (JPEG APP1, PNG eXIf, WebP EXIF): the one OpenCV
    turns an image by. Pillow's getexif also takes an XMP tiff:Orientation and ImageMagick's PNG text
    profile, which OpenCV ignores; a block Pillow cannot parse is read as none."""
    exif = Image.Exif()
    try:
        exif.load(im.info.get("exif"))
        return exif.get(ExifTags.Base.Orientation)
    except (SyntaxError, ValueError, OSError, struct.error):  # a damaged TIFF header or a cut directory
        return None


def jpeg_header_steps(data: bytes) -> int:
    """The turns of Pillow's JPEG header loop, from SOI to the first scan: one per segment and one per
    stray byte (junk or 0xFF fill) between them; counted up to one past :data:`MAX_JPEG_HEADER_STEPS`."""
    i, steps = 2, 0
    while i < len(data) - 1 and steps <= MAX_JPEG_HEADER_STEPS:
        if data[i] != 0xFF:  # junk up to the next 0xFF, which Pillow skips a byte at a time
            end = data.find(b"\xff", i)
            steps, i = steps + ((end if end >= 0 else len(data)) - i), end if end >= 0 else len(data)
            continue
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan
            break
        steps += 1
        if marker in (0x00, 0xFF):  # an escaped or fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return steps


def png_chunks(data: bytes) -> tuple[int, int]:
    """The chunks Pillow walks in a PNG, up to IEND: (image data chunks, the others), counted until one is
    past its bound (:data:`MAX_PNG_DATA_CHUNKS`, :data:`MAX_PNG_CHUNKS`). The walk ends quietly where the
    bytes do: Pillow's own checks find a cut or garbled file."""
    at, image_data, others = 8, 0, 0
    while at + 8 <= len(data) and image_data <= MAX_PNG_DATA_CHUNKS and others <= MAX_PNG_CHUNKS:
        length, kind = struct.unpack_from(">I4s", data, at)
        if kind == b"IEND":
            break
        if kind in PNG_DATA_CHUNKS:
            image_data += 1
        else:
            others += 1
        at += 12 + length  # length, type, data, CRC
    return image_data, others


def check_header_work(data: bytes) -> None:
    """Raise a ``decompression_bomb`` :class:`FetchFailure` for bytes over a bound on the work their header
    or scans cost a decoder (:data:`MAX_JPEG_HEADER_STEPS`, :data:`MAX_JPEG_SCANS`, :data:`MAX_PNG_CHUNKS`,
    :data:`MAX_PNG_DATA_CHUNKS`). Read off the raw bytes, nothing decoded: cheap enough to rerun on a stored
    file that a later run reuses, which an earlier run may have stored before a bound existed."""
    if data.startswith(b"\xff\xd8\xff"):  # Pillow's test for a JPEG (and an MPO): walked here before Pillow
        if jpeg_header_steps(data) > MAX_JPEG_HEADER_STEPS:
            raise FetchFailure("decompression_bomb", f"a JPEG header of more than {MAX_JPEG_HEADER_STEPS} "
                               "segments and stray bytes")
        # each scan starts with the bytes FF DA, which entropy-coded data never holds (it stuffs each FF
        # with 00): an upper bound, counting a second MPO image's scans and such bytes in metadata too
        if data.count(b"\xff\xda") > MAX_JPEG_SCANS:
            raise FetchFailure("decompression_bomb", f"more than {MAX_JPEG_SCANS} JPEG scans")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):  # Pillow's test for a PNG
        image_data, others = png_chunks(data)
        if image_data > MAX_PNG_DATA_CHUNKS:
            raise FetchFailure("decompression_bomb",
                               f"a PNG of more than {MAX_PNG_DATA_CHUNKS} image data chunks")
        if others > MAX_PNG_CHUNKS:
            raise FetchFailure("decompression_bomb",
                               f"a PNG of more than {MAX_PNG_CHUNKS} chunks besides its image data")


def inspect(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Return (suffix, width, height) of a fully decodable image, else raise :class:`FetchFailure`.

    The size is the upright one that OpenCV decodes in the crop stage (EXIF orientation applied), so
    the manifest and detection boxes share the crop stage's frame.

    The pixel bound is checked on the header before anything is decoded (the orientation is read after
    it: Pillow decodes a whole PNG to find its EXIF); ``verify`` catches structural damage and a
    ``load`` catches truncated pixel data (a JPEG's at 1/8 scale, which reads every coefficient too).
    """
    check_header_work(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError as err:
        raise FetchFailure("decompression_bomb", str(err)) from None
    except Exception as err:  # PIL raises UnidentifiedImageError and others for garbage
        raise FetchFailure("not_image", f"{type(err).__name__}: {err}") from None
    if fmt not in FORMATS:
        raise FetchFailure("not_image", f"unsupported image format {fmt}")
    if width * height > max_pixels:
        raise FetchFailure("decompression_bomb", f"{width}x{height} is over {max_pixels} pixels")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            if fmt in ("JPEG", "MPO"):  # at 1/8 scale: every coefficient is still read, so a cut or damaged
                # scan is found as by a full decode (tests/test_fetch.py), for 1.2-2x less CPU
                im.draft(im.mode, (max(width // 8, 1), max(height // 8, 1)))
            im.load()
            orientation = exif_orientation(im)
    except Exception as err:  # OSError "image file is truncated", SyntaxError for broken chunks, ...
        raise FetchFailure("truncated", f"{type(err).__name__}: {err}") from None
    if orientation in TRANSPOSED:  # the crop stage's decoder turns it
        width, height = height, width
    return FORMATS[fmt], width, height


def save_image(data: bytes, sample_id: str, root: Path, max_pixels: int) -> Record:
    """Check ``data`` and write it under ``root`` at :func:`image_path`; the file appears atomically."""
    suffix, width, height = inspect(data, max_pixels)
    rel = image_path(sample_id, suffix)
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: a stopped run's thread may still be writing the row a rerun in this process fetches
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return Record("success", None, rel, hashlib.sha256(data).hexdigest(), width, height)
