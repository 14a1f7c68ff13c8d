"""Arrow IPC streams written by the workers without pyarrow: a schema's `Wire`, and `write`.

NOTE [wire]: a worker writes each batch as an Arrow IPC stream (a schema message, one record
batch message, the end marker) into its slot, and the consumer maps it with pyarrow. Importing
pyarrow took ~50 ms of a worker zygote's start-up (the longest step to a first batch), and
writing through its IPC writer ~3 us per image (three passes over the stream per batch, each
a dozen Python calls). Nothing in a batch's metadata depends on its contents but numbers at
fixed places: the record batch's length, its body's length, and each field node's length and
each buffer's offset and length (flatbuffer structs of two int64s, inline in their vectors).
So the consumer, which has pyarrow, writes one small batch of the run's schema once and
makes a `Wire` of it: the schema message as is, the record batch message as a template, and
where those numbers lie in it (read from the flatbuffer's tables). A worker copies the two
messages, writes the numbers, and lays out the body itself: each buffer at an 8-byte aligned
offset, the pixels first, where `BatchBuilder(out=slot)` decoded them. `_batch.wire_for`
writes the same small batch this way and compares it with what pyarrow wrote, byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

__all__ = ["TooLarge", "Wire", "buffer_size", "parse_wire"]

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_I64 = struct.Struct("<q")
_PAIR = struct.Struct("<qq")
EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the end of an IPC stream
ALIGN = 8


def buffer_size(length: int) -> int:
    """The room a buffer of `length` bytes takes in a body: padded to 8 bytes."""
    return -(-length // ALIGN) * ALIGN


@dataclass(frozen=True)
class Wire:
    """The two messages of one schema's streams, and where a batch's numbers go (NOTE [wire])."""

    schema: bytes  # the encapsulated schema message, as pyarrow wrote it
    meta: bytes  # an encapsulated record batch message without its body: the template
    length_at: int  # RecordBatch.length (int64) in `meta`
    body_length_at: int  # Message.bodyLength (int64) in `meta`
    nodes_at: int  # the FieldNode structs (length, null_count) in `meta`
    buffers_at: int  # the Buffer structs (offset, length) in `meta`
    num_nodes: int
    num_buffers: int

    @property
    def body_at(self) -> int:
        """Where a batch's body starts in its stream: its first buffer (the pixels) is there."""
        return len(self.schema) + len(self.meta)

    def write(
        self, rows: int, nodes: Sequence[int], buffers: Sequence[Any], out: memoryview
    ) -> int:
        """Writes a batch of `rows` rows into `out`; returns the bytes written.

        `nodes` are the field nodes' lengths and `buffers` the buffers, in schema order (as
        `BatchBuilder.layout` gives them): each a numpy array or another bytes-like object, a
        list of them (written one after the other), or None for an empty validity bitmap. An
        array that already lies in `out` where it goes is not copied; one that lies elsewhere
        in `out` is moved out first (the pixels of a batch whose schema is longer: masks).

        Raises:
            TooLarge: the batch does not fit in `out` (nothing was written).
        """
        if len(nodes) != self.num_nodes or len(buffers) != self.num_buffers:
            raise ValueError(
                f"a batch of {len(nodes)} nodes and {len(buffers)} buffers does not fit a schema "
                f"of {self.num_nodes} and {self.num_buffers}"
            )
        import numpy as np  # here: the supervisor passes wires on without numpy

        dest = memoryview(out).cast("B")
        base = np.frombuffer(dest, np.uint8).ctypes.data
        meta = bytearray(self.meta)
        places: list[tuple[Any, int]] = []  # (part, where it goes)
        offset = 0  # in the body
        for i, buffer in enumerate(buffers):
            start = offset
            for part in _parts(buffer):
                places.append((part, self.body_at + offset))
                offset += part.nbytes
            _PAIR.pack_into(meta, self.buffers_at + 16 * i, start, offset - start)
            offset = start + buffer_size(offset - start)
        end = self.body_at + offset
        if end + len(EOS) > len(dest):
            raise TooLarge(
                f"the batch needs {end + len(EOS)} bytes, more than the {len(dest)} it has"
            )
        for i, (part, to) in enumerate(places):
            at = part.ctypes.data - base if isinstance(part, np.ndarray) else -1
            if 0 <= at < len(dest) and at != to:
                places[i] = (part.copy(), to)  # before the writes below reach it
        _I64.pack_into(meta, self.length_at, rows)
        _I64.pack_into(meta, self.body_length_at, offset)
        for i, length in enumerate(nodes):
            _PAIR.pack_into(meta, self.nodes_at + 16 * i, length, 0)
        dest[: len(self.schema)] = self.schema
        dest[len(self.schema) : self.body_at] = meta
        written = self.body_at
        for part, to in places:
            if written < to:  # the padding after a buffer
                dest[written:to] = bytes(to - written)
            written = to + part.nbytes
            if not isinstance(part, np.ndarray):
                dest[to:written] = part
            elif part.ctypes.data != base + to:  # else in place already
                dest[to:written] = part.data
        if written < end:
            dest[written:end] = bytes(end - written)
        dest[end : end + len(EOS)] = EOS
        return end + len(EOS)


class TooLarge(ValueError):
    """A batch larger than the buffer it was to be written to."""


def _parts(buffer: Any) -> list[Any]:
    """A buffer's parts as flat uint8 arrays or byte memoryviews (views, no copy)."""
    import numpy as np

    if buffer is None:
        return []
    items = buffer if isinstance(buffer, list) else [buffer]
    return [
        np.ascontiguousarray(b).reshape(-1).view(np.uint8)
        if isinstance(b, np.ndarray)
        else memoryview(b).cast("B")
        for b in items
    ]


def parse_wire(stream: bytes) -> Wire:
    """The `Wire` of an IPC stream holding one record batch (NOTE [wire]).

    Reads the flatbuffers of the record batch message (Arrow's Message.fbs and Schema.fbs):
    the root table Message { version, header_type, header, bodyLength }, its header a
    RecordBatch { length, nodes, buffers, compression }.
    """
    schema_end = 8 + _I32.unpack_from(stream, 4)[0]
    meta_len = _I32.unpack_from(stream, schema_end + 4)[0]
    meta = stream[schema_end : schema_end + 8 + meta_len]
    fb = 8  # the flatbuffer starts after the continuation marker and the length
    message = fb + _U32.unpack_from(meta, fb)[0]
    header_type = meta[_field(meta, message, 1)]
    if header_type != 3:  # MessageHeader.RecordBatch
        raise ValueError(f"the stream's second message is not a record batch ({header_type})")
    header = _offset(meta, _field(meta, message, 2))
    nodes = _offset(meta, _field(meta, header, 1))
    buffers = _offset(meta, _field(meta, header, 2))
    if _vtable_has(meta, header, 3):
        raise ValueError("the template batch is compressed")
    return Wire(
        schema=bytes(stream[:schema_end]),
        meta=bytes(meta),
        length_at=_field(meta, header, 0),
        body_length_at=_field(meta, message, 3),
        nodes_at=nodes + 4,
        buffers_at=buffers + 4,
        num_nodes=_U32.unpack_from(meta, nodes)[0],
        num_buffers=_U32.unpack_from(meta, buffers)[0],
    )


def _vtable_has(buf: bytes, table: int, index: int) -> bool:
    vtable = table - _I32.unpack_from(buf, table)[0]
    size = _U16.unpack_from(buf, vtable)[0]
    slot = 4 + 2 * index
    return slot < size and _U16.unpack_from(buf, vtable + slot)[0] != 0


def _field(buf: bytes, table: int, index: int) -> int:
    """Where field `index` of the table at `table` lies; it must be present."""
    if not _vtable_has(buf, table, index):
        raise ValueError(f"field {index} is absent from the template's flatbuffer")
    vtable = table - _I32.unpack_from(buf, table)[0]
    return table + _U16.unpack_from(buf, vtable + 4 + 2 * index)[0]


def _offset(buf: bytes, at: int) -> int:
    """The position an offset field at `at` points to."""
    return at + _U32.unpack_from(buf, at)[0]
