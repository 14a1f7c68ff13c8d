"""The local job store: its layout, and reading jobs and chunks back (`pack` writes it).

Layout (DESIGN §2), written by `pack`, served by `pixcrawler serve`, read by the `file://` source:

    <store>/jobs/<job_id>/job.json            the job manifest (chunk urls relative)
    <store>/jobs/<job_id>/chunks/<index>.zip  manifest.jsonl + the images, stored as they are

Entries of `<store>/jobs/` whose name starts with a dot
are work in progress (or left by a killed run) and are never listed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pixcrawler_engine._errors import DownloadError, NotFoundError
from pixcrawler_engine.decode._formats import FORMAT_EXTENSIONS
from pixcrawler_engine.sources._http import redact_url
from pixcrawler_engine.sources._manifest import ChunkInfo
from pixcrawler_engine.sources._stamp import VerifiedFiles, file_matches

__all__ = [
    "IMAGE_FORMATS",
    "JOB_STATUSES",
    "chunk_path",
    "file_url_path",
    "job_dir",
    "list_jobs",
    "read_job",
    "store_chunk",
    "validate_job_id",
]

# Pillow format name -> the extension members get in a chunk zip: what the decoder reads.
IMAGE_FORMATS: dict[str, str] = dict(FORMAT_EXTENSIONS)
JOB_STATUSES = ("completed", "processing", "failed")

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_job_id(job_id: str) -> str:
    """Returns `job_id` if it is a safe job id, else raises ValueError saying what is allowed."""
    if not isinstance(job_id, str) or _JOB_ID.fullmatch(job_id) is None:
        raise ValueError(
            f"invalid job id {job_id!r}: use 1-128 characters from letters, digits, '_', '.' "
            "and '-', starting with a letter or a digit (for example 'job_123')"
        )
    return job_id


def job_dir(store: str | os.PathLike[str], job_id: str) -> Path:
    """The folder of one job; the id is validated, so the path never leaves `<store>/jobs/`."""
    return Path(store) / "jobs" / validate_job_id(job_id)


def read_job(store: str | os.PathLike[str], job_id: str) -> dict[str, Any]:
    """Reads `job.json` of one job.

    Raises:
        NotFoundError: no job with this id in the store (or an invalid id).
        ValueError: job.json exists but is not a JSON object.
    """
    try:
        path = job_dir(store, job_id) / "job.json"
    except ValueError as exc:
        raise NotFoundError(f"job {job_id!r} not found: {exc}") from exc
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFoundError(f"job {job_id!r} not found in store {os.fspath(store)}") from exc
    job = json.loads(text)
    if not isinstance(job, dict):
        raise ValueError(f"{path} is not a JSON object; re-pack the job with `pixcrawler pack`")
    return job


def list_jobs(store: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Summaries of every job in the store (job.json without `chunks`, plus `num_chunks`)."""
    jobs = Path(store) / "jobs"
    if not jobs.is_dir():
        return []
    summaries = []
    for entry in sorted(jobs.iterdir()):
        if _JOB_ID.fullmatch(entry.name) is None or not (entry / "job.json").is_file():
            continue  # temporary folders of a pack in progress start with a dot
        job = read_job(store, entry.name)
        chunks = job.pop("chunks", [])
        job["num_chunks"] = len(chunks)
        summaries.append(job)
    return summaries


def chunk_path(store: str | os.PathLike[str], job_id: str, index: int) -> Path:
    """The zip of chunk `index` of a job.

    Raises:
        NotFoundError: unknown job, or no such chunk.
    """
    job = read_job(store, job_id)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise NotFoundError(f"chunk {index!r} of job {job_id!r} not found")
    if index >= len(job.get("chunks", [])):
        raise NotFoundError(
            f"chunk {index} of job {job_id!r} not found (the job has {len(job['chunks'])})"
        )
    path = job_dir(store, job_id) / "chunks" / f"{index}.zip"
    if not path.is_file():
        raise NotFoundError(f"chunk {index} of job {job_id!r} is missing from {path.parent}")
    return path


def file_url_path(url: str) -> Path:
    """The local path a `file://` URL names (a host other than localhost is refused)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file:// URLs must name a local path (file:///path/to/store), got host "
            f"{parts.netloc!r} in {url!r}"
        )
    return Path(url2pathname(parts.path))


def store_chunk(
    root: Path, chunk: ChunkInfo, verified: VerifiedFiles, on_bytes: Callable[[int], None] | None
) -> Path:
    """The path of a chunk of a `file://` store, checked against its manifest entry.

    The file must lie inside `root` and match its size and sha256; `verified` remembers the
    files already hashed (and may keep stamps of them), so a file is hashed once.
    """

    def fail(reason: str) -> NoReturn:
        raise DownloadError(f"chunk {chunk.index}: {reason}", chunk_id=chunk.index)

    if urlsplit(chunk.url).scheme.lower() != "file":
        fail(f"URL {redact_url(chunk.url)} is not in the store {root}")
    path = file_url_path(chunk.url)
    root = root.resolve()
    if not path.resolve().is_relative_to(root):
        fail(f"{path} is outside the store {root}; the job.json is not trustworthy")
    try:
        st = path.stat()
    except OSError as exc:
        fail(f"cannot read {path} ({exc.strerror or exc}); re-pack the job")
    if not verified.trusted(path, st, chunk.sha256):
        if not file_matches(path, chunk.size_bytes, chunk.sha256):
            fail(
                f"{path} does not match its manifest (size {st.st_size}, expected "
                f"{chunk.size_bytes} bytes with sha256 {chunk.sha256}); re-pack the job"
            )
        verified.add(path, st, chunk.sha256)
    if on_bytes is not None:
        on_bytes(chunk.size_bytes)
    return path
