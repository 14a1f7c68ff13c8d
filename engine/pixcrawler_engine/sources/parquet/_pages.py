"""Reading one binary column chunk of a Parquet row group, value by value, in bounded memory.

pyarrow reads a column chunk a page at a time and copies every value into an Arrow array: for a
SNAPPY page of 124 MB (`datasets` 2.x writes a row group's images into one dictionary page),
it holds the compressed page, the decompressed page and the array at once. `stream_values`
walks the pages itself and hands each value on in 1 MiB blocks, so a row group of several
100 MB images costs a few MiB whatever its layout:

    page header    Thrift, uncompressed (`_thrift`)
    page body      as stored (UNCOMPRESSED), or decompressed as it is read: SNAPPY by
                   `_snappy.SnappyStream`, GZIP, ZSTD and BROTLI by Arrow's streaming
                   decompressors; a page of at most `SMALL_PAGE` bytes is decompressed whole
                   (C speed for small images and masks)
    levels         definition levels (RLE, `_rle`): which rows are null; no repetition
    values         PLAIN (`<u32 length><bytes>` each), or dictionary indices (RLE) into the
                   values of the chunk's dictionary page, themselves PLAIN

Each value is handed to `place(length, at)`, which returns the value's ref and a sink for its
bytes; `at` is the value's offset in the column chunk when its page is stored uncompressed
(its bytes can be read where they are: the sink may be None, and they are skipped), None when
they only exist decompressed. Each row is then passed to `on_row`, with its value's ref (a
dictionary entry's for an index) or None for a null.

Anything else (repetition levels, DELTA encodings, LZ4/LZO pages larger than `SMALL_PAGE`, a
Snappy copy from further back than any known writer makes) raises `Unsupported` before the
rows of that page are passed on, and the caller reads the rest another way. Damage (a bad
header, lengths past the page or the chunk, too few values) raises `Corrupt` after the rows
already passed on, which are good.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from typing import Any, BinaryIO

from pixcrawler_engine.sources.parquet._rle import decode_hybrid
from pixcrawler_engine.sources.parquet._snappy import SnappyStream, TooFarBack
from pixcrawler_engine.sources.parquet._thrift import (
    DATA_PAGE,
    DATA_PAGE_V2,
    DICTIONARY_PAGE,
    INDEX_PAGE,
    Corrupt,
    PageHeader,
    read_page_header,
)

__all__ = ["Corrupt", "Place", "Unsupported", "can_stream", "stream_values"]

BLOCK = 1 << 20
SMALL_PAGE = 2 << 20
_PLAIN, _PLAIN_DICTIONARY, _RLE, _RLE_DICTIONARY = 0, 2, 3, 8
_LEN = struct.Struct("<I")
_STREAMED = {"SNAPPY": "snappy", "GZIP": "gzip", "ZSTD": "zstd", "BROTLI": "brotli"}
# Arrow names LZ4_RAW pages "LZ4" (and the old Hadoop framing "LZ4_HADOOP", not read here).
_WHOLE = {**_STREAMED, "LZ4": "lz4_raw", "LZ4_RAW": "lz4_raw"}
Place = Callable[[int, int | None], tuple[Any, Callable[[bytes], Any] | None]]


class Unsupported(Exception):
    """The column chunk is laid out in a way this reader does not stream (use pyarrow)."""


def can_stream(compression: str, max_rep: int) -> bool:
    """Whether a column chunk of this codec and nesting is one `stream_values` may read."""
    return max_rep == 0 and (compression.upper() == "UNCOMPRESSED" or compression.upper() in _WHOLE)


class _Input:
    """Reads exactly what is asked from a stream, within a length; counts the position."""

    def __init__(self, read: Callable[[int], bytes], length: int, skip: Any = None) -> None:
        self._read = read
        self._skip = skip  # seek forward, when the stream can
        self.left = length
        self.pos = 0

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise Corrupt(f"a length of {n} bytes runs past the end of its page or chunk")
        data = self._read(n) if n else b""
        if len(data) != n:
            raise Corrupt(f"the column chunk ends {n - len(data)} bytes early")
        self.left -= n
        self.pos += n
        return data

    def copy(self, n: int, sink: Callable[[bytes], Any]) -> None:
        while n:
            block = self.read(min(n, BLOCK))
            sink(block)
            n -= len(block)

    def skip(self, n: int) -> None:
        if self._skip is None or n < BLOCK:
            self.copy(n, lambda _block: None)
            return
        if n > self.left:
            raise Corrupt(f"a length of {n} bytes runs past the end of its page or chunk")
        self._skip(n)
        self.left -= n
        self.pos += n

    def take(self, n: int) -> _Input:
        """The next `n` bytes as an input of their own (this one skips past them)."""
        if n > self.left:
            raise Corrupt(f"a page of {n} bytes runs past the end of the column chunk")
        self.left -= n
        part = _Input(self._read, n, self._skip)
        part.pos = self.pos
        self.pos += n
        return part


def _decompressed(raw: _Input, codec: str, size: int) -> _Input:
    """A page body of `size` bytes once decompressed, read from `raw` as it goes."""
    try:
        if raw.left <= SMALL_PAGE and size <= SMALL_PAGE and codec in _WHOLE:
            import pyarrow as pa

            data = pa.Codec(_WHOLE[codec]).decompress(
                raw.read(raw.left), decompressed_size=size, asbytes=True
            )
            return _Input(io.BytesIO(data).read, size)
        if codec == "SNAPPY":
            return _Input(SnappyStream(raw, raw.left, size).read, size)
        if codec in _STREAMED:
            import pyarrow as pa

            stream = pa.CompressedInputStream(_Raw(raw), _STREAMED[codec])
            return _Input(stream.read, size)
    except (OSError, ValueError) as exc:  # pyarrow's errors are both
        raise Corrupt(f"a {codec} page does not decompress ({exc})") from exc
    raise Unsupported(f"{codec} pages over {SMALL_PAGE} bytes")


class _Raw(io.RawIOBase):
    """An `_Input` as a raw file object (what Arrow's decompressors read from)."""

    def __init__(self, inp: _Input) -> None:
        super().__init__()
        self.inp = inp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.inp.read(min(len(view), self.inp.left))
        view[: len(data)] = data
        return len(data)


def _finish(body: _Input, raw: _Input) -> None:
    """Reads past what is left of a page (padding a writer may leave), compressed and not."""
    try:
        body.skip(body.left)
        raw.skip(raw.left)
    except (OSError, ValueError) as exc:
        raise Corrupt(f"the end of a page does not decompress ({exc})") from exc


def _value(body: _Input, place: Place, raw: bool) -> Any:
    (n,) = _LEN.unpack(body.read(4))
    if n > body.left:
        raise Corrupt(f"a value of {n} bytes runs past the end of its page")
    ref, sink = place(n, body.pos if raw else None)
    if sink is None:
        body.skip(n)
    else:
        body.copy(n, sink)
    return ref


def _page(
    inp: _Input, header: PageHeader, codec: str, max_def: int
) -> tuple[Any, _Input, _Input, bool]:
    """(definition levels or None, values, the page's raw bytes, whether values are raw)."""
    raw = inp.take(header.compressed)
    size, levels = header.uncompressed, None
    compressed = codec != "UNCOMPRESSED"
    if header.kind == DATA_PAGE_V2:  # levels first, never compressed
        raw.skip(header.rep_bytes)  # always 0 here (refused before)
        data = raw.read(header.def_bytes)
        if max_def:
            levels = decode_hybrid(data, header.count, max_def.bit_length())
        size -= header.def_bytes + header.rep_bytes
        compressed = compressed and header.values_compressed
    body = _decompressed(raw, codec, size) if compressed else raw
    if header.kind == DATA_PAGE and max_def:
        if header.def_encoding != _RLE:
            raise Unsupported("definition levels not RLE-encoded")
        (n,) = _LEN.unpack(body.read(4))
        if n > 4 * header.count + 64:
            raise Corrupt(f"{n} bytes of definition levels for {header.count} values")
        levels = decode_hybrid(body.read(n), header.count, max_def.bit_length())
    return levels, body, raw, not compressed


def _indices(body: _Input, count: int) -> Any:
    """The dictionary indices of a data page's `count` values."""
    if count == 0:
        return []
    width = body.read(1)[0]
    if body.left > 5 * count + 64:
        raise Corrupt(f"{body.left} bytes of dictionary indices for {count} values")
    return decode_hybrid(body.read(body.left), count, width)


def stream_values(
    stream: BinaryIO,
    length: int,
    *,
    codec: str,
    num_rows: int,
    max_def: int,
    place: Place,
    on_row: Callable[[Any], None],
    seekable: bool = False,
) -> None:
    """Streams the values of one binary column chunk (see the module docstring).

    Args:
        stream: positioned at the chunk's first page (its dictionary page, if any).
        length: the chunk's total compressed size.
        codec: its compression, as the column metadata names it (SNAPPY, ...).
        num_rows: the row group's row count; the pages must hold exactly this many.
        max_def: the column's maximum definition level (0 required, 1 optional, 2 an
            optional field of an optional struct).
        place: `place(length, at) -> (ref, sink or None)`, called at each value's start.
        on_row: called for every row, in order, with its value's ref or None (a null).
        seekable: `stream` can seek forward (values left in place are skipped, not read).

    Raises:
        Unsupported: a layout this reader does not stream (before that page's rows).
        Corrupt: the chunk is damaged; the rows passed on so far are good.
    """
    skip = (lambda n: stream.seek(n, io.SEEK_CUR)) if seekable else None
    inp = _Input(stream.read, length, skip)
    try:
        _walk(inp, codec.upper(), num_rows, max_def, place, on_row)
    except TooFarBack as exc:
        raise Unsupported(str(exc)) from exc
    except (OSError, ValueError) as exc:  # Arrow's decompressors raise both
        raise Corrupt(f"a page does not decompress ({exc})") from exc


def _walk(
    inp: _Input,
    codec: str,
    num_rows: int,
    max_def: int,
    place: Place,
    on_row: Callable[[Any], None],
) -> None:
    dictionary: list[Any] | None = None
    rows = 0
    while rows < num_rows:
        if inp.left <= 0:
            raise Corrupt(f"the column chunk holds {rows} values, the row group {num_rows}")
        header = read_page_header(inp)
        if header.kind == INDEX_PAGE:
            inp.skip(header.compressed)
            continue
        if header.kind == DICTIONARY_PAGE:
            if dictionary is not None:
                raise Corrupt("a second dictionary page in one column chunk")
            if header.encoding not in (_PLAIN, _PLAIN_DICTIONARY):
                raise Unsupported(f"a dictionary page of encoding {header.encoding}")
            _, body, raw, plain = _page(inp, header, codec, 0)
            dictionary = [_value(body, place, plain) for _ in range(header.count)]
            _finish(body, raw)
            continue
        if header.kind == DATA_PAGE_V2 and header.rep_bytes:
            raise Unsupported("repetition levels")
        if rows + header.count > num_rows:
            raise Corrupt(f"a page of {header.count} values past the row group's {num_rows} rows")
        if header.encoding not in (_PLAIN, _PLAIN_DICTIONARY, _RLE_DICTIONARY):
            raise Unsupported(f"encoding {header.encoding}")
        levels, body, raw, plain = _page(inp, header, codec, max_def)
        present = header.count if levels is None else int((levels == max_def).sum())
        if header.encoding == _PLAIN:
            values: Any = None
        elif dictionary is None:
            raise Corrupt("dictionary indices without a dictionary page")
        else:
            values = [dictionary[int(i)] if i < len(dictionary) else None
                      for i in _indices(body, present)]  # fmt: skip
            if None in values:
                raise Corrupt(f"a dictionary index past the dictionary's {len(dictionary)} values")
        k = 0
        for i in range(header.count):
            if levels is not None and levels[i] < max_def:
                on_row(None)
            else:
                on_row(_value(body, place, plain) if values is None else values[k])
                k += 1
            rows += 1
        _finish(body, raw)
