"""The local form of a fetched Parquet row group (a rows file), and its reader in the workers.

A rows file holds the encoded image (and mask) bytes of one row group, one after another as
they were streamed out of the Parquet file, then an index:

    [value bytes ...][index: JSON, UTF-8][u64 LE: index length][b"PXROWS01"]

The index lists each row as `[key, label, metadata JSON, image ref, mask ref, name]` (the name
is what messages call the row: its id or image path, or null). A ref is
`[offset, length]` into the file, or a string: why that row has no readable bytes (a null
cell, a damaged row group); the worker raises it as the sample's `DecodeError`, so it follows
`on_error` like any bad image. Reading one sample reads exactly its bytes, nothing else.

`RowsWriter` (supervisor) writes one under a `.part` name and renames it when complete; the
supervisor owns the file and deletes it once its rows are delivered. `RowsOpener` (workers)
holds nothing but the class: it is pickled to every worker.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcrawler_engine._errors import DecodeError, DecompressionError
from pixcrawler_engine.sources._record import Record

__all__ = ["RowsOpener", "RowsWriter", "read_index"]

MAGIC = b"PXROWS01"
_TRAILER = struct.Struct("<Q8s")
MAX_INDEX_BYTES = 256 << 20


class RowsWriter:
    """Writes one rows file: values as they stream in, then the index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.file = open(self.part, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self.rows: list[list[Any]] = []

    def start_value(self, length: int) -> tuple[list[int], Callable[[bytes], Any]]:
        """Begins a value of `length` bytes; returns its ref and the sink for its blocks."""
        return [self.file.tell(), length], self.file.write

    def add_bytes(self, data: Any) -> list[int]:
        """Writes a whole value (a bytes-like object); returns its ref."""
        ref = [self.file.tell(), memoryview(data).nbytes]
        self.file.write(data)
        return ref

    def finish(self, rows: list[list[Any]]) -> Path:
        """Appends the index and renames the file to its final name."""
        index = json.dumps({"rows": rows}, separators=(",", ":")).encode()
        self.file.write(index)
        self.file.write(_TRAILER.pack(len(index), MAGIC))
        self.file.close()
        os.replace(self.part, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)


def read_index(path: Path, chunk: int, first_index: int) -> list[Record]:
    """The records of a rows file, numbered from `first_index`.

    Raises:
        DecompressionError: the file is not a complete rows file.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < _TRAILER.size:
                raise ValueError("shorter than its trailer")
            f.seek(size - _TRAILER.size)
            length, magic = _TRAILER.unpack(f.read(_TRAILER.size))
            if magic != MAGIC or length > min(MAX_INDEX_BYTES, size - _TRAILER.size):
                raise ValueError("no rows-file trailer")
            f.seek(size - _TRAILER.size - length)
            rows = json.loads(f.read(length))["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DecompressionError(
            f"chunk {chunk}: {path.name} is not a complete rows file ({exc}); fetch it again",
            chunk_id=chunk,
        ) from exc
    return [
        Record(
            key=row[0],
            ref=_ref(row[3]),
            label=row[1],
            index=first_index + i,
            metadata=row[2],
            mask_ref=_ref(row[4]),
            name=row[5] if len(row) > 5 else None,
        )
        for i, row in enumerate(rows)
    ]


def _ref(ref: Any) -> Any:
    # JSON gives lists; a tuple is what Record carries (hashable, immutable).
    return tuple(ref) if isinstance(ref, list) else ref


class _RowsReader:
    def __init__(self, path: str) -> None:
        try:
            self.file = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise DecompressionError(f"{path} cannot be opened: {exc}") from exc

    def read(self, ref: Any) -> bytes:
        if isinstance(ref, str):
            raise DecodeError(ref)
        if not isinstance(ref, tuple) or len(ref) != 2:
            raise DecodeError(f"the row has no bytes to read (ref {ref!r})")
        offset, length = ref
        self.file.seek(offset)
        data = self.file.read(length)
        if len(data) != length:
            raise DecodeError(f"the rows file ends {length - len(data)} bytes early")
        return data

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class RowsOpener:
    """Opens rows files in workers (holds no state, so no secret)."""

    def open(self, path: str) -> _RowsReader:
        return _RowsReader(path)
