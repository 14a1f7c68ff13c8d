"""The supervisor process: downloads chunks, schedules decode tasks, delivers batches in order.

It owns every OS resource of a run (worker processes, shared-memory slots, the download
folder) and is the only process that unlinks or deletes them.

NOTE [scheduling]: a chunk's records are cut into tasks of `batch_rows` records; a task is
keyed (chunk position, first record) and dispatched in key order, each with a free slot
reserved for it. Results are delivered to the consumer in key order only, so the output
order is the dataset order (or the seeded shuffle) whatever the number of workers. Since
every task earlier than a dispatched one was dispatched first, the next task to deliver
always has, or gets, a slot; the exceptions (a task cut short because its slot filled up, a
consumer holding every slot) are handled by evicting a later finished task or growing the
pool.

The loop, one state per task:

    pending --dispatch (idle worker + free slot)--> running --TaskDone--> done --deliver--> sent
       ^                                              |                    |
       +------ worker died / hung (slot kept) --------+   evicted (slot freed) --> pending
"""

from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import signal
import struct
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine._errors import WorkerError
from pixcrawler_engine.runtime._prefetch import Prefetcher
from pixcrawler_engine.runtime._protocol import (
    BatchReady,
    Failed,
    Finished,
    Grow,
    Ready,
    SlotsAdded,
    Stop,
    Task,
    TaskDone,
    TaskFailed,
    WorkerReady,
)
from pixcrawler_engine.runtime._schedule import (
    Done,
    State,
    WorkerSlot,
    chunk_order,
    slot_bytes_for,
)
from pixcrawler_engine.runtime._shm import PREFIX, SlotPool, shm_free_bytes
from pixcrawler_engine.runtime._worker import worker_main
from pixcrawler_engine.sources._base import Source

__all__ = ["RELEASE", "Supervisor"]

RELEASE = struct.Struct("<i")  # one released slot, as the consumer writes it to its pipe
MAX_TASK_RESTARTS = 2
WORKER_START_TIMEOUT = 120.0


class Supervisor:
    def __init__(
        self,
        conn: Connection,
        release: Connection,
        source: Source,
        config: EngineConfig,
        policy: DecodePolicy,
    ) -> None:
        self.conn = conn
        self.release = release
        self.source = source
        self.config = config
        self.policy = policy
        self.consumer = os.getppid()
        self.plans = source.plan()
        self.order = chunk_order(len(self.plans), shuffle=config.shuffle, seed=config.seed)
        self.state = State()
        self.workers: list[WorkerSlot] = []
        self.task_ids = 0
        self.restarts: dict[tuple[int, int], int] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="pxc-run-"))
        self.pool: SlotPool | None = None
        self.prefetch = Prefetcher(source, config, self.plans, self.order, self.workdir)

    # ---- set-up -------------------------------------------------------------------------
    def start(self) -> None:
        self.pool = SlotPool(self.config.slots, slot_bytes_for(self.config, self.policy))
        self.state.free_slots = list(range(len(self.pool)))
        self.prefetch.start(self.state)  # the first chunks download while the workers boot
        from pixcrawler_engine.runtime._launch import worker_context

        self.ctx = worker_context()
        self.opener = self.source.opener()
        for _ in range(self.config.workers):
            self.workers.append(self._spawn_worker())
        self.conn.send(
            Ready(
                tuple(self.pool.names),
                self.pool.slot_bytes,
                os.getpid(),
                tuple(w.proc.pid for w in self.workers),
            )
        )

    def _spawn_worker(self) -> WorkerSlot:
        assert self.pool is not None
        mine, theirs = self.ctx.Pipe()
        prefix = f"{PREFIX}{os.getpid()}_{self.pool.token}_"
        proc = self.ctx.Process(
            target=worker_main,
            args=(theirs, self.opener, self.policy, prefix, self.pool.slot_bytes),
            daemon=True,
            name="pixcrawler-worker",
        )
        proc.start()
        theirs.close()
        return WorkerSlot(proc, mine)

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        st = self.state
        while st.deliver_pos < len(self.order):
            self.prefetch.start(self.state)
            self._dispatch()
            self._deliver()
            if st.deliver_pos >= len(self.order):
                break
            waitables: list[Any] = [self.conn, self.release, self.prefetch.wake_fd]
            for w in self.workers:
                waitables += [w.conn, w.proc.sentinel]
            ready = wait(waitables, timeout=1.0)
            if self.release in ready:
                self._on_releases()
            if self.conn in ready and self._on_consumer():
                return
            for w in list(self.workers):
                if w.conn in ready:
                    self._on_result(w)
            self.prefetch.collect(self.state)
            self._check_workers()
            if os.getppid() != self.consumer:
                return  # the consumer is gone and nobody will read what we make
        self.conn.send(Finished(dict(st.stats)))
        # The consumer may not have attached the slots yet (it maps them when it reads
        # Ready): keep them until it says it is done or goes away. The workers can go.
        self._stop_workers()
        while os.getppid() == self.consumer:
            ready = wait([self.conn, self.release], timeout=1.0)
            if self.release in ready:
                self._on_releases()
            if self.conn in ready and self._on_consumer():
                return

    def _on_consumer(self) -> bool:
        """Handles consumer messages; True when the run must stop."""
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if isinstance(msg, Stop):
                    return True
                if isinstance(msg, Grow):
                    self._grow()
        except (EOFError, OSError):
            return True
        return False

    def _on_releases(self) -> None:
        try:
            data = os.read(self.release.fileno(), 4096 * RELEASE.size)
        except BlockingIOError:
            return
        if not data:
            raise SystemExit(0)  # the consumer closed its end: it is gone
        for (slot,) in RELEASE.iter_unpack(data):
            self.state.free_slots.append(slot)
            self.state.held_by_consumer -= 1

    def _grow(self) -> None:
        assert self.pool is not None
        free = shm_free_bytes()
        if free is not None and free < 2 * self.pool.slot_bytes:
            raise MemoryError(
                f"the consumer holds all {len(self.pool)} shared-memory slots and /dev/shm is "
                "full; copy the arrays you keep (np.array(image)) instead of keeping views, or "
                "use to_arrays()"
            )
        slot = self.pool.grow()
        self.state.stats["slots_added"] += 1
        self.conn.send(SlotsAdded((self.pool.names[slot],)))
        self.state.free_slots.append(slot)

    # ---- decoding -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        st = self.state
        idle = [w for w in self.workers if w.ready and w.task is None and w.proc.is_alive()]
        while idle and st.pending:
            pos, start, end, slot = st.pending[0]
            if slot < 0:
                if not st.free_slots:
                    if not any(w.task for w in self.workers) and not self._evict(pos, start):
                        break
                    if not st.free_slots:
                        break
                slot = st.free_slots.pop()
            heapq.heappop(st.pending)
            worker = idle.pop()
            chunk = st.chunks[pos]
            assert chunk.records is not None and chunk.path is not None
            self.task_ids += 1
            task = Task(
                self.task_ids,
                self.plans[chunk.plan_index].index,
                str(chunk.path),
                tuple(chunk.records[start:end]),
                slot,
            )
            worker.conn.send(task)
            worker.task, worker.task_id, worker.started = (
                (pos, start, end, slot),
                task.task_id,
                (time.monotonic()),
            )

    def _evict(self, pos: int, start: int) -> bool:
        """Frees the slot of the latest finished task that waits behind (pos, start)."""
        st = self.state
        later = [k for k, d in st.done.items() if k > (pos, start) and d.slot is not None]
        if not later:
            return False
        key = max(later)
        done = st.done.pop(key)
        assert done.slot is not None
        st.free_slots.append(done.slot)
        heapq.heappush(st.pending, (key[0], key[1], done.end, -1))
        return True

    def _on_result(self, worker: WorkerSlot) -> None:
        try:
            result = worker.conn.recv()
        except (EOFError, OSError):
            return  # it died; _check_workers redoes its task
        if isinstance(result, WorkerReady):
            worker.ready = True
            return
        if worker.task is None or result.task_id != worker.task_id:
            return
        pos, start, end, slot = worker.task
        worker.task = None
        st = self.state
        chunk = st.chunks[pos]
        plan_index = self.plans[chunk.plan_index].index
        if isinstance(result, TaskFailed):
            st.free_slots.append(slot)
            st.done[(pos, start)] = Done(None, end, Failed(result.error))
            return
        assert isinstance(result, TaskDone)
        covered_end = start + result.covered
        if covered_end < end:  # the slot filled up: the rest is a task of its own
            heapq.heappush(st.pending, (pos, covered_end, end, -1))
        st.done[(pos, start)] = Done(
            slot,
            covered_end,
            BatchReady(slot, result.nbytes, result.rows, plan_index, result.errors),
            result.covered,
        )

    def _check_workers(self) -> None:
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            hung = w.task is not None and now - w.started > self.config.worker_timeout
            if not w.ready and now - w.born > WORKER_START_TIMEOUT:
                raise WorkerError(
                    f"worker {w.proc.pid} did not start within {WORKER_START_TIMEOUT:.0f} s; "
                    "the machine may be out of memory or processes",
                    pid=w.proc.pid,
                    exitcode=w.proc.exitcode,
                )
            if hung and w.proc.is_alive():
                os.kill(w.proc.pid, signal.SIGKILL)
                w.proc.join(5)
            if w.proc.is_alive():
                continue
            w.proc.join()
            pid, code = w.proc.pid, w.proc.exitcode
            w.conn.close()
            self.state.stats["worker_restarts"] += 1
            if w.task is not None:
                pos, start, end, slot = w.task
                tries = self.restarts.get((pos, start), 0) + 1
                self.restarts[(pos, start)] = tries
                if tries > MAX_TASK_RESTARTS:
                    why = "hung" if hung else f"exited with code {code}"
                    chunk_id = self.plans[self.state.chunks[pos].plan_index].index
                    raise WorkerError(
                        f"worker {pid} {why} on chunk {chunk_id} (records {start}-{end}), "
                        f"{tries} times; the chunk may hold an image "
                        "that crashes the decoder",
                        pid=pid,
                        exitcode=code,
                    )
                heapq.heappush(self.state.pending, (pos, start, end, slot))
            self.workers[i] = self._spawn_worker()

    # ---- delivery -------------------------------------------------------------------------
    def _deliver(self) -> None:
        st = self.state
        while st.deliver_pos < len(self.order):
            key = (st.deliver_pos, st.deliver_row)
            done = st.done.pop(key, None)
            if done is None:
                return
            if isinstance(done.message, Failed):
                self.conn.send(done.message)
                raise _Delivered()
            if isinstance(done.message, BatchReady):
                st.stats["samples"] += done.message.rows
                st.stats["skipped"] += len(done.message.errors)
                st.held_by_consumer += 1
                self.conn.send(done.message)
            st.deliver_row = done.end
            chunk = st.chunks[st.deliver_pos]
            if chunk.records is not None and st.deliver_row >= len(chunk.records):
                # Delivered whole: no task can need the file again (evictions redo only
                # tasks of undelivered chunks).
                if chunk.owned and chunk.path is not None:
                    chunk.path.unlink(missing_ok=True)
                del st.chunks[st.deliver_pos]
                st.deliver_pos += 1
                st.deliver_row = 0

    # ---- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Stops workers, unlinks slots, removes the download folder. Idempotent."""
        self._stop_workers()
        if self.pool is not None:
            self.pool.close()
        self.prefetch.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.source.close()

    def _stop_workers(self) -> None:
        """Asks, waits (bounded), then kills; idempotent."""
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.conn.send(None)
        deadline = time.monotonic() + 2.0
        for w in self.workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2.0)
            with contextlib.suppress(Exception):
                w.conn.close()
        self.workers.clear()


class _Delivered(Exception):
    """A run-ending error was handed to the consumer; stop quietly."""
