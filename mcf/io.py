"""Atomic outputs: a stage killed half-way must leave nothing that DVC could take as complete; and one
run of a stage at a time in a checkout."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcf.errors import StageError

if TYPE_CHECKING:
    import pandas as pd

LIVE_SIGN = "metrics.json"  # dvclive's summary: every dvclive folder holds it (check_replaceable's sign)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # a PNG file's first eight bytes (read by lapa and report)
# a full disk or a spent quota: the CLI's "free some space and run it again", exit 1, wherever it is met
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
LOCAL_DIR = Path(".mcf")  # this checkout's own state (validation results, stage locks), kept out of git


def local_dir(name: str) -> Path:
    """``.mcf/<name>``, created with the ``.gitignore`` that keeps all of ``.mcf`` out of git."""
    path = LOCAL_DIR / name
    path.mkdir(parents=True, exist_ok=True)
    ignore = LOCAL_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# written by mcf: this checkout's local state\n*\n")
    return path


@contextmanager
def stage_lock(name: str) -> Iterator[None]:
    """Hold ``.mcf/locks/<name>.lock`` while stage ``name`` runs here, or refuse at once.

    A second run would resume from the first's live checkpoint and delete its resume folder and journal
    when done. The kernel drops the lock with its holder, so a killed run never leaves a stale one.
    """
    with (local_dir("locks") / f"{name}.lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StageError(f"stage {name} is already running in this folder ({holder}): wait for it, "
                             "or stop it") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed (a ViT-B teacher is ~350 MB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_table(path: str | Path, columns: Sequence[str], fix: str, only: bool = False) -> pd.DataFrame:
    """The parquet table at ``path`` with ``columns`` (only those if ``only``), which an earlier stage or
    the user wrote: a file that is not parquet (cut short, damaged, replaced) or lacks a column is a
    one-line :class:`StageError` naming it and ending in ``fix`` (what to do), not pyarrow's traceback.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if not missing:
            return pd.read_parquet(path, columns=list(dict.fromkeys(columns)) if only else None)
        problem = f"no column {', '.join(missing)}"
    except PermissionError:  # the CLI's one line for an unreadable input
        raise
    except (OSError, ValueError, pa.ArrowException) as err:  # ArrowInvalid is a ValueError
        cause = str(err).splitlines()[0] if str(err) else ""
        problem = f"not a readable parquet table ({type(err).__name__}: {cause})"
    raise StageError(f"{path}: {problem}; {fix}")


def _alive(pid: int) -> bool:
    """Whether another process ``pid`` runs: this one's pid on a sibling is a killed writer's, reused."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def _killed_writers(path: Path, kind: str) -> list[Path]:
    """The siblings ``.<name>.<kind>-<pid>`` of ``path`` whose writer ``pid`` no longer runs."""
    prefix = f".{path.name}.{kind}-"
    killed = []
    for sibling in sorted(path.parent.iterdir()) if path.parent.is_dir() else []:
        pid = sibling.name[len(prefix) :] if sibling.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            killed.append(sibling)
    return killed


def _recover(path: Path) -> None:
    """Tidy what killed writers of ``path`` left (a live writer's siblings are left alone).

    ``.<name>.tmp-<pid>`` folders are removed. ``.<name>.old-<pid>`` is the previous output, renamed
    aside a moment before the new one was to take its place: it is put back when ``path`` is missing
    (dvc.lock still describes it), else removed. It is whole: :func:`atomic_dir` deletes it under the
    ``tmp`` name.
    """
    for sibling in _killed_writers(path, "tmp"):
        shutil.rmtree(sibling, ignore_errors=True)
    for sibling in _killed_writers(path, "old"):
        if not path.exists():
            sibling.rename(path)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolved(path: str | Path) -> Path:
    """``Path.resolve()``, but a symlink loop stays unresolved (as on Python 3.13) rather than raising 3.11's
    RuntimeError, a traceback from a params check: the checks that follow find no such path, or
    :func:`check_replaceable` refuses it as an output."""
    return Path(os.path.realpath(path))


def holds_working_folder(path: str | Path) -> bool:
    """``path`` is the working folder or one above it (``.``, ``''``, ``..``): deleting or replacing it
    takes the checkout, params.yaml with it."""
    return resolved(path) in (Path.cwd(), *Path.cwd().parents)


def check_replaceable(path: str | Path, sign: str) -> None:
    """Refuse an existing ``path`` that holds files but not ``sign``, a file or folder every output of
    this writer holds: a mistyped ``out`` must not delete a folder the pipeline did not write, nor the
    working folder or one above it (even empty: the command runs in it), nor a mount point. Empty folders
    and ``.gitignore`` files do not count: ``dvc repro`` deletes a stage's declared files and may leave
    their folders, and the ``.gitignore`` it wrote there to name them (pretrain's outs).
    """
    path = Path(path)
    if output_target(path).is_symlink():  # followed as far as it goes, still a link: no rename replaces it
        raise StageError(f"{path} is a symbolic link that leads back to itself; name another folder")
    if holds_working_folder(path):  # `.` or `..`: replaced whole, from under us
        raise StageError(f"{path} holds the working folder, which replacing it would delete; name a folder "
                         "below it")
    if os.path.ismount(output_target(path)):  # a volume mounted there: renaming it aside fails (EBUSY)
        raise StageError(f"{path} is a mount point, which no rename can replace; name a folder inside it")
    if path.is_file() or (
        path.is_dir()
        and not (path / sign).exists()
        and any(p.is_file() and p.name != ".gitignore" for p in path.rglob("*"))
    ):
        raise StageError(
            f"{path} exists and holds no {sign}, so it is not an earlier output of this step; "
            "refusing to replace it (name another folder, or delete it yourself)"
        )


def check_output(path: str | Path, sign: str) -> None:
    """:func:`check_replaceable`, and the folder can be made: an output written after long work (a
    training run) under a file or a read-only folder is refused before that work, not by its rename."""
    check_replaceable(path, sign)
    if (why := unwritable(output_target(path).parent)) is not None:
        raise StageError(f"cannot write {path}: {why}")


def unwritable(path: str | Path) -> str | None:
    """Why no folder can be made at ``path`` nor files written in it, else None: ``path`` or a folder above
    it is a file, or the nearest existing one is read-only. For outputs written at the end of long work,
    checked before it. Creates nothing."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_target(path: str | Path) -> Path:
    """Where the output ``path`` is written: the folder it names when it is a symlink (``outputs/crop ->
    /scratch/crop``, a bigger disk), whose siblings hold its staging and resume folders, else ``path``.

    Renaming the link itself swapped in a real folder on the link's disk, and a resume folder kept beside
    the link was not the one a writer given the resolved path (fetch_dask) looked in.
    """
    path = Path(path)
    return resolved(path) if path.is_symlink() else path


@contextmanager
def atomic_dir(path: str | Path, sign: str) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path``; on success it replaces ``path`` in one rename.

    ``path`` must be new, empty or an earlier output (it holds ``sign``: :func:`check_replaceable`).
    On an exception the temporary folder is removed and ``path`` is left as it was; what killed
    writers left (``kill -9``, OOM) is tidied on the next start (:func:`_recover`). A ``path`` that is a
    symlink keeps it: the folder it names is replaced (:func:`output_target`).
    """
    path = output_target(path)
    check_replaceable(path, sign)
    _recover(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:  # a file on the way, a read-only folder: one line naming ``path``, not a traceback
        raise StageError(f"cannot write {path}: {err.strerror}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():  # deleted as tmp: what a kill mid-way leaves must not be restored by _recover
        old.rename(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file of ``path``; on success it is renamed over ``path``.

    The file and then its folder are synced around the rename, so a power cut cannot leave an empty
    ``path`` (a checkpoint, a metrics file) where the previous one was. The temporary files of killed
    writers of ``path`` are removed: they would gather in metrics/, and in a dvclive folder be copied
    into the published curves.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the folder belongs: say so, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    for sibling in _killed_writers(path, "tmp"):
        if sibling.is_file():
            sibling.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


PROBE_BYTES = 1 << 20  # more than a file system block: the probe needs a block of its own


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, with a full disk or a spent quota raised as the ``OSError`` it is.

    torch reports a short write only as "unexpected pos". A probe write to the file it left, which still
    holds what torch wrote, gets the file system's own error (ENOSPC, EDQUOT), which the CLI turns into
    one line; any other failure is torch's, raised as it came.
    """
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as err:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                left = memoryview(bytes(PROBE_BYTES))
                while left:  # a write that fits only partly returns short; the next one fails
                    left = left[os.write(fd, left):]
                os.fsync(fd)  # a file system that reports a full disk only when the data reaches it
            finally:
                os.close(fd)
        except OSError as probe:
            if probe.errno in FULL_DISK:
                raise OSError(probe.errno, probe.strerror, str(path)) from err
        raise
