"""The consumer side of a run: starts the supervisor, maps its slots, yields batches in place.

`Stream` owns the supervisor process (it starts and stops it) but none of the shared memory:
it only attaches the slots the supervisor created. A batch's arrays are views of its slot; the
slot goes back to the pool when the last view is gone (a `weakref.finalize` on the lease that
every view keeps alive), never earlier.

Teardown (`_run.shutdown`) is one ordered, idempotent function run by `close()`, `__exit__`, the
end of iteration and a `weakref.finalize`, so a forgotten stream cleans up too.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import time
import warnings
import weakref
from collections.abc import Generator
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
from pixcrawler_engine.runtime._launch import Launched, Spare, dump_run, launch
from pixcrawler_engine.runtime._protocol import (
    BatchReady,
    Failed,
    Finished,
    Grow,
    Parked,
    Ping,
    Pong,
    Ready,
    SlotsAdded,
    Workers,
)
from pixcrawler_engine.runtime._run import RunState, shutdown
from pixcrawler_engine.runtime._shm import attach
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
        home: Spare | None = None,
    ) -> None:
        """Starts the run: its supervisor, which starts the workers.

        Args:
            source: the dataset's chunks.
            config: the engine's knobs (its `shuffle`, `seed` and `shuffle_window` too).
            policy: how images are decoded.
            share: which part of which epoch's order to deliver (see NOTE [epoch order] in
                `runtime._epoch`); default all of epoch 0.
            launched: a waiting supervisor (`_launch.Spare.take`) to run this; the stream
                owns it from here. None (or one that died) launches a new one.
            home: where the supervisor waits for the next run once this one ends (NOTE
                [parked] in `_launch`); None stops it.
        """
        self.config = config
        self.policy = policy
        self._state = RunState()
        self._finalizer = weakref.finalize(self, shutdown, self._state)
        # See NOTE [bootstrap], NOTE [spare] and NOTE [parked] in `_launch`.
        if launched is None or not launched.usable():
            if launched is not None:
                launched.close()
            launched = launch()
        state = self._state
        proc, conn, release_w = launched.proc, launched.conn, launched.release
        state.token = f"{proc.pid}_{secrets.token_hex(8)}"  # names the run's resources
        state.run, launched.runs = launched.runs, launched.runs + 1
        state.release_conn, state.release_fd = release_w, release_w.fileno()
        # How the workers write this run's batches (NOTE [wire] in `_ipc`): without masks, with.
        wires = (wire_for(policy.fixed_shape), wire_for(policy.fixed_shape, masks=True))
        run = (state.token, state.run, source, config, policy, share or Share(), wires)
        try:
            data = dump_run(run)
            conn.send(list(sys.path))
            conn.send_bytes(data)
        except OSError:
            pass  # it died at once; the first receive says how
        except BaseException:
            launched.close()  # the arguments cannot be pickled (or Ctrl-C): it waits in vain
            raise
        state.proc, state.conn, state.launched, state.home = proc, conn, launched, home
        self.pid = proc.pid
        self.worker_pids: tuple[int, ...] = ()
        self._ready: Ready | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Ends the run: its workers stop, and its supervisor is parked in `home` for the next
        run (NOTE [parked] in `_launch`) or stopped; views already handed out stay valid."""
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
        # takes the `Finished` behind it and ends the run (its supervisor parked, or stopped:
        # tens of ms) before handing the batch out, so that the caller's next `next()` ends at
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
        except Exception:
            self._state.failed = True  # the engine's error: its supervisor is not kept
            raise
        finally:
            self.close()

    def _finish(self, msg: Any) -> None:
        """The run's end: `Finished` (its stats kept, the run stopped) or `Failed` (raised)."""
        if isinstance(msg, Failed):
            msg.error.reraise()
        if not isinstance(msg, Finished):
            raise RuntimeError(f"the supervisor sent {type(msg).__name__} after the run's end")
        self._state.stats = msg.stats
        self._state.finished = True
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
                if isinstance(msg, (Pong, Parked)):  # Parked: the last run's, unread
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
