"""The worker loop: tasks of records in, one Arrow RecordBatch in a shared-memory slot out.

`worker_main` is the body of a worker process, forked by the zygote (see NOTE [zygote]); the
decoding itself is the plain function `_chunk.decode_samples`, and the batch is written as
Arrow IPC without pyarrow (NOTE [wire] in `_ipc`). A worker talks only to the supervisor, over
its own socket: EOF there means the supervisor is gone, and the worker exits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine._errors import SharedMemoryError
from pixcrawler_engine.decode._fast import opencv
from pixcrawler_engine.runtime._chunk import decode_samples
from pixcrawler_engine.runtime._ipc import TooLarge, Wire
from pixcrawler_engine.runtime._memory import MemoryKeeper
from pixcrawler_engine.runtime._protocol import (
    Channel,
    ExceptionWrapper,
    Task,
    TaskDone,
    TaskFailed,
    WorkerReady,
)
from pixcrawler_engine.runtime._shm import attach
from pixcrawler_engine.sources._base import ChunkOpener, ChunkReader
from pixcrawler_engine.sources._listing import RecordLines
from pixcrawler_engine.sources._record import Record

__all__ = ["worker_main"]


# A worker keeps open the chunk files of the latest groups it decoded (and those of its current
# task, which may be an older group's, redone after an eviction): a shuffled group's tasks draw
# from all of its chunks (NOTE [epoch order] in `_epoch`), and reopening a zip reads its whole
# directory again. Older ones are closed: the supervisor deletes a group's files once it is
# delivered, and a file held open would keep its disk space (and a descriptor).
KEEP_GROUPS = 2


class _Worker:
    """State of one worker process: attached slots and the chunks it has open."""

    def __init__(
        self,
        opener: ChunkOpener,
        policy: DecodePolicy,
        wires: tuple[Wire, Wire],
        slot_prefix: str,
        slot_bytes: int,
        beats_name: str,
        seat: int,
    ) -> None:
        self.opener = opener
        self.policy = policy
        self.wires = wires  # without masks, with
        self.slot_prefix = slot_prefix
        self.slot_bytes = slot_bytes
        self.slots: dict[int, Any] = {}
        self.readers: dict[str, tuple[ChunkReader, int]] = {}  # path -> (reader, its group)
        self.latest = 0  # the latest group decoded
        self.beats = attach(beats_name)
        self.counts = self.beats.buf.cast("Q")
        self.seat = seat

    def beat(self) -> None:
        """One more sample started: the supervisor measures silence per sample with this."""
        self.counts[self.seat] += 1

    def _open(self, paths: tuple[str, ...], group: int) -> list[Any]:
        """The `read` of each path's chunk, opened or reused; closes those of older groups."""
        self.latest = max(self.latest, group)
        for path in paths:
            reader, last = self.readers.get(path, (None, group))
            self.readers[path] = (reader or self.opener.open(path), max(last, group))
        old = self.latest - KEEP_GROUPS
        for path in [p for p, (_, g) in self.readers.items() if g <= old and p not in paths]:
            self.readers.pop(path)[0].close()
        return [self.readers[path][0].read for path in paths]

    def run(self, task: Task) -> TaskDone:
        if task.slot not in self.slots:
            self.slots[task.slot] = attach(f"{self.slot_prefix}{task.slot}")
        buf = self.slots[task.slot].buf
        readers = self._open(task.paths, task.group)
        read: Any = readers[0]
        chunk: int | list[int] = task.chunks[0]
        if task.parts is not None:
            read = [readers[part] for part in task.parts]
            chunk = [task.chunks[part] for part in task.parts]
        notes: list[tuple[str, str]] = []
        if isinstance(task.records, RecordLines):  # NOTE [manifest lines]
            records = task.records.build()
        else:
            records = list(map(Record._make, task.records))
        builder, covered, errors = decode_samples(
            records,
            read,
            self.policy,
            chunk=chunk,
            byte_limit=self.slot_bytes,
            notes=notes,
            on_sample=self.beat,
            out=buf,  # pixels decoded into the slot itself (NOTE [pixels in place])
            at=self.wires[0].body_at,
        )
        wire = self.wires[bool(builder.masks)]
        while True:
            try:
                nbytes = wire.write(len(builder), *builder.layout(), buf)
                break
            except TooLarge:
                if len(builder) <= 1:
                    raise
            # The estimate above is generous; if labels or metadata are huge, hand back rows.
            keep = len(builder) // 2
            covered = _position(records, builder.keys[keep])
            errors = [e for e in errors if _position(records, e[0]) < covered]
            notes = [n for n in notes if _position(records, n[0]) < covered]
            builder.truncate(keep)
        return TaskDone(task.task_id, nbytes, len(builder), covered, tuple(errors), tuple(notes))

    def close(self) -> None:
        for reader, _ in self.readers.values():
            reader.close()
        for shm in self.slots.values():
            shm.close()
        self.counts.release()
        self.beats.close()


def warm_up() -> None:
    """Runs the decode and batch paths once on tiny images, so that lazy imports happen now.

    The images are made with OpenCV, the decoders' fast path (Pillow's encoders, which
    workers never use, took ~25 ms of the zygote's start-up); with Pillow without it."""
    cv2 = opencv()
    for fmt, policy in (
        ("JPEG", DecodePolicy(image_size=(8, 8))),
        ("PNG", DecodePolicy(image_size=None)),
    ):
        if cv2 is not None:
            data = cv2.imencode(f".{fmt.lower()}", np.full((16, 16, 3), 120, np.uint8))[1].tobytes()
        else:
            from PIL import Image

            out = io.BytesIO()
            Image.new("RGB", (16, 16), (200, 100, 50)).save(out, fmt)
            data = out.getvalue()
        record = Record(key="warm", ref="warm", label="warm", index=0)
        builder, _, _ = decode_samples([record], {"warm": data}.__getitem__, policy, chunk=0)
        builder.layout()


def _position(records: Sequence[Record], key: str) -> int:
    return next(i for i, r in enumerate(records) if r.key == key)


def _sent_away(conn: Channel) -> bool:
    """Whether the supervisor ends this worker (None, or EOF) within a few seconds."""
    if not conn.poll(5.0):
        return False
    try:
        return conn.recv() is None
    except (EOFError, OSError):
        return True


def worker_main(
    conn: Channel,
    opener: ChunkOpener,
    policy: DecodePolicy,
    wires: tuple[Wire, Wire],
    slot_prefix: str,
    slot_bytes: int,
    beats_name: str,
    *,
    seat: int,
) -> None:
    """Runs tasks from `conn` until it sends None or closes (the supervisor is gone)."""
    try:
        worker = _Worker(opener, policy, wires, slot_prefix, slot_bytes, beats_name, seat)
    except SharedMemoryError:
        if _sent_away(conn):
            return  # the run stopped while this worker started: its segments went first
        raise
    memory = MemoryKeeper()  # gives memory back after large samples (see _memory)
    try:
        try:
            conn.send(WorkerReady())
        except OSError:
            return  # the supervisor is gone already
        while True:
            try:
                # No timeout needed: the supervisor's death closes its end, and recv sees EOF.
                task = conn.recv()
            except (EOFError, OSError):
                return
            if task is None:
                return
            try:
                result: TaskDone | TaskFailed = worker.run(task)
            except Exception as exc:  # a bad sample or chunk must never kill the worker
                chunks = ", ".join(map(str, task.chunks))
                where = f"in worker {os.getpid()}, chunk{'s' * (len(task.chunks) > 1)} {chunks}"
                result = TaskFailed(task.task_id, ExceptionWrapper.wrap(exc, where))
            try:
                conn.send(result)
            except OSError:
                return
            memory.after_task()  # after the send: the supervisor does not wait for it
    finally:
        worker.close()
