"""Resumable, verified chunk downloads: `download_chunk` (the HTTP client is in `_http`).

This module owns the files it writes in `dest_dir` (`<index>.zip.part`, then `<index>.zip`).

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

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from pixcrawler_engine.sources._http import (
    Fatal,
    Retryable,
    RetryPolicy,
    describe_transport_error,
    is_tls_verify_error,
    parse_retry_after,
    redact_url,
    run_attempts,
)
from pixcrawler_engine.sources._stamp import file_matches, sha256_of

__all__ = ["download_chunk"]

_log = logging.getLogger("pixcrawler_engine.download")


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
        digest, size = sha256_of(self.part, limit=self.size)
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
