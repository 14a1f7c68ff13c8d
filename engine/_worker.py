"""Decode workers: records of a chunk in, one Arrow RecordBatch in a shared-memory slot out.

`decode_records` is the plain decoding function (no processes, no shared memory): the worker
loop calls it, and so can any other runtime. `decode_chunk` applies it to a whole chunk zip held
in memory. `worker_main` is the body of a worker process, started by the supervisor.
"""

from __future__ import annotations

import io
import os
import signal
import zipfile
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler.engine._batch import BatchBuilder, ipc_size, write_batch
from pixcrawler.engine._config import DecodePolicy
from pixcrawler.engine._decode import (
    ImageHeader,
    check_budget,
    decode_image,
    decode_mask,
    output_shape,
    probe,
)
from pixcrawler.engine._errors import DecodeError, DecompressionError
from pixcrawler.engine._protocol import (
    ExceptionWrapper,
    Record,
    Task,
    TaskDone,
    TaskFailed,
    WorkerReady,
)
from pixcrawler.engine._shm import attach
from pixcrawler.engine._sources import ChunkOpener, ChunkReader, ZipOpener, read_zip_manifest

__all__ = ["decode_chunk", "decode_records", "worker_main"]

# Room in a slot for the IPC framing and the non-pixel columns of one batch.
SLOT_OVERHEAD = 1 << 16
ROW_OVERHEAD = 4096


def decode_records(
    records: Sequence[Record],
    read: Any,
    policy: DecodePolicy,
    *,
    chunk: int,
    byte_limit: int | None = None,
) -> tuple[pa.RecordBatch, int, list[tuple[str, str]]]:
    """Decodes records into one RecordBatch, following `policy.on_error` for bad samples.

    Args:
        records: the samples, in output order.
        read: `read(record.ref) -> bytes`, the encoded bytes of one sample.
        policy: the decode policy.
        chunk: the chunk id, for the batch's `chunk` column and for error messages.
        byte_limit: the most bytes the batch may take as Arrow IPC; decoding stops early
            (before the record that would not fit) when it is reached.

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


class _Worker:
    """State of one worker process: attached slots and the chunk it last opened."""

    def __init__(
        self, opener: ChunkOpener, policy: DecodePolicy, slot_prefix: str, slot_bytes: int
    ) -> None:
        self.opener = opener
        self.policy = policy
        self.slot_prefix = slot_prefix
        self.slot_bytes = slot_bytes
        self.slots: dict[int, Any] = {}
        self.reader: tuple[str, ChunkReader] | None = None

    def _reader(self, path: str) -> ChunkReader:
        if self.reader is None or self.reader[0] != path:
            if self.reader is not None:
                self.reader[1].close()
            self.reader = (path, self.opener.open(path))
        return self.reader[1]

    def run(self, task: Task) -> TaskDone:
        if task.slot not in self.slots:
            self.slots[task.slot] = attach(f"{self.slot_prefix}{task.slot}")
        buf = self.slots[task.slot].buf
        reader = self._reader(task.chunk_path)
        batch, covered, errors = decode_records(
            task.records,
            reader.read,
            self.policy,
            chunk=task.chunk,
            byte_limit=self.slot_bytes,
        )
        # The estimate above is generous; if labels or metadata are huge, hand back rows.
        while batch.num_rows > 1 and ipc_size(batch) > self.slot_bytes:
            keep = batch.num_rows // 2
            last_key = batch.column("key")[keep].as_py()
            covered = next(i for i, r in enumerate(task.records) if r.key == last_key)
            errors = [e for e in errors if _position(task.records, e[0]) < covered]
            batch = batch.slice(0, keep)
        nbytes = write_batch(batch, buf)
        return TaskDone(task.task_id, nbytes, batch.num_rows, covered, tuple(errors))

    def close(self) -> None:
        if self.reader is not None:
            self.reader[1].close()
        for shm in self.slots.values():
            shm.close()


def warm_up() -> None:
    """Runs the decode and batch paths once on tiny images, so that lazy imports happen now."""
    from PIL import Image

    for fmt, policy in (
        ("JPEG", DecodePolicy(image_size=(8, 8))),
        ("PNG", DecodePolicy(image_size=None)),
    ):
        out = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(out, fmt)
        data = out.getvalue()
        record = Record(key="warm", ref="warm", label="warm", index=0)
        batch, _, _ = decode_records([record], {"warm": data}.__getitem__, policy, chunk=0)
        write_batch(batch, memoryview(bytearray(ipc_size(batch))))


def _position(records: Sequence[Record], key: str) -> int:
    return next(i for i, r in enumerate(records) if r.key == key)


def worker_main(
    conn: Connection,
    opener: ChunkOpener,
    policy: DecodePolicy,
    slot_prefix: str,
    slot_bytes: int,
) -> None:
    """Runs tasks from `conn` until it sends None or closes, or the supervisor is gone."""
    # Ctrl-C reaches the whole process group; the consumer decides what stops, not us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor = os.getppid()
    worker = _Worker(opener, policy, slot_prefix, slot_bytes)
    try:
        conn.send(WorkerReady(os.getpid()))
        while True:
            # Wake up now and then to notice a supervisor that died without closing the pipe.
            if not conn.poll(1.0):
                if os.getppid() != supervisor:
                    return
                continue
            try:
                task = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            try:
                result: TaskDone | TaskFailed = worker.run(task)
            except Exception as exc:  # a bad sample or chunk must never kill the worker
                where = f"in worker {os.getpid()}, chunk {task.chunk}"
                result = TaskFailed(task.task_id, ExceptionWrapper.wrap(exc, where))
            try:
                conn.send(result)
            except (BrokenPipeError, OSError):
                return
    finally:
        worker.close()
