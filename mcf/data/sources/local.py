"""A local folder of images as fetch rows: every file with an image extension, recursively.

Hidden files and folders are skipped, and symlinked folders are not followed, so a listing cannot
loop. A file with an image extension that does not decode gets ``not_image`` (or ``truncated``). A name
that is not UTF-8 cannot be a manifest id (a parquet string): the listing refuses it, naming it. A
folder that cannot be listed (no permission, an I/O error) ends the stage: its files would have no row.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from pathlib import Path
from typing import Any

import pandas as pd

from mcf.data.sources.download import Source
from mcf.data.sources.image import IMAGE_EXTENSIONS, FetchFailure, check_extensions
from mcf.errors import AccessError, StageError
from mcf.params import ParamsError, checking_paths, param, require_path


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """``fetch.local``: the folder to read."""

    root: str = "data/images"
    extensions: list[str] = param(IMAGE_EXTENSIONS)  # other files are skipped; [] keeps all

    def check_inputs(self) -> None:
        """Called when this source is active."""
        require_path(self.root, "root")
        if checking_paths() and not Path(self.root).is_dir():  # else found by the listing, once the stage ran
            raise ParamsError("root", f"not a folder: {self.root} (name the folder that holds the images)")
        check_extensions(self.extensions)


def list_rows(cfg: LocalConfig) -> pd.DataFrame:
    """One row per file: ``sample_id`` and ``file`` (relative posix path), ``size``, ``mtime_ns``."""
    root = Path(cfg.root)
    extensions = tuple(e.lower() for e in cfg.extensions)
    rows, undecodable = [], []
    for folder, dirs, files in os.walk(root, onerror=_unlistable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if name.startswith(".") or (extensions and path.suffix.lower() not in extensions):
                continue
            try:
                stat = path.stat()
                size, mtime_ns = stat.st_size, stat.st_mtime_ns
            except OSError:  # a broken link: kept as a row, the reader reports the error
                size, mtime_ns = -1, 0
            rel = path.relative_to(root).as_posix()
            if not _is_utf8(rel):
                undecodable.append(os.fsencode(rel).decode(errors="backslashreplace"))
                continue
            rows.append({"sample_id": rel, "caption": "", "file": rel, "size": size, "mtime_ns": mtime_ns})
    if undecodable:  # before any work, all named at once (the sha1 of such an id cannot be taken)
        raise StageError(f"fetch.local: {len(undecodable)} file names under {root} are not UTF-8, which "
                         f"manifest ids must be; rename them (convmv): {', '.join(undecodable[:5])}")
    return pd.DataFrame(rows, columns=["sample_id", "caption", "file", "size", "mtime_ns"])


def _unlistable(err: OSError) -> None:
    """os.walk's default drops a folder it cannot read, and with it every image inside, without a word."""
    denied = err.errno in (errno.EACCES, errno.EPERM)
    raise (AccessError if denied else StageError)(f"fetch.local: cannot list {err.filename}: {err.strerror}")


def _is_utf8(name: str) -> bool:
    """Whether ``name`` came from UTF-8 bytes: os.walk hands other bytes over as lone surrogates."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


class FileReader:
    """Relative path to bytes, refusing files over ``max_bytes`` before reading them.

    Only regular files are read (a link to one is followed): a FIFO or a device under an image name
    (``x.jpg -> /dev/zero``) would block the worker or never end. The read stops one byte past
    ``max_bytes``, so a file that grows after the size check is bounded too. A file whose size or mtime
    is no longer the listed one is refused: its bytes would be stored under the listed ones, which a later
    run trusts to reuse them.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes

    def __call__(self, row: dict[str, Any]) -> bytes:
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            with os.fdopen(os.open(self.root / row["file"], os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise FetchFailure("error", f"{row['file']} is not a regular file")
                listed = row.get("size"), row.get("mtime_ns")
                if listed != (None, None) and listed != (info.st_size, info.st_mtime_ns):
                    raise FetchFailure("error", f"{row['file']} changed after it was listed (size and mtime "
                                       "differ); the next run lists it again")
                if info.st_size > self.max_bytes:
                    raise FetchFailure("too_large", f"{info.st_size} bytes is over {self.max_bytes}")
                data = f.read(self.max_bytes + 1)
        except OSError as err:
            raise FetchFailure("error", f"cannot read {row['file']}: {err}") from None
        if len(data) > self.max_bytes:
            raise FetchFailure("too_large", f"more than {self.max_bytes} bytes")
        return data


def source(cfg: LocalConfig, max_bytes: int, rows: pd.DataFrame | None = None) -> Source:
    """The folder's files (or ``rows``, a slice of them listed elsewhere) and their reader."""
    reader = FileReader(Path(cfg.root), max_bytes)
    origin = f"{cfg.root} (files ending in {', '.join(cfg.extensions) or 'anything'})"
    rows = list_rows(cfg) if rows is None else rows
    return Source("local", rows, reader, match=("file", "size", "mtime_ns"), origin=origin)
