"""The exception tree of PixCrawler, shared by the engine and the SDK.

    PixCrawlerError (base)
    ├── AuthenticationError      # 401/403: invalid API key, or a key without access to the job
    ├── NotFoundError            # 404: unknown job or chunk
    ├── JobNotCompleteError      # job still processing (or failed); `.progress`, `.status`
    ├── DownloadError            # chunk download failed after its attempts; `.chunk_id`
    ├── DecompressionError       # chunk extraction failed (bad zip, bad manifest); `.chunk_id`
    ├── NetworkError             # connection or timeout talking to the API
    ├── DecodeError              # one sample could not be decoded; `.chunk_id`, `.key`
    │   └── UnsupportedImageError    # a valid image in a format or feature not supported
    └── WorkerError              # an engine process died or hung; `.pid`, `.exitcode`
        └── SharedMemoryError    # /dev/shm too small or full, or a slot gone

Library errors (httpx, Pillow, pyarrow, zipfile) are translated where they enter, with
`raise ... from exc`; callers never see a library's private exception. The SDK re-exports
this tree from `pixcrawler.exceptions`.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "DecodeError",
    "DecompressionError",
    "DownloadError",
    "JobNotCompleteError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
    "SharedMemoryError",
    "UnsupportedImageError",
    "WorkerError",
]


class PixCrawlerError(Exception):
    """Base class of every error PixCrawler raises on purpose."""


class AuthenticationError(PixCrawlerError):
    """The API key is missing, wrong, or has no access to the job (HTTP 401/403)."""


class NotFoundError(PixCrawlerError):
    """The job (or one of its chunks) does not exist (HTTP 404)."""


class JobNotCompleteError(PixCrawlerError):
    """The job is not `completed` yet; `progress` is its percentage (0-100)."""

    def __init__(self, message: str, *, progress: float = 0.0, status: str = "processing") -> None:
        super().__init__(message)
        self.progress = progress
        self.status = status

    def __reduce__(self):  # keep the attributes across processes
        return (_rebuild, (type(self), self.args, self.__dict__))


class DownloadError(PixCrawlerError):
    """A chunk could not be downloaded after every attempt; `chunk_id` names it."""

    def __init__(self, message: str, *, chunk_id: int | str | None = None) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class DecompressionError(PixCrawlerError):
    """A chunk is not a readable archive, or its manifest is malformed; never retried."""

    def __init__(self, message: str, *, chunk_id: int | str | None = None) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class NetworkError(PixCrawlerError):
    """The API could not be reached (connection refused, DNS, TLS, timeout)."""


class DecodeError(PixCrawlerError):
    """One sample is corrupt, truncated, not an image, or over the pixel budget."""

    def __init__(
        self, message: str, *, chunk_id: int | str | None = None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.chunk_id = chunk_id
        self.key = key

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class UnsupportedImageError(DecodeError):
    """A valid image that the decoders cannot read (a 12-bit JPEG, a codec libtiff lacks).

    Unlike a corrupt file, fetching it again does not help: convert it (to 8-bit PNG or
    JPEG, say), or skip such samples.
    """


class WorkerError(PixCrawlerError):
    """An engine process died, hung or could not start; `pid` and `exitcode` say which."""

    def __init__(
        self, message: str, *, pid: int | None = None, exitcode: int | None = None
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class SharedMemoryError(WorkerError):
    """/dev/shm cannot hold the run's slots: it is too small, or full; the message says which."""


def _rebuild(cls: type[BaseException], args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc
