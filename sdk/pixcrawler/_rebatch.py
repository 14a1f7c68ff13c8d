"""Engine batches regrouped into batches of the size a user asks for, with at most one copy.

The engine decodes a chunk into batches of `batch_rows` images; a user asks for `batch_size`.
A requested batch that lies inside one engine batch is handed out as a view of it (no copy:
it keeps the engine's shared-memory slot leased for as long as it lives). One that spans engine
batches (a chunk's short tail, or sizes that do not divide) is copied once, piece by piece as
the engine batches arrive, into memory from `alloc`: at most one engine batch is held back
while a batch is assembled. `iter_batches` and the torch and TensorFlow adapters all batch
through here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcrawler._arrays import stack_images

if TYPE_CHECKING:
    from pixcrawler_engine.runtime._stream import Batch

__all__ = [
    "Rows",
    "aligned_empty",
    "check_batch_size",
    "count_batches",
    "numpy_alloc",
    "rebatch",
]

# Per-row values of an engine batch that travel with its images (labels, metadata): each a
# list or a 1-D array, sliced and joined alongside the pixels.
Columns = tuple[Any, ...]
Alloc = Callable[[tuple[int, ...]], tuple[np.ndarray, Any]]


@dataclass
class Rows:
    """One batch of the requested size (the last one may be shorter).

    Attributes:
        images: (n, H, W, C) uint8.
        columns: what `extract` gave for these rows, in the same order.
        shared: True when `images` is a view of an engine batch (of shared memory when it came
            from a `Stream`); False when it is private memory.
        owner: for an assembled batch, what `alloc` returned beside the array (a torch tensor,
            say), already cut to `n` rows where it supports slicing; None otherwise.
    """

    images: np.ndarray
    columns: Columns
    shared: bool
    owner: Any = None


def numpy_alloc(shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
    """Plain numpy memory for an assembled batch."""
    return np.empty(shape, dtype=np.uint8), None


def aligned_empty(shape: tuple[int, ...], align: int = 64) -> np.ndarray:
    """An uninitialised uint8 array whose data starts on an `align`-byte boundary.

    TensorFlow adopts a numpy array handed to `from_generator` without copying it only when
    the data is 64-byte aligned; numpy's allocator gives 16.
    """
    size = math.prod(shape)
    raw = np.empty(size + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + size].reshape(shape)


def rebatch(
    batches: Iterable[Batch],
    batch_size: int | None,
    *,
    drop_last: bool,
    shape: tuple[int, ...] | None,
    extract: Callable[[Batch], Columns],
    alloc: Alloc = numpy_alloc,
) -> Iterator[Rows]:
    """Batches of `batch_size` rows (None: the engine's batches as they come).

    Args:
        batches: engine batches, in order.
        batch_size: rows per batch; the last one is shorter unless `drop_last`.
        drop_last: drop a last batch shorter than `batch_size`.
        shape: the (H, W, C) every image must have; None asks only that the images of each
            batch agree.
        extract: the per-row columns of an engine batch (called once per engine batch).
        alloc: memory for an assembled batch: (array to fill, its owner object).

    Raises:
        ValueError: the images differ in size (the message says to pass `image_size=`).
    """
    pending = _Assembly(batch_size or 0, alloc)
    for batch in batches:
        raw = batch.images
        # A batch being assembled fixes the shape of the pieces that join it.
        images = stack_images(raw, pending.shape or shape)
        shared = isinstance(raw, np.ndarray)
        del raw
        if not len(images):
            continue
        columns = extract(batch)
        n = len(images)
        if batch_size is None:
            yield Rows(images, columns, shared)
            continue
        start = 0
        while start < n:
            if not pending.filled and n - start >= batch_size:
                stop = start + batch_size
                yield Rows(images[start:stop], _cut(columns, start, stop), shared)
                start = stop
                continue
            stop = start + min(batch_size - pending.filled, n - start)
            pending.add(images[start:stop], _cut(columns, start, stop), shared)
            start = stop
            if pending.filled == batch_size:
                yield pending.pop()
    if pending.filled and not drop_last:
        yield pending.pop()


class _Assembly:
    """A batch put together from pieces of engine batches, copied once into `alloc`'s memory.

    The first piece is kept as a view until a second one joins (a batch that ends up with
    one piece, the last of a pass, is handed out as that view); from then on each piece is
    copied as it arrives, so at most one engine batch is held back.
    """

    def __init__(self, batch_size: int, alloc: Alloc) -> None:
        self.batch_size = batch_size
        self.alloc = alloc
        self.filled = 0
        self.first: Rows | None = None
        self.out: np.ndarray | None = None
        self.owner: Any = None
        self.parts: list[Columns] = []

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self.out is not None:
            return self.out.shape[1:]
        return None if self.first is None else self.first.images.shape[1:]

    def add(self, images: np.ndarray, columns: Columns, shared: bool) -> None:
        if self.first is None and self.out is None:
            self.first = Rows(images, columns, shared)
        else:
            if self.out is None:
                assert self.first is not None
                self.out, self.owner = self.alloc((self.batch_size, *images.shape[1:]))
                self.out[: self.filled] = self.first.images
                self.first = None
            self.out[self.filled : self.filled + len(images)] = images
        self.parts.append(columns)
        self.filled += len(images)

    def pop(self) -> Rows:
        n, parts = self.filled, self.parts
        if self.first is not None:
            rows = self.first
        else:
            assert self.out is not None
            out, owner = self.out, self.owner
            if n < self.batch_size:  # the last batch of a pass
                out, owner = out[:n], None if owner is None else owner[:n]
            rows = Rows(out, _join(parts), False, owner)
        self.filled, self.first, self.out, self.owner, self.parts = 0, None, None, None, []
        return rows


def _cut(columns: Columns, start: int, stop: int) -> Columns:
    return tuple(column[start:stop] for column in columns)


def _join(parts: Sequence[Columns]) -> Columns:
    if len(parts) == 1:
        return parts[0]
    joined: list[Any] = []
    for pieces in zip(*parts, strict=True):
        if isinstance(pieces[0], np.ndarray):
            joined.append(np.concatenate(pieces))
        else:
            joined.append([value for piece in pieces for value in piece])
    return tuple(joined)


def count_batches(rows: int, batch_size: int | None, drop_last: bool) -> int | None:
    """How many batches `rows` rows make (None when `batch_size` is None: the engine decides)."""
    if batch_size is None:
        return None
    return rows // batch_size if drop_last else -(-rows // batch_size)


def check_batch_size(batch_size: object, *, optional: bool = False) -> None:
    """Raises ValueError unless `batch_size` is a positive int (or None, when `optional`)."""
    if optional and batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
