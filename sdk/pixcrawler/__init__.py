"""PixCrawler: load image datasets lazily, as numpy, pandas, PyTorch or TensorFlow data.

    >>> from pixcrawler import load_dataset
    >>> dataset = load_dataset("job_abc123", api_key="your_api_key")
    >>> for image, label in dataset:
    ...     print(image.shape, label)

This package stays light: the engine runs in its own processes, and torch and tensorflow are
imported only by `Dataset.to_torch` and `Dataset.to_tensorflow`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from pixcrawler._dataset import Dataset
    from pixcrawler._info import DatasetInfo
    from pixcrawler._load import load_dataset

# The facade loads on first use: `import pixcrawler` (the CLI, a DataLoader worker unpickling
# a dataset) never pays for the engine runtime, pandas or tqdm until it needs them.
_LAZY = {
    "Dataset": "pixcrawler._dataset",
    "load_dataset": "pixcrawler._load",
    "DatasetInfo": "pixcrawler._info",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("pixcrawler-sdk")
        except PackageNotFoundError:  # pragma: no cover - a source tree, not installed
            value = "0.0.0"
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
    "UnsupportedImageError",
    "WorkerError",
    "__version__",
    "load_dataset",
]
