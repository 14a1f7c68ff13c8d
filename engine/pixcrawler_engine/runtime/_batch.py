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
stream (`Wire.body_at`: the schema message and the batch's metadata, whose flatbuffers hold
only fixed-size fields), whatever the number of rows and the other columns. `BatchBuilder`
given the slot (`out=`, `at=`) places its pixel array there, and `Wire.write` (NOTE [wire] in
`_ipc`) leaves in place every buffer that already lies where the stream puts it, so the
pixels are never copied; anything else is copied.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler_engine.runtime._builder import BatchBuilder, binary_offsets, string_buffers
from pixcrawler_engine.runtime._ipc import Wire, parse_wire

__all__ = [
    "BatchBuilder",
    "image_views",
    "labels_of",
    "mask_views",
    "read_batch",
    "record_batch",
    "schema_for",
    "wire_for",
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
    data = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.empty(0, np.uint8)
    offsets = pa.py_buffer(binary_offsets(arrays))
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(arrays), [None, offsets, pa.py_buffer(data)]
    )


# Arrays are built from buffers, not with `pa.array`: that one imports pandas on first use
# (half a second in every worker) to check whether its input is a pandas object.
def _numeric(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def _strings(values: Sequence[str]) -> pa.Array:
    offsets, data = string_buffers(values)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(data))


def _tensor(type_: pa.DataType, array: np.ndarray, width: int) -> pa.ExtensionArray:
    storage = pa.FixedSizeListArray.from_arrays(_numeric(array.reshape(-1), pa.uint8()), width)
    return pa.ExtensionArray.from_storage(type_, storage)


def record_batch(builder: BatchBuilder) -> pa.RecordBatch:
    """A builder's batch as a pyarrow RecordBatch, zero-copy over its arrays."""
    builder.check()
    schema = schema_for(builder.fixed_shape, masks=bool(builder.masks))
    columns: list[pa.Array]
    fixed = builder.image_columns()
    if fixed is not None and builder.fixed_shape is not None:
        h, w, c = builder.fixed_shape
        pixels, masks = fixed
        columns = [_tensor(schema.field("image").type, pixels, h * w * c)]
        if masks is not None:
            columns.append(_tensor(schema.field("mask").type, masks, h * w))
    else:
        shapes = builder.image_shapes().reshape(-1)
        columns = [
            _binary(builder.images),
            pa.FixedSizeListArray.from_arrays(_numeric(shapes, pa.int32()), 3),
        ]
        if builder.masks:
            columns.append(_binary(builder.masks))
    columns += [
        _strings(builder.labels),
        _strings(builder.keys),
        _numeric(np.array(builder.chunks, np.int32), pa.int32()),
        _numeric(np.array(builder.indices, np.int64), pa.int64()),
        _numeric(np.array(builder.widths, np.int32), pa.int32()),
        _numeric(np.array(builder.heights, np.int32), pa.int32()),
        _strings(builder.metadata),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


@functools.cache
def wire_for(fixed_shape: tuple[int, int, int] | None, masks: bool = False) -> Wire:
    """The `Wire` of batches of this shape (NOTE [wire] in `_ipc`), checked against pyarrow:
    a small batch written both ways is the same bytes here, and must at least read back the
    same (another pyarrow may pad or order its flatbuffers otherwise)."""
    builder = _sample(fixed_shape, masks)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema_for(fixed_shape, masks=masks)) as writer:
        writer.write_batch(record_batch(builder))
    expected = sink.getvalue().to_pybytes()
    wire = parse_wire(expected)
    mine = bytearray(len(expected) + 4096)
    size = wire.write(len(builder), *builder.layout(), memoryview(mine))
    if bytes(mine[:size]) != expected:
        back = read_batch(pa.py_buffer(bytes(mine[:size])))
        if not back.equals(read_batch(pa.py_buffer(expected))):
            raise RuntimeError(
                "this pyarrow reads the workers' Arrow IPC otherwise than it was written (NOTE "
                f"[wire] in runtime/_ipc.py); please report it with pyarrow {pa.__version__}"
            )
    return wire


def _sample(fixed_shape: tuple[int, int, int] | None, masks: bool) -> BatchBuilder:
    """A batch of two odd-sized samples, to learn and check a schema's `Wire`."""
    builder = BatchBuilder(fixed_shape, capacity=2)
    for i in range(2):
        shape = fixed_shape or (i + 1, 3, 3)
        image = builder.next_image()
        if image is None:
            image = np.full(shape, 7 + i, np.uint8)
        mask = np.full(shape[:2], i, np.uint8) if masks else None
        builder.add(image, label=["a", i][i], key=f"k{i}é", chunk=i, index=i, orig_size=(5, 3),
                    metadata={"i": i}, mask=mask)  # fmt: skip
    return builder


def write_batch(batch: pa.RecordBatch, buf: memoryview) -> int:
    """Writes `batch` as an Arrow IPC stream into `buf` (which must not hold the batch's own
    buffers); returns the bytes written. The workers write theirs with `_ipc` instead."""
    sink = pa.FixedSizeBufferWriter(pa.py_buffer(buf))
    try:
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"the batch needs more than the {len(buf)} bytes of its buffer") from exc
    return int(sink.tell())


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
