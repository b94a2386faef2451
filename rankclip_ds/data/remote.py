"""Reading remote shards (``http://``, ``https://``, ``s3://``) over a bad network: retries, backoff, resumed reads.

:func:`open_remote` returns a sequential byte stream of one object. A transient failure (connection reset or
refused, a timeout, HTTP 5xx/429/408, a body shorter than its ``Content-Length``; for S3 also ``SlowDown``,
``InternalError``, ``RequestTimeout``) closes the connection, waits ``min(backoff_max_s, backoff_s · 2^k)`` seconds
scaled by a random factor in [0.5, 1] (k = failures so far without progress), and re-requests the object from the
byte already consumed (``Range: bytes=N-``; ``If-Range``/``IfMatch`` with the first response's ETag, so a changed
object is never stitched onto the old one). The reader above sees one unbroken stream: records are neither repeated
nor lost. ``retries`` bounds the failures in a row *without a byte of progress*: a long shard on a flaky link that
keeps advancing is read to the end. Permanent failures are not retried: 404/410 and ``NoSuchKey``/``NoSuchBucket``
(``remote_not_found``), 401/403 and ``AccessDenied``/bad keys (``remote_forbidden``), any other 4xx
(``remote_failed``). When the retries run out the error is ``remote_failed``. Each is a :class:`RemoteError`
(an ``OSError``) whose ``reason`` is the skip reason the record reader counts.

S3 goes through boto3 with its standard configuration: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` and the shared files, or an instance role;
the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, Ceph, GCS's interoperability API);
boto3's own retries are switched off so that every retry is ours, counted and logged.
"""

from __future__ import annotations

import base64
import contextlib
import io
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from rankclip_ds.data.redact import redact

__all__ = ["REMOTE_SCHEMES", "RemoteError", "RemotePolicy", "is_remote", "open_remote", "read_remote_bytes"]

REMOTE_SCHEMES = ("http", "https", "s3")
_JITTER = random.SystemRandom()  # no state to share between forked DataLoader workers
_CHUNK = 1 << 20  # the buffer above the reader
_READ = 256 << 10  # most bytes taken from a response per call: what a reset can cost is re-requested from here


@dataclass(frozen=True)
class RemotePolicy:
    """How hard to try for a remote shard (``data.remote_*`` in the run config)."""

    retries: int = 5
    """Failures in a row without progress before a shard is given up for this pass (0: never retry)."""
    backoff_s: float = 1.0
    """First wait; doubled after each failure in a row, scaled by a random factor in [0.5, 1]."""
    backoff_max_s: float = 30.0
    """Cap on one wait."""
    timeout_s: float = 60.0
    """Connect timeout, and the longest wait for the next bytes of a response."""

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"remote retries={self.retries!r} must be an integer >= 0 (0 never retries)")
        if not self.backoff_s >= 0 or not self.backoff_max_s >= self.backoff_s:
            raise ValueError(
                f"remote backoff_s={self.backoff_s!r}, backoff_max_s={self.backoff_max_s!r}: need "
                "0 <= backoff_s <= backoff_max_s (e.g. 1 and 30 seconds)"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"remote timeout_s={self.timeout_s!r} must be > 0 seconds (e.g. 60)")

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` (0-based) failures in a row: exponential, capped, jittered."""
        return min(self.backoff_max_s, self.backoff_s * 2.0**failures) * (0.5 + 0.5 * _JITTER.random())


class RemoteError(OSError):
    """A remote read that failed; ``reason`` is the skip reason, ``transient`` whether a retry may help."""

    def __init__(self, reason: str, message: str, *, transient: bool = False):
        super().__init__(message)
        self.reason, self.transient = reason, transient

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0]}"


def is_remote(url: str) -> bool:
    """True for the URLs this module reads itself (``http``, ``https``, ``s3``)."""
    return url.split("://", 1)[0].lower() in REMOTE_SCHEMES if "://" in url else False


def status_error(status: int, what: str) -> RemoteError:
    """The :class:`RemoteError` of an HTTP status (also used for S3's status codes)."""
    if status in (404, 410):
        return RemoteError("remote_not_found", f"{what}: HTTP {status}, the object does not exist")
    if status in (401, 403):
        return RemoteError("remote_forbidden", f"{what}: HTTP {status}, access denied (credentials?)")
    transient = status >= 500 or status in (408, 425, 429)
    return RemoteError("remote_failed", f"{what}: HTTP {status}", transient=transient)


def classify(exc: BaseException) -> RemoteError:
    """Maps an exception of a remote read to a :class:`RemoteError`; anything unexpected is re-raised."""
    if isinstance(exc, RemoteError):
        return exc
    if isinstance(exc, urllib.error.HTTPError):
        return status_error(exc.code, exc.reason or "request refused")
    if type(exc).__module__.startswith("botocore"):
        from rankclip_ds.data.s3 import classify_botocore

        return classify_botocore(exc)
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, OSError) and "CERTIFICATE_VERIFY_FAILED" not in str(reason):
            return RemoteError("remote_failed", repr(reason), transient=True)
        return RemoteError("remote_failed", f"cannot reach the server: {reason!r}")
    import http.client

    if isinstance(exc, (OSError, http.client.HTTPException)):  # resets, timeouts, short bodies, bad status lines
        return RemoteError("remote_failed", repr(exc), transient=True)
    raise exc


# An opener fetches the object from a byte offset: (start, etag) -> (body with .read(n) and .close(), etag, size).
Opener = Callable[[int, "str | None"], "tuple[Any, str | None, int | None]"]


class RemoteReader(io.RawIOBase):
    """One remote object as a sequential stream that survives transient failures (see the module doc)."""

    def __init__(
        self,
        url: str,
        opener: Opener,
        policy: RemotePolicy,
        on_retry: Callable[[int, float, RemoteError], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__()
        self.url, self._opener, self.policy = url, opener, policy
        self._on_retry, self._sleep = on_retry, sleep
        self.pos = 0  # bytes handed to the reader so far: where a resumed request starts
        self.retries = 0  # retries of this object, all told
        self._failures = 0  # failures in a row without progress
        self._etag: str | None = None
        self._size: int | None = None
        self._body: Any = None
        self._connect()

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        while True:
            try:
                self._body, etag, size = self._opener(self.pos, self._etag)
            except Exception as exc:  # classify re-raises what is not a remote failure
                self._failed(exc)
                continue
            self._etag = self._etag or etag
            self._size = size if size is not None else self._size
            return

    def _failed(self, exc: BaseException) -> None:
        """Gives up (raises) on a permanent failure or when the retries are spent; otherwise waits to retry."""
        self._drop_body()
        err = classify(exc)
        if not err.transient:
            raise err from exc
        if self._failures >= self.policy.retries:
            message = f"gave up after {self._failures} retries without progress at byte {self.pos}; last: {err}"
            raise RemoteError("remote_failed", message) from exc
        delay = self.policy.delay(self._failures)
        self._failures += 1
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry(self._failures, delay, err)
        self._sleep(delay)

    def readinto(self, buffer) -> int:
        while True:
            if self._size is not None and self.pos >= self._size:
                return 0
            if self._body is None:
                self._connect()
            try:
                read = getattr(self._body, "read1", None) or self._body.read  # read1: what has arrived, no waiting
                data = read(min(len(buffer), _READ))
                if not data and self._size is not None and self.pos < self._size:
                    raise RemoteError("remote_failed", f"body ended at byte {self.pos} of {self._size}", transient=True)
            except Exception as exc:  # classify re-raises what is not a remote failure
                self._failed(exc)
                continue
            n = len(data)
            buffer[:n] = data
            self.pos += n
            if n:
                self._failures = 0
            return n

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close; it is dropped anyway
                body.close()

    def close(self) -> None:
        self._drop_body()
        super().close()


# ------------------------------------------------------------------------------------------------ http(s)
def _http_opener(url: str, policy: RemotePolicy) -> Opener:
    parts = urlsplit(url)
    headers = {"User-Agent": "rankclip-ds", "Accept-Encoding": "identity"}
    if parts.username is not None:  # urllib does not send URL credentials itself; never keep them in the URL
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(token).decode()
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    clean = urlunsplit(parts)

    def open_at(start: int, etag: str | None):
        extra = {"Range": f"bytes={start}-"} if start else {}
        if start and etag:
            extra["If-Range"] = etag
        request = urllib.request.Request(clean, headers={**headers, **extra})
        response = urllib.request.urlopen(request, timeout=policy.timeout_s)
        try:
            return _check_http_response(response, start, etag)
        except BaseException:
            response.close()
            raise

    return open_at


def _check_http_response(response, start: int, etag: str | None):
    """(body, etag, total size) of a response to a request from byte ``start``."""
    length = response.headers.get("Content-Length")
    tag = response.headers.get("ETag")
    strong = tag if tag and not tag.startswith("W/") else None
    if start and response.status == 200:
        if etag:
            raise RemoteError("remote_failed", "the object changed between two requests (its ETag differs)")
        _discard(response, start)  # a server without range support: skip what was already read
        return response, strong, int(length) if length else None
    if start and response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {start}-"):
            raise RemoteError("remote_failed", f"asked for bytes {start}- and got {content_range!r}")
        total = content_range.rsplit("/", 1)[-1]
        return response, strong, int(total) if total.isdigit() else None
    return response, strong, int(length) if length else None


def _discard(response, n: int) -> None:
    while n > 0:
        got = response.read(min(n, _CHUNK))
        if not got:
            raise RemoteError("remote_failed", "body ended before the resume point", transient=True)
        n -= len(got)


# ------------------------------------------------------------------------------------------------ entry points
def _opener(url: str, policy: RemotePolicy) -> Opener:
    scheme = url.split("://", 1)[0].lower()
    if scheme == "s3":
        from rankclip_ds.data.s3 import s3_opener

        return s3_opener(url, policy)
    if scheme in ("http", "https"):
        return _http_opener(url, policy)
    raise ValueError(f"{redact(url)} is not an http(s):// or s3:// URL")


def open_remote(
    url: str,
    policy: RemotePolicy | None = None,
    on_retry: Callable[[int, float, RemoteError], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> IO[bytes]:
    """A buffered sequential stream of ``url`` (raises :class:`RemoteError` when the object cannot be had)."""
    reader = RemoteReader(url, _opener(url, policy or RemotePolicy()), policy or RemotePolicy(), on_retry, sleep)
    return io.BufferedReader(reader, _CHUNK)


def read_remote_bytes(url: str, policy: RemotePolicy | None = None) -> bytes:
    """The whole object (small files: manifests), with the same retries."""
    with open_remote(url, policy) as stream:
        return stream.read()
