"""A decoded batch as it is collected: `BatchBuilder`, and its buffers in Arrow's layout.

No pyarrow here: the workers write batches through `_ipc` (NOTE [wire]);
`_batch.record_batch` makes a pyarrow RecordBatch of one for the runtimes that want one.
"""

from __future__ import annotations

import array
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pixcrawler_engine._json import dumps

__all__ = ["BatchBuilder", "binary_offsets", "string_buffers"]


def string_buffers(values: Sequence[str]) -> tuple[array.array[int], bytes]:
    """The int32 offsets and UTF-8 data of an Arrow string column of `values`."""
    joined = "".join(values)
    if joined.isascii():  # one encode, and the lengths in characters are the lengths in bytes
        data, lengths = joined.encode(), map(len, values)
    else:
        encoded = [v.encode() for v in values]
        data, lengths = b"".join(encoded), map(len, encoded)
    return array.array("i", itertools.accumulate(lengths, initial=0)), data


def binary_offsets(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The int64 offsets of a large_binary column holding `arrays`, one value each."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([a.nbytes for a in arrays], out=offsets[1:])
    return offsets


@dataclass
class BatchBuilder:
    """Collects decoded samples of one batch: its columns, in Arrow's layout or as pyarrow.

    With a fixed shape, images are decoded straight into `pixels`, a preallocated
    (rows, H, W, C) array, through `next_image()`; no per-image allocation. Given `out`, the
    buffer the batch will be written to (a shared-memory slot), and `at`, where the stream
    puts the pixels (`Wire.body_at`), `pixels` lies in it there (NOTE [wire] in `_ipc`).
    """

    fixed_shape: tuple[int, int, int] | None
    capacity: int
    pixels: np.ndarray | None = None
    out: memoryview | None = None
    at: int | None = None
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fixed_shape is not None and self.pixels is None:
            shape = (self.capacity, *self.fixed_shape)
            size = math.prod(shape)
            start = self.at
            if self.out is not None and start is not None and start + size <= len(self.out):
                self.pixels = np.frombuffer(self.out, np.uint8, size, start).reshape(shape)
            else:
                self.pixels = np.empty(shape, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.keys)

    def next_image(self) -> np.ndarray | None:
        """The array to decode the next fixed-shape image into, or None for variable size."""
        return None if self.pixels is None else self.pixels[len(self.keys)]

    def add(
        self,
        image: np.ndarray,
        *,
        label: Any,
        key: str,
        chunk: int,
        index: int,
        orig_size: tuple[int, int],
        metadata: dict[str, Any] | str | None,
        mask: np.ndarray | None = None,
    ) -> None:
        if self.pixels is None:
            self.images.append(image)
        if mask is not None:
            self.masks.append(mask)
        self.labels.append(dumps(label))
        self.keys.append(key)
        self.chunks.append(chunk)
        self.indices.append(index)
        self.widths.append(orig_size[0])
        self.heights.append(orig_size[1])
        if metadata is None or isinstance(metadata, str):
            self.metadata.append(metadata or "{}")
        else:
            self.metadata.append(dumps(metadata))

    def truncate(self, rows: int) -> None:
        """Keeps the first `rows` samples only."""
        for values in (self.images, self.masks, self.labels, self.keys, self.chunks,
                       self.indices, self.widths, self.heights, self.metadata):  # fmt: skip
            del values[rows:]

    def check(self) -> int:
        """The number of rows; raises when some samples have masks and others not."""
        n = len(self.keys)
        if self.masks and len(self.masks) != n:
            raise ValueError("either every sample of a batch has a mask or none has")
        return n

    def image_columns(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(pixels, masks) of a fixed-shape batch as (rows, ...) arrays; None for variable size."""
        if self.pixels is None or self.fixed_shape is None:
            return None
        n = len(self.keys)
        return self.pixels[:n], np.stack(self.masks) if self.masks else None

    def image_shapes(self) -> np.ndarray:
        """The (rows, 3) int32 shapes of a variable-size batch's images."""
        return np.array([a.shape for a in self.images], dtype=np.int32).reshape(-1, 3)

    def layout(self) -> tuple[list[int], list[Any]]:
        """The batch in Arrow's IPC layout, in schema order (`_batch.schema_for`): each field
        node's length, and each buffer (None for an empty validity bitmap; a list of arrays for
        a large_binary column's values, written one after the other)."""
        n = self.check()
        nodes: list[int] = []
        buffers: list[Any] = []
        fixed = self.image_columns()
        if fixed is not None:
            assert self.fixed_shape is not None
            h, w, c = self.fixed_shape
            pixels, masks = fixed
            nodes += [n, n * h * w * c]  # the tensor's list, and its values
            buffers += [None, None, pixels]
            if masks is not None:
                nodes += [n, n * h * w]
                buffers += [None, None, masks]
        else:
            nodes += [n, n, 3 * n]
            buffers += [None, binary_offsets(self.images), list(self.images)]
            buffers += [None, None, self.image_shapes()]
            if self.masks:
                nodes.append(n)
                buffers += [None, binary_offsets(self.masks), list(self.masks)]
        for values in (self.labels, self.keys):
            nodes.append(n)
            buffers += [None, *string_buffers(values)]
        for ints, dtype in ((self.chunks, np.int32), (self.indices, np.int64),
                            (self.widths, np.int32), (self.heights, np.int32)):  # fmt: skip
            nodes.append(n)
            buffers += [None, np.array(ints, dtype)]
        nodes.append(n)
        buffers += [None, *string_buffers(self.metadata)]
        return nodes, buffers
