"""HTTP plumbing shared by every remote source: the client, attempts with backoff, error texts.

Retries follow DESIGN §4: network errors, 5xx and 429 (`Retry-After` honoured, capped) are
retried with exponential backoff and jitter; 401/403/404 never are. The API key goes only to
the origin it was given for (`_BearerAuth`), so a cross-origin redirect never carries it.
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AttemptsExhausted",
    "Fatal",
    "RetryPolicy",
    "Retryable",
    "describe_transport_error",
    "http_client",
    "is_tls_verify_error",
    "parse_retry_after",
    "redact_url",
    "run_attempts",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}


_T = TypeVar("_T")


_log = logging.getLogger("pixcrawler_engine.download")


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
    """An HTTP/1.1 connection pool that sends `api_key` to the origin of `base_url` only.

    httpx is imported here, not with this module: a `file://` job never needs it (~60 ms)."""
    import httpx

    auth = None if api_key is None else _bearer_auth(api_key, _origin(httpx.URL(base_url)))
    return httpx.Client(
        auth=auth,
        timeout=httpx.Timeout(timeout),
        verify=_ssl_context(verify),
        follow_redirects=True,  # httpx drops Authorization when a redirect leaves the origin
        max_redirects=5,
        headers={"User-Agent": "pixcrawler-sdk"},
    )


def _bearer_auth(api_key: str, origin: tuple[str, str, int]) -> httpx.Auth:
    """An `httpx.Auth` that adds the bearer token to requests for one origin only."""
    import httpx

    class _BearerAuth(httpx.Auth):
        def __init__(self) -> None:
            self._header = f"Bearer {api_key}"

        def __repr__(self) -> str:
            return f"_BearerAuth(origin={origin!r}, key=***)"

        def auth_flow(
            self, request: httpx.Request
        ) -> Generator[httpx.Request, httpx.Response, None]:
            if _origin(request.url) == origin:
                request.headers["Authorization"] = self._header
            yield request

    return _BearerAuth()


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
    import httpx

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
