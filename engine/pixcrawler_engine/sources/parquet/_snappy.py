"""A raw Snappy block decompressed as a stream, in bounded memory (64 KiB of history).

Parquet's SNAPPY pages are one raw Snappy block each, and `datasets` 2.x (the writer of most
image datasets on the Hugging Face Hub) puts a whole row group of images in one dictionary
page: 124 MB for 4 ARTeFACT rows, up to the row group's size in general. Snappy libraries
only decompress a block whole (the compressed and the decompressed page at once, ~2x the
row group); `SnappyStream` yields it in pieces instead.

A block is a varint (the decompressed length) and elements: literals (bytes as they are) and
copies (length, offset back into what was produced). Snappy's own compressor, which Arrow and
parquet-mr call, works in 64 KiB fragments and never copies from further back, so 64 KiB of
history is all a copy needs; a copy from further back (valid, but no known writer makes one)
raises `Unsupported`, and the caller reads that page another way. Images are stored already
compressed, so their blocks are long literals (1,901 elements for 124 MB in ARTeFACT's shard)
and Python's loop costs little; each literal is passed on in slices, never copied whole.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

from pixcrawler_engine.sources.parquet._thrift import Corrupt

__all__ = ["HISTORY", "SnappyStream", "TooFarBack"]

HISTORY = 64 << 10
_BLOCK = 1 << 20


class TooFarBack(Exception):
    """A copy reaches further back than the history kept (read the page another way)."""


class _Reader(Protocol):
    def read(self, n: int) -> bytes: ...


class SnappyStream(io.RawIOBase):
    """Reads the decompressed bytes of one raw Snappy block whose compressed form is `source`.

    Args:
        source: the compressed block, read in order (at most `compressed` bytes are asked for).
        compressed: the block's compressed length.
        expected: the decompressed length the page header promises.

    Raises (from `read`):
        Corrupt: a damaged block (a bad element, a copy before the start, a length that
            differs from `expected`).
        TooFarBack: a copy from further back than `HISTORY`.
    """

    def __init__(self, source: _Reader, compressed: int, expected: int) -> None:
        super().__init__()
        self.source = source
        self.left = compressed  # compressed bytes not yet read from `source`
        self.inb = b""  # compressed bytes read, not yet parsed
        self.pos = 0  # parse position in `inb`
        self.out = bytearray()  # history, then produced bytes not yet read
        self.start = 0  # where the unread part of `out` begins
        self.produced = 0  # bytes produced so far
        self.literal = 0  # bytes of the current literal still to pass on
        self.total = self._varint()
        if self.total != expected:
            raise Corrupt(f"a Snappy page of {self.total} bytes where its header says {expected}")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while len(self.out) - self.start < len(view) and self.produced < self.total:
            self._produce(len(view))
        n = min(len(view), len(self.out) - self.start)
        view[:n] = self.out[self.start : self.start + n]
        self.start += n
        if self.start > HISTORY + _BLOCK:  # drop what no copy can reach any more
            del self.out[: self.start - HISTORY]
            self.start = HISTORY
        return n

    # ---- parsing ---------------------------------------------------------------------------
    def _fill(self, n: int) -> None:
        """Makes at least `n` unparsed compressed bytes available (fewer at the block's end)."""
        if len(self.inb) - self.pos >= n or not self.left:
            return
        more = self.source.read(min(self.left, max(n, _BLOCK)))
        if not more:
            raise Corrupt("the Snappy page ends early")
        self.left -= len(more)
        self.inb = self.inb[self.pos :] + more
        self.pos = 0

    def _bytes(self, n: int) -> bytes:
        self._fill(n)
        if len(self.inb) - self.pos < n:
            raise Corrupt("the Snappy page ends inside an element")
        data = self.inb[self.pos : self.pos + n]
        self.pos += n
        return data

    def _varint(self) -> int:
        result = shift = 0
        while True:
            b = self._bytes(1)[0]
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 28:
                raise Corrupt("a Snappy length longer than 32 bits")

    def _produce(self, want: int) -> None:
        """Decodes elements until about `want` bytes are ready to read, or the block ends."""
        target = self.start + want
        while len(self.out) < target and self.produced < self.total:
            if self.literal:
                self._pass_literal(target - len(self.out))
                continue
            tag = self._bytes(1)[0]
            kind = tag & 3
            if kind == 0:
                n = tag >> 2
                if n >= 60:
                    n = int.from_bytes(self._bytes(n - 59), "little")
                self.literal = n + 1
                if self.produced + self.literal > self.total:
                    raise Corrupt("a Snappy literal past the page's length")
                continue
            if kind == 1:
                length, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | self._bytes(1)[0]
            else:
                length = (tag >> 2) + 1
                offset = int.from_bytes(self._bytes(2 if kind == 2 else 4), "little")
            self._copy(length, offset)
        if self.produced == self.total and (self.left or self.pos != len(self.inb)):
            raise Corrupt("a Snappy page longer than its elements")

    def _pass_literal(self, room: int) -> None:
        n = min(self.literal, max(room, 1), _BLOCK)
        self._fill(n)
        take = min(n, len(self.inb) - self.pos)
        if take <= 0:
            raise Corrupt("the Snappy page ends inside a literal")
        self.out += memoryview(self.inb)[self.pos : self.pos + take]
        self.pos += take
        self.literal -= take
        self.produced += take

    def _copy(self, length: int, offset: int) -> None:
        if offset == 0 or offset > self.produced:
            raise Corrupt(f"a Snappy copy from {offset} bytes back, before the page's start")
        if self.produced + length > self.total:
            raise Corrupt("a Snappy copy past the page's length")
        if offset > len(self.out):
            raise TooFarBack(f"a Snappy copy from {offset} bytes back (history: {HISTORY})")
        src = len(self.out) - offset
        if offset >= length:
            self.out += self.out[src : src + length]
        else:  # overlapping: the last `offset` bytes repeated
            pattern = self.out[src:]
            self.out += (pattern * (length // offset + 1))[:length]
        self.produced += length
