"""PixCrawler: load image datasets lazily, as numpy, pandas, PyTorch or TensorFlow data.

    >>> from pixcrawler import load_dataset
    >>> dataset = load_dataset("job_abc123", api_key="your_api_key")
    >>> for image, label in dataset:
    ...     print(image.shape, label)

This package stays light: the engine runs in its own processes, and torch and tensorflow are
imported only by `Dataset.to_torch` and `Dataset.to_tensorflow`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from pixcrawler._dataset import Dataset, load_dataset
from pixcrawler._info import DatasetInfo
from pixcrawler.exceptions import (
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

try:
    __version__ = _version("pixcrawler-sdk")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree, not installed
    __version__ = "0.0.0"

__all__ = [
    "AuthenticationError",
    "Dataset",
    "DatasetInfo",
    "DecodeError",
    "DecompressionError",
    "DownloadError",
    "JobNotCompleteError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
    "WorkerError",
    "__version__",
    "load_dataset",
]
