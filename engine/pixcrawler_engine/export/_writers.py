"""What every export format shares: `Piece`, the `FormatWriter` protocol, PNG encoding, zip reading.

Every format writes one part per chunk under `.pixcrawler/parts/` (see `_export_state`) and
moves the parts into place in `finalize`, which is idempotent: an export killed while it
finalizes finishes on the next run. The formats: `_export_files` (numpy, images, zip) and
`_export_parquet`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.export._state import Workspace
from pixcrawler_engine.sources._base import ZipOpener
from pixcrawler_engine.sources._record import Record

__all__ = ["FormatWriter", "Piece", "encode_png", "label_text", "pieces_from_zip"]

# One piece of an encoded export never holds more bytes than this (Arrow `binary` arrays
# and Parquet pages are limited to 2 GiB; a dataset of huge images must not get near it).
PIECE_BYTES = 256 << 20


@dataclass
class Piece:
    """Consecutive samples of one chunk, as a format writer receives them.

    Attributes:
        chunk: the chunk they belong to.
        columns: label (JSON), key, chunk, index, orig_width, orig_height, metadata (JSON).
        encoded: the original file bytes of each sample (exports without decoding).
        pixels: the decoded images, (B, H, W, C) or a list of (H, W, C); views into shared
            memory, valid only during the writer's call.
    """

    chunk: int
    columns: pa.RecordBatch
    encoded: list[bytes] | None = None
    pixels: np.ndarray | list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.columns.num_rows

    def rows(self) -> Iterator[dict[str, Any]]:
        """The non-pixel fields of each sample, label and metadata parsed."""
        cols = {
            name: self.columns.column(name).to_pylist()
            for name in ("label", "key", "chunk", "index", "orig_width", "orig_height", "metadata")
        }
        for i in range(self.columns.num_rows):
            yield {
                "index": cols["index"][i],
                "key": cols["key"][i],
                "label": json.loads(cols["label"][i]),
                "chunk": cols["chunk"][i],
                "orig_width": cols["orig_width"][i],
                "orig_height": cols["orig_height"][i],
                "metadata": json.loads(cols["metadata"][i] or "{}"),
            }


def encode_png(pixels: np.ndarray, level: int = 1) -> bytes:
    """Lossless PNG of a uint8 (H, W, C) or (H, W) image, C in 1-4.

    Written here rather than by Pillow because Pillow tries every PNG filter on every row: the
    "Up" filter alone with zlib level 1 is ~1.5x faster on photos and the files are smaller.
    numpy and zlib release the GIL, so several threads encode in parallel.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    h, w, c = pixels.shape
    if pixels.dtype != np.uint8 or c not in _PNG_COLOR or h == 0 or w == 0:
        raise ValueError(
            f"encode_png takes uint8 (H, W, 1-4) images, got {pixels.dtype} {pixels.shape}"
        )
    rows = np.ascontiguousarray(pixels).reshape(h, w * c)
    filtered = np.empty((h, w * c + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the one above it (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR[c], 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(filtered.data, level)),
            _png_chunk(b"IEND", b""),
        )
    )


_PNG_COLOR = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def pieces_from_zip(
    chunk: int, path: Path, records: Sequence[Record], *, rows: int, on_error: str = "raise"
) -> Iterator[Piece]:
    """The samples of a chunk zip as pieces of at most `rows` samples, bytes as stored.

    Nothing is decoded; the original width and height come from the file header when it can
    be read (None otherwise). A member the zip lacks (or one over the size caps) follows
    `on_error`: `raise`, or anything else to leave it out.
    """
    from pixcrawler_engine.decode._headers import as_view, sniff

    reader = ZipOpener().open(os.fspath(path))
    try:
        fields: dict[str, list[Any]] = {k: [] for k in _COLUMNS}
        data: list[bytes] = []
        size = 0
        for record in records:
            try:
                blob = bytes(reader.read(record.ref))  # one copy of a view into the read
            except DecodeError as exc:
                if on_error == "raise":
                    raise DecodeError(
                        f"chunk {chunk}, sample {record.key!r}: {exc}",
                        chunk_id=chunk,
                        key=record.key,
                    ) from exc
                continue
            header = sniff(as_view(blob))
            width = height = None
            if header is not None:
                width, height = header.width, header.height
                if header.orientation >= 5:  # EXIF rotation by 90 degrees: as the engine says
                    width, height = height, width
            for name, value in zip(
                _COLUMNS,
                (json.dumps(record.label), record.key, chunk, record.index, width, height,
                 record.metadata),
                strict=True,
            ):  # fmt: skip
                fields[name].append(value)
            data.append(blob)
            size += len(blob)
            if len(data) >= rows or size >= PIECE_BYTES:
                yield Piece(chunk, _columns(fields), encoded=data)
                fields, data, size = {k: [] for k in _COLUMNS}, [], 0
        if data:
            yield Piece(chunk, _columns(fields), encoded=data)
    finally:
        reader.close()


_COLUMNS = ("label", "key", "chunk", "index", "orig_width", "orig_height", "metadata")
_TYPES = (pa.string(), pa.string(), pa.int32(), pa.int64(), pa.int32(), pa.int32(), pa.string())


def _columns(fields: dict[str, list[Any]]) -> pa.RecordBatch:
    arrays = [pa.array(fields[n], t) for n, t in zip(_COLUMNS, _TYPES, strict=True)]
    return pa.RecordBatch.from_arrays(arrays, names=list(_COLUMNS))


def label_text(label: Any) -> str:
    """A label as one line of text: str as is, anything else as JSON."""
    return label if isinstance(label, str) else json.dumps(label, sort_keys=True)


class FormatWriter:
    """One export format: parts per chunk, then the final layout.

    The driver calls `begin()` once, then for each chunk to write either `chunk_file()` (an
    export without decoding) or `begin_chunk()`, `write()` for each piece and
    `commit_chunk()`; `abort_chunk()` if that fails; then `finalize()` once every part exists,
    and `close()` in any case.

    Attributes:
        kind: the suffix of committed parts (`<chunk:06d>.<kind>`).
        decoded: whether the format wants decoded pixels.
        needs_records: whether `chunk_file` needs the chunk's records (its manifest).
    """

    kind = "part"
    decoded = False
    needs_records = True
    chunk: int | None  # the chunk being written
    tmp: Path | None  # its part, under a temporary name
    # The export's selection (`_order.SelectedSource`): chunk order and output rows; set by
    # the driver. None: every chunk, in the job's order.
    order: Any = None

    def __init__(
        self,
        ws: Workspace,
        manifest: Any,
        *,
        policy: DecodePolicy | None,
        on_error: str = "raise",
        threads: int = 2,
    ) -> None:
        self.ws = ws
        self.manifest = manifest
        self.policy = policy
        self.on_error = policy.on_error if policy is not None else on_error
        self.threads = max(1, threads)
        self.chunk = None
        self.tmp = None
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def check(cls, policy: DecodePolicy | None) -> None:
        """Raises ValueError, before anything is written, if the format cannot take `policy`."""

    def begin(self) -> None:
        """Prepares state shared by every chunk (called again after a restart)."""

    def chunk_file(
        self, chunk: int, path: Path, records: Sequence[Record] | None, *, owned: bool, rows: int
    ) -> int:
        """Writes the part of one chunk from its local zip (exports without decoding).

        Returns the number of samples written.
        """
        assert records is not None
        self.begin_chunk(chunk)
        written = 0
        try:
            for piece in pieces_from_zip(chunk, path, records, rows=rows, on_error=self.on_error):
                self.write(piece)
                written += len(piece)
            self.commit_chunk()
        except BaseException:
            self.abort_chunk()
            raise
        return written

    def chunk_order(self) -> list[int]:
        """The indices of the exported chunks, in output order."""
        if self.order is not None:
            return list(self.order.chunk_order)
        return [c.index for c in self.manifest.chunks]

    def begin_chunk(self, chunk: int) -> None:
        """Starts the part of `chunk`, under a temporary name (`self.tmp`, not created)."""
        self.chunk = chunk
        self.tmp = self.ws.temp(chunk, self.kind)

    def write(self, piece: Piece) -> None:
        raise NotImplementedError

    def commit_chunk(self) -> None:
        raise NotImplementedError

    def rename_part(self, kind: str | None = None) -> None:
        """Commits the part being written: the rename of its temporary is the commit."""
        assert self.tmp is not None and self.chunk is not None
        os.replace(self.tmp, self.ws.part(self.chunk, kind or self.kind))
        self.tmp, self.chunk = None, None

    def abort_chunk(self) -> None:
        """Drops the part being written."""
        if self.tmp is not None:
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
            else:
                self.tmp.unlink(missing_ok=True)
        self.tmp, self.chunk = None, None

    def finalize(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def encode_all(self, pixels: np.ndarray | list[np.ndarray]) -> list[bytes]:
        """PNG files of decoded images, encoded on a few threads."""
        images = list(pixels)
        if len(images) < 4 or self.threads == 1:
            return [encode_png(a) for a in images]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pxc-png")
        return list(self._pool.map(encode_png, images))

    def _committed(self) -> list[Path]:
        """The committed parts of this format, in output order."""
        parts = [self.ws.part(chunk, self.kind) for chunk in self.chunk_order()]
        return [part for part in parts if part.exists()]
