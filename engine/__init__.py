"""The PixCrawler ingestion engine: supervisor, decode workers, shared-memory Arrow transport.

The engine never imports the SDK (`pixcrawler`); every worker process imports this package, so
it stays free of torch and tensorflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixcrawler.engine._batch import (
        image_views,
        labels_of,
        mask_views,
        read_batch,
        schema_for,
        write_batch,
    )
    from pixcrawler.engine._cache import CachedSource, ChunkCache
    from pixcrawler.engine._config import DecodePolicy, EngineConfig
    from pixcrawler.engine._errors import (
        AuthenticationError,
        DecodeError,
        DecompressionError,
        DownloadError,
        JobNotCompleteError,
        NetworkError,
        NotFoundError,
        PixCrawlerError,
        WorkerError,
    )
    from pixcrawler.engine._parquet import ParquetSource
    from pixcrawler.engine._protocol import Record
    from pixcrawler.engine._sinks import EXPORT_FORMATS, ExportResult, export_job
    from pixcrawler.engine._sources import ChunkPlan, JobSource, Source, SubsetSource, ZipOpener
    from pixcrawler.engine._stream import Batch, SampleWarning, Stream
    from pixcrawler.engine._worker import decode_chunk, decode_records

# Names are imported on first use: the CLI and every worker import this package, and most
# of them need only a part of it (pyarrow and multiprocess are slow to import).
_LAZY = {
    "CachedSource": "pixcrawler.engine._cache",
    "ChunkCache": "pixcrawler.engine._cache",
    "EXPORT_FORMATS": "pixcrawler.engine._sinks",
    "ExportResult": "pixcrawler.engine._sinks",
    "ParquetSource": "pixcrawler.engine._parquet",
    "export_job": "pixcrawler.engine._sinks",
    "mask_views": "pixcrawler.engine._batch",
    "AuthenticationError": "pixcrawler.engine._errors",
    "Batch": "pixcrawler.engine._stream",
    "ChunkPlan": "pixcrawler.engine._sources",
    "DecodeError": "pixcrawler.engine._errors",
    "DecodePolicy": "pixcrawler.engine._config",
    "DecompressionError": "pixcrawler.engine._errors",
    "DownloadError": "pixcrawler.engine._errors",
    "EngineConfig": "pixcrawler.engine._config",
    "JobNotCompleteError": "pixcrawler.engine._errors",
    "JobSource": "pixcrawler.engine._sources",
    "NetworkError": "pixcrawler.engine._errors",
    "NotFoundError": "pixcrawler.engine._errors",
    "PixCrawlerError": "pixcrawler.engine._errors",
    "Record": "pixcrawler.engine._protocol",
    "SampleWarning": "pixcrawler.engine._stream",
    "Source": "pixcrawler.engine._sources",
    "Stream": "pixcrawler.engine._stream",
    "SubsetSource": "pixcrawler.engine._sources",
    "WorkerError": "pixcrawler.engine._errors",
    "ZipOpener": "pixcrawler.engine._sources",
    "decode_chunk": "pixcrawler.engine._worker",
    "decode_records": "pixcrawler.engine._worker",
    "image_views": "pixcrawler.engine._batch",
    "labels_of": "pixcrawler.engine._batch",
    "read_batch": "pixcrawler.engine._batch",
    "schema_for": "pixcrawler.engine._batch",
    "write_batch": "pixcrawler.engine._batch",
}

__all__ = [
    "EXPORT_FORMATS",
    "AuthenticationError",
    "Batch",
    "CachedSource",
    "ChunkCache",
    "ChunkPlan",
    "DecodeError",
    "DecodePolicy",
    "DecompressionError",
    "DownloadError",
    "EngineConfig",
    "ExportResult",
    "JobNotCompleteError",
    "JobSource",
    "NetworkError",
    "NotFoundError",
    "ParquetSource",
    "PixCrawlerError",
    "Record",
    "SampleWarning",
    "Source",
    "Stream",
    "SubsetSource",
    "WorkerError",
    "ZipOpener",
    "decode_chunk",
    "decode_records",
    "export_job",
    "image_views",
    "labels_of",
    "mask_views",
    "read_batch",
    "schema_for",
    "write_batch",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
