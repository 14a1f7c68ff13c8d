"""Remote Parquet files read with HTTP Range requests: random access for footers, streams for data.

`HttpFile` is one remote file. `random_access()` gives pyarrow a seekable file object (each
read is one Range request: the footer and the small columns); `stream(start, length)` reads a
byte range sequentially with one request, resumed with a new Range from where it broke off
(a column chunk of images, never held whole). Every request goes through `run_attempts` of
`_download`: network errors, 5xx and 429 are retried with backoff (`Retry-After` honoured);
401/403/404 are not. A server that ignores Range, or a file whose ETag changes between
requests, is refused: the bytes would not be the ones the footer describes.

Errors leave as `DownloadError` with the URL redacted (no query values, no user info).
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pixcrawler_engine._errors import DownloadError
from pixcrawler_engine.sources._http import (
    AttemptsExhausted,
    Fatal,
    Retryable,
    RetryPolicy,
    describe_transport_error,
    parse_retry_after,
    redact_url,
    run_attempts,
)

if TYPE_CHECKING:  # imported where a request is made: local shards need no httpx
    import httpx

__all__ = ["HttpFile"]

BLOCK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_FATAL = {401: "unauthorized (401)", 403: "forbidden (403)", 404: "not found (404)", 410: "gone"}


@dataclass
class HttpFile:
    """One remote file, read by byte ranges.

    Attributes:
        client: the connection pool (owned by the caller).
        url: the file's URL.
        retry: attempts and backoff per request.
        cancel: set to stop waiting between attempts (the source is closing).
        size: the file's size, learnt by `open` from the first response.
        etag: its ETag, if the server sends one; every later response must match it.
    """

    client: httpx.Client
    url: str
    retry: RetryPolicy
    cancel: threading.Event
    size: int = -1
    etag: str | None = None

    def open(self) -> HttpFile:
        """Learns the size (and ETag) with a one-byte Range request."""
        with self._response(0, 1, learn=True):
            pass
        return self

    def read(self, start: int, length: int) -> bytes:
        """The `length` bytes at `start` (fewer only at the end of the file)."""
        with self.stream(start, length) as stream:
            return stream.read()

    def stream(self, start: int, length: int) -> _RangeStream:
        """A sequential reader of `length` bytes from `start`, resumed if the connection breaks."""
        return _RangeStream(self, start, max(0, min(length, self.size - start)))

    def random_access(self) -> _RandomAccess:
        """A seekable file object for pyarrow, one Range request per read."""
        return _RandomAccess(self)

    def what(self, start: int, end: int) -> str:
        return f"{redact_url(self.url)} (bytes {start}-{end - 1})"

    # ---- one request ----------------------------------------------------------------------
    def _response(self, start: int, end: int, *, learn: bool = False) -> _Open:
        """Sends the Range request for [start, end), with retries; the caller closes it."""
        return _Open(self._attempts(lambda _n: self._send(start, end, learn), start, end))

    def _send(self, start: int, end: int, learn: bool = False) -> httpx.Response:
        """One attempt at the Range request; raises `Retryable` or `Fatal`."""
        import httpx

        request = self.client.build_request(
            "GET",
            self.url,
            headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
        )
        try:
            response = self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise Retryable(describe_transport_error(exc)) from exc
        try:
            self._check(response, start, learn=learn)
        except BaseException:
            response.close()
            raise
        return response

    def _check(self, response: httpx.Response, start: int, *, learn: bool) -> None:
        status = response.status_code
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != start:
                raise Fatal(
                    "the server answered another range "
                    f"({response.headers.get('content-range')!r} for bytes {start}-)"
                )
            etag = response.headers.get("etag")
            if learn:
                self.etag = etag
                if match.group(3) == "*":
                    raise Fatal("the server does not say the file's size (Content-Range */*)")
                self.size = int(match.group(3))
            elif etag != self.etag:
                raise Fatal(
                    f"the file changed on the server while it was read (ETag {self.etag} -> "
                    f"{etag}); start again"
                )
            return
        if status == 200:
            raise Fatal(
                "the server ignores Range requests, so a row group cannot be read without "
                "downloading the whole file; download it and pass its local path"
            )
        if status in _FATAL:
            raise Fatal(_FATAL[status])
        if status == 429 or status >= 500:
            raise Retryable(
                f"HTTP {status}", retry_after=parse_retry_after(response.headers.get("retry-after"))
            )
        raise Fatal(f"unexpected HTTP {status}")

    def _attempts(self, op: Any, start: int, end: int) -> Any:
        try:
            return run_attempts(op, self.retry, self.cancel, what=self.what(start, end))
        except Fatal as exc:
            raise DownloadError(f"{self.what(start, end)}: {exc.reason}") from exc
        except AttemptsExhausted as exc:
            raise DownloadError(
                f"{self.what(start, end)}: {exc.reason}, after {exc.attempts} attempts"
            ) from exc


class _Open:
    """A response to close after use (`with`)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __enter__(self) -> httpx.Response:
        return self.response

    def __exit__(self, *exc: object) -> None:
        self.response.close()


class _RangeStream(io.RawIOBase):
    """Reads [start, start + length) of an `HttpFile` in order, reconnecting where it broke."""

    def __init__(self, file: HttpFile, start: int, length: int) -> None:
        super().__init__()
        self.file = file
        self.pos = start
        self.end = start + length
        self._response: httpx.Response | None = None
        self._blocks: Iterator[bytes] | None = None
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self.pos < self.end:
            if not self._pending:
                self._pending = memoryview(self._next_block())
            take = min(len(self._pending), len(view) - done)
            view[done : done + take] = self._pending[:take]
            self._pending = self._pending[take:]
            self.pos += take
            done += take
        return done

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.end - self.pos
        out = bytearray(min(size, max(0, self.end - self.pos)))
        n = self.readinto(out)
        return bytes(out[:n]) if n < len(out) else bytes(out)

    def _next_block(self) -> bytes:
        import httpx

        def attempt(_number: int) -> bytes:
            if self._blocks is None:
                self._response = self.file._send(self.pos, self.end)
                self._blocks = self._response.iter_raw(BLOCK)
            try:
                block = next(self._blocks)
            except StopIteration:
                self._drop()
                raise Retryable("the response ended before the range did") from None
            except httpx.TransportError as exc:
                self._drop()
                raise Retryable(describe_transport_error(exc)) from exc
            return block[: self.end - self.pos]

        block: bytes = self.file._attempts(attempt, self.pos, self.end)
        return block

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._blocks = None, None

    def close(self) -> None:
        self._drop()
        super().close()


class _RandomAccess(io.RawIOBase):
    """A seekable, read-only file object over an `HttpFile` (what pyarrow's reader asks for)."""

    def __init__(self, file: HttpFile) -> None:
        super().__init__()
        self.file = file
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.file.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        with self.file.stream(self.pos, len(view)) as stream:
            n = stream.readinto(view)
        self.pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.file.size - self.pos
        data = self.file.read(self.pos, size)
        self.pos += len(data)
        return data
