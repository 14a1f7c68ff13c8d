"""The public exception tree of PixCrawler (re-exported from `pixcrawler_engine._errors`).

    PixCrawlerError (base)
    ├── AuthenticationError      # invalid API key (401), or no access to the job (403)
    ├── NotFoundError            # job not found (404)
    ├── JobNotCompleteError      # job still processing (or failed); `.progress`, `.status`
    ├── DownloadError            # chunk download failed after its retries; `.chunk_id`
    ├── DecompressionError       # chunk extraction failed (bad zip or manifest); `.chunk_id`
    ├── NetworkError             # network or timeout issues reaching the API
    ├── DecodeError              # one image could not be decoded; `.chunk_id`, `.key`
    │   └── UnsupportedImageError    # a valid image the decoders cannot read (12-bit JPEG, ...)
    └── WorkerError              # an engine process died or hung; `.pid`, `.exitcode`

Example:
    >>> from pixcrawler.exceptions import JobNotCompleteError
    >>> try:
    ...     dataset = load_dataset("job_123", api_key="key")
    ... except JobNotCompleteError as e:
    ...     print(f"Job still processing: {e.progress}% complete")
"""

from __future__ import annotations

from pixcrawler_engine._errors import (
    AuthenticationError,
    DecodeError,
    DecompressionError,
    DownloadError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
    UnsupportedImageError,
    WorkerError,
)

__all__ = [
    "AuthenticationError",
    "DecodeError",
    "DecompressionError",
    "DownloadError",
    "JobNotCompleteError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
    "UnsupportedImageError",
    "WorkerError",
]
