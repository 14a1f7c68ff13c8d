"""The PixCrawler ingestion engine: supervisor, decode workers, shared-memory Arrow transport.

The engine never imports the SDK (`pixcrawler`); every worker process imports this package, so
it stays free of torch and tensorflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixcrawler_engine._config import DecodePolicy, EngineConfig
    from pixcrawler_engine._errors import (
        AuthenticationError,
        DecodeError,
        DecompressionError,
        DownloadError,
        JobNotCompleteError,
        NetworkError,
        NotFoundError,
        PixCrawlerError,
        SharedMemoryError,
        UnsupportedImageError,
        WorkerError,
    )
    from pixcrawler_engine.decode._image import decode_image, probe
    from pixcrawler_engine.decode._mask import decode_mask
    from pixcrawler_engine.decode._plan import output_shape
    from pixcrawler_engine.export._driver import EXPORT_FORMATS, ExportResult, export_job
    from pixcrawler_engine.runtime._batch import (
        image_views,
        labels_of,
        mask_views,
        read_batch,
        schema_for,
        write_batch,
    )
    from pixcrawler_engine.runtime._chunk import decode_chunk, decode_records
    from pixcrawler_engine.runtime._stream import Batch, SampleWarning, Stream
    from pixcrawler_engine.sources._base import (
        ChunkPlan,
        JobSource,
        Source,
        SubsetSource,
        ZipOpener,
    )
    from pixcrawler_engine.sources._cache import CacheWarning, ChunkCache
    from pixcrawler_engine.sources._cached_source import CachedSource
    from pixcrawler_engine.sources._jobapi import JobClient
    from pixcrawler_engine.sources._manifest import JobManifest
    from pixcrawler_engine.sources._pack import pack
    from pixcrawler_engine.sources._record import Record
    from pixcrawler_engine.sources.parquet._source import ParquetSource

# Names are imported on first use: the CLI and every worker import this package, and most
# of them need only a part of it (pyarrow and multiprocess are slow to import).
_LAZY = {
    "JobClient": "pixcrawler_engine.sources._jobapi",
    "JobManifest": "pixcrawler_engine.sources._manifest",
    "pack": "pixcrawler_engine.sources._pack",
    "decode_image": "pixcrawler_engine.decode._image",
    "probe": "pixcrawler_engine.decode._image",
    "decode_mask": "pixcrawler_engine.decode._mask",
    "output_shape": "pixcrawler_engine.decode._plan",
    "DecodePolicy": "pixcrawler_engine._config",
    "EngineConfig": "pixcrawler_engine._config",
    "AuthenticationError": "pixcrawler_engine._errors",
    "DecodeError": "pixcrawler_engine._errors",
    "DecompressionError": "pixcrawler_engine._errors",
    "DownloadError": "pixcrawler_engine._errors",
    "JobNotCompleteError": "pixcrawler_engine._errors",
    "NetworkError": "pixcrawler_engine._errors",
    "NotFoundError": "pixcrawler_engine._errors",
    "PixCrawlerError": "pixcrawler_engine._errors",
    "SharedMemoryError": "pixcrawler_engine._errors",
    "UnsupportedImageError": "pixcrawler_engine._errors",
    "WorkerError": "pixcrawler_engine._errors",
    "EXPORT_FORMATS": "pixcrawler_engine.export._driver",
    "ExportResult": "pixcrawler_engine.export._driver",
    "export_job": "pixcrawler_engine.export._driver",
    "image_views": "pixcrawler_engine.runtime._batch",
    "labels_of": "pixcrawler_engine.runtime._batch",
    "mask_views": "pixcrawler_engine.runtime._batch",
    "read_batch": "pixcrawler_engine.runtime._batch",
    "schema_for": "pixcrawler_engine.runtime._batch",
    "write_batch": "pixcrawler_engine.runtime._batch",
    "decode_chunk": "pixcrawler_engine.runtime._chunk",
    "decode_records": "pixcrawler_engine.runtime._chunk",
    "Batch": "pixcrawler_engine.runtime._stream",
    "SampleWarning": "pixcrawler_engine.runtime._stream",
    "Stream": "pixcrawler_engine.runtime._stream",
    "ChunkPlan": "pixcrawler_engine.sources._base",
    "JobSource": "pixcrawler_engine.sources._base",
    "Source": "pixcrawler_engine.sources._base",
    "SubsetSource": "pixcrawler_engine.sources._base",
    "ZipOpener": "pixcrawler_engine.sources._base",
    "CachedSource": "pixcrawler_engine.sources._cached_source",
    "CacheWarning": "pixcrawler_engine.sources._cache",
    "ChunkCache": "pixcrawler_engine.sources._cache",
    "Record": "pixcrawler_engine.sources._record",
    "ParquetSource": "pixcrawler_engine.sources.parquet._source",
}

__all__ = [
    "EXPORT_FORMATS",
    "AuthenticationError",
    "Batch",
    "CacheWarning",
    "CachedSource",
    "ChunkCache",
    "ChunkPlan",
    "DecodeError",
    "DecodePolicy",
    "DecompressionError",
    "DownloadError",
    "EngineConfig",
    "ExportResult",
    "JobClient",
    "JobManifest",
    "JobNotCompleteError",
    "JobSource",
    "NetworkError",
    "NotFoundError",
    "ParquetSource",
    "PixCrawlerError",
    "Record",
    "SampleWarning",
    "SharedMemoryError",
    "Source",
    "Stream",
    "SubsetSource",
    "UnsupportedImageError",
    "WorkerError",
    "ZipOpener",
    "decode_chunk",
    "decode_image",
    "decode_mask",
    "decode_records",
    "export_job",
    "image_views",
    "labels_of",
    "mask_views",
    "output_shape",
    "pack",
    "probe",
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
