"""The job API client: job manifests and chunk files from `http(s)://` servers or `file://` stores.

`JobClient` owns one `httpx.Client` (created on first use, closed by `close()`); for a
`file://` store it reads `<store>/jobs/<job_id>/` through `_store` and opens no socket.
Errors are mapped where they enter (see `_errors`): callers see `AuthenticationError`,
`NotFoundError`, `JobNotCompleteError`, `NetworkError`, `DownloadError` or `PixCrawlerError`,
never an httpx exception.

The API key goes only into the `Authorization` header of requests to the origin of
`base_url`: a chunk URL or redirect to another origin gets no key (httpx also strips the
header on cross-origin redirects). It is never logged, put in an error message, or written to
a file. A pickled client carries it (the supervisor process rebuilds the client from it), so
pickles of a client go through process pipes only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from pixcrawler_engine._config import EngineConfig
from pixcrawler_engine._errors import (
    DownloadError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from pixcrawler_engine.sources import _store
from pixcrawler_engine.sources._api_shape import (
    KEY_HINT,
    api_root,
    foreign_shape,
    not_a_job_api,
    raise_for_status,
)
from pixcrawler_engine.sources._http import (
    AttemptsExhausted,
    Fatal,
    Retryable,
    RetryPolicy,
    describe_transport_error,
    http_client,
    is_tls_verify_error,
    redact_url,
    run_attempts,
)
from pixcrawler_engine.sources._manifest import (
    ChunkInfo,
    JobManifest,
    check_complete,
    parse_manifest,
)
from pixcrawler_engine.sources._stamp import VerifiedFiles
from pixcrawler_engine.sources._store import file_url_path, store_chunk

if TYPE_CHECKING:  # imported where a request is made: a `file://` store needs no httpx
    import httpx

__all__ = ["JobClient"]

_SCHEMES = ("http", "https", "file")


class JobClient:
    """Reads job manifests and fetches chunk files of one PixCrawler job API or local store.

    Args:
        base_url: `https://host[/prefix]`, `http://...`, or `file:///path/to/store`.
        api_key: the bearer key for the job API; None sends none (a `file://` store needs none).
        timeout: seconds a request may go without progress (connect, read, write).
        verify_ssl: verify TLS certificates; a path to a CA bundle (file or folder) trusts it.
        retries: attempts per request, the first included.
        backoff: base of the exponential backoff between attempts, in seconds.
        retry_after_cap: the longest `Retry-After` honoured, in seconds.
        stamps: a folder where the identities of a `file://` store's chunks seen to match their
            sha256 are kept (the chunk cache's `stores/`), so that later processes trust them
            without hashing them again (NOTE [stamps]); None: each client hashes them once.

    Raises:
        ValueError: an unsupported scheme or a bad setting; the message says what works.

    The client is thread-safe: several threads may fetch chunks at once through one pool.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 300,
        verify_ssl: bool | str = True,
        retries: int = 3,
        backoff: float = 0.5,
        retry_after_cap: float = 30.0,
        stamps: str | None = None,
    ) -> None:
        if not isinstance(base_url, str) or urlsplit(base_url).scheme.lower() not in _SCHEMES:
            scheme = urlsplit(base_url).scheme if isinstance(base_url, str) else None
            raise ValueError(
                f"unsupported base_url scheme {scheme!r} in {base_url!r}: use https://host, "
                "http://host or file:///path/to/store"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if api_key is not None and (
            not isinstance(api_key, str) or not api_key or not api_key.isascii()
            or not api_key.isprintable() or any(c.isspace() for c in api_key)
        ):  # fmt: skip
            # The key itself stays out of the message: it may be a real secret with a typo.
            raise ValueError(
                "api_key must be a non-empty string of printable ASCII without spaces; "
                "check the value passed (or PIXCRAWLER_API_KEY)"
            )
        if isinstance(verify_ssl, str) and not os.path.exists(verify_ssl):
            raise ValueError(
                f"verify_ssl={verify_ssl!r} is not an existing CA bundle file or folder; "
                "pass True, False, or the path of a PEM file"
            )
        if not isinstance(verify_ssl, (bool, str)):
            raise ValueError(f"verify_ssl must be a bool or a CA bundle path, got {verify_ssl!r}")
        # A platform client's base URL ends in /api/v1; the paths below add it themselves.
        self.base_url = base_url.rstrip("/")
        if urlsplit(base_url).scheme.lower() != "file":
            self.base_url = api_root(base_url)
        self.timeout = float(timeout)
        self.verify_ssl = verify_ssl
        self._api_key = api_key
        self._policy = RetryPolicy(
            attempts=retries, backoff=backoff, retry_after_cap=retry_after_cap
        )
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._store_root: Path | None = None
        if urlsplit(base_url).scheme.lower() == "file":
            self._store_root = file_url_path(base_url).absolute()
        # Store chunks already hashed (a store is read many times), with stamps in `stamps`.
        self._verified = VerifiedFiles(Path(stamps) if stamps else None)

    @classmethod
    def from_config(cls, base_url: str, api_key: str | None, config: EngineConfig) -> JobClient:
        """A client with the network settings of an `EngineConfig`."""
        return cls(
            base_url,
            api_key,
            timeout=config.timeout,
            verify_ssl=config.verify_ssl,
            retries=config.retries,
            backoff=config.backoff,
            retry_after_cap=config.retry_after_cap,
        )

    # The settings cross to the supervisor process; the connection pool does not.
    def __reduce__(self) -> tuple[Any, ...]:
        settings = {
            "timeout": self.timeout,
            "verify_ssl": self.verify_ssl,
            "retries": self._policy.attempts,
            "backoff": self._policy.backoff,
            "retry_after_cap": self._policy.retry_after_cap,
            "stamps": None if self._verified.folder is None else str(self._verified.folder),
        }
        return (_rebuild_client, (self.base_url, self._api_key, settings))

    def __repr__(self) -> str:
        key = "None" if self._api_key is None else "***"
        return f"JobClient({redact_url(self.base_url)!r}, api_key={key})"

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection pool and interrupts retry waits; idempotent."""
        self._closed.set()
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    # ------------------------------------------------------------------------ the API calls

    def list_jobs(self) -> list[dict[str, Any]]:
        """Summaries of the jobs this key can see (`GET /api/v1/jobs`)."""
        if self._store_root is not None:
            self._check_store()
            try:
                return _store.list_jobs(self._store_root)
            except (OSError, ValueError) as exc:
                raise PixCrawlerError(f"cannot read store {self._store_root}: {exc}") from exc
        url = f"{self.base_url}/api/v1/jobs"
        data, _ = self._get_json(url, not_found=f"no job API at {redact_url(url)}")
        shape = foreign_shape(data, listing=True)
        if shape is not None:
            raise not_a_job_api(redact_url(url), shape)
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
            raise PixCrawlerError(
                f"malformed answer from {redact_url(url)}: expected {{'jobs': [...]}}; "
                "check that base_url points at a PixCrawler job API"
            )
        return jobs

    def get_job(self, job_id: str, *, require_complete: bool = True) -> JobManifest:
        """The manifest of one job, chunk URLs made absolute.

        Args:
            job_id: the job's id.
            require_complete: raise `JobNotCompleteError` unless the job is `completed`.

        Raises:
            AuthenticationError: the key is wrong (401) or has no access to the job (403).
            NotFoundError: no such job.
            JobNotCompleteError: the job is `processing` or `failed` (with require_complete).
            NetworkError: the server could not be reached after every attempt.
            PixCrawlerError: the manifest is malformed.
        """
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty string, got {job_id!r}")
        if self._store_root is not None:
            self._check_store()
            try:
                data: Any = _store.read_job(self._store_root, job_id)
            except (OSError, ValueError) as exc:
                raise PixCrawlerError(f"cannot read job {job_id!r}: {exc}") from exc
            manifest_url = (_store.job_dir(self._store_root, job_id) / "job.json").as_uri()
        else:
            url = f"{self.base_url}/api/v1/jobs/{quote(job_id, safe='')}"
            data, manifest_url = self._get_json(
                url,
                not_found=f"job {job_id!r} not found at {redact_url(self.base_url)}; "
                "check the job id (JobClient.list_jobs() lists the jobs your key can see)",
                job_id=job_id,
            )
            shape = foreign_shape(data, listing=False)
            if shape is not None:
                raise not_a_job_api(redact_url(manifest_url), shape)
        if require_complete:
            check_complete(data, job_id)
        return parse_manifest(data, manifest_url, job_id, self._store_root is not None)

    def fetch_chunk(
        self,
        chunk: ChunkInfo,
        dest_dir: Path,
        *,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Path:
        """A local, verified file of one chunk.

        Over HTTP the chunk is downloaded to `dest_dir/<index>.zip` (see NOTE [download
        protocol] in `_download`); from a `file://` store the path inside the store is
        returned after its size and sha256 are checked, without copying.

        Args:
            chunk: the chunk, from `get_job`.
            dest_dir: the download folder (one per job: files are named by chunk index). One
                fetch per (dest_dir, chunk) at a time: concurrent callers lock around it.
            on_bytes: progress callback, called with byte counts (negative when discarded).

        Raises:
            DownloadError: the chunk could not be fetched or verified; `chunk_id` names it.
        """
        url = redact_url(chunk.url)
        if self._store_root is not None:
            return self._store_chunk(chunk, on_bytes)
        if urlsplit(chunk.url).scheme.lower() not in ("http", "https"):
            raise DownloadError(
                f"chunk {chunk.index}: URL {url} is not http(s); a job API cannot point at "
                "local files",
                chunk_id=chunk.index,
            )
        from pixcrawler_engine.sources._download import download_chunk

        try:
            return download_chunk(
                self._client(),
                url=chunk.url,
                index=chunk.index,
                size=chunk.size_bytes,
                sha256=chunk.sha256,
                dest_dir=Path(dest_dir),
                policy=self._policy,
                cancel=self._closed,
                on_bytes=on_bytes,
            )
        except Fatal as exc:
            tried = f" after {exc.attempts} attempt(s), not retried" if exc.attempts else ""
            raise DownloadError(
                f"chunk {chunk.index} could not be downloaded from {url}{tried}: "
                f"{exc.reason}{_status_hint(exc.reason)}",
                chunk_id=chunk.index,
            ) from exc.__cause__
        except AttemptsExhausted as exc:
            raise DownloadError(
                f"chunk {chunk.index} could not be downloaded from {url} after {exc.attempts} "
                f"attempt(s): {exc.reason}",
                chunk_id=chunk.index,
            ) from _root_cause(exc)

    # ---------------------------------------------------------------------------- internals

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._closed.is_set():
                raise PixCrawlerError("this JobClient is closed; create a new one")
            if self._http is None:
                self._http = http_client(
                    self.base_url, self._api_key, timeout=self.timeout, verify=self.verify_ssl
                )
            return self._http

    def _get_json(self, url: str, *, not_found: str, job_id: str | None = None) -> tuple[Any, str]:
        """GETs a JSON document with retries; returns it and the final URL (after redirects)."""
        shown = redact_url(url)

        import httpx

        def attempt(number: int) -> tuple[Any, str]:
            try:
                resp = self._client().get(url, headers={"Accept": "application/json"})
            except (httpx.UnsupportedProtocol, httpx.TooManyRedirects, httpx.InvalidURL) as exc:
                raise PixCrawlerError(f"GET {shown} failed: {exc}") from exc
            except httpx.RequestError as exc:
                if is_tls_verify_error(exc):
                    raise NetworkError(
                        f"TLS certificate verification failed for {shown} ({exc}); pass "
                        "verify_ssl='/path/to/ca.pem' for a private CA (or False to skip checks)"
                    ) from exc
                raise Retryable(describe_transport_error(exc)) from exc
            raise_for_status(resp, shown, not_found=not_found, job_id=job_id,
                             has_key=bool(self._api_key))  # fmt: skip
            try:
                return resp.json(), str(resp.url)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both
                raise PixCrawlerError(
                    f"malformed JSON from {shown} ({exc}); check that base_url points at a "
                    "PixCrawler job API"
                ) from exc

        try:
            return run_attempts(attempt, self._policy, self._closed, what=f"GET {shown}")
        except AttemptsExhausted as exc:
            raise NetworkError(
                f"GET {shown} failed after {exc.attempts} attempt(s): {exc.reason}; check that "
                f"the server runs and that base_url ({redact_url(self.base_url)}) is right"
            ) from _root_cause(exc)

    def _check_store(self) -> None:
        assert self._store_root is not None
        if not (self._store_root / "jobs").is_dir():
            raise NotFoundError(
                f"no job store at {self._store_root} (no jobs/ folder); check base_url or "
                "create one with `pixcrawler pack`"
            )

    def _store_chunk(self, chunk: ChunkInfo, on_bytes: Callable[[int], None] | None) -> Path:
        assert self._store_root is not None
        return store_chunk(self._store_root, chunk, self._verified, on_bytes)


def _root_cause(exc: AttemptsExhausted) -> BaseException | None:
    """The library error behind the last failed attempt (if any), for `raise ... from`."""
    return exc.last.__cause__ if exc.last is not None else None


def _rebuild_client(base_url: str, api_key: str | None, settings: dict[str, Any]) -> JobClient:
    return JobClient(base_url, api_key, **settings)


def _status_hint(reason: str) -> str:
    if reason.startswith(("HTTP 401", "HTTP 403")):
        return f"; {KEY_HINT}"
    if reason.startswith("HTTP 404"):
        return "; the chunk is gone from the server (the job may have been re-packed)"
    return ""
