"""The job manifest: `JobManifest` and `ChunkInfo`, parsed and checked from the job API's JSON."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from pixcrawler_engine._errors import (
    JobNotCompleteError,
    PixCrawlerError,
)
from pixcrawler_engine.sources._http import redact_url

__all__ = ["ChunkInfo", "JobManifest", "check_complete", "parse_manifest"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class ChunkInfo:
    """One chunk of a job, as the manifest describes it; `url` is absolute."""

    index: int
    url: str
    num_images: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class JobManifest:
    """A job's manifest (`GET /api/v1/jobs/{job_id}`), chunks in index order."""

    job_id: str
    status: str
    progress: float
    created_at: str
    num_images: int
    chunk_size: int
    size_bytes: int
    labels: tuple[Any, ...]
    version: str
    chunks: tuple[ChunkInfo, ...]


def check_complete(data: Any, job_id: str) -> None:
    """Raises JobNotCompleteError unless the job is `completed`.

    Checked before the rest of the manifest is validated: an unfinished job may lack fields.
    """
    status = data.get("status") if isinstance(data, dict) else None
    if not isinstance(status, str) or status == "completed":
        return  # a missing status is a malformed manifest, reported by parse_manifest
    progress = data.get("progress")
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        progress = 0.0
    if status == "failed":
        hint = "it failed and will not complete; start a new job"
    else:
        hint = "wait until it is completed and try again"
    raise JobNotCompleteError(
        f"job {job_id!r} is {status} ({progress:g}% complete): {hint}",
        progress=float(progress),
        status=status,
    )


def _bad(source: str, what: str) -> PixCrawlerError:
    return PixCrawlerError(f"malformed job manifest from {redact_url(source)}: {what}")


def _number(data: dict[str, Any], key: str, source: str, kind: type = int) -> Any:
    value = data.get(key)
    kinds = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        raise _bad(source, f"{key!r} must be a number >= 0, got {value!r}")
    return kind(value)


def parse_manifest(data: Any, source: str, job_id: str, local: bool) -> JobManifest:
    """Checks a manifest's fields and resolves its chunk URLs against `source`."""
    if not isinstance(data, dict):
        raise _bad(source, f"expected a JSON object, got {type(data).__name__}")
    if data.get("job_id") != job_id:
        raise _bad(source, f"it describes job {data.get('job_id')!r}, not {job_id!r}")
    status = data.get("status")
    if not isinstance(status, str):
        raise _bad(source, f"'status' must be a string, got {status!r}")
    raw_chunks = data.get("chunks", [])
    if not isinstance(raw_chunks, list):
        raise _bad(source, "'chunks' must be a list")
    chunks = []
    allowed = ("file",) if local else ("http", "https")
    for i, c in enumerate(raw_chunks):
        if not isinstance(c, dict) or not isinstance(c.get("url"), str):
            raise _bad(source, f"chunks[{i}] must be an object with a string 'url'")
        sha = c.get("sha256")
        if not isinstance(sha, str) or _SHA256.fullmatch(sha.lower()) is None:
            raise _bad(source, f"chunks[{i}].sha256 must be 64 hex digits, got {sha!r}")
        url = urljoin(source, c["url"])
        if urlsplit(url).scheme.lower() not in allowed:
            raise _bad(source, f"chunks[{i}].url {redact_url(url)} must be {' or '.join(allowed)}")
        chunks.append(
            ChunkInfo(
                index=_number(c, "index", source),
                url=url,
                num_images=_number(c, "num_images", source),
                size_bytes=_number(c, "size_bytes", source),
                sha256=sha.lower(),
            )
        )
    chunks.sort(key=lambda c: c.index)
    if len({c.index for c in chunks}) != len(chunks):
        raise _bad(source, "two chunks have the same index")
    labels = data.get("labels", [])
    if not isinstance(labels, list):
        raise _bad(source, f"'labels' must be a list, got {labels!r}")
    return JobManifest(
        job_id=job_id,
        status=status,
        progress=_number(data, "progress", source, float),
        created_at=str(data.get("created_at", "")),
        num_images=_number(data, "num_images", source),
        chunk_size=_number(data, "chunk_size", source),
        size_bytes=_number(data, "size_bytes", source),
        labels=tuple(labels),
        version=str(data.get("version", "")),
        chunks=tuple(chunks),
    )
