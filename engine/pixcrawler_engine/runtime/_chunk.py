"""Decoding the records of one chunk into one Arrow RecordBatch: a plain function, no processes.

`decode_records` is what the worker loop calls, and so can any other runtime (a Ray read task, a
torch DataLoader worker). `decode_chunk` applies it to a whole chunk zip held in memory.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcrawler_engine._config import ROW_OVERHEAD, SLOT_OVERHEAD, DecodePolicy
from pixcrawler_engine._errors import DecodeError, DecompressionError, UnsupportedImageError
from pixcrawler_engine.decode import _chatter
from pixcrawler_engine.decode._headers import ImageHeader
from pixcrawler_engine.decode._image import decode_image, probe
from pixcrawler_engine.decode._mask import decode_mask
from pixcrawler_engine.decode._pixels import check_budget
from pixcrawler_engine.decode._plan import Plan, make_plan
from pixcrawler_engine.runtime._builder import BatchBuilder
from pixcrawler_engine.sources._base import ZipOpener, read_zip_manifest
from pixcrawler_engine.sources._record import Record

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["decode_chunk", "decode_records", "decode_samples"]

logger = logging.getLogger(__name__)


def decode_records(
    records: Sequence[Record],
    read: Any,
    policy: DecodePolicy,
    *,
    chunk: int | Sequence[int],
    byte_limit: int | None = None,
    notes: list[tuple[str, str]] | None = None,
    on_sample: Callable[[], None] | None = None,
) -> tuple[pa.RecordBatch, int, list[tuple[str, str]]]:
    """Decodes records into one RecordBatch, following `policy.on_error` for bad samples.

    Args:
        records: the samples, in output order.
        read: `read(record.ref) -> bytes`, the encoded bytes of one sample; or one such
            function per record (records drawn from several chunks).
        policy: the decode policy.
        chunk: the chunk id, for the batch's `chunk` column and for error messages; or one
            per record.
        byte_limit: the most bytes the batch may take as Arrow IPC; decoding stops early
            (before the record that would not fit) when it is reached.
        notes: receives (key, message) for samples decoded fine while the decoder said
            something (libtiff's warnings, Pillow's; see `decode._chatter`): one line each,
            naming the sample. None logs them instead.
        on_sample: called after each record (decoded or skipped): the worker's heartbeat.

    Returns:
        (batch, covered, errors): `covered` is how many leading records were consumed
        (decoded or skipped); `errors` lists the (key, message) of the skipped ones.

    Raises:
        DecodeError: a bad sample with `on_error="raise"` (`UnsupportedImageError` for a valid
            image no decoder reads), or one sample larger than `byte_limit`; the message
            names the chunk and the sample.
    """
    builder, covered, errors = decode_samples(
        records, read, policy, chunk=chunk, byte_limit=byte_limit, notes=notes,
        on_sample=on_sample,
    )  # fmt: skip
    from pixcrawler_engine.runtime._batch import record_batch  # pyarrow: not in the workers

    return record_batch(builder), covered, errors


def decode_samples(
    records: Sequence[Record],
    read: Any,
    policy: DecodePolicy,
    *,
    chunk: int | Sequence[int],
    byte_limit: int | None = None,
    notes: list[tuple[str, str]] | None = None,
    on_sample: Callable[[], None] | None = None,
    out: memoryview | None = None,
    at: int | None = None,
) -> tuple[BatchBuilder, int, list[tuple[str, str]]]:
    """`decode_records`, with the batch as its `BatchBuilder` (no pyarrow: the workers write
    it with `_ipc`). Given `out`, the buffer the batch will be written to (a free slot), and
    `at`, where the stream puts the pixels, fixed-size images are decoded into their place
    there (NOTE [pixels in place] in `_batch`)."""
    fixed = policy.fixed_shape
    builder = BatchBuilder(fixed, capacity=len(records), out=out, at=at)
    errors: list[tuple[str, str]] = []
    covered = 0
    used = SLOT_OVERHEAD
    chunks: Sequence[int] = [chunk] * len(records) if isinstance(chunk, int) else chunk
    reads: Sequence[Any] = [read] * len(records) if callable(read) else read
    noted: list[tuple[str, str]] = [] if notes is None else notes
    plans: dict[ImageHeader, tuple[Plan, int]] = {}  # images of one size share one plan
    # fd 2 stays on the chatter sink for the whole loop (see `_chatter.held`): per sample,
    # what the decoders said is in `said`, and nothing else here writes to fd 2.
    try:
        with _chatter.held(), _chatter.collect() as said:
            for record, chunk_id, read_one in zip(records, chunks, reads, strict=True):
                if on_sample is not None:
                    on_sample()
                started = bool(len(builder) or errors)
                room = byte_limit - used if byte_limit is not None else None
                outcome = _decode_one(record, read_one, policy, builder, room, started, plans)
                _chatter.drain(said)
                if said:
                    if not isinstance(outcome, DecodeError):
                        note = f"the decoder said: {_chatter.summary(said)}"
                        noted.append(
                            (record.key, f"chunk {chunk_id}, sample {_name(record)}: {note}")
                        )
                    said.clear()
                if outcome is None:
                    break  # the rest goes in the next batch
                if isinstance(outcome, DecodeError):
                    kind = (
                        UnsupportedImageError
                        if isinstance(outcome, UnsupportedImageError)
                        else DecodeError
                    )
                    message = f"chunk {chunk_id}, sample {_name(record)}: {outcome}"
                    error = kind(message, chunk_id=chunk_id, key=record.key)
                    if policy.on_error == "raise":
                        raise error from outcome
                    errors.append((record.key, str(error)))
                    covered += 1
                    continue
                header, image, mask, need = outcome
                used += need
                builder.add(
                    image,
                    label=record.label,
                    key=record.key,
                    chunk=chunk_id,
                    index=record.index,
                    orig_size=(header.width, header.height)
                    if header.orientation < 5
                    else (header.height, header.width),
                    metadata=record.metadata,
                    mask=mask,
                )
                covered += 1
    finally:
        if notes is None:  # logged once fd 2 is back
            for _, note in noted:
                logger.warning("%s", note)
    return builder, covered, errors


def _name(record: Record) -> str:
    """How a message names a sample: its key, and what else identifies it (an id, a path)."""
    return repr(record.key) if not record.name else f"{record.name!r} ({record.key})"


def _decode_one(
    record: Record,
    read: Any,
    policy: DecodePolicy,
    builder: BatchBuilder,
    room: int | None,
    started: bool,
    plans: dict[ImageHeader, tuple[Plan, int]],
) -> tuple[ImageHeader, np.ndarray, np.ndarray | None, int] | DecodeError | None:
    """Decodes one sample into the builder's next image; `plans` keeps the plan (and its
    pixel bytes) of each header seen, checked against the budget.

    Returns:
        (header, image, mask, bytes it takes); the DecodeError that stops it; or None when
        it does not fit in the `room` left in the slot (and the batch has begun).
    """
    try:
        data = read(record.ref)
        header = probe(data)
        known = plans.get(header)
        if known is None:
            check_budget(header, policy.max_pixels)  # a bomb is refused as a bomb, first
            plan = make_plan(header, policy)
            known = plans[header] = (plan, math.prod(plan.shape))
        plan, size = known
        shape = plan.shape
        # ROW_OVERHEAD covers small labels and metadata; slots are sized with it.
        need = size + ROW_OVERHEAD + max(0, len(record.metadata) - 1024)
        if room is not None and need > room:
            if started:
                return None
            raise DecodeError(
                f"decoded it is {shape[1]}x{shape[0]}x{shape[2]} = {need} bytes, more than a "
                f"whole shared-memory slot ({room + SLOT_OVERHEAD} bytes); pass image_size= "
                "to shrink images, or a larger slot_bytes"
            )
        image = decode_image(data, policy, out=builder.next_image(), header=header, plan=plan)
        del data  # a memory-mapped value is unmapped before the mask is decoded
        mask = None
        if record.mask_ref is not None:
            mask = _decode_mask(read(record.mask_ref), header, image.shape, policy)
            need += mask.nbytes
    except DecodeError as exc:
        return exc
    return header, image, mask, need


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
