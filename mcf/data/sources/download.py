"""The resumable fetch loop shared by the laion-face, s3 and local sources.

A source gives a table of rows (``sample_id``, ``caption``, its own columns) and a function from a row
to bytes. This module runs that function on a thread pool with retries, turns bytes into image files
(:mod:`mcf.data.sources.image`) and returns one manifest row per input row, whatever happened.

Resume. Outputs are published by one rename (:func:`mcf.io.atomic_dir`), so a killed run must not lose
what it downloaded. New files are therefore written to a *journal folder*, a stable sibling of the
output, or of the folder it names when it is a link (``.<out>.partial/``): ``images/`` plus
``journal.jsonl``, one JSON line appended per success (``journal-<part>.jsonl``, one per slice, when
flows/fetch_dask.py splits the rows over Dask workers; a run reads them all, so a resumed run may split
the rows differently or not at all). At the end every success is hard-linked (copied across devices)
from there, or from the previous output, into the staging folder. A later run reuses a row when the
previous output's manifest or the journal has it as a success with the same source columns (URL, key,
...) and the file on disk still has the recorded sha256 and passes today's bounds, a bound added since
the run that stored it included; everything else (missing, failed, changed) is fetched again. The caller
deletes the journal folder once the new output is published. Ctrl-C (or an error) stops a run at once:
no queued row starts, and no download under way is waited for, retried or linked into the staging folder
the caller then deletes (they run on daemon threads, which hold no exit); one cut short is never reused,
as its image appears by a rename and its journal line only after that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from tqdm import tqdm

from mcf.data.sources.image import FetchFailure, Record, check_header_work, image_path, redact, save_image
from mcf.errors import StageError

log = logging.getLogger(__name__)

Fetch = Callable[[dict[str, Any]], bytes]
RECORD_COLUMNS = list(Record("success").columns())


@dataclass(frozen=True)
class Source:
    """What a source hands to :func:`download`.

    ``match`` names the columns that identify the remote object: a stored success is reused only
    when they are unchanged. ``origin`` says where the rows were listed from, for messages.
    """

    name: str
    rows: pd.DataFrame
    fetch: Fetch
    match: tuple[str, ...]
    origin: str


@dataclass(frozen=True)
class Limits:
    threads: int
    retries: int
    max_bytes: int
    max_pixels: int


class Journal:
    """Append-only record of the successes of an unfinished run (thread-safe); one file per writer."""

    def __init__(self, root: Path, part: str | None = None) -> None:
        self.root = root
        self.path = root / (f"journal-{part}.jsonl" if part else "journal.jsonl")
        self._lock = threading.Lock()
        self._end_torn_line()

    def _end_torn_line(self) -> None:
        """A kill mid-write leaves a last line without its newline: end it, or the next entry joins it."""
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def load(self) -> list[dict[str, Any]]:
        """The entries every writer in the folder wrote so far; a line cut short by a kill is skipped."""
        entries = []
        for path in sorted(self.root.glob("journal*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=str) + "\n"
        with self._lock, self.path.open("a") as f:
            f.write(line)


def previous_successes(
    previous: Path, match: tuple[str, ...], wanted: set[str] | None = None
) -> pd.DataFrame:
    """The successes in the previous output's manifest (of the ``wanted`` sample ids only, when given),
    with the columns a reuse checks; no rows when there is no such manifest or it cannot be read."""
    columns = list(dict.fromkeys(["sample_id", "path", "sha256", "width", "height", *match]))
    manifest = previous / "manifest.parquet"
    if (wanted is None or wanted) and manifest.is_file():
        try:
            if {"status", *columns} <= set(pq.read_schema(manifest).names):
                filters = [("status", "==", "success")]
                if wanted is not None:  # inside the parquet reader: a slice loads its own rows only
                    filters.append(("sample_id", "in", sorted(wanted)))
                return pq.read_table(manifest, columns=columns, filters=filters).to_pandas()
        except Exception as err:  # a damaged or foreign previous output is only a lost shortcut
            log.warning("not reusing the previous manifest %s: %s", manifest, err)
    return pd.DataFrame(columns=columns)


def _candidates(
    previous: Path,
    journal_dir: Path,
    entries: list[dict[str, Any]],
    match: tuple[str, ...],
    wanted: set[str],
    reusable: pd.DataFrame | None = None,
) -> dict[str, tuple[Path, dict]]:
    """Stored successes of the ``wanted`` sample ids among the previous manifest's (``reusable``, else
    read here) and the journal ``entries`` of ``journal_dir``, each with the folder its path is relative
    to."""
    found: dict[str, tuple[Path, dict]] = {}
    old = previous_successes(previous, match, wanted) if reusable is None else reusable
    for row in old.to_dict("records"):
        found[str(row["sample_id"])] = (previous, row)
    for entry in entries:
        if str(entry["sample_id"]) in wanted:
            found[str(entry["sample_id"])] = (journal_dir, entry)
    return found


def _link(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _reuse(
    row: dict[str, Any], stored: tuple[Path, dict] | None, match: tuple[str, ...], limits: Limits
) -> Record | None:
    """A stored success, when its source columns, its file's sha256 and today's limits still hold: the byte
    and pixel bounds, and the bounds on header work (:func:`check_header_work`), which an earlier run may
    have stored it without. A file over one is fetched again, and the fetch records why it fails."""
    if stored is None:
        return None
    root, old = stored
    if any(str(old.get(c)) != str(row.get(c)) for c in match) or not old.get("path"):
        return None
    if old["path"] != image_path(str(row["sample_id"]), PurePosixPath(old["path"]).suffix):
        return None  # only where this id's file is stored: an earlier manifest is data, not a pointer
    if int(old["width"]) * int(old["height"]) > limits.max_pixels:
        return None
    path = root / old["path"]
    if not path.is_file() or path.stat().st_size > limits.max_bytes:
        return None
    try:
        data = path.read_bytes()  # at most max_bytes, read once for the sha256 and the header checks
    except OSError:  # unreadable: fetched again
        return None
    if hashlib.sha256(data).hexdigest() != old.get("sha256"):
        return None
    try:
        check_header_work(data)
    except FetchFailure:
        return None
    return Record("success", None, old["path"], old["sha256"], int(old["width"]), int(old["height"]))


def _fetch_with_retries(fetch: Fetch, row: dict[str, Any], retries: int, stop: threading.Event) -> bytes:
    """Retry only what may pass next time (timeouts, dropped connections, HTTP 5xx/429), and not once the
    run has stopped (``stop``): a Ctrl-C must not wait out another timeout."""
    attempt = 0
    while True:
        try:
            return fetch(row)
        except FetchFailure as failure:  # the pause ends at once when the run stops
            if not failure.retryable or attempt >= retries or stop.wait(min(0.2 * 2**attempt, 5.0)):
                raise
        attempt += 1


_END = object()  # a worker's last item
SIGNAL_POLL_S = 0.1  # longest wait for a result between two looks at a pending signal


def _bounded_map(
    fn: Callable[[Any], Any], items: Iterable[Any], threads: int, stop: threading.Event
) -> Iterator[Any]:
    """``fn`` over ``items`` on ``threads`` threads, at most ``4 * threads`` in flight (20M rows fit); the
    results as they come, an error of ``fn`` raised as it comes.

    Left early (an error, Ctrl-C, closed unfinished) it sets ``stop``: queued items are dropped and the
    running calls are not waited for. The threads are daemons, so a call hung on a silent server (a read
    timeout, a retry) holds no exit either; ThreadPoolExecutor joins its threads when the interpreter ends.
    """
    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while (item := todo.get()) is not _END and not stop.is_set():
            try:
                done.put((True, fn(item)))
            except BaseException as err:  # raised in the caller's thread
                done.put((False, err))

    def take() -> Any:
        while True:  # a wait without end missed Ctrl-C when the kernel gave the signal to a fetch thread:
            try:  # Python runs a handler in the main thread, once that one wakes (a download's timeout)
                ok, result = done.get(timeout=SIGNAL_POLL_S)
                break
            except queue.Empty:
                continue
        if not ok:
            raise result
        return result

    workers: list[threading.Thread] = []
    pending = 0
    try:
        for item in items:
            todo.put(item)
            pending += 1
            if len(workers) < threads:  # a thread an item up to ``threads``: a short slice starts a few
                workers.append(threading.Thread(target=work, name=f"fetch_{len(workers)}", daemon=True))
                workers[-1].start()
            if pending >= 4 * threads:
                yield take()
                pending -= 1
        for _ in range(pending):
            yield take()
    finally:
        stop.set()
        for _ in workers:
            todo.put(_END)


def download(
    source: Source, previous: Path, journal_dir: Path, staging: Path, limits: Limits
) -> pd.DataFrame:
    """Fetch every row of ``source`` into ``staging``; return the manifest (same rows, same order)."""
    return to_manifest(source, fetch_records(source, previous, journal_dir, staging, limits))


def require_rows(source: Source) -> None:
    """An empty listing is a stage error that names where it looked, not an empty output."""
    if source.rows.empty:
        raise StageError(f"fetch: the {source.name} source lists no rows: nothing in {source.origin}")


def fetch_records(
    source: Source,
    previous: Path,
    journal_dir: Path,
    staging: Path,
    limits: Limits,
    part: str | None = None,
    journaled: list[dict[str, Any]] | None = None,
    reusable: pd.DataFrame | None = None,
) -> list[Record]:
    """One record per row of ``source``, in order, each success's file in ``staging``.

    ``part`` names one slice of a split run (flows/fetch_dask.py): its own journal file, same folders.
    ``journaled`` is the slice's share of the journal, which the caller read once for all slices (every
    slice reading the whole folder, earlier runs' files and the growing files of the slices before it,
    is quadratic); None reads the journal here. ``reusable`` is likewise the slice's share of the previous
    output's successes (:func:`previous_successes`): each slice filtering the previous manifest scans all
    its rows; None reads it here.
    """
    require_rows(source)
    journal_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(journal_dir, part)
    rows = source.rows.to_dict("records")
    entries = journal.load() if journaled is None else journaled
    wanted = {str(row["sample_id"]) for row in rows}
    stored = _candidates(previous, journal_dir, entries, source.match, wanted, reusable)
    stop, linking = threading.Event(), threading.Condition()
    in_flight = 0  # links under way: a stopped run waits for them, the threads link side by side

    def stage(root: Path, record: Record) -> None:
        """Link a success into ``staging``, unless the run has stopped: its caller may be deleting that."""
        nonlocal in_flight
        with linking:
            if stop.is_set():
                return
            in_flight += 1
        try:
            _link(root / record.path, staging / record.path)
        finally:
            with linking:
                in_flight -= 1
                linking.notify_all()

    def one(index: int) -> tuple[int, Record, bool]:
        row = rows[index]
        sample_id = str(row["sample_id"])
        hit = stored.get(sample_id)
        record = _reuse(row, hit, source.match, limits)
        if record is not None:
            stage(hit[0], record)
            return index, record, True
        try:
            data = _fetch_with_retries(source.fetch, row, limits.retries, stop)
        except FetchFailure as failure:
            return index, Record(failure.status, failure.error), False
        except Exception as err:  # never lose a row to an unforeseen source error
            # the traceback quotes what the error quotes: a signed URL must not reach a verbose log either
            trace = redact("".join(traceback.format_exception(err)))
            log.debug("unexpected error on %s:\n%s", sample_id, trace)
            return index, Record("error", f"{type(err).__name__}: {err}"), False
        try:  # our own write errors (a full disk) are not row statuses: they end the stage
            record = save_image(data, sample_id, journal_dir, limits.max_pixels)
        except FetchFailure as failure:
            return index, Record(failure.status, failure.error), False
        journal.append({**{c: row.get(c) for c in source.match}, "sample_id": sample_id, **record.columns()})
        stage(journal_dir, record)
        return index, record, False

    records: list[Record | None] = [None] * len(rows)
    reused = 0
    desc = f"fetch {source.name}" + (f" {part}" if part else "")
    # a line a second at most, unless TQDM_MININTERVAL says otherwise (the Prefect flow: every 30 s)
    every = float(os.environ.get("TQDM_MININTERVAL", 1.0))
    bar = tqdm(total=len(rows), desc=desc, unit="img", mininterval=every)
    try:
        with bar:
            for index, record, was_reused in _bounded_map(one, range(len(rows)), limits.threads, stop):
                records[index] = record
                reused += was_reused
                bar.update()
    finally:  # once no link is under way, no thread still downloading starts one: staging is the caller's
        stop.set()
        with linking:
            linking.wait_for(lambda: not in_flight)
    log.info("%s: %d rows, %d reused from an earlier run", desc, len(rows), reused)
    return records  # type: ignore[return-value]  # every index was filled


def to_manifest(source: Source, records: list[Record]) -> pd.DataFrame:
    """The manifest: a row's record, then the source's own columns."""
    manifest = pd.DataFrame({"sample_id": source.rows["sample_id"].astype(str).to_numpy()})
    for column in RECORD_COLUMNS:
        manifest[column] = [getattr(r, column) for r in records]
    manifest["source"] = source.name
    extra = source.rows.drop(columns=["sample_id"]).reset_index(drop=True)
    manifest = pd.concat([manifest, extra], axis=1)
    counts = manifest["status"].value_counts().to_dict()
    log.info("fetch %s: %d rows, statuses %s", source.name, len(manifest), counts)
    if "success" not in counts:  # the gate then says no row succeeded: here is why, before it
        # by status, each with its most common error: many errors quote their row (a size, a file name)
        examples = manifest.groupby("status")["error"].agg(lambda errors: errors.mode().iloc[0])
        reasons = [f"{status} ({n} row{'s' * (n != 1)}), e.g. {examples[status]}"
                   for status, n in list(counts.items())[:3]]
        log.warning("fetch %s: no row succeeded; the most common failures: %s", source.name,
                    "; ".join(reasons))
    return manifest
