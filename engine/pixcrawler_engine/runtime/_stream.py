"""The consumer side of a run: starts the supervisor, maps its slots, yields batches in place.

`Stream` owns the supervisor process (it starts and stops it) but none of the shared memory:
it only attaches the slots the supervisor created. A batch's arrays are views of its slot; the
slot goes back to the pool when the last view is gone (a `weakref.finalize` on the lease that
every view keeps alive), never earlier.

Teardown (`_shutdown`) is one ordered, idempotent function run by `close()`, `__exit__`, the end
of iteration and a `weakref.finalize`, so a forgotten stream cleans up too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine._errors import SharedMemoryError, WorkerError
from pixcrawler_engine.runtime._batch import (
    image_views,
    labels_of,
    mask_views,
    metadata_of,
    read_batch,
    wire_for,
)
from pixcrawler_engine.runtime._classes import ClassIndex, label_indices
from pixcrawler_engine.runtime._epoch import Share
from pixcrawler_engine.runtime._launch import Launched, launch
from pixcrawler_engine.runtime._protocol import (
    RELEASE,
    BatchReady,
    Failed,
    Finished,
    Grow,
    Ping,
    Pong,
    Ready,
    SlotsAdded,
    Stop,
    Workers,
    plain_connection,
)
from pixcrawler_engine.runtime._shm import attach, sweep_run
from pixcrawler_engine.sources._base import Source

__all__ = ["Batch", "SampleWarning", "Stream"]

logger = logging.getLogger("pixcrawler_engine.decode")


class SampleWarning(UserWarning):
    """A bad sample was dropped because `on_error="warn"`; `key` names it in its chunk."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Lease:
    """Keeps a slot out of the pool, and mapped, while any view of it lives."""

    __slots__ = ("__weakref__", "array")

    def __init__(self, mapping: Any) -> None:
        # An export of the mapping's buffer: while it lives the mapping cannot be closed.
        self.array = np.frombuffer(mapping.buf, dtype=np.uint8)


class Batch:
    """One decoded batch, read in place from shared memory.

    Attributes:
        record_batch: the Arrow RecordBatch (columns: see `pixcrawler_engine.runtime._batch`).
        skipped: bad samples dropped (`on_error`) in the order's positions this batch
            covers, and in those of batches before it that had no good sample left.
    """

    def __init__(self, record_batch: pa.RecordBatch, skipped: int = 0) -> None:
        self.record_batch = record_batch
        self.skipped = skipped

    def __len__(self) -> int:
        return self.record_batch.num_rows

    @property
    def images(self) -> np.ndarray | list[np.ndarray]:
        """(B, H, W, C) view for fixed-size output, else a list of (H, W, C) views."""
        return image_views(self.record_batch)

    @property
    def masks(self) -> np.ndarray | list[np.ndarray] | None:
        """Segmentation masks at the images' geometry ((B, H, W) or a list), or None."""
        return mask_views(self.record_batch)

    @property
    def labels(self) -> list[Any]:
        return labels_of(self.record_batch)

    def label_indices(self, classes: ClassIndex) -> np.ndarray:
        """The labels as int64 class indices (see `runtime._classes`)."""
        return label_indices(self.record_batch, classes)

    @property
    def keys(self) -> list[str]:
        return self.record_batch.column("key").to_pylist()

    @property
    def metadata(self) -> list[dict[str, Any]]:
        return metadata_of(self.record_batch)


@dataclass
class _RunState:
    """Everything teardown needs, kept apart from `Stream` so the finalizer holds no cycle.

    Only the process that started the run stops it or releases its slots: a forked child (a
    DataLoader worker) that drops its copy of a stream, iterator or view closes its own copies
    of the pipes and mappings, and nothing else.
    """

    owner: int = field(default_factory=os.getpid)
    proc: Any = None
    token: str = ""
    conn: Any = None
    release_fd: int = -1
    release_conn: Any = None
    slots: list[Any] = field(default_factory=list)
    live_leases: int = 0
    closed: bool = False
    unresponsive: bool = False  # the supervisor missed its heartbeat: no polite stop
    stats: dict[str, Any] = field(default_factory=dict)

    def release(self, slot: int) -> None:
        # Runs from garbage collection, in any thread: one atomic pipe write, no lock.
        self.live_leases -= 1
        if not self.closed and self.owner == os.getpid():
            with contextlib.suppress(OSError):
                os.write(self.release_fd, RELEASE.pack(slot))


def _shutdown(state: _RunState) -> None:
    """Stops the run: ask, wait, terminate, kill, reclaim. Safe to call any number of times."""
    if state.closed:
        return
    state.closed = True
    proc = state.proc if state.owner == os.getpid() else None
    if proc is not None:
        steps: tuple[tuple[Any, float], ...] = ((proc.kill, 2.0),)
        if not state.unresponsive:
            with contextlib.suppress(Exception):
                state.conn.send(Stop())
            steps = ((None, 5.0), (proc.terminate, 2.0), (proc.kill, 2.0))
        for stop, grace in steps:
            if stop is not None:
                stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
                break
        # A supervisor that was killed could not clean up: its lock is free now, so this can.
        sweep_run(state.token)
    for conn in (state.conn, state.release_conn):
        with contextlib.suppress(Exception):
            conn.close()
    while state.slots:
        state.slots.pop().close()  # unmaps now, or when the last view is gone


class Stream:
    """One engine run over a source, iterated as `Batch` objects in dataset order.

    Example:
        >>> with Stream(source, config=EngineConfig(), policy=DecodePolicy()) as stream:
        ...     for batch in stream:
        ...         use(batch.images, batch.labels)
    """

    def __init__(
        self,
        source: Source,
        *,
        config: EngineConfig,
        policy: DecodePolicy,
        share: Share | None = None,
        launched: Launched | None = None,
    ) -> None:
        """Starts the run: its supervisor, which starts the workers.

        Args:
            source: the dataset's chunks.
            config: the engine's knobs (its `shuffle`, `seed` and `shuffle_window` too).
            policy: how images are decoded.
            share: which part of which epoch's order to deliver (see NOTE [epoch order] in
                `runtime._epoch`); default all of epoch 0.
            launched: a supervisor launched ahead (`_launch.Spare.take`) to run this; the
                stream owns it from here. None (or one that died) launches a new one.
        """
        self.config = config
        self.policy = policy
        self._state = _RunState()
        self._finalizer = weakref.finalize(self, _shutdown, self._state)
        # See NOTE [bootstrap] and NOTE [spare] in `_launch`.
        if launched is None or not launched.usable():
            if launched is not None:
                launched.close()
            launched = launch()
        proc, conn, release_w = launched.proc, launched.conn, launched.release
        self._state.token = f"{proc.pid}_{secrets.token_hex(8)}"  # names the run's resources
        self._state.release_conn, self._state.release_fd = release_w, release_w.fileno()
        # How the workers write this run's batches (NOTE [wire] in `_ipc`): without masks, with.
        wires = (wire_for(policy.fixed_shape), wire_for(policy.fixed_shape, masks=True))
        try:
            conn.send(list(sys.path))
            conn.send((self._state.token, source, config, policy, share or Share(), wires))
        except OSError:
            pass  # it died at once; the first receive says how
        except BaseException:
            launched.close()  # the arguments cannot be pickled (or Ctrl-C): it waits in vain
            raise
        self._state.proc, self._state.conn = proc, plain_connection(conn)
        self.pid = proc.pid
        self.worker_pids: tuple[int, ...] = ()
        self._ready: Ready | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the supervisor and its workers; views already handed out stay valid."""
        self._finalizer()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> dict[str, Any]:
        """Counts of the run: samples, skipped, chunks, worker_restarts, bytes_downloaded,
        slots_added, and stalls (the supervisor's waits of a whole second in which nothing
        happened: slow downloads or decodes, or a slow consumer holding every slot)."""
        return dict(self._state.stats)

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Generator[Batch, None, None]:
        # NOTE [last batch]: the run's last batch says so (`BatchReady.last`). The stream then
        # takes the `Finished` behind it and stops the run (tens of ms: the supervisor's
        # teardown) before handing the batch out, so that the caller's next `next()` ends at
        # once: a DataLoader's pass ends with its last batch (it ended 0.02-0.04 s later), and
        # the end of `to_tensorflow()`'s generator does no work of ours in TensorFlow's thread.
        # The batch's views stay valid (see `close`).
        skipped = 0
        try:
            while True:
                msg = self._receive()
                if isinstance(msg, BatchReady):
                    batch = self._map(msg)
                    skipped = batch.skipped = skipped + len(msg.errors)
                    if self.policy.on_error == "warn":
                        for key, message in msg.errors:
                            warnings.warn(SampleWarning(message, key), stacklevel=2)
                    for _key, message in msg.notes:  # decoder chatter, one line a sample
                        logger.warning("%s", message)
                    if msg.last:
                        self._finish(self._receive())
                    if len(batch):
                        yield batch
                        skipped = 0
                    del batch
                    if msg.last:
                        return
                else:
                    self._finish(msg)
                    return
        finally:
            self.close()

    def _finish(self, msg: Any) -> None:
        """The run's end: `Finished` (its stats kept, the run stopped) or `Failed` (raised)."""
        if isinstance(msg, Failed):
            msg.error.reraise()
        if not isinstance(msg, Finished):
            raise RuntimeError(f"the supervisor sent {type(msg).__name__} after the run's end")
        self._state.stats = msg.stats
        self.close()

    def _receive(self) -> Any:
        """The next message for the caller; handles set-up, heartbeats and a lost supervisor.

        Waits in short steps (no blind waits): between them it checks that the supervisor is
        alive, asks for one more slot when the caller holds them all, and pings a silent
        supervisor; one that does not answer within `heartbeat_timeout` is a `WorkerError`.
        """
        state = self._state
        timeout = self.config.heartbeat_timeout
        interval = min(1.0, timeout / 4)
        heard = time.monotonic()
        pinged = False
        while True:
            if state.closed:
                raise RuntimeError("this stream is closed; start a new one to iterate again")
            if state.conn.poll(min(0.5, interval)):
                try:
                    msg = state.conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None:
                    heard, pinged = time.monotonic(), False
                if isinstance(msg, Ready):
                    self._ready = msg
                    state.slots.extend(self._attach(msg.slots))
                    continue
                if isinstance(msg, SlotsAdded):
                    state.slots.extend(self._attach(msg.names))
                    continue
                if isinstance(msg, Workers):
                    self.worker_pids = msg.pids
                    continue
                if isinstance(msg, Pong):
                    continue
                if msg is not None:
                    return msg
            proc = state.proc
            if proc.poll() is not None:
                raise WorkerError(
                    f"the supervisor process (pid {proc.pid}) exited with code {proc.returncode} "
                    "before the run finished; see its error output above, or rerun",
                    pid=proc.pid,
                    exitcode=proc.returncode,
                )
            silent = time.monotonic() - heard
            if silent > timeout:
                state.unresponsive = True
                raise WorkerError(
                    f"the supervisor process (pid {proc.pid}) has not answered for "
                    f"{silent:.0f} s (heartbeat_timeout={timeout:g}): it is stopped (SIGSTOP, a "
                    "debugger) or deadlocked; the run is abandoned. Raise heartbeat_timeout if "
                    "the machine is that overloaded",
                    pid=proc.pid,
                )
            if silent > interval and not pinged:
                self._send(Ping())
                pinged = True
            if self._ready is not None and state.slots and state.live_leases >= len(state.slots):
                # Every slot is pinned by views the caller keeps: ask for one more.
                self._send(Grow())

    def _attach(self, names: tuple[str, ...]) -> list[Any]:
        """Maps slots. A run that failed before its consumer came unlinked them on its way
        out: its error, sent after them, is raised rather than the missing segment."""
        try:
            return [attach(name) for name in names]
        except SharedMemoryError:
            conn = self._state.conn
            with contextlib.suppress(EOFError, OSError):
                while conn.poll(2.0):
                    msg = conn.recv()
                    if isinstance(msg, Failed):
                        msg.error.reraise()
            raise

    def _send(self, message: Any) -> None:
        try:
            self._state.conn.send(message)
        except OSError as exc:
            proc = self._state.proc
            raise WorkerError(
                f"the supervisor process (pid {proc.pid}) is gone (its pipe broke: {exc}); "
                "see its error output above, or rerun",
                pid=proc.pid,
                exitcode=proc.poll(),
            ) from exc

    def _map(self, msg: BatchReady) -> Batch:
        state = self._state
        shm = state.slots[msg.slot]
        lease = _Lease(shm)
        state.live_leases += 1
        weakref.finalize(lease, state.release, msg.slot)
        buf = pa.foreign_buffer(lease.array.ctypes.data, msg.nbytes, base=lease)
        return Batch(read_batch(buf))
