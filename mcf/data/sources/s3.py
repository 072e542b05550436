"""S3 (or any S3-compatible store): the objects under ``s3://bucket/prefix`` as fetch rows.

Credentials come only from boto3's own chain (environment, profile, instance role); they are never
part of params or logs. The endpoint is configurable so that MinIO, Ceph or a local test server work.
Objects larger than ``max_bytes`` are refused from their listed size, without a download; an object's
body is read within ``total_timeout``, as laion-face's images are. An object replaced between the listing
and its download is an ``error`` row, not stored under the listed ETag (which a later run would trust).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import boto3
import pandas as pd
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    InvalidRegionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url, validate_region_name

from mcf.data.sources.download import Source
from mcf.data.sources.image import (
    IMAGE_EXTENSIONS,
    FetchFailure,
    check_deadline,
    check_extensions,
    read_bounded,
    redact,
)
from mcf.errors import AccessError, StageError
from mcf.params import ParamsError, param


@dataclasses.dataclass(frozen=True)
class S3Config:
    """``fetch.s3``: which objects, and how to reach the store."""

    bucket: str = ""
    prefix: str = ""
    endpoint_url: str | None = None  # None: AWS; else e.g. http://127.0.0.1:9000
    region: str | None = None
    extensions: list[str] = param(IMAGE_EXTENSIONS)  # keys with other endings are skipped; [] keeps all
    max_objects: int | None = param(None, ge=1)
    timeout: float = param(10.0, gt=0)  # seconds, connect and read
    total_timeout: float = param(30.0, gt=0)  # seconds for an object's body (as laion_face.total_timeout)

    def __post_init__(self) -> None:
        """Whichever source is active: dvc.lock and `dvc params diff` record the whole fetch section."""
        url = self.endpoint_url or ""
        # before any message quotes the value: "@" and "?" mark credentials however the rest is malformed
        if "@" in url or "?" in url:
            raise ParamsError("endpoint_url", "takes no user, password or query: credentials come from "
                              "boto3's chain (AWS_ACCESS_KEY_ID ..., a profile), never from params")

    def check_inputs(self) -> None:
        """Called when this source is active."""
        if not self.bucket:
            raise ParamsError("bucket", "give the bucket to read from")
        # boto3 refused a URL or a path only once the stage listed; an access point's ARN
        # (arn:...:accesspoint/name) is a bucket to it
        if "://" in self.bucket or ("/" in self.bucket and not self.bucket.startswith("arn:")):
            raise ParamsError("bucket", _bucket_hint(self.bucket))
        check_extensions(self.extensions)
        url = self.endpoint_url or ""
        if self.endpoint_url is not None and not _valid_endpoint(url):  # "" too: boto3's ValueError
            raise ParamsError("endpoint_url", f"expected http(s)://host[:port] (null: AWS's), got {url!r}")
        try:
            if self.region == "":  # botocore's check takes it; its client then fails on https://s3..amazonaws.com
                raise InvalidRegionError(region_name="")
            validate_region_name(self.region)
        except InvalidRegionError:  # raised by boto3's client, as a traceback, once the stage ran
            raise ParamsError("region", f"{self.region!r} is not a region name (e.g. us-east-1)") from None


def _bucket_hint(bucket: str) -> str:
    """What to write for ``s3://bucket/prefix`` or ``bucket/prefix``, without a URL's ``user:password@``.

    An http(s) URL's host is a server (or holds the bucket), never the bucket; a value with a ``?`` (a
    signed URL's query) or an ``@`` past its first ``/`` (a password holding a ``/``) is not quoted.
    """
    scheme, url, rest = bucket.partition("://")
    netloc, _, prefix = (rest if url else bucket).partition("/")
    if url and scheme.lower() in ("http", "https"):  # s3://, s3a://, gs://: the host is the bucket
        return ("takes a bucket name, not a URL (its server goes in endpoint_url, null for AWS's; the "
                "bucket's name here and the folder in prefix)")
    kind = "a URL" if url else "a path: the rest goes in prefix"
    if "?" in bucket or "@" in prefix:
        return f"takes a bucket name, not {kind}"
    hint = f"bucket: {netloc.rpartition('@')[2]}" + (f", prefix: {prefix}" if prefix else "")
    return f"takes a bucket name, not {kind} ({hint})"


def _valid_endpoint(url: str) -> bool:
    """An http(s) URL that botocore takes (its own host test) with a port in range: else boto3 raised a
    bare ValueError (a traceback, not exit 2) or failed only when listing."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses it: a port that is no number, or is over 65535, raises)
    except ValueError:  # an unbalanced IPv6 bracket, a bad port
        return False
    host_ok = is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and bool(host_ok)


def _client(cfg: S3Config, threads: int, retries: int) -> Any:
    """A client that retries each call ``retries`` times (botocore's ``max_attempts`` counts the retries
    after the first try, not the tries)."""
    config = Config(
        connect_timeout=cfg.timeout,
        read_timeout=cfg.timeout,
        retries={"max_attempts": retries, "mode": "standard"},
        max_pool_connections=max(10, threads),
    )
    try:
        return boto3.session.Session().client(
            "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config
        )
    except BotoCoreError as err:  # the environment's set-up, e.g. an AWS_PROFILE that no file defines
        raise AccessError(f"fetch.s3: cannot set up an S3 client: {redact(str(err))}") from None


def _keys(client: Any, cfg: S3Config) -> Any:
    """Listed objects under the prefix whose key ends in one of ``cfg.extensions``."""
    extensions = tuple(e.lower() for e in cfg.extensions)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=cfg.bucket, Prefix=cfg.prefix):
        for obj in page.get("Contents", []):
            suffix = PurePosixPath(obj["Key"]).suffix.lower()
            if not obj["Key"].endswith("/") and (not extensions or suffix in extensions):
                yield obj


def list_rows(client: Any, cfg: S3Config) -> pd.DataFrame:
    """One row per object: ``sample_id`` (the key), ``key``, ``etag``, ``size``, empty ``caption``."""
    rows = []
    try:
        for obj in _keys(client, cfg):
            if cfg.max_objects is not None and len(rows) >= cfg.max_objects:
                break
            key, etag, size = obj["Key"], obj.get("ETag", ""), int(obj.get("Size", 0))
            rows.append({"sample_id": key, "caption": "", "key": key, "etag": etag, "size": size})
    except (ClientError, BotoCoreError) as err:
        message = f"fetch.s3: cannot list s3://{cfg.bucket}/{cfg.prefix}: {redact(str(err))}"
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            message += (" (boto3 reads AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an "
                        "instance role where the stage runs)")
        raise (AccessError if _refused(err) else StageError)(message) from None
    return pd.DataFrame(rows, columns=["sample_id", "caption", "key", "etag", "size"])


def _refused(err: Exception) -> bool:
    """Whether a rerun would be refused the same way: no credentials to sign with, or a 4xx (access
    denied, no such bucket, a bad key) but a timeout or throttling, which a later run may get past."""
    if not isinstance(err, ClientError):
        return isinstance(err, (NoCredentialsError, PartialCredentialsError))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = err.response.get("Error", {}).get("Code", "")
    return 400 <= status < 500 and status not in (408, 429) and code != "RequestTimeout"  # S3's is a 400


def _shut_at(deadline: float, body: Any) -> threading.Timer:
    """A timer that shuts the body's socket at ``deadline``: botocore's read timeout restarts with every
    byte, and one ``read`` waits for all the bytes it asked for, so a store trickling an object would hold
    the thread for ever. botocore's body keeps its urllib3 response in ``_raw_stream`` (no public name;
    botocore's own ``set_socket_timeout`` reaches it there), whose ``shutdown`` is urllib3's way to end a
    read blocked in another thread. The reads, botocore's length and checksum checks included, are
    unchanged."""

    def shut() -> None:
        with contextlib.suppress(AttributeError, ValueError, RuntimeError, OSError):  # gone or done
            body._raw_stream.shutdown()

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), shut)
    timer.daemon = True
    timer.start()
    return timer


def _unquoted(etag: str) -> str:
    """An ETag without the quotes that S3 puts around it and some compatible stores leave off."""
    return etag.strip('"')


class S3Fetcher:
    """Object key to bytes, bounded by ``max_bytes`` and, for the body, ``total_timeout`` seconds (boto3
    clients are thread-safe)."""

    def __init__(self, client: Any, bucket: str, max_bytes: int, total_timeout: float) -> None:
        self.client, self.bucket, self.max_bytes = client, bucket, max_bytes
        self.total_timeout = total_timeout

    def __call__(self, row: dict[str, Any]) -> bytes:
        if row["size"] > self.max_bytes:
            raise FetchFailure("too_large", f"{row['size']} bytes is over {self.max_bytes}")
        deadline = time.monotonic() + self.total_timeout
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=row["key"])
            body, listed, got = response["Body"], row.get("etag"), response.get("ETag")
            if listed and got and _unquoted(got) != _unquoted(listed):
                body.close()  # replaced since the listing: its bytes would go under the listed ETag
                raise FetchFailure("error", f"the object changed after it was listed (ETag {listed}, now "
                                   f"{got}); the next run lists it again")
            timer = _shut_at(deadline, body)
            try:
                with body:
                    return read_bounded(iter(lambda: body.read(64 * 1024), b""), self.max_bytes, deadline)
            finally:
                timer.cancel()
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.response.get("Error", {}).get("Code", "")
            retry = status >= 500 or status == 429  # 429: throttling on S3-compatible stores
            raise FetchFailure("http_error", f"HTTP {status} {code}", retryable=retry) from None
        except (ConnectTimeoutError, ReadTimeoutError) as err:
            raise FetchFailure("timeout", type(err).__name__, retryable=True) from None
        except EndpointConnectionError as err:
            raise FetchFailure("connection_error", str(err), retryable=True) from None
        except BotoCoreError as err:
            check_deadline(deadline)  # the deadline's timer cut the body short: a timeout
            raise FetchFailure("connection_error", f"{type(err).__name__}: {err}", retryable=True) from None


def source(
    cfg: S3Config, max_bytes: int, threads: int, retries: int, rows: pd.DataFrame | None = None
) -> Source:
    """The objects under the prefix (or ``rows``, a slice of them listed elsewhere) and their fetcher.

    ``fetch.retries`` holds for both: botocore retries the listing's calls, our loop the downloads
    (:func:`mcf.data.sources.download.fetch_records`), so the fetcher's client makes each call once.
    """
    client = _client(cfg, threads, retries=0)
    rows = list_rows(_client(cfg, 1, retries), cfg) if rows is None else rows
    origin = f"s3://{cfg.bucket}/{cfg.prefix} (keys ending in {', '.join(cfg.extensions) or 'anything'})"
    fetcher = S3Fetcher(client, cfg.bucket, max_bytes, cfg.total_timeout)
    return Source("s3", rows, fetcher, match=("key", "etag"), origin=origin)
