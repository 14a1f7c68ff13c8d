"""HTTP plumbing of the job API: the pool, attempts and backoff, and resumable chunk downloads.

This module owns the files it writes in `dest_dir` (`<index>.zip.part`, then `<index>.zip`).
`http_client` builds the connection pool; its caller (`JobClient`) owns and closes it.

NOTE [download protocol]: one chunk, at most `RetryPolicy.attempts` requests:

    cached <index>.zip verified? --yes--> done (no request)
    attempt k: hash what <index>.zip.part already holds (N bytes)
        GET url [Range: bytes=N-, If-Range: <etag>]   (Accept-Encoding: identity)
        401/403/404            -> fatal: DownloadError at once, never retried
        429/5xx, network error -> retryable (part kept for the next attempt's Range)
        206 from N             -> append;  200 -> the server ignored Range: restart from zero
        body ends short        -> retryable (part kept)
        body longer than size  -> part deleted, retryable
        N == size: sha256 ok   -> rename part to <index>.zip; done
                   mismatch    -> part deleted, retryable
    between attempts: full-jitter exponential backoff, or `Retry-After` (capped), waited on a
    `threading.Event` so that closing the client interrupts the wait.

`on_bytes` keeps a running sum equal to the bytes on disk: a resumed part is reported once at
the start, every block as it is written, and discarded bytes as a negative count.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

__all__ = [
    "AttemptsExhausted",
    "Fatal",
    "RetryPolicy",
    "Retryable",
    "describe_transport_error",
    "download_chunk",
    "file_matches",
    "http_client",
    "is_tls_verify_error",
    "parse_retry_after",
    "redact_url",
    "run_attempts",
]

_log = logging.getLogger("pixcrawler.engine.download")
_BLOCK = 1 << 20
_DEFAULT_PORTS = {"http": 80, "https": 443}
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a request is repeated.

    Attributes:
        attempts: requests in all, the first included.
        backoff: base of the exponential backoff, in seconds; attempt k waits a uniform random
            time in [0, backoff * 2**(k-1)] ("full jitter", so that many clients spread out).
        retry_after_cap: the longest `Retry-After` honoured, in seconds.
    """

    attempts: int = 3
    backoff: float = 0.5
    retry_after_cap: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"retries must be an int >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(
                f"retries must be >= 1 (the first attempt counts), got {self.attempts}"
            )
        for name in ("backoff", "retry_after_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return random.uniform(0.0, self.backoff * 2 ** (attempt - 1))


class Retryable(Exception):
    """One attempt failed in a way that another attempt may fix; `reason` says how."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Fatal(Exception):
    """One attempt failed in a way no retry can fix (401/403/404, TLS, disk); never retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = 1  # set by run_attempts to the attempt that failed


class AttemptsExhausted(Exception):
    """Every attempt failed (or the wait was cancelled); `last` is the last failure."""

    def __init__(self, attempts: int, last: Retryable | None, *, cancelled: bool) -> None:
        super().__init__(last.reason if last else "cancelled")
        self.attempts = attempts
        self.last = last
        self.cancelled = cancelled

    @property
    def reason(self) -> str:
        if self.cancelled:
            return "the client was closed" + (
                f" (last failure: {self.last.reason})" if self.last else ""
            )
        return self.last.reason if self.last else "no attempt was made"


def run_attempts(
    op: Callable[[int], _T], policy: RetryPolicy, cancel: threading.Event, *, what: str
) -> _T:
    """Calls `op(attempt)` until it returns, raising `Retryable` counts as a failed attempt.

    Any other exception (`Fatal` included) propagates at once. Waits between attempts are
    interruptible: setting `cancel` ends the loop within the wait.

    Raises:
        AttemptsExhausted: every attempt raised `Retryable`, or `cancel` was set.
    """
    last: Retryable | None = None
    for attempt in range(1, policy.attempts + 1):
        if cancel.is_set():
            raise AttemptsExhausted(attempt - 1, last, cancelled=True)
        try:
            return op(attempt)
        except Fatal as exc:
            exc.attempts = attempt
            raise
        except Retryable as exc:
            last = exc
            if attempt == policy.attempts:
                break
            delay = policy.delay(attempt, exc.retry_after)
            _log.debug(
                "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                what, attempt, policy.attempts, exc.reason, delay,
            )  # fmt: skip
            if cancel.wait(delay):
                raise AttemptsExhausted(attempt, last, cancelled=True) from exc
    raise AttemptsExhausted(policy.attempts, last, cancelled=False) from last


def http_client(
    base_url: str, api_key: str | None, *, timeout: float, verify: bool | str
) -> httpx.Client:
    """An HTTP/1.1 connection pool that sends `api_key` to the origin of `base_url` only."""
    auth = None if api_key is None else _BearerAuth(api_key, _origin(httpx.URL(base_url)))
    return httpx.Client(
        auth=auth,
        timeout=httpx.Timeout(timeout),
        verify=_ssl_context(verify),
        follow_redirects=True,  # httpx drops Authorization when a redirect leaves the origin
        max_redirects=5,
        headers={"User-Agent": "pixcrawler-sdk"},
    )


class _BearerAuth(httpx.Auth):
    """Adds the bearer token to requests for one origin only."""

    def __init__(self, api_key: str, origin: tuple[str, str, int]) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = origin

    def __repr__(self) -> str:
        return f"_BearerAuth(origin={self._origin!r}, key=***)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    return (url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0))


def _ssl_context(verify: bool | str) -> bool | ssl.SSLContext:
    # httpx deprecates verify=<path>; a context built here trusts the bundle or folder.
    if isinstance(verify, bool):
        return verify
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if seconds == seconds else None  # NaN is not a delay
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - Python < 3.10 returned None on bad dates
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def redact_url(url: str | httpx.URL) -> str:
    """The URL without user info or query values, fit for messages and logs.

    A query string may carry a signature (presigned blob URLs), so its values are hidden.
    """
    parts = urlsplit(str(url))
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{p.partition('=')[0]}=..." for p in parts.query.split("&") if p)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def is_tls_verify_error(exc: BaseException) -> bool:
    """Whether a transport error comes from a certificate that failed verification."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain is short; the bound guards against cycles
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_transport_error(exc: Exception) -> str:
    """A short human description of an httpx transport error (no headers, no secrets)."""
    kinds: tuple[tuple[type[Exception], str], ...] = (
        (httpx.ConnectTimeout, "connecting timed out"),
        (httpx.ReadTimeout, "the server sent nothing before the read timeout"),
        (httpx.WriteTimeout, "sending the request timed out"),
        (httpx.PoolTimeout, "no free connection before the timeout"),
        (httpx.ConnectError, "could not connect"),
        (httpx.RemoteProtocolError, "the connection broke off"),
        (httpx.ReadError, "reading the response failed"),
        (httpx.WriteError, "sending the request failed"),
        (httpx.TooManyRedirects, "too many redirects"),
        (httpx.UnsupportedProtocol, "a redirect or URL with an unsupported scheme"),
    )
    label = next((text for cls, text in kinds if isinstance(exc, cls)), type(exc).__name__)
    detail = str(exc).strip()
    return f"{label} ({detail})" if detail else label


def _sha256_of(path: Path, limit: int | None = None) -> tuple[hashlib._Hash, int]:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            done += len(block)
            if limit is not None and done > limit:
                break
    return digest, done


def file_matches(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` has exactly `size` bytes with this sha256 (size checked first, cheaply)."""
    try:
        if path.stat().st_size != size:
            return False
        return _sha256_of(path)[0].hexdigest() == sha256
    except FileNotFoundError:
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@dataclass
class _Download:
    """One chunk's download state, shared by its attempts."""

    http: httpx.Client
    url: str
    index: int
    size: int
    sha256: str
    part: Path
    final: Path
    cancel: threading.Event
    report: Callable[[int], None]
    etag: str | None = None  # the strong ETag the server gave for this content, if any

    def attempt(self, number: int) -> Path:
        try:
            return self._attempt(number)
        except OSError as exc:  # the local disk, not the network: no retry helps
            raise Fatal(f"cannot write in {self.part.parent}: {exc.strerror or exc}") from exc

    def _attempt(self, number: int) -> Path:
        offset = self._resume_offset(first=number == 1)
        if offset == self.size:
            if self._finish():  # an earlier attempt or run got every byte
                return self.final
            offset = 0
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            # The protocol's ETag is the sha256, so a part left by an earlier run resumes only
            # if the server still holds the same content; otherwise it answers 200.
            headers["If-Range"] = self.etag or f'"{self.sha256}"'
        try:
            with self.http.stream("GET", self.url, headers=headers) as resp:
                offset = self._check_response(resp, offset)
                self._receive(resp, offset)
        except (httpx.UnsupportedProtocol, httpx.TooManyRedirects) as exc:
            raise Fatal(describe_transport_error(exc)) from exc
        except httpx.RequestError as exc:
            if is_tls_verify_error(exc):
                raise Fatal(f"TLS certificate verification failed ({exc})") from exc
            raise Retryable(describe_transport_error(exc)) from exc
        except httpx.InvalidURL as exc:
            raise Fatal(f"invalid URL ({exc})") from exc
        if self._finish():
            return self.final
        raise Retryable(f"sha256 mismatch (expected {self.sha256})")

    def _resume_offset(self, *, first: bool) -> int:
        """Bytes already in the part file; a part longer than the chunk is discarded."""
        try:
            offset = self.part.stat().st_size
        except FileNotFoundError:
            return 0
        if offset > self.size:
            self._discard(offset, report=not first)
            return 0
        if first and offset:
            self.report(offset)  # a part left by an earlier call: count it once
        return offset

    def _discard(self, nbytes: int, *, report: bool = True) -> None:
        _unlink(self.part)
        if report and nbytes:
            self.report(-nbytes)

    def _check_response(self, resp: httpx.Response, offset: int) -> int:
        """Maps the status to an outcome; returns the offset the body starts at."""
        code = resp.status_code
        if code in (401, 403, 404):
            raise Fatal(f"HTTP {code} {resp.reason_phrase}".rstrip())
        if code == 429 or code >= 500:
            after = parse_retry_after(resp.headers.get("Retry-After"))
            raise Retryable(f"HTTP {code} {resp.reason_phrase}".rstrip(), retry_after=after)
        etag = resp.headers.get("ETag")
        if etag and not etag.startswith("W/"):
            self.etag = etag
        if code == 206 and offset:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                self._discard(offset)
                raise Retryable(f"the server answered a range from {start}, asked for {offset}")
        elif code == 200:
            if offset:  # Range ignored, or If-Range did not match: the body is the whole chunk
                _log.debug("chunk %d: the server sent the whole chunk; restarting", self.index)
                self._discard(offset)
            start = 0
        elif code == 416:  # our part cannot be a prefix of the chunk the server holds
            self._discard(offset)
            raise Retryable("HTTP 416 Range Not Satisfiable")
        else:
            raise Fatal(f"unexpected HTTP {code} {resp.reason_phrase}".rstrip())
        # A body that cannot end at the manifest's size is refused before it is read.
        length = resp.headers.get("Content-Length", "")
        encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
        if length.isdigit() and not encoded and start + int(length) != self.size:
            raise Retryable(
                f"the server's chunk has {start + int(length)} bytes, the manifest says {self.size}"
            )
        return start

    def _receive(self, resp: httpx.Response, offset: int) -> None:
        with open(self.part, "ab" if offset else "wb") as f:
            for block in resp.iter_bytes():  # as it arrives: a break keeps what came
                if self.cancel.is_set():
                    raise Fatal("the client was closed during the download")
                if offset + len(block) > self.size:
                    f.close()
                    self._discard(offset)
                    raise Retryable(f"the server sent more than the manifest's {self.size} bytes")
                f.write(block)
                offset += len(block)
                self.report(len(block))
        if offset < self.size:
            raise Retryable(f"the body ended at byte {offset} of {self.size}")

    def _finish(self) -> bool:
        """Verifies a complete part and renames it into place; a bad one is discarded."""
        digest, size = _sha256_of(self.part, limit=self.size)
        if size == self.size and digest.hexdigest() == self.sha256:
            os.replace(self.part, self.final)
            return True
        self._discard(size)
        return False


def _content_range_start(value: str | None) -> int | None:
    """The first byte of `Content-Range: bytes START-END/TOTAL`, or None if malformed."""
    if not value or not value.startswith("bytes "):
        return None
    first = value[6:].partition("-")[0].strip()
    return int(first) if first.isdigit() else None


def download_chunk(
    http: httpx.Client,
    *,
    url: str,
    index: int,
    size: int,
    sha256: str,
    dest_dir: Path,
    policy: RetryPolicy,
    cancel: threading.Event,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Downloads one chunk to `dest_dir/<index>.zip`, verified; see NOTE [download protocol].

    Args:
        http: the client's connection pool (it adds authentication where it belongs).
        url: the chunk's absolute URL.
        index: the chunk index, for file names and messages.
        size: the chunk's size in bytes, from the manifest.
        sha256: the chunk's sha256 (lowercase hex), from the manifest.
        dest_dir: the folder to download into; created if needed.
        policy: attempts and backoff.
        cancel: set to abandon the download (the client closes).
        on_bytes: called with the number of bytes written (negative when discarded).

    Returns:
        The path of the verified `<index>.zip`.

    Raises:
        Fatal: a failure no retry can fix; the caller maps it to `DownloadError`.
        AttemptsExhausted: every attempt failed; the caller maps it to `DownloadError`.
    """
    final = dest_dir / f"{index}.zip"
    report = on_bytes or (lambda n: None)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if file_matches(final, size, sha256):
                report(size)
                return final
            _unlink(final)  # a stale or damaged copy from an earlier run
    except OSError as exc:
        failure = Fatal(f"cannot use {dest_dir} for downloads: {exc.strerror or exc}")
        failure.attempts = 0
        raise failure from exc
    job = _Download(
        http=http,
        url=url,
        index=index,
        size=size,
        sha256=sha256,
        part=dest_dir / f"{index}.zip.part",
        final=final,
        cancel=cancel,
        report=report,
    )
    return run_attempts(job.attempt, policy, cancel, what=f"chunk {index} ({redact_url(url)})")
