"""The supervisor process: schedules decode tasks, delivers batches in order, replaces workers.

It owns every OS resource of a run (its owner lock, the shared-memory slots and beat counters,
the download folder, the zygote and, through it, the workers) and is the only process that
unlinks or deletes them (see NOTE [ownership] in `_shm`).

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

A worker's death (EOF on its socket, or a failed send; see `_pool`) puts its task back with its
slot and starts a replacement at its seat; a task whose workers die `MAX_TASK_RESTARTS` times is
an error naming the chunk. The consumer's `Ping` is answered at once: a supervisor that stops
answering (stopped, deadlocked) is the consumer's `WorkerError` after `heartbeat_timeout`.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import signal
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine._errors import SharedMemoryError, WorkerError
from pixcrawler_engine.runtime._pool import Death, WorkerPool
from pixcrawler_engine.runtime._prefetch import Prefetcher
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
    Task,
    TaskDone,
    TaskFailed,
    Workers,
)
from pixcrawler_engine.runtime._schedule import (
    Done,
    State,
    WorkerSlot,
    chunk_order,
    slot_bytes_for,
)
from pixcrawler_engine.runtime._shm import (
    Beats,
    OwnerLock,
    SlotPool,
    run_folder,
    shm_free_bytes,
    shm_size_text,
)
from pixcrawler_engine.runtime._waiter import Waiter
from pixcrawler_engine.runtime._zygote import Zygote
from pixcrawler_engine.sources._base import Source

__all__ = ["Supervisor"]

MAX_TASK_RESTARTS = 2


class Supervisor:
    """One run's scheduler; `run()` is its loop, `close()` its ordered teardown."""

    def __init__(
        self,
        conn: Connection,
        release: Connection,
        zygote: Zygote,
        token: str,
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
        self.token = token
        self.lock = OwnerLock(token)  # first: everything below is swept by it if we die
        self.workdir = run_folder(token)
        self.workdir.mkdir(mode=0o700)
        self.zygote = zygote
        self.slots: SlotPool | None = None
        self.beats: Beats | None = None
        self.pool: WorkerPool | None = None
        try:
            self.plans = source.plan()
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.lock.release()
            raise
        self.order = chunk_order(len(self.plans), shuffle=config.shuffle, seed=config.seed)
        self.state = State()
        self.task_ids = 0
        self.restarts: dict[tuple[int, int], int] = {}
        self.prefetch = Prefetcher(source, config, self.plans, self.order, self.workdir)
        self.waiter = Waiter()

    # ---- set-up -------------------------------------------------------------------------
    def start(self) -> None:
        self.prefetch.start(self.state)  # the first chunks download while the workers boot
        slot_bytes = slot_bytes_for(self.config, self.policy)
        self.slots = SlotPool(self.token, self.config.slots, slot_bytes)
        self.state.free_slots = list(range(len(self.slots)))
        self.beats = Beats(self.token, self.config.workers)
        args = (self.source.opener(), self.policy, self.slots.prefix, slot_bytes, self.beats.name)
        args_path = self.workdir / "worker-args.pkl"
        _write_args(args_path, args)
        self.zygote.set_args(args_path)
        self.pool = WorkerPool(self.zygote, self.beats, self.config)
        self.pool.start(self.config.workers)
        self.conn.send(Ready(tuple(self.slots.names)))

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        assert self.pool is not None
        st = self.state
        while st.deliver_pos < len(self.order):
            self.prefetch.start(self.state)
            self._dispatch()
            self._deliver()
            if st.deliver_pos >= len(self.order):
                break
            if self.pool.changed:
                self.conn.send(Workers(self.pool.pids()))
            handles = [self.conn, self.release, self.prefetch.wake_fd, *self.pool.waitables()]
            ready = self.waiter.wait(handles, timeout=1.0)
            if self.release in ready:
                self._on_releases()
            if self.conn in ready and self._on_consumer():
                return
            results, deaths = self.pool.poll(ready)
            for worker, result in results:
                self._on_result(worker, result)
            for death in deaths:
                self._on_death(death)
            self.prefetch.collect(self.state)
            self.pool.check()
            if os.getppid() != self.consumer:
                return  # the consumer is gone and nobody will read what we make
        self.conn.send(Finished(dict(st.stats)))
        # The consumer may not have attached the slots yet (it maps them when it reads
        # Ready): keep them until it says it is done or goes away. The workers can go.
        self.pool.stop()
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
                elif isinstance(msg, Ping):
                    self.conn.send(Pong())
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

    def _grow(self) -> None:
        assert self.slots is not None
        free = shm_free_bytes()
        if free is not None and free < 2 * self.slots.slot_bytes:
            raise SharedMemoryError(
                f"the consumer holds all {len(self.slots)} shared-memory slots and "
                f"{shm_size_text()} is full; copy the arrays you keep (np.array(image)) instead "
                "of keeping views, or use to_arrays()"
            )
        slot = self.slots.grow()
        self.state.stats["slots_added"] += 1
        self.conn.send(SlotsAdded((self.slots.names[slot],)))
        self.state.free_slots.append(slot)

    # ---- decoding -------------------------------------------------------------------------
    def _dispatch(self) -> None:
        assert self.pool is not None
        st = self.state
        idle = self.pool.idle()
        while idle and st.pending:
            pos, start, end, slot = st.pending[0]
            if slot < 0:
                if not st.free_slots:
                    if not self.pool.busy() and not self._evict(pos, start):
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
            worker.task, worker.task_id = (pos, start, end, slot), task.task_id
            death = self.pool.send(worker, task)
            if death is not None:
                self._on_death(death)

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

    def _on_result(self, worker: WorkerSlot, result: TaskDone | TaskFailed) -> None:
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
        covered_end = start + result.covered
        if covered_end < end:  # the slot filled up: the rest is a task of its own
            heapq.heappush(st.pending, (pos, covered_end, end, -1))
        st.done[(pos, start)] = Done(
            slot,
            covered_end,
            BatchReady(slot, result.nbytes, result.rows, plan_index, result.errors, result.notes),
        )

    def _on_death(self, death: Death) -> None:
        """Puts a dead worker's task back (with its slot) and starts a replacement."""
        assert self.pool is not None
        worker = death.worker
        self.state.stats["worker_restarts"] += 1
        if death.exitcode == -signal.SIGBUS:
            raise SharedMemoryError(
                f"worker {death.pid} was killed by SIGBUS writing to shared memory: "
                f"{shm_size_text()} ran out, or a slot was truncated by another process; give "
                "the container more shared memory (docker run --shm-size=1g) or lower num_slots "
                "or batch_rows",
                pid=death.pid,
                exitcode=death.exitcode,
            )
        if worker.task is not None:
            pos, start, end, slot = worker.task
            tries = self.restarts.get((pos, start), 0) + 1
            self.restarts[(pos, start)] = tries
            if tries > MAX_TASK_RESTARTS:
                chunk_id = self.plans[self.state.chunks[pos].plan_index].index
                raise WorkerError(
                    f"worker {death.pid} {death.describe()} on chunk {chunk_id} (records "
                    f"{start}-{end}), {tries} times; the chunk may hold an image that crashes "
                    "the decoder (or, when hung, one that takes longer than worker_timeout="
                    f"{self.config.worker_timeout:g} s)",
                    pid=death.pid,
                    exitcode=death.exitcode,
                )
            heapq.heappush(self.state.pending, (pos, start, end, slot))
        self.pool.respawn(worker.seat)

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
        """Stops workers and the zygote, unlinks shared memory, removes the folder, unlocks.

        Idempotent. The lock goes last: until then a sweep cannot mistake the run for dead.
        """
        # Names first: unlinking leaves every mapping valid, and a slow stop below must not
        # keep the segments listed in /dev/shm.
        if self.slots is not None:
            self.slots.close()
        if self.beats is not None:
            self.beats.close()
        if self.pool is not None:
            self.pool.stop()
        self.zygote.close()
        self.prefetch.close()
        self.waiter.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.source.close()
        self.lock.release()


def _write_args(path: Path, args: tuple[Any, ...]) -> None:
    """The workers' arguments, for the zygote: dill, so lambdas and `__main__` objects travel."""
    import sys

    import dill

    path.write_bytes(dill.dumps((list(sys.path), args)))


class _Delivered(Exception):
    """A run-ending error was handed to the consumer; stop quietly."""
