"""The local form of a fetched Parquet row group (a rows file), and its reader in the workers.

A rows file holds the encoded image (and mask) bytes of one row group that exist nowhere else
on this machine (read over HTTP, or decompressed), one after another as they were streamed
out, then an index:

    [value bytes ...][index: JSON, UTF-8][u64 LE: index length][b"PXROWS02"]

The index is `{"rows": [...], "files": [[path, size, mtime_ns], ...]}`; it lists each row as
`[key, label, metadata JSON, image ref, mask ref, name]` (the name is what messages call the
row: its id or image path, or null). A ref is `[offset, length]` into the rows
file, `[offset, length, f]` into `files[f]` (a local Parquet file whose bytes are stored
uncompressed: read where they are, never copied), or a string: why that row has no readable
bytes (a null cell, a damaged row group); the worker raises it as the sample's `DecodeError`,
so it follows `on_error` like any bad image. A file that changed since the index was written
(size or mtime) is refused, not read.

Reading one sample reads exactly its bytes: a small one with `pread`, a large one (at least
`MMAP_BYTES`) as a read-only memory map of the file, handed out as a memoryview: no copy on
the heap, and the pages go back to the page cache when the view is dropped.

`RowsWriter` (supervisor) writes one under a `.part` name and renames it when complete; the
supervisor owns the file and deletes it once its rows are delivered. `RowsOpener` (workers)
holds nothing but the class: it is pickled to every worker.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcrawler_engine._errors import DecodeError, DecompressionError
from pixcrawler_engine.sources._record import Record

__all__ = ["RowsOpener", "RowsWriter", "read_index"]

MAGIC = b"PXROWS02"
_TRAILER = struct.Struct("<Q8s")
MAX_INDEX_BYTES = 256 << 20
MMAP_BYTES = 1 << 20


class RowsWriter:
    """Writes one rows file: values as they stream in, then the index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.file = open(self.part, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self.files: list[list[Any]] = []

    def external(self, path: str) -> int:
        """Numbers a local file that refs may point into (stamped with its size and mtime)."""
        for f, (known, _, _) in enumerate(self.files):
            if known == path:
                return f
        st = os.stat(path)
        self.files.append([path, st.st_size, st.st_mtime_ns])
        return len(self.files) - 1

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
        index = json.dumps({"rows": rows, "files": self.files}, separators=(",", ":")).encode()
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
            index = json.loads(f.read(length))
            rows, files = index["rows"], [tuple(x) for x in index["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DecompressionError(
            f"chunk {chunk}: {path.name} is not a complete rows file ({exc}); fetch it again",
            chunk_id=chunk,
        ) from exc
    return [
        Record(
            key=row[0],
            ref=_ref(row[3], files),
            label=row[1],
            index=first_index + i,
            metadata=row[2],
            mask_ref=_ref(row[4], files),
            name=row[5] if len(row) > 5 else None,
        )
        for i, row in enumerate(rows)
    ]


def _ref(ref: Any, files: list[tuple[Any, ...]]) -> Any:
    """A ref as Record carries it: a tuple (hashable, immutable), a file's number resolved to
    `(offset, length, path, size, mtime_ns)`."""
    if not isinstance(ref, list):
        return ref
    if len(ref) == 3 and isinstance(ref[2], int) and 0 <= ref[2] < len(files):
        return (ref[0], ref[1], *files[ref[2]])
    return tuple(ref)


class _RowsReader:
    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, int] = {}  # path -> descriptor, the rows file's included
        self.files[path] = self._open(path)

    @staticmethod
    def _open(path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DecompressionError(f"{path} cannot be opened: {exc}") from exc

    def read(self, ref: Any) -> bytes | memoryview:
        if isinstance(ref, str):
            raise DecodeError(ref)
        if not isinstance(ref, tuple) or len(ref) not in (2, 5):
            raise DecodeError(f"the row has no bytes to read (ref {ref!r})")
        offset, length = ref[:2]
        fd = self.files[self.path] if len(ref) == 2 else self._external(*ref[2:])
        if offset + length > os.fstat(fd).st_size:
            raise DecodeError(f"its file ends before its {length} bytes at {offset}")
        if length < MMAP_BYTES:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise DecodeError(f"its file ends {length - len(data)} bytes early")
            return data
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, offset + length - start, offset=start, access=mmap.ACCESS_READ)
        mapped.madvise(mmap.MADV_SEQUENTIAL)
        # The view keeps the map alive; it is unmapped when the last view is gone.
        return memoryview(mapped)[offset - start : offset - start + length]

    def _external(self, path: str, size: int, mtime_ns: int) -> int:
        fd = self.files.get(path)
        if fd is None:
            fd = self.files[path] = self._open(path)
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            raise DecodeError(
                f"{path} changed since its row group was read (size or modification time); "
                "run again"
            )
        return fd

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


@dataclass(frozen=True)
class RowsOpener:
    """Opens rows files in workers (holds no state, so no secret)."""

    def open(self, path: str) -> _RowsReader:
        return _RowsReader(path)
