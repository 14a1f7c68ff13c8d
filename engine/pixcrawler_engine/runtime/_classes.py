"""A batch's labels as int64 class indices: `ClassIndex` and `label_indices`.

A batch's `label` column holds each label as JSON text. A label that is a class name becomes
its class's index, an int label stays itself. The match is on the JSON text, held as numpy
fixed-width bytes, with the class names sorted once: a few numpy calls per batch, no Python
per row, and no `pyarrow.compute`, whose import (~35 ms alone, ~0.1 s on a busy machine: it
wraps some 300 functions) would land on the first batch of every framework pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler_engine._json import dumps

__all__ = ["ClassIndex", "label_indices"]


class ClassIndex:
    """Class names by index, ready to look labels up in.

    Args:
        names: the name of each class index; None for an index no label names.
    """

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names = [name for name in names if name is not None]
        texts = np.array([b"" if n is None else dumps(n).encode() for n in names], dtype=bytes)
        # The first of equal texts wins (only the empty ones of unnamed indices can repeat).
        self._order = np.argsort(texts, kind="stable")
        self._sorted = texts[self._order]


def label_indices(batch: pa.RecordBatch, classes: ClassIndex) -> np.ndarray:
    """The labels of a batch as int64 class indices.

    Raises:
        ValueError: a label is neither a class name nor an int; the message names it.
    """
    texts = _fixed_width(batch.column("label"))
    out = np.zeros(len(texts), np.int64)
    found = np.zeros(len(texts), bool)
    if len(classes._sorted):
        at = np.searchsorted(classes._sorted, texts).clip(max=len(classes._sorted) - 1)
        found = classes._sorted[at] == texts
        out[found] = classes._order[at[found]]
    if found.all():
        return out
    missing = ~found
    try:
        out[missing] = texts[missing].astype(np.int64)  # a JSON int's text is the number
    except (ValueError, OverflowError):
        bad = next(json.loads(t) for t in texts[missing] if not _is_int(json.loads(t)))
        raise ValueError(
            f"label {bad!r} is neither a class name of the job {classes.names} nor an int, so "
            "it has no class index; frameworks need one label type for every sample"
        ) from None
    return out


def _fixed_width(column: pa.Array) -> np.ndarray:
    """A string column without nulls as numpy fixed-width bytes (`S<longest>`), one copy.

    numpy drops a value's trailing NUL bytes: JSON text has none.
    """
    n = len(column)
    if column.null_count:
        raise ValueError(f"expected strings without nulls, got {column.null_count} null")
    offsets = np.frombuffer(column.buffers()[1], np.int32, n + 1, column.offset * 4)
    values = column.buffers()[2]
    data = np.empty(0, np.uint8) if values is None else np.frombuffer(values, np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max(initial=0)), 1)
    columns = np.arange(width)
    inside = columns < lengths[:, None]
    matrix = np.zeros((n, width), np.uint8)
    if data.size:
        matrix[inside] = data[(offsets[:-1, None] + columns)[inside]]
    return matrix.view(f"S{width}").reshape(n)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
