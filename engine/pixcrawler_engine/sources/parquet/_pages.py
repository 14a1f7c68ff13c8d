"""Streaming one binary column chunk of a Parquet row group, value by value, in bounded memory.

pyarrow reads a column chunk page by page, but holds a whole page and copies every value into
an Arrow array: for a page holding one 110 MB PNG, fetching it costs ~230 MB (measured: the
page, then the array). Hugging Face writes `Image` bytes uncompressed and PLAIN-encoded (they
are JPEG/PNG already), which is a sequence of `<u32 length><bytes>` after the page header and
the definition levels. `stream_values` parses that itself and copies each value from the input
stream to a sink in 1 MiB blocks, so a row group of several 100 MB images costs a few MiB.

Only what this layout needs is parsed: Thrift compact page headers (`_Thrift`), data pages v1
and v2, RLE/bit-packed definition levels, no repetition (a flat or struct column). Anything
else (a compressed or dictionary-encoded chunk) is `Unsupported`, and the caller falls back to
pyarrow, which then holds one page. Damage (a bad header, lengths past the chunk's end, too
few values) raises `Corrupt` after the values already streamed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

__all__ = ["Corrupt", "Unsupported", "can_stream", "stream_values"]

BLOCK = 1 << 20
# Page headers are small; a larger one (huge min/max statistics) is refused, not read.
MAX_HEADER_BYTES = 16 << 20
_DATA_PAGE, _INDEX_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 1, 2, 3
_PLAIN, _RLE = 0, 3
_LEN = struct.Struct("<I")


class Corrupt(Exception):
    """The column chunk is damaged; the values streamed before it are good."""


class Unsupported(Exception):
    """The column chunk is laid out in a way this reader does not stream (use pyarrow)."""


def can_stream(compression: str, encodings: tuple[str, ...], max_rep: int) -> bool:
    """Whether a column chunk with this metadata is one `stream_values` handles."""
    return (
        compression.upper() == "UNCOMPRESSED"
        and set(encodings) <= {"PLAIN", "RLE", "BIT_PACKED"}
        and max_rep == 0
    )


class _Input:
    """Reads exactly what is asked from a stream, within the column chunk's length."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self.stream = stream
        self.left = length

    def read(self, n: int) -> bytes:
        if n > self.left:
            raise Corrupt(f"a length of {n} bytes runs past the end of the column chunk")
        data = self.stream.read(n)
        if len(data) != n:
            raise Corrupt(f"the column chunk ends {n - len(data)} bytes early")
        self.left -= n
        return data

    def copy(self, n: int, sink: Callable[[bytes], Any]) -> None:
        while n:
            block = self.read(min(n, BLOCK))
            sink(block)
            n -= len(block)


class _Thrift:
    """Just enough of the Thrift compact protocol to read a Parquet PageHeader."""

    def __init__(self, inp: _Input) -> None:
        self.inp = inp
        self.read_bytes = 0

    def byte(self) -> int:
        self.read_bytes += 1
        if self.read_bytes > MAX_HEADER_BYTES:
            raise Corrupt("a page header longer than 16 MiB")
        return self.inp.read(1)[0]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise Corrupt("a varint longer than 64 bits in a page header")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int) -> Any:
        if kind in (1, 2):  # booleans live in the field header
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.read_bytes += 8
            return self.inp.read(8)
        if kind == 8:
            size = self.varint()
            self.read_bytes += size
            if self.read_bytes > MAX_HEADER_BYTES:
                raise Corrupt("a page header longer than 16 MiB")
            return self.inp.read(size)
        if kind in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return [self.value(elem) for _ in range(size)]
        if kind == 11:
            size = self.varint()
            types = self.byte() if size else 0
            return [(self.value(types >> 4), self.value(types & 0x0F)) for _ in range(size)]
        if kind == 12:
            return self.struct()
        raise Corrupt(f"unknown Thrift type {kind} in a page header")

    def struct(self) -> dict[int, Any]:
        fields: dict[int, Any] = {}
        last = 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == 0:
                return fields
            delta = head >> 4
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind)


def _levels(data: bytes, count: int, bit_width: int) -> np.ndarray:
    """Decodes `count` RLE/bit-packed hybrid levels (Parquet's definition levels)."""
    out = np.empty(count, dtype=np.int32)
    pos = filled = 0
    width_bytes = (bit_width + 7) // 8
    try:
        while filled < count:
            shift = header = 0
            while True:
                b = data[pos]
                pos += 1
                header |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if header & 1:  # bit-packed: groups of 8 values, LSB first
                groups = header >> 1
                nbytes = groups * bit_width
                bits = np.unpackbits(
                    np.frombuffer(data, np.uint8, nbytes, pos), bitorder="little"
                ).reshape(-1, bit_width)
                values = bits @ (1 << np.arange(bit_width))
                take = min(len(values), count - filled)
                out[filled : filled + take] = values[:take]
                filled += take
                pos += nbytes
            else:  # a run of one value
                run = header >> 1
                value = int.from_bytes(data[pos : pos + width_bytes], "little")
                pos += width_bytes
                take = min(run, count - filled)
                out[filled : filled + take] = value
                filled += take
                if run == 0:
                    raise Corrupt("an empty run in the definition levels")
    except (IndexError, ValueError) as exc:
        raise Corrupt(f"the definition levels are truncated ({exc})") from exc
    return out


def stream_values(
    stream: BinaryIO,
    length: int,
    *,
    num_rows: int,
    max_def: int,
    on_value: Callable[[int], Callable[[bytes], Any]],
    on_null: Callable[[], None],
) -> None:
    """Streams the values of one uncompressed PLAIN binary column chunk, row by row.

    Args:
        stream: positioned at the chunk's first page (its dictionary page offset, or data
            page offset).
        length: the chunk's total compressed size.
        num_rows: the row group's row count; the pages must hold exactly this many.
        max_def: the column's maximum definition level (0 required, 1 optional, 2 an
            optional field of an optional struct).
        on_value: called with a value's length at its start; returns the sink its bytes are
            passed to, block by block.
        on_null: called for a row without a value (a null struct or a null field).

    Raises:
        Unsupported: a dictionary page, repetition levels or an encoding other than PLAIN
            (checked before any value of that page is passed on); the caller checked
            `can_stream` (no compression) first.
        Corrupt: the chunk is damaged; the rows passed on so far are good.
    """
    inp = _Input(stream, length)
    width = max_def.bit_length()
    rows = 0
    while rows < num_rows:
        if inp.left <= 0:
            raise Corrupt(f"the column chunk holds {rows} values, the row group {num_rows}")
        header = _Thrift(inp).struct()
        kind, size = header.get(1), header.get(3)
        if not isinstance(size, int) or size < 0:
            raise Corrupt(f"a page header without a valid size ({header.get(3)!r})")
        if kind == _DICTIONARY_PAGE:
            raise Unsupported("dictionary-encoded")
        if kind == _INDEX_PAGE:
            inp.read(size)
            continue
        if kind == _DATA_PAGE:
            page = header.get(5) or {}
            count, encoding = page.get(1), page.get(2)
            if max_def and page.get(3) != _RLE:
                raise Unsupported("definition levels not RLE-encoded")
            if max_def:
                (nbytes,) = _LEN.unpack(inp.read(4))
                levels_len = 4 + nbytes
                levels = _levels(inp.read(nbytes), count or 0, width)
        elif kind == _DATA_PAGE_V2:
            page = header.get(8) or {}
            count, encoding = page.get(1), page.get(4)
            nbytes, rep_bytes = page.get(5, 0), page.get(6, 0)
            if rep_bytes:
                raise Unsupported("repetition levels")
            levels_len = nbytes
            if max_def:
                levels = _levels(inp.read(nbytes), count or 0, width)
        else:
            raise Corrupt(f"unknown page type {kind!r}")
        if not isinstance(count, int) or count < 0 or rows + count > num_rows:
            raise Corrupt(f"a page of {count!r} values past the row group's {num_rows} rows")
        if encoding != _PLAIN:
            raise Unsupported(f"encoding {encoding}")
        if not max_def:
            levels_len = 0
            levels = np.zeros(count, dtype=np.int32)
        left = size - levels_len
        for level in levels[:count]:
            if level < max_def:
                on_null()
            else:
                (n,) = _LEN.unpack(inp.read(4))
                if n + 4 > left:
                    raise Corrupt(f"a value of {n} bytes runs past the end of its page")
                inp.copy(n, on_value(n))
                left -= 4 + n
            rows += 1
        if left:
            inp.read(left)  # padding a writer may leave; nothing of ours
