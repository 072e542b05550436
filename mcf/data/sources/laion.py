"""LAION-Face: metadata parquet parts to downloaded images, with img2dataset's settings and statuses.

We do not depend on img2dataset: it pins wandb and albumentations, and gives no control over
decompression bombs or byte bounds. This is our own downloader (``requests`` with ``stream=True``, a
connect/read timeout, a byte bound, a total time bound per image, a thread pool; see
:mod:`mcf.data.sources.download` for resume) that mirrors img2dataset's settings for LAION-Face:
``input_format parquet``, ``url_col URL``, ``caption_col TEXT``, ``resize_mode no`` (bytes kept as
received), extra columns carried through, ``X-Robots-Tag`` opt-outs honoured, and a per-row status
instead of a fatal error.

Released detections (one dict per part, ``SAMPLE_ID -> [(box, 5 landmarks, score), ...]``) are read
from the files as released (``sample2detect_<part>.pth``: torch's pickle of that dict with int ids and
numpy values, loaded with numbers, lists and dicts only), from the same dict as JSON, or from parquet
files already in our flat schema, for the listed rows before any download; those of the images that
arrived are written together as ``detections.parquet``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import json
import logging
import math
import os
import pickle
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies_environment

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import requests.utils
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar, merge_cookies
from requests.hooks import default_hooks
from tqdm import tqdm
from urllib3 import PoolManager, ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    LocationValueError,
    ProtocolError,
    ReadTimeoutError,
)

from mcf.data.sources.download import RECORD_COLUMNS, Source
from mcf.data.sources.image import FetchFailure, check_deadline, read_bounded, redact, redact_url
from mcf.errors import StageError
from mcf.io import read_table
from mcf.params import ParamsError, param, require_path

log = logging.getLogger(__name__)
DETECTION_COLUMNS = ["sample_id", "face", "box", "landmarks", "score"]
DETECTION_SUFFIXES = (".pth", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class LaionFaceConfig:
    """``fetch.laion_face``: where the metadata is and how to download it."""

    parquet: list[str] = param([])  # LAION-Face metadata parts
    detections: list[str] = param([])  # released detections, one file per part: .pth, .json or our .parquet
    max_rows: int | None = param(None, ge=1)  # first rows only (over all parts, in order)
    url_col: str = "URL"
    caption_col: str = "TEXT"
    id_col: str = "SAMPLE_ID"
    extra_columns: list[str] = param([])  # carried into the manifest, e.g. [NSFW, similarity, LICENSE]
    timeout: float = param(10.0, gt=0)  # seconds, connect and between bytes
    total_timeout: float = param(30.0, gt=0)  # seconds for a whole image
    max_redirects: int = param(5, ge=0)  # more is `http_error` (requests would follow 30, a loop included)
    user_agent: str = "mcf-fetch/0.1 (research; img2dataset-compatible settings)"
    disallowed_header_directives: list[str] = param(["noai", "noimageai", "noindex", "noimageindex"])

    def check_inputs(self) -> None:
        """Called when this source is active: its inputs must exist."""
        if not self.parquet:
            raise ParamsError("parquet", "give at least one LAION-Face metadata parquet file")
        for i, path in enumerate(self.parquet):
            require_path(path, f"parquet[{i}]")
        taken = sorted(set(self.extra_columns) & {"sample_id", *RECORD_COLUMNS, "source", "url", "caption"})
        if taken:  # pyarrow refuses repeated names when the manifest is written, after every download
            raise ParamsError("extra_columns", f"{taken} are columns of the manifest itself: leave them out")
        seen: dict[Path, int] = {}
        for i, path in enumerate(self.detections):
            require_path(path, f"detections[{i}]")
            if Path(path).suffix not in DETECTION_SUFFIXES:
                raise ParamsError(f"detections[{i}]", f"expected a .pth, .json or .parquet file, got {path}")
            if (first := seen.setdefault(Path(path).resolve(), i)) != i:  # its faces would come twice
                raise ParamsError(f"detections[{i}]", f"{path} is detections[{first}] again")


def _sample_id(value: Any) -> str:
    """``"123"`` for ``123.0``: pandas reads an int64 id column with nulls as float64."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def read_rows(cfg: LaionFaceConfig) -> pd.DataFrame:
    """The metadata rows to fetch: ``sample_id``, ``url``, ``caption`` and the extra columns.

    A missing id becomes ``<part>:<row>``; a repeated id keeps its first row (with a warning) so that
    ids stay unique.
    """
    frames = []
    wanted = [cfg.id_col, cfg.url_col, cfg.caption_col, *cfg.extra_columns]
    for path in cfg.parquet:
        # only these: a LAION part has 15+ columns
        part = read_table(path, wanted, "check fetch.laion_face.parquet", only=True)
        frame = pd.DataFrame(
            {
                "sample_id": [
                    f"{Path(path).stem}:{i}" if pd.isna(v) else _sample_id(v)
                    for i, v in enumerate(part[cfg.id_col])
                ],
                "url": part[cfg.url_col].astype(object).where(part[cfg.url_col].notna(), None),
                "caption": part[cfg.caption_col].fillna("").astype(str),
            }
        )
        for column in cfg.extra_columns:
            frame[column] = part[column].to_numpy()
        frames.append(frame)
        if cfg.max_rows is not None and sum(map(len, frames)) >= cfg.max_rows:
            break
    rows = pd.concat(frames, ignore_index=True)
    if cfg.max_rows is not None:
        rows = rows.iloc[: cfg.max_rows]
    unique = rows.drop_duplicates("sample_id", keep="first").reset_index(drop=True)
    if len(unique) < len(rows):
        log.warning("laion-face: %d rows repeat a sample id; kept the first", len(rows) - len(unique))
    return unique


# this thread's download: its deadline (monotonic), for the connections below, and the watchdog tokens of
# the sockets they hold to it (released when the download ends)
_DEADLINE = threading.local()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Workers:
    """Daemon threads that run the calls handed to them, a new one whenever none is idle, so a call that
    never returns (a name lookup, which takes no timeout) holds only its own thread. Kept for the next
    call, they save the thread start each call cost (0.3 ms of CPU per connect); one idle for ``IDLE_S``
    ends."""

    IDLE_S = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a call and not yet promised one

    def run(self, call: Callable[[], None]) -> None:
        """Start ``call`` (which must not raise) on an idle thread, or on a new one."""
        with self._lock:
            new = self._idle == 0
            if not new:
                self._idle -= 1
        self._calls.put(call)
        if new:
            threading.Thread(target=self._work, name="fetch-connect", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # one idle thread ends; when all are promised a call, this one waits on
                        self._idle -= 1
                        return
                continue
            call()
            with self._lock:
                self._idle += 1


class _Watchdog:
    """Shuts each socket handed to :meth:`hold` at its deadline unless released before, on one daemon thread
    for all of them (a ``threading.Timer`` each cost a thread start: 0.3 ms of CPU per image)."""

    def __init__(self) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._deadlines: list[tuple[float, int]] = []  # a heap; a released entry stays until it is on top
        self._held: dict[int, socket.socket] = {}
        self._tokens = itertools.count()
        self._until = math.inf  # when the thread wakes next unless notified
        self._started = False

    def hold(self, sock: socket.socket, deadline: float) -> int:
        """A token for :meth:`release`; the socket is shut at ``deadline`` (monotonic) unless released."""
        with self._wake:
            if not self._started:
                threading.Thread(target=self._run, name="fetch-deadlines", daemon=True).start()
                self._started = True
            token = next(self._tokens)
            self._held[token] = sock
            heapq.heappush(self._deadlines, (deadline, token))
            if deadline < self._until:
                self._wake.notify()
        return token

    def release(self, token: int) -> None:
        """The socket is no longer shut at its deadline (returns after any shut already under way)."""
        with self._wake:
            self._held.pop(token, None)
            while self._deadlines and self._deadlines[0][1] not in self._held:  # released entries on top
                heapq.heappop(self._deadlines)

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    sock = self._held.pop(heapq.heappop(self._deadlines)[1], None)
                    if sock is not None:
                        _shut(sock)
                self._until = self._deadlines[0][0] if self._deadlines else math.inf
                self._wake.wait(None if self._until == math.inf else self._until - now)


_WORKERS, _WATCHDOG = _Workers(), _Watchdog()


def _new_helpers() -> None:
    """A forked child has none of the parent's threads: it starts its own."""
    global _WORKERS, _WATCHDOG
    _WORKERS, _WATCHDOG = _Workers(), _Watchdog()


os.register_at_fork(after_in_child=_new_helpers)


class _Connect:
    """``connect()`` on a :class:`_Workers` thread, which a caller may stop waiting for: ``getaddrinfo``
    takes no timeout. A socket that arrives after the caller gave up is closed."""

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self._connect, self._lock, self._done = connect, threading.Lock(), threading.Event()
        self._result: socket.socket | BaseException | None = None
        self._abandoned = False
        _WORKERS.run(self._run)

    def _run(self) -> None:
        try:
            result: socket.socket | BaseException = self._connect()
        except BaseException as err:  # handed to the waiting thread, which raises it
            result = err
        with self._lock:
            if self._abandoned and isinstance(result, socket.socket):
                result.close()
            self._result = result
        self._done.set()

    def wait(self, seconds: float) -> socket.socket | None:
        """The socket, or None once ``seconds`` passed (raises what the connect raised)."""
        self._done.wait(seconds)
        with self._lock:
            if self._result is None:
                self._abandoned = True
                return None
        if isinstance(self._result, BaseException):
            raise self._result
        return self._result


class _DeadlineConnection:
    """Holds each connection to the download's deadline. The name lookup and the connects (a redirect's
    hop connects anew; a host with several addresses tries each) end when it passes, each connect
    getting at most what is left of it; and from the request on, until the download ends
    (:class:`HttpFetcher` releases it), the :class:`_Watchdog` shuts the socket at the deadline: the read
    timeout restarts with every byte, so a server dripping its headers (or a chain of slow redirects, each
    hop in time) would hold a thread for ever. So would a compressed body dripping bytes that decode to
    nothing (empty deflate blocks): urllib3's ``read1`` reads on until there is something to hand back, so
    :func:`read_bounded`'s deadline check between chunks is never reached. The body's size is bounded
    there."""

    sock: socket.socket | None
    timeout: Any

    def _new_conn(self) -> socket.socket:
        deadline = getattr(_DEADLINE, "value", None)
        if deadline is None:
            return super()._new_conn()  # type: ignore[misc]
        timeout, left = self.timeout, deadline - time.monotonic()
        if left <= 0:
            raise ConnectTimeoutError(self, "the download's total_timeout passed before this connect")
        self.timeout = min(timeout, left) if isinstance(timeout, int | float) else left
        try:
            sock = _Connect(super()._new_conn).wait(left)  # type: ignore[misc]
        finally:
            self.timeout = timeout
        if sock is None:
            raise ConnectTimeoutError(self, "total_timeout passed in the DNS lookup or the connect")
        return sock

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        deadline = getattr(_DEADLINE, "value", None)
        if deadline is None or self.sock is None:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        watchdog = _WATCHDOG
        token = watchdog.hold(self.sock, deadline)
        try:
            response = super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            watchdog.release(token)
            raise
        _DEADLINE.tokens.append(token)  # held while the body is read: the socket may be the response's alone
        return response


class _HTTPConnection(_DeadlineConnection, HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """Connections held to the deadline, direct or through an http(s) proxy (requests gives each proxy a
    manager of its own, with urllib3's plain pools; a SOCKS proxy's keep their own connection classes)."""

    POOLS = {"http": _HTTPPool, "https": _HTTPSPool}

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):
            manager.pool_classes_by_scheme = self.POOLS
        return manager


# requests takes proxies from the environment alone (no system settings, as on macOS or Windows), where
# urllib reads them from variables named ``*_proxy`` in any case
_PROXIES_FROM_ENVIRONMENT_ONLY = requests.utils.getproxies is getproxies_environment


def _environment_may_name_a_proxy() -> bool:
    """Whether a variable urllib takes proxies (or ``no_proxy``) from is set, empty or not."""
    return not _PROXIES_FROM_ENVIRONMENT_ONLY or any(name[-6:].lower() == "_proxy" for name in os.environ)


class _Session(requests.Session):
    """requests' session without ~/.netrc (or ``$NETRC``): with ``trust_env`` it sends the login it finds
    there for each host a request or a redirect goes to, and a ``default`` entry's to any host, so the
    user's credentials would reach every image host, over plain http too. Proxies and CA bundles from the
    environment still apply; a URL's own ``user:pass@`` still authenticates as given.

    ``trust_env`` is off only while ``prepare_request`` and ``rebuild_auth`` run (the only two that read
    netrc), and while requests looks for proxies in an environment that names none; each thread has its own
    session, so no request sees it off mid-way.

    A redirect's body is read within the image's bounds (``max_bytes``, the deadline) before requests reads
    it whole to free the connection: unbounded, a hop's body went into memory however large, and one
    dripping a byte within each read timeout held the thread for ever.
    No cookie outlives its download (a redirect's hop still sends the next hop those set before it, as
    requests does within a chain): kept, a host could tell our downloads apart, and requests copies the
    whole jar into every request, 0.1 s of CPU, the GIL held, once a thread had met 10,000 hosts that set
    one.
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def bare_get(self, url: str, timeout: tuple[float, float]) -> requests.Response:
        """``get(url, stream=True, timeout=timeout)``: the same request, settings and redirects, for less
        CPU (see :meth:`prepare_get` and :meth:`merge_environment_settings`)."""
        prepared = self.prepare_get(url)
        settings = self.merge_environment_settings(prepared.url, {}, True, None, None)
        try:
            return self.send(prepared, timeout=timeout, allow_redirects=True, **settings)
        finally:  # send stored the cookies of every hop in the session's jar
            self.cookies.clear()

    def prepare_get(self, url: str) -> requests.PreparedRequest:
        """What ``prepare_request`` makes of ``Request("GET", url)``: the session's headers and cookies, the
        URL's own login if it has one, never netrc's. Its generic merging of request settings into the
        session's (none of which we set) cost 0.2 ms of CPU per image, a tenth of the download's."""
        prepared = requests.PreparedRequest()
        prepared.prepare(method="GET", url=url, headers=self.headers,
                         cookies=merge_cookies(RequestsCookieJar(), self.cookies), hooks=default_hooks())
        return prepared

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        """requests' own; where no variable names a proxy, without its proxy lookup, which finds none then
        but reads the whole environment four times (0.35 ms of CPU per image with 40 variables)."""
        if not self.trust_env or _environment_may_name_a_proxy():
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is True or verify is None:  # the CA bundle variables, read as requests reads them
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or verify
        with self._untrusting():
            return super().merge_environment_settings(url, proxies, stream, verify, cert)

    def rebuild_proxies(self, prepared_request: requests.PreparedRequest, proxies: Any) -> Any:
        """requests' own for a redirect's hop; where no variable names a proxy, without the environment
        reads that find none (the only part of it ``trust_env`` governs)."""
        if not self.trust_env or _environment_may_name_a_proxy():
            return super().rebuild_proxies(prepared_request, proxies)
        with self._untrusting():
            return super().rebuild_proxies(prepared_request, proxies)

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        try:  # requests raises a bare ValueError where it decodes (UTF-8) and parses a Location
            target = super().get_redirect_target(resp)
            if target is not None:
                urlsplit(target)
        except ValueError as err:
            resp.close()
            raise FetchFailure("invalid_url", _short(f"a redirect's Location: {err}")) from None
        if target is not None:  # called again on a hop already read: its body is then at its end
            chunks = iter(lambda: resp.raw.read1(64 * 1024, decode_content=False), b"")
            deadline = getattr(_DEADLINE, "value", None)
            try:
                read_bounded(chunks, self.max_bytes, deadline)
                if deadline is not None:  # the watchdog ended a dripping body at the deadline, as a close
                    check_deadline(deadline)
            except FetchFailure as failure:
                resp.close()
                raise FetchFailure(failure.status, f"a redirect's body: {failure.error}",
                                   retryable=failure.retryable) from None
            except ProtocolError:  # cut short: requests follows such a redirect all the same
                pass
        return target

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        with self._untrusting():
            return super().prepare_request(request)

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        with self._untrusting():
            super().rebuild_auth(prepared_request, response)

    @contextlib.contextmanager
    def _untrusting(self) -> Iterator[None]:
        trust, self.trust_env = self.trust_env, False
        try:
            yield
        finally:
            self.trust_env = trust


# robots rules whose value follows a colon ("max-image-preview:large"): not a crawler's name
_VALUE_RULES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}


def robots_refusals(headers: list[str], agents: set[str], directives: list[str]) -> list[str]:
    """The ``directives`` that the X-Robots-Tag ``headers`` (one string per header) set for us.

    As img2dataset reads them: a header is ``[crawler:] directive, ...``, and one naming another crawler
    (``googlebot: noindex``) does not address us; directives match whole (``noindex``, not ``noindexnow``).
    """
    found: list[str] = []
    for header in headers:
        name, colon, rest = header.partition(":")
        name = name.strip().lower()
        if colon and name not in _VALUE_RULES and not re.search(r"[,\s]", name):
            if name not in agents:
                continue
            header = rest
        given = {d.strip().lower() for d in header.split(",")}
        found += [d for d in directives if d.lower() in given and d not in found]
    return found


def _short(text: str) -> str:
    """An error text for the manifest: redacted first, then cut to 200 characters (cut first, a URL's
    password crossing the cut would lose the ``@`` its redaction finds it by)."""
    return redact(text)[:200]


class HttpFetcher:
    """URL to bytes with bounds on time and size; one ``requests`` session per thread."""

    def __init__(self, cfg: LaionFaceConfig, max_bytes: int) -> None:
        self.cfg, self.max_bytes = cfg, max_bytes
        self._local = threading.local()
        # the crawler names an X-Robots-Tag header may address us by: our product token, and the tool
        # whose settings we follow
        self._agents = {re.split(r"[/\s]", cfg.user_agent.strip(), maxsplit=1)[0].lower(), "img2dataset"}

    def _session(self) -> _Session:
        if not hasattr(self._local, "session"):
            self._local.session = _Session(self.max_bytes)
            for scheme in ("http://", "https://"):
                self._local.session.mount(scheme, _DeadlineAdapter())
            self._local.session.headers["User-Agent"] = self.cfg.user_agent
            self._local.session.max_redirects = self.cfg.max_redirects
        return self._local.session

    def _check_headers(self, response: requests.Response) -> None:
        if response.status_code >= 400:
            retry = response.status_code >= 500 or response.status_code == 429
            raise FetchFailure("http_error", f"HTTP {response.status_code}", retryable=retry)
        refused = robots_refusals(
            response.raw.headers.getlist("X-Robots-Tag"), self._agents, self.cfg.disallowed_header_directives
        )
        if refused:
            raise FetchFailure("disallowed", f"X-Robots-Tag: {', '.join(refused)}")
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise FetchFailure("too_large", f"Content-Length {length} is over {self.max_bytes} bytes")

    def __call__(self, row: dict[str, Any]) -> bytes:
        url = row.get("url")
        try:
            parts = urlsplit(url) if isinstance(url, str) else None
        except ValueError:  # e.g. an unbalanced IPv6 bracket
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            quoted = redact_url(url) if isinstance(url, str) else url
            raise FetchFailure("invalid_url", f"not an http(s) URL: {quoted!r}")
        deadline = time.monotonic() + self.cfg.total_timeout
        timeout = (self.cfg.timeout, self.cfg.timeout)
        _DEADLINE.value, _DEADLINE.tokens = deadline, []
        try:
            with self._session().bare_get(url, timeout) as response:
                check_deadline(deadline)  # a head the watchdog cut short parses as a (wrong) response
                self._check_headers(response)
                # read1 returns what has arrived, so the deadline holds against a slow drip
                chunks = iter(lambda: response.raw.read1(64 * 1024, decode_content=True), b"")
                data = read_bounded(chunks, self.max_bytes, deadline)
                check_deadline(deadline)  # a body the watchdog cut that ends at the close reads as whole
                return data
        except (requests.exceptions.Timeout, ReadTimeoutError) as err:
            raise FetchFailure("timeout", type(err).__name__, retryable=True) from None
        except ProtocolError as err:
            check_deadline(deadline)  # the watchdog cut a body dripping past the deadline: a timeout
            raise FetchFailure("truncated", _short(f"body ended early: {err}"), retryable=True) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as err:
            raise FetchFailure("invalid_url", _short(str(err))) from None
        except LocationValueError as err:  # urllib3's parser refused the host (an empty or over-long label)
            raise FetchFailure("invalid_url", _short(f"{type(err).__name__}: {err}")) from None
        except requests.exceptions.TooManyRedirects:  # a loop or a chain: trying again will not help
            raise FetchFailure("http_error", f"more than {self.cfg.max_redirects} redirects") from None
        except (requests.exceptions.ContentDecodingError, DecodeError) as err:  # sent so each time: no retry
            check_deadline(deadline)  # unless the watchdog cut it mid-stream
            message = f"the body does not decode as its Content-Encoding says ({type(err).__name__}: {err})"
            raise FetchFailure("not_image", _short(message)) from None
        except (requests.exceptions.RequestException, HTTPError) as err:
            check_deadline(deadline)  # the watchdog cut a dripping server off at the deadline: a timeout
            message = _short(f"{type(err).__name__}: {err}")
            raise FetchFailure("connection_error", message, retryable=True) from None
        finally:
            _DEADLINE.value = None
            for token in _DEADLINE.tokens:  # before a later download of this thread reuses a connection
                _WATCHDOG.release(token)


def source(cfg: LaionFaceConfig, max_bytes: int, rows: pd.DataFrame | None = None) -> Source:
    """The parquet parts' rows (or ``rows``, a slice of them listed elsewhere) and their fetcher."""
    origin = ", ".join(cfg.parquet)
    rows = read_rows(cfg) if rows is None else rows
    return Source("laion-face", rows, HttpFetcher(cfg, max_bytes), match=("url",), origin=origin)


def _face(sample_id: str, index: int, face: Any) -> dict[str, Any]:
    """One released detection, as a dict or a ``(box, landmarks, score)`` sequence, flattened."""
    try:
        if isinstance(face, dict):
            box, landmarks, score = face["box"], face["landmarks"], face["score"]
        else:
            box, landmarks, score = face
        # numpy arrays as released (landmarks [5, 2]), or nested or flat lists; sized before any copy: a
        # crafted file's array can be a view of billions of elements over a few bytes (stride 0)
        box, landmarks = np.asarray(box), np.asarray(landmarks)
        if box.size != 4 or landmarks.size != 10:
            raise ValueError("need 4 box values and 5 landmark points")
        flat = landmarks.astype(np.float64).ravel().tolist()
        box = box.astype(np.float64).ravel().tolist()
        if not all(math.isfinite(v) for v in [*box, *flat, float(score)]):
            raise ValueError("box, landmarks and score must be finite (JSON allows NaN and Infinity)")
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a tensor needing grad
        where = f"fetch.laion_face.detections: face {index} of {sample_id!r}"
        raise StageError(f"{where} is malformed: {err}") from None
    return {"sample_id": sample_id, "face": index, "box": box, "landmarks": flat, "score": float(score)}


def _fits(column: str, kind: pa.DataType) -> bool:
    """Whether a detections parquet's ``column`` (box, landmarks, score) holds numbers as the flat schema
    does, at any width; an all-null column is Arrow's null type, and lists that are all empty or null
    (landmarks unknown on every row) list<null>. Values are the crop stage's to check."""
    if pa.types.is_null(kind):
        return True
    if column != "score":
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
            return False
        kind = kind.value_type
        if pa.types.is_null(kind):
            return True
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def read_detections(paths: list[str | Path], sample_ids: set[str]) -> pd.DataFrame:
    """Detections for ``sample_ids`` from every file (one per part), in the flat schema of docs/CONTRACTS.md
    (``detections.parquet``), in the files' order. A bar counts the files: a released part takes minutes
    (torch's safe loader unpickles in Python)."""
    files = tqdm(paths, desc="read detections", unit="file", disable=len(paths) < 2 or None)
    tables = [_read_detections(Path(path), sample_ids) for path in files]
    if not tables:
        return pd.DataFrame(columns=DETECTION_COLUMNS)
    table = pd.concat(tables, ignore_index=True)
    twice = table[table.duplicated(["sample_id", "face"])]
    if len(twice):  # the crop stage refuses it, after every download: here it fails before the first
        sample_id, face = twice.iloc[0][["sample_id", "face"]]
        given = [str(path) for path, part in zip(paths, tables, strict=True)
                 if ((part["sample_id"] == sample_id) & (part["face"] == face)).any()]
        raise StageError(f"fetch.laion_face.detections: face {face} of sample {sample_id!r} is given twice "
                         f"(in {', '.join(given)}): a sample's faces come from one part, once")
    return table


class _Array(np.ndarray):
    """What a released file's ``numpy.ndarray`` is: the class ``_reconstruct`` rebuilds an array as (then
    read as a plain array), and a call of it refused. numpy's pickles never call it, and a crafted one
    could: ``ndarray((n,), "O")`` fills n slots with None as the file loads, 80 GB at n = 10**10."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Array:
        raise pickle.UnpicklingError("a call of numpy.ndarray(...), which numpy's own pickles never make")

    def __setstate__(self, state: Any) -> None:
        """numpy's, for the state it pickles an array of numbers with: the bytes, a dtype without flags.
        numpy reads an object array's items from the pickled list without checking its length, so a
        list shorter than the shape (or a dtype whose flags say its items come as a list) crashed."""
        plain = isinstance(state, tuple) and len(state) >= 4 and isinstance(state[-1], bytes)
        if not (plain and isinstance(state[-3], np.dtype) and not state[-3].flags):
            raise pickle.UnpicklingError("an array state that is not the bytes of a dtype of numbers")
        super().__setstate__(state)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` as numpy's pickles call it: an empty array, which ``__setstate__`` fills.
    Another shape is refused: ``(10**9,)`` of objects is gigabytes written when it is freed."""
    from numpy._core import multiarray

    if not (type(shape) is tuple and len(shape) == 1 and type(shape[0]) is int and shape[0] == 0):
        raise pickle.UnpicklingError("an array rebuilt at a shape of its own, not as numpy pickles one")
    return multiarray._reconstruct(subtype, shape, dtype)


def _numpy_globals() -> list[Any]:
    """What unpickling numpy arrays and scalars calls, under the names numpy 1 (``numpy.core``, in a file
    saved before numpy 2) and numpy 2 (``numpy._core``) give it; nothing else may run."""
    from numpy._core import multiarray

    dtypes = {type(np.dtype(code)) for code in "?bhilqBHILQefd"}
    named = [(f, f"{module}.{f.__name__}") for f in (_reconstruct, multiarray.scalar)
             for module in ("numpy.core.multiarray", "numpy._core.multiarray")]
    return [(_Array, "numpy.ndarray"), np.dtype, *dtypes, *named]


def _released(path: Path, where: str) -> dict[Any, Any]:
    """A released detections dict: ``.pth`` as LAION-Face ships it (``torch.load`` with numbers, lists,
    dicts and numpy arrays allowed, so a pickle cannot run code), else JSON."""
    if path.suffix == ".pth":
        import torch

        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                released = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the file's, whatever it is: an allowed global's own refusal of the
            # arguments a crafted file gives it is a TypeError, MemoryError or the like, not torch's.
            # torch's refusal wraps what it refused in advice to load unsafely: keep only what it refused
            text = " ".join(str(err).split()).split("from a trusted source.", 1)[-1]
            text = text.split("WeightsUnpickler error:", 1)[-1]
            cause = text.split("Check the documentation of torch.load", 1)[0].strip()
            raise StageError(f"{where}: not a torch file of numbers, lists and dicts ({type(err).__name__}: "
                             f"{cause[:300]})") from None
    else:
        try:
            released = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:  # not UTF-8, not JSON
            raise StageError(f"{where} is not JSON: {err}") from None
    if not isinstance(released, dict):
        kind = "dict" if path.suffix == ".pth" else "JSON object"
        raise StageError(f"{where} is not a {kind} of SAMPLE_ID -> faces, as released")
    return released


def _read_detections(path: Path, sample_ids: set[str]) -> pd.DataFrame:
    """One file's detections for ``sample_ids``.

    A file none of whose ids is listed gets a warning: ids formatted differently look like no faces.
    """
    where = f"fetch.laion_face.detections: {path}"
    if path.suffix == ".parquet":
        table = read_table(path, DETECTION_COLUMNS, "check fetch.laion_face.detections", only=True)
        schema = pq.read_schema(path)
        wrong = [c for c in ("box", "landmarks", "score") if not _fits(c, schema.field(c).type)]
        if wrong or not pd.api.types.is_integer_dtype(table["face"]):  # a null face reads as a float
            raise StageError(f"{where}: column {(wrong or ['face'])[0]} is not of its type in "
                             "docs/CONTRACTS.md (face int64 without nulls, box and landmarks list<double>, "
                             "score double)")
        table = table.assign(sample_id=table["sample_id"].map(_sample_id))
        given = set(table["sample_id"])
        found = table[table["sample_id"].isin(sample_ids)][DETECTION_COLUMNS].reset_index(drop=True)
    else:
        released = _released(path, where)
        given = {str(key) for key in released}
        rows = []
        for key, faces in released.items():
            if str(key) in sample_ids:
                if not isinstance(faces, list | tuple):
                    raise StageError(f"{where}: the faces of {key!r} are not a list")
                rows += [_face(str(key), i, face) for i, face in enumerate(faces)]
        found = pd.DataFrame(rows, columns=DETECTION_COLUMNS)
    if given and sample_ids and given.isdisjoint(sample_ids):
        log.warning(
            "fetch.laion_face.detections: none of the %d sample ids in %s is a listed sample id "
            "(e.g. %r there, %r here): no image gets released detections",
            len(given), path, min(given), min(sample_ids),
        )
    return found
