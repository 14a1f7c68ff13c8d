"""Pixels decoded into the slot itself: `BatchBuilder(out=slot)` + `write_batch` copy no pixel.

See NOTE [pixels in place] in `runtime/_batch.py`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pixcrawler_engine._json import dumps
from pixcrawler_engine.runtime._batch import (
    BatchBuilder,
    image_views,
    mask_views,
    read_batch,
    write_batch,
)
from pixcrawler_engine.runtime._sink import InPlaceSink, write_stream

SHAPE = (32, 48, 3)


def _fill(builder: BatchBuilder, n: int, *, masks: bool = False) -> None:
    for i in range(n):
        image = builder.next_image()
        assert image is not None
        image[...] = i
        mask = np.full(SHAPE[:2], i, np.uint8) if masks else None
        builder.add(image, label=f"l{i}", key=f"k{i}", chunk=3, index=i,
                    orig_size=(48, 32), metadata={"i": i}, mask=mask)  # fmt: skip


def _copied(batch: pa.RecordBatch, slot: memoryview) -> tuple[int, pa.RecordBatch]:
    sink = InPlaceSink(slot)
    write_stream(batch, sink)
    return sink.copied, read_batch(pa.py_buffer(slot[: sink.position]))


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_pixels_are_written_in_place(rows: int) -> None:
    slot = memoryview(bytearray(64 * (np.prod(SHAPE) + 4096) + 65536))
    builder = BatchBuilder(SHAPE, capacity=64, out=slot)
    assert builder.pixels is not None and np.shares_memory(builder.pixels, np.frombuffer(slot))
    _fill(builder, rows)
    copied, back = _copied(builder.build(), slot)
    assert copied < 4096 + 64 * rows  # labels, keys, metadata: never the pixels
    views = image_views(back)
    assert isinstance(views, np.ndarray) and views.shape == (rows, *SHAPE)
    assert (views[:, 5, 7, 1] == np.arange(rows)).all()
    assert back.column("key").to_pylist() == [f"k{i}" for i in range(rows)]


def test_a_sliced_batch_and_masks_still_round_trip() -> None:
    """A batch with masks has a longer schema: its pixels are not where the stream puts them,
    and `write_batch` moves them out before the metadata would overwrite them."""
    slot = memoryview(bytearray(16 * (np.prod(SHAPE) * 2 + 4096) + 65536))
    builder = BatchBuilder(SHAPE, capacity=16, out=slot)
    _fill(builder, 12, masks=True)
    nbytes = write_batch(builder.build().slice(0, 5), slot)
    back = read_batch(pa.py_buffer(slot[:nbytes]))
    assert (image_views(back)[:, 0, 0, 0] == np.arange(5)).all()  # type: ignore[call-overload]
    masks = mask_views(back)
    assert isinstance(masks, np.ndarray) and (masks[:, 1, 1] == np.arange(5)).all()


def test_same_stream_as_a_plain_write() -> None:
    """In place or not, the slot holds the same bytes."""
    size = 8 * (np.prod(SHAPE) + 4096) + 65536
    plain, in_place = bytearray(size), memoryview(bytearray(size))
    heap = BatchBuilder(SHAPE, capacity=8)
    _fill(heap, 6)
    n1 = write_batch(heap.build(), memoryview(plain))
    slotted = BatchBuilder(SHAPE, capacity=8, out=in_place)
    _fill(slotted, 6)
    n2 = write_batch(slotted.build(), in_place)
    assert n1 == n2 and bytes(plain[:n1]) == bytes(in_place[:n2])


def test_a_slot_too_small_falls_back_to_memory_and_a_full_one_raises() -> None:
    small = memoryview(bytearray(1000))
    builder = BatchBuilder(SHAPE, capacity=4, out=small)
    assert builder.pixels is not None and not np.shares_memory(builder.pixels, np.frombuffer(small))
    _fill(builder, 2)
    with pytest.raises(ValueError, match="more than the 1000 bytes"):
        write_batch(builder.build(), small)


def test_labels_keys_and_metadata_survive_the_trip_byte_for_byte() -> None:
    # The string columns are built from one join when ASCII and per value otherwise; labels
    # and metadata are JSON from the engine's reused encoder, which must equal json.dumps.
    values: list[Any] = ["7", 3, {"b": [1, 2.5, None], "a": "é"}, "日本", "", float("nan"), True]
    for value in values:
        assert dumps(value) == json.dumps(value)
    with pytest.raises(TypeError):
        dumps({"x": object()})
    slot = memoryview(bytearray(1 << 20))
    builder = BatchBuilder(SHAPE, capacity=len(values), out=slot)
    keys = [f"k{i}-{'é' * i}" for i in range(len(values))]
    for i, (value, key) in enumerate(zip(values, keys, strict=True)):
        builder.next_image()
        builder.add(builder.pixels[i], label=value, key=key, chunk=0, index=i,  # type: ignore[index]
                    orig_size=(48, 32), metadata={"v": value})  # fmt: skip
    _, back = _copied(builder.build(), slot)
    assert back.column("key").to_pylist() == keys
    assert back.column("label").to_pylist() == [json.dumps(v) for v in values]
    assert back.column("metadata").to_pylist() == [json.dumps({"v": v}) for v in values]
