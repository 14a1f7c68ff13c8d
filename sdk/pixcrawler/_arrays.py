"""Whole-array conversions: stacking decoded images, label arrays, and the memory limit check.

`Dataset.iter_batches`, `to_arrays` and `to_dataframe` use these. The limit check runs before
anything is allocated: `to_arrays()` on a dataset too big for memory fails at once with advice,
rather than swapping or being killed by the OOM killer halfway through.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcrawler._info import format_bytes

if TYPE_CHECKING:
    import pandas as pd

    from pixcrawler_engine.runtime._stream import Batch

__all__ = [
    "MEMORY_FRACTION",
    "available_memory",
    "check_size",
    "collect_arrays",
    "collect_dataframe",
    "concat",
    "label_array",
    "memory_limit",
    "stack_images",
]

# The share of the memory available at the start that a whole-dataset array may take, unless
# the caller says otherwise (`max_bytes=`).
MEMORY_FRACTION = 0.5


def stack_images(
    images: np.ndarray | list[np.ndarray], shape: tuple[int, ...] | None
) -> np.ndarray:
    """Images of one engine batch as one (B, H, W, C) array.

    Args:
        images: a (B, H, W, C) array (fixed-size output) or a list of (H, W, C) arrays.
        shape: the (H, W, C) every image must have, or None to take the first one's.

    Raises:
        ValueError: the images differ in shape; the message says to pass `image_size=`.
    """
    if isinstance(images, np.ndarray):
        if shape is not None and images.shape[1:] != tuple(shape):
            raise shape_error(tuple(shape), images.shape[1:])
        return images
    first = tuple(shape) if shape is not None else (images[0].shape if images else None)
    for image in images:
        if image.shape != first:
            raise shape_error(first, image.shape)
    if not images:
        return np.empty((0, *(first or (0, 0, 0))), dtype=np.uint8)
    return np.stack(images)


def concat(parts: list[np.ndarray]) -> np.ndarray:
    """Joins pieces of a batch (one piece is returned as it is)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def shape_error(first: Any, other: Any) -> ValueError:
    return ValueError(
        f"the images of this dataset differ in size ({tuple(first)} and {tuple(other)}), so "
        "they cannot be stacked into one array: pass image_size=(height, width) (or an int) "
        "to load_dataset to resize them all, or iterate one image at a time"
    )


def label_array(labels: list[Any]) -> np.ndarray:
    """Labels as a 1-D array: str and int labels keep their type, anything else is an object."""
    if labels and all(isinstance(v, str) for v in labels):
        return np.array(labels, dtype=str)
    if labels and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return np.array(labels, dtype=np.int64)
    out = np.empty(len(labels), dtype=object)
    for i, value in enumerate(labels):
        out[i] = value  # one by one: numpy would make dicts or lists into more dimensions
    return out


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux `MemAvailable`), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def memory_limit(max_bytes: int | None) -> int:
    """`max_bytes`, checked, or `MEMORY_FRACTION` of the memory available now."""
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        return max_bytes
    available = available_memory()
    return int(available * MEMORY_FRACTION) if available else 1 << 62


def check_size(count: int, per_image: int, limit: int, shape: tuple[int, ...] | None) -> None:
    """Raises MemoryError, with advice, when `count` images of `per_image` bytes exceed `limit`."""
    need = count * per_image
    if need <= limit:
        return
    what = "x".join(str(v) for v in shape) if shape else "their decoded size"
    raise MemoryError(
        f"loading {count:,} images of {what} needs about {format_bytes(need)}, over the "
        f"limit of {format_bytes(limit)}; iterate with iter_batches() instead, pass a smaller "
        "image_size= to load_dataset, or raise the limit with max_bytes="
    )


def collect_arrays(
    batches: Iterable[Batch],
    num_images: int,
    fixed: tuple[int, int, int] | None,
    max_bytes: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """`Dataset.to_arrays`: one pass into (X, y), its size checked before it is allocated."""
    limit = memory_limit(max_bytes)
    if fixed is not None:
        check_size(num_images, int(np.prod(fixed)), limit, fixed)
    x: np.ndarray | None = None
    labels: list[Any] = []
    for batch in batches:
        if x is None:
            images0 = batch.images
            shape = images0.shape[1:] if isinstance(images0, np.ndarray) else images0[0].shape
            check_size(num_images, int(np.prod(shape)), limit, shape)
            x = np.empty((num_images, *shape), dtype=np.uint8)
        n = len(labels)
        images = stack_images(batch.images, x.shape[1:])
        x[n : n + len(images)] = images
        labels.extend(batch.labels)
    if x is None:
        x = np.empty((0, 0, 0, 0), dtype=np.uint8)
    return x[: len(labels)], label_array(labels)


def collect_dataframe(
    batches: Iterable[Batch],
    num_images: int,
    fixed: tuple[int, int, int] | None,
    max_bytes: int | None,
) -> pd.DataFrame:
    """`Dataset.to_dataframe`: one pass into rows of copied images, labels and metadata."""
    import pandas as pd

    limit = memory_limit(max_bytes)
    if fixed is not None:
        check_size(num_images, int(np.prod(fixed)), limit, fixed)
    images = np.empty(num_images, dtype=object)
    columns: dict[str, list[Any]] = {"label": [], "metadata": [], "key": []}
    sizes: list[tuple[int, int]] = []
    used = 0
    for batch in batches:
        for image in batch.images:
            used += image.nbytes
            if used > limit:  # variable sizes: known only as they arrive
                check_size(num_images, used // max(1, len(sizes)), limit, None)
            images[len(sizes)] = np.array(image)  # a copy: the row outlives the batch
            sizes.append(image.shape[:2])
        columns["label"].extend(batch.labels)
        columns["metadata"].extend(batch.metadata)
        columns["key"].extend(batch.keys)
    n = len(sizes)
    return pd.DataFrame(
        {
            "image": images[:n],
            "label": columns["label"],
            "metadata": columns["metadata"],
            "key": columns["key"],
            "height": np.array([s[0] for s in sizes], dtype=np.int64),
            "width": np.array([s[1] for s in sizes], dtype=np.int64),
        }
    )
