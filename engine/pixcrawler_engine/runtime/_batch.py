"""The Arrow form of a decoded batch: its schema, how it is built, written and read in place.

A decoded batch is one Arrow RecordBatch with these columns:

    image        fixed_shape_tensor<uint8>[H, W, C]   when the decode policy fixes the shape
                 large_binary (raw HWC bytes)         otherwise, with `image_shape`
    image_shape  fixed_size_list<int32>[3]            (variable-size form only)
    mask         fixed_shape_tensor<uint8>[H, W] or large_binary: the segmentation mask at
                 the image's geometry (only for sources with masks)
    label        string: the label as JSON (str, int or dict labels all survive the trip)
    key          string: the sample's key within its source (zip member, row id)
    chunk        int32: the chunk it came from
    index        int64: the sample's position in the unshuffled dataset
    orig_width   int32, orig_height int32: the stored size before any resize
    metadata     string: the sample's other manifest fields, as JSON

Batches travel as Arrow IPC streams written into shared-memory slots; `read_batch` maps one in
place, so every array handed out is a view of the slot.

NOTE [pixels in place]: a worker decodes fixed-size images straight into the slot. The image
column's values are the first buffer of the IPC body, so they start at a fixed offset of the
stream (`pixels_offset`: the schema message and the batch's metadata, whose flatbuffers hold
only fixed-size fields), whatever the number of rows and the other columns. `BatchBuilder`
given the slot (`out=`) places its pixel array there, and `write_batch` skips every buffer
that already lies where the stream puts it, so the pixels are never copied; anything else (or
a layout that ever differs) is copied as before.
"""

from __future__ import annotations

import array
import functools
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler_engine._json import dumps
from pixcrawler_engine.runtime._sink import InPlaceSink, write_stream

__all__ = [
    "BatchBuilder",
    "image_views",
    "labels_of",
    "mask_views",
    "pixels_offset",
    "read_batch",
    "schema_for",
    "write_batch",
]

_COMMON_FIELDS = [
    pa.field("label", pa.string()),
    pa.field("key", pa.string()),
    pa.field("chunk", pa.int32()),
    pa.field("index", pa.int64()),
    pa.field("orig_width", pa.int32()),
    pa.field("orig_height", pa.int32()),
    pa.field("metadata", pa.string()),
]


def schema_for(fixed_shape: tuple[int, int, int] | None, *, masks: bool = False) -> pa.Schema:
    """The schema of a batch for a fixed output shape (H, W, C), or None for variable size."""
    if fixed_shape is not None:
        image = [pa.field("image", pa.fixed_shape_tensor(pa.uint8(), list(fixed_shape)))]
        if masks:
            mask_type = pa.fixed_shape_tensor(pa.uint8(), list(fixed_shape[:2]))
            image.append(pa.field("mask", mask_type))
    else:
        image = [
            pa.field("image", pa.large_binary()),
            pa.field("image_shape", pa.list_(pa.int32(), 3)),
        ]
        if masks:
            image.append(pa.field("mask", pa.large_binary()))
    return pa.schema(image + _COMMON_FIELDS)


def _binary(arrays: Sequence[np.ndarray]) -> pa.LargeBinaryArray:
    """Concatenates arrays into one large_binary column, one value each (one copy)."""
    n = len(arrays)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([a.nbytes for a in arrays], out=offsets[1:])
    data = np.concatenate([a.reshape(-1) for a in arrays]) if n else np.empty(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


# Arrays are built from buffers, not with `pa.array`: that one imports pandas on first use
# (half a second in every worker) to check whether its input is a pandas object.
def _numeric(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _strings(values: Sequence[str]) -> pa.Array:
    joined = "".join(values)
    if joined.isascii():  # one encode, and the lengths in characters are the lengths in bytes
        data, lengths = joined.encode(), map(len, values)
    else:
        encoded = [v.encode() for v in values]
        data, lengths = b"".join(encoded), map(len, encoded)
    offsets = array.array("i", itertools.accumulate(lengths, initial=0))
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(data))


def _tensor(type_: pa.DataType, array: np.ndarray, width: int) -> pa.ExtensionArray:
    storage = pa.FixedSizeListArray.from_arrays(_numeric(array.reshape(-1), pa.uint8()), width)
    return pa.ExtensionArray.from_storage(type_, storage)


@dataclass
class BatchBuilder:
    """Collects decoded samples of one batch and turns them into a RecordBatch.

    With a fixed shape, images are decoded straight into `pixels`, a preallocated
    (rows, H, W, C) array, through `next_image()`; no per-image allocation. Given `out`, the
    buffer the batch will be written to (a shared-memory slot), `pixels` lies in it, where
    `write_batch` would copy them (see NOTE [pixels in place]).
    """

    fixed_shape: tuple[int, int, int] | None
    capacity: int
    pixels: np.ndarray | None = None
    out: memoryview | None = None
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
            start = 0 if self.out is None else pixels_offset(self.fixed_shape)
            if self.out is not None and start + size <= len(self.out):
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

    def build(self) -> pa.RecordBatch:
        n = len(self.keys)
        if self.masks and len(self.masks) != n:
            raise ValueError("either every sample of a batch has a mask or none has")
        schema = schema_for(self.fixed_shape, masks=bool(self.masks))
        columns: list[pa.Array]
        if self.pixels is not None and self.fixed_shape is not None:
            h, w, c = self.fixed_shape
            columns = [_tensor(schema.field("image").type, self.pixels[:n], h * w * c)]
            if self.masks:
                columns.append(_tensor(schema.field("mask").type, np.stack(self.masks), h * w))
        else:
            shapes = np.array([a.shape for a in self.images], dtype=np.int32).reshape(n, 3)
            columns = [
                _binary(self.images),
                pa.FixedSizeListArray.from_arrays(_numeric(shapes.reshape(-1), pa.int32()), 3),
            ]
            if self.masks:
                columns.append(_binary(self.masks))
        columns += [
            _strings(self.labels),
            _strings(self.keys),
            _numeric(np.array(self.chunks, np.int32), pa.int32()),
            _numeric(np.array(self.indices, np.int64), pa.int64()),
            _numeric(np.array(self.widths, np.int32), pa.int32()),
            _numeric(np.array(self.heights, np.int32), pa.int32()),
            _strings(self.metadata),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=schema)


def ipc_size(batch: pa.RecordBatch) -> int:
    """Bytes `write_batch` needs for this batch."""
    sink = pa.MockOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return int(sink.size())


def write_batch(batch: pa.RecordBatch, buf: memoryview) -> int:
    """Writes `batch` as an Arrow IPC stream into `buf`; returns the bytes written.

    Buffers of `batch` that already lie in `buf` where the stream puts them (the pixels of a
    `BatchBuilder(out=buf)`) are left as they are.
    """
    dest = np.frombuffer(buf, np.uint8)
    low, high = dest.ctypes.data, dest.ctypes.data + dest.size
    layout = InPlaceSink(None)  # where each buffer goes, nothing written (~13 calls)
    write_stream(batch, layout)
    if any(low <= a < high and a != low + at for a, at in layout.marks.items()):
        # A buffer lies in `buf` but not where the stream puts it (a batch with masks has a
        # longer schema): the writes before it would overwrite it. Move the batch out first.
        heap = memoryview(bytearray(layout.position))
        write_stream(batch, InPlaceSink(heap))
        batch = read_batch(pa.py_buffer(heap))
    sink = InPlaceSink(buf)
    write_stream(batch, sink)
    return sink.position


@functools.cache
def pixels_offset(fixed_shape: tuple[int, int, int], masks: bool = False) -> int:
    """Where the image values of a fixed-shape batch start in its IPC stream (`write_batch`)."""
    builder = BatchBuilder(fixed_shape, capacity=1)
    assert builder.pixels is not None
    mask = np.zeros(fixed_shape[:2], np.uint8) if masks else None
    builder.add(
        builder.pixels[0],
        label=0,
        key="",
        chunk=0,
        index=0,
        orig_size=(1, 1),
        metadata=None,
        mask=mask,
    )
    sink = InPlaceSink(None)
    write_stream(builder.build(), sink)
    return sink.marks[builder.pixels.ctypes.data]


def read_batch(buf: pa.Buffer) -> pa.RecordBatch:
    """Maps an IPC stream in `buf` without copying: the arrays are views of `buf`.

    The stream's schema message is the same bytes batch after batch: its parsed schema is
    kept (by those bytes), and only the batch's own message is read (3 us, against 11 for
    opening the stream).
    """
    # A message: the continuation marker, its metadata's length, the metadata (no body).
    size = 8 + int.from_bytes(buf.slice(4, 4).to_pybytes(), "little")
    head = buf.slice(0, size).to_pybytes()
    schema = _schemas.get(head)
    if schema is None:
        schema = pa.ipc.open_stream(buf).schema
        if len(_schemas) >= 16:  # a few shapes per process; never grows without bound
            _schemas.clear()
        _schemas[head] = schema
    return pa.ipc.read_record_batch(pa.ipc.read_message(buf.slice(size)), schema)


_schemas: dict[bytes, pa.Schema] = {}  # a stream's schema message -> its schema


def image_views(batch: pa.RecordBatch) -> np.ndarray | list[np.ndarray]:
    """The images of a batch as zero-copy numpy views.

    Returns one (B, H, W, C) array for fixed-shape batches, else a list of (H, W, C) arrays.
    """
    column = batch.column("image")
    if isinstance(column.type, pa.FixedShapeTensorType):
        shape = tuple(column.type.shape)
        flat = _view(column.storage.values, np.uint8)
        start = column.offset * math.prod(shape)
        return flat[start : start + len(column) * math.prod(shape)].reshape(len(column), *shape)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[
        column.offset : column.offset + len(column) + 1
    ]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    shapes = _view(batch.column("image_shape").values, np.int32).reshape(-1, 3)
    shapes = shapes[column.offset : column.offset + len(column)]
    return [data[offsets[i] : offsets[i + 1]].reshape(tuple(shapes[i])) for i in range(len(column))]


def mask_views(batch: pa.RecordBatch) -> np.ndarray | list[np.ndarray] | None:
    """The masks of a batch as zero-copy views, shaped like `image_views` without channels."""
    if "mask" not in batch.schema.names:
        return None
    column = batch.column("mask")
    if isinstance(column.type, pa.FixedShapeTensorType):
        shape = tuple(column.type.shape)
        size = math.prod(shape)
        flat = _view(column.storage.values, np.uint8)
        start = column.offset * size
        return flat[start : start + len(column) * size].reshape(len(column), *shape)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[
        column.offset : column.offset + len(column) + 1
    ]
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    shapes = _view(batch.column("image_shape").values, np.int32).reshape(-1, 3)
    shapes = shapes[column.offset : column.offset + len(column)]
    return [
        data[offsets[i] : offsets[i + 1]].reshape(tuple(shapes[i][:2])) for i in range(len(column))
    ]


def labels_of(batch: pa.RecordBatch) -> list[Any]:
    """The labels of a batch as Python values (str, int or dict), parsed in one call."""
    return _json_column(batch.column("label"))


def _view(array: pa.Array, dtype: type[np.generic]) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls.

    Not `Array.to_numpy`: pyarrow imports pandas on its first call, when pandas is installed
    (0.3-0.6 s measured on this machine, on the consumer's first batch).
    """
    want = np.dtype(dtype)
    if array.type != pa.from_numpy_dtype(want) or array.null_count:
        raise TypeError(f"expected {want} without nulls, got {array.type}, {array.null_count} null")
    data = array.buffers()[1]
    if data is None or not len(array):
        return np.empty(0, dtype=want)
    return np.frombuffer(data, dtype=want, count=len(array), offset=array.offset * want.itemsize)


def metadata_of(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    return _json_column(batch.column("metadata"))


def _json_column(column: pa.Array) -> list[Any]:
    """A column of JSON texts as values: one parse for the whole column, not one per row."""
    values = column.to_pylist()
    return list(json.loads("[" + ",".join(values) + "]")) if values else []
