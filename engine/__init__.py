"""The PixCrawler ingestion engine: supervisor, decode workers, shared-memory Arrow transport.

The engine never imports the SDK (`pixcrawler`); every worker process imports this package, so
it stays free of torch and tensorflow.
"""

from __future__ import annotations

from pixcrawler.engine._batch import image_views, labels_of, read_batch, schema_for, write_batch
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
from pixcrawler.engine._protocol import Record
from pixcrawler.engine._sources import ChunkPlan, JobSource, Source, SubsetSource, ZipOpener
from pixcrawler.engine._stream import Batch, SampleWarning, Stream
from pixcrawler.engine._worker import decode_chunk, decode_records

__all__ = [
    "AuthenticationError",
    "Batch",
    "ChunkPlan",
    "DecodeError",
    "DecodePolicy",
    "DecompressionError",
    "DownloadError",
    "EngineConfig",
    "JobNotCompleteError",
    "JobSource",
    "NetworkError",
    "NotFoundError",
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
    "image_views",
    "labels_of",
    "read_batch",
    "schema_for",
    "write_batch",
]
