"""Hugging Face-style Parquet shards as a dataset: the address test and the picklable ref.

`load_dataset` sends an address that `is_parquet_address` accepts here instead of to the job
API. `ParquetRef` plays the part `JobRef` plays for a job: it builds engine sources (one chunk
per Parquet row group, through `pixcrawler_engine.ParquetSource`) and carries a
job-shaped `JobManifest` of the data (the address as job id, status `completed`, one chunk
per row group, the ClassLabel names as labels), so that `DatasetInfo`, the framework adapters
and `LocalChunks` treat both kinds of dataset alike.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pixcrawler_engine.sources._base import Source, SubsetSource
from pixcrawler_engine.sources._manifest import ChunkInfo, JobManifest
from pixcrawler_engine.sources.parquet._source import ParquetSource

__all__ = ["ParquetRef", "is_parquet_address", "local_lookalike"]

_SUFFIX = ".parquet"


def is_parquet_address(address: object) -> bool:
    """Whether `load_dataset`'s first argument names Parquet data rather than a job id.

    A job id is a job id, whatever is on disk: a bare name like `photos` is never read as a
    local folder. Parquet addresses say what they are: a path object; a `file://` URL; an
    `http(s)://` URL whose path ends in `.parquet`; a path that starts with `./`, `../`, `/`
    or `~`, or that ends in `.parquet` (globs included). Anything else takes `source=`.
    """
    if isinstance(address, os.PathLike):
        return True
    if not isinstance(address, str) or not address:
        return False
    parts = urlsplit(address)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return parts.path.lower().endswith(_SUFFIX)
    if scheme == "file":
        return True
    if address.lower().endswith(_SUFFIX):
        return True
    starts = ("./", "../", "/", "~", "." + os.sep, ".." + os.sep, os.sep)
    return address.startswith(starts) or address in (".", "..")


def local_lookalike(job_id: str) -> str | None:
    """A note for a job id that was not found but names a local file or folder."""
    if not job_id or not os.path.exists(os.path.expanduser(job_id)):
        return None
    return (
        f"; there is a local {'folder' if os.path.isdir(job_id) else 'file'} {job_id!r}: to "
        f"load its Parquet data, pass './{job_id}' or source='parquet'"
    )


def _local_path(address: str) -> str:
    if address.lower().startswith("file://"):
        return url2pathname(urlsplit(address).path)
    return os.path.expanduser(address)


@dataclass(frozen=True, kw_only=True)
class ParquetRef:
    """Everything a process needs to read Parquet shards as a dataset; no open file.

    Attributes:
        address: the address the dataset was loaded from (its `job_id`).
        parquet: the source, footers read; each `source()` call gets its own copy.
        manifest: the data described as a job (one chunk per row group).
    """

    address: str
    parquet: ParquetSource
    manifest: JobManifest

    @classmethod
    def open(
        cls,
        address: str | os.PathLike[str],
        *,
        token: str | None = None,
        timeout: float = 300.0,
        verify_ssl: bool | str = True,
    ) -> ParquetRef:
        """Reads the footers of the Parquet files at `address` (nothing else).

        Raises:
            FileNotFoundError: no Parquet file at a local address.
            DecompressionError: a file is not Parquet, or files of different columns.
            DownloadError: a remote footer could not be read.
            ValueError: no image column.
        """
        text = os.fspath(address)
        scheme = urlsplit(text).scheme.lower()
        target = text if scheme in ("http", "https") else _local_path(text)
        source = ParquetSource(target, token=token, timeout=timeout, verify_ssl=verify_ssl)
        plans = source.plan()
        files = source.files
        summary = source.describe()
        version = hashlib.sha256(
            json.dumps([files, [(p.num_records, p.size_bytes) for p in plans]]).encode()
        ).hexdigest()[:16]
        manifest = JobManifest(
            job_id=text,
            status="completed",
            progress=100.0,
            created_at="",
            num_images=summary["num_images"],
            chunk_size=summary["chunk_size"],
            size_bytes=summary["size_bytes"],
            labels=tuple(source.labels),
            version=version,
            chunks=tuple(
                ChunkInfo(
                    index=p.index, url=text, num_images=p.num_records,
                    size_bytes=p.size_bytes, sha256="",
                )
                for p in plans
            ),
        )  # fmt: skip
        return cls(address=text, parquet=source, manifest=manifest)

    def source(self, chunks: list[int] | None = None) -> Source:
        """An engine source over the data (some `chunks` only, in that order); caller closes it."""
        # A copy: closing a source cancels its HTTP reads, and the ref outlives every pass.
        source: Source = copy.copy(self.parquet)
        if chunks is not None:
            source = SubsetSource(source, chunks)
        return source
