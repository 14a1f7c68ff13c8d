"""Decoding the records of one chunk into one Arrow RecordBatch: a plain function, no processes.

`decode_records` is what the worker loop calls, and so can any other runtime (a Ray read task, a
torch DataLoader worker). `decode_chunk` applies it to a whole chunk zip held in memory.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine._errors import DecodeError, DecompressionError
from pixcrawler_engine.decode._headers import ImageHeader
from pixcrawler_engine.decode._image import decode_image, probe
from pixcrawler_engine.decode._mask import decode_mask
from pixcrawler_engine.decode._pixels import check_budget
from pixcrawler_engine.decode._plan import output_shape
from pixcrawler_engine.runtime._batch import BatchBuilder
from pixcrawler_engine.runtime._schedule import ROW_OVERHEAD, SLOT_OVERHEAD
from pixcrawler_engine.sources._base import ZipOpener, read_zip_manifest
from pixcrawler_engine.sources._record import Record

__all__ = ["decode_chunk", "decode_records"]


def decode_records(
    records: Sequence[Record],
    read: Any,
    policy: DecodePolicy,
    *,
    chunk: int,
    byte_limit: int | None = None,
    on_sample: Callable[[], None] | None = None,
) -> tuple[pa.RecordBatch, int, list[tuple[str, str]]]:
    """Decodes records into one RecordBatch, following `policy.on_error` for bad samples.

    Args:
        records: the samples, in output order.
        read: `read(record.ref) -> bytes`, the encoded bytes of one sample.
        policy: the decode policy.
        chunk: the chunk id, for the batch's `chunk` column and for error messages.
        byte_limit: the most bytes the batch may take as Arrow IPC; decoding stops early
            (before the record that would not fit) when it is reached.
        on_sample: called after each record (decoded or skipped): the worker's heartbeat.

    Returns:
        (batch, covered, errors): `covered` is how many leading records were consumed
        (decoded or skipped); `errors` lists the (key, message) of the skipped ones.

    Raises:
        DecodeError: a bad sample with `on_error="raise"`, or one sample larger than
            `byte_limit`; the message names the chunk and the sample.
    """
    fixed = policy.fixed_shape
    builder = BatchBuilder(fixed, capacity=len(records))
    errors: list[tuple[str, str]] = []
    covered = 0
    used = SLOT_OVERHEAD
    for record in records:
        if on_sample is not None:
            on_sample()
        try:
            data = read(record.ref)
            header = probe(data)
            check_budget(header, policy.max_pixels)  # a bomb is refused as a bomb, first
            shape = output_shape(header, policy)
            # ROW_OVERHEAD covers small labels and metadata; slots are sized with it.
            need = int(np.prod(shape)) + ROW_OVERHEAD + max(0, len(record.metadata) - 1024)
            if byte_limit is not None and used + need > byte_limit:
                if len(builder) or errors:
                    break  # the rest goes in the next batch
                raise DecodeError(
                    f"decoded it is {shape[1]}x{shape[0]}x{shape[2]} = {need} bytes, more than a "
                    f"whole shared-memory slot ({byte_limit} bytes); pass image_size= to "
                    "shrink images, or a larger slot_bytes"
                )
            image = decode_image(data, policy, out=builder.next_image())
            del data  # a memory-mapped value is unmapped before the mask is decoded
            mask = None
            if record.mask_ref is not None:
                mask = _decode_mask(read(record.mask_ref), header, image.shape, policy)
                need += mask.nbytes
        except DecodeError as exc:
            error = DecodeError(
                f"chunk {chunk}, sample {record.key!r}: {exc}", chunk_id=chunk, key=record.key
            )
            if policy.on_error == "raise":
                raise error from exc
            errors.append((record.key, str(error)))
            covered += 1
            continue
        used += need
        builder.add(
            image,
            label=record.label,
            key=record.key,
            chunk=chunk,
            index=record.index,
            orig_size=(header.width, header.height)
            if header.orientation < 5
            else (header.height, header.width),
            metadata=record.metadata,
            mask=mask,
        )
        covered += 1
    return builder.build(), covered, errors


def _decode_mask(
    data: bytes, header: ImageHeader, shape: tuple[int, ...], policy: DecodePolicy
) -> np.ndarray:
    """A segmentation mask at its image's output geometry: nearest neighbour, values kept."""
    if policy.image_size is not None and policy.resize in ("crop", "pad"):
        raise DecodeError(
            f"masks follow their image only through a plain resize; resize={policy.resize!r} "
            'would misalign them: use resize="stretch" or "fit"'
        )
    mask_header = probe(data)
    size = (header.width, header.height)
    if header.orientation >= 5:
        size = (header.height, header.width)
    if (mask_header.width, mask_header.height) != size:
        raise DecodeError(
            f"its mask is {mask_header.width}x{mask_header.height} but the image is "
            f"{size[0]}x{size[1]}; a mask must match its image pixel for pixel"
        )
    return decode_mask(data, (shape[0], shape[1]), max_pixels=policy.max_pixels)


def decode_chunk(chunk_bytes: bytes, policy: DecodePolicy, *, chunk: int = 0) -> pa.RecordBatch:
    """Decodes a whole chunk zip held in memory into one RecordBatch (no processes involved)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(chunk_bytes))
    except zipfile.BadZipFile as exc:
        raise DecompressionError(f"chunk {chunk} is not a zip: {exc}", chunk_id=chunk) from exc
    records = read_zip_manifest(zf, chunk, 0)  # closes zf
    reader = ZipOpener().open(io.BytesIO(chunk_bytes))  # the same caps as in the workers
    try:
        batch, _, _ = decode_records(records, reader.read, policy, chunk=chunk)
    finally:
        reader.close()
    return batch
