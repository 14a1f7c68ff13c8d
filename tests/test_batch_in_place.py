"""The workers' Arrow IPC writer (`_ipc.Wire`): pixels decoded into the slot stay in place, and
every batch is the stream pyarrow would write, without pyarrow in the worker.

See NOTE [wire] in `runtime/_ipc.py` and NOTE [pixels in place] in `runtime/_batch.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    record_batch,
    wire_for,
    write_batch,
)
from pixcrawler_engine.runtime._ipc import TooLarge

SHAPE = (32, 48, 3)


def _fill(builder: BatchBuilder, n: int, *, masks: bool = False, sizes: bool = False) -> None:
    for i in range(n):
        image = builder.next_image()
        if image is None:  # variable size: each its own
            image = np.empty((3 + i * sizes, 5, 3), np.uint8)
        image[...] = i
        mask = np.full(image.shape[:2], i, np.uint8) if masks else None
        builder.add(image, label=[f"l{i}", i][i % 2], key=f"k{i}-{'é' * (i % 3)}", chunk=3,
                    index=i, orig_size=(48, 32), metadata={"i": i}, mask=mask)  # fmt: skip


def _write(builder: BatchBuilder, slot: memoryview) -> tuple[int, pa.RecordBatch]:
    wire = wire_for(builder.fixed_shape, masks=bool(builder.masks))
    nbytes = wire.write(len(builder), *builder.layout(), slot)
    return nbytes, read_batch(pa.py_buffer(slot[:nbytes]))


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_pixels_decoded_into_the_slot_read_back_in_place(rows: int) -> None:
    slot = memoryview(bytearray(64 * (np.prod(SHAPE) + 4096) + 65536))
    builder = BatchBuilder(SHAPE, capacity=64, out=slot, at=wire_for(SHAPE).body_at)
    assert builder.pixels is not None and np.shares_memory(builder.pixels, np.frombuffer(slot))
    _fill(builder, rows)
    _, back = _write(builder, slot)
    views = image_views(back)
    assert isinstance(views, np.ndarray) and views.shape == (rows, *SHAPE)
    assert np.shares_memory(views, builder.pixels)  # the very bytes decoded into the slot
    assert (views[:, 5, 7, 1] == np.arange(rows)).all()
    assert back.column("key").to_pylist() == builder.keys


@pytest.mark.parametrize(
    ("shape", "masks", "rows"),
    [(SHAPE, False, 0), (SHAPE, False, 5), (SHAPE, True, 4), (None, False, 6), (None, True, 3)],
)
def test_the_stream_is_what_pyarrow_writes(
    shape: tuple[int, int, int] | None, masks: bool, rows: int
) -> None:
    """Byte for byte, for fixed and variable sizes, with masks and without; an empty batch
    (pyarrow leaves its zero length out of the flatbuffer, we write it) reads the same."""
    builder = BatchBuilder(shape, capacity=8)
    _fill(builder, rows, masks=masks, sizes=True)
    expected = bytearray(1 << 20)
    n1 = write_batch(record_batch(builder), memoryview(expected))
    mine = memoryview(bytearray(1 << 20))
    n2, back = _write(builder, mine)
    if rows:
        assert n1 == n2 and bytes(mine[:n2]) == bytes(expected[:n1])
    assert back.equals(read_batch(pa.py_buffer(expected[:n1])))
    assert back.num_rows == rows and back.column("index").to_pylist() == list(range(rows))


def test_pixels_placed_for_a_shorter_schema_move_before_the_masks_schema_is_written() -> None:
    """A batch with masks has a longer schema: its pixels, decoded where a batch without masks
    puts them, are moved out before the metadata would overwrite them."""
    slot = memoryview(bytearray(16 * (np.prod(SHAPE) * 2 + 4096) + 65536))
    builder = BatchBuilder(SHAPE, capacity=16, out=slot, at=wire_for(SHAPE).body_at)
    _fill(builder, 12, masks=True)
    builder.truncate(5)
    _, back = _write(builder, slot)
    assert (image_views(back)[:, 0, 0, 0] == np.arange(5)).all()  # type: ignore[call-overload]
    masks = mask_views(back)
    assert isinstance(masks, np.ndarray) and (masks[:, 1, 1] == np.arange(5)).all()


def test_a_slot_too_small_falls_back_to_memory_and_a_full_one_raises() -> None:
    small = memoryview(bytearray(1000))
    builder = BatchBuilder(SHAPE, capacity=4, out=small, at=wire_for(SHAPE).body_at)
    assert builder.pixels is not None and not np.shares_memory(builder.pixels, np.frombuffer(small))
    _fill(builder, 2)
    with pytest.raises(TooLarge, match="more than the 1000 it has"):
        _write(builder, small)


def test_labels_keys_and_metadata_survive_the_trip_byte_for_byte() -> None:
    # The string columns are built from one join when ASCII and per value otherwise; labels
    # and metadata are JSON from the engine's reused encoder, which must equal json.dumps.
    values: list[Any] = ["7", 3, {"b": [1, 2.5, None], "a": "é"}, "日本", "", float("nan"), True]
    for value in values:
        assert dumps(value) == json.dumps(value)
    with pytest.raises(TypeError):
        dumps({"x": object()})
    slot = memoryview(bytearray(1 << 20))
    builder = BatchBuilder(SHAPE, capacity=len(values), out=slot, at=wire_for(SHAPE).body_at)
    keys = [f"k{i}-{'é' * i}" for i in range(len(values))]
    for i, (value, key) in enumerate(zip(values, keys, strict=True)):
        builder.next_image()
        builder.add(builder.pixels[i], label=value, key=key, chunk=0, index=i,  # type: ignore[index]
                    orig_size=(48, 32), metadata={"v": value})  # fmt: skip
    _, back = _write(builder, slot)
    assert back.column("key").to_pylist() == keys
    assert back.column("label").to_pylist() == [json.dumps(v) for v in values]
    assert back.column("metadata").to_pylist() == [json.dumps({"v": v}) for v in values]


def test_a_worker_never_imports_pyarrow() -> None:
    """Its imports and warm-up are the zygote's start-up, the longest step to a first batch:
    no pyarrow (~50 ms), nor multiprocessing (~8 ms; `_protocol.Channel` frames its messages),
    dill or tomllib."""
    code = (
        "import sys\n"
        "from pixcrawler_engine.runtime._worker import warm_up, worker_main\n"
        "warm_up()\n"
        "print(sorted(set(sys.modules) & {'pyarrow', 'multiprocessing', 'dill', 'tomllib'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
