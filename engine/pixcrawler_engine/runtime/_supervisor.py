"""The supervisor process: schedules decode tasks, delivers batches in order, replaces workers.

It owns every OS resource of a run (its owner lock, the shared-memory slots and beat counters,
the download folder, the zygote and, through it, the workers) and is the only process that
unlinks or deletes them (see NOTE [ownership] in `_shm`).

NOTE [scheduling]: a run delivers its share of an epoch's order: groups of one chunk, or of a
shuffled block of chunks (NOTE [epoch order] in `_epoch`). Once a group's chunks are on disk,
its positions are cut into tasks of `batch_rows` (NOTE [batch rows] in `_config`), keyed
(group, first position), dispatched in key order with a free slot each, and delivered in key
order only: the epoch's order whatever the number of workers. Since every task earlier than a
dispatched one was dispatched first, the next task to deliver always has, or gets, a slot; the
exceptions (a task cut short because its slot filled up, a consumer holding every slot) take
the slot of a later task put back with one (its worker died), evict a later finished task, or
grow the pool (`_schedule.free_a_slot`).

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
import dataclasses
import heapq
import itertools
import os
import shutil
import signal
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine._errors import SharedMemoryError, WorkerError
from pixcrawler_engine.runtime._epoch import Share, epoch_groups
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
    TaskDone,
    TaskFailed,
    Workers,
)
from pixcrawler_engine.runtime._schedule import (
    Done,
    State,
    WorkerSlot,
    build_task,
    free_a_slot,
    queue_group,
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

if TYPE_CHECKING:
    from pixcrawler_engine.runtime._ipc import Wire

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
        run: int,
        source: Source,
        config: EngineConfig,
        policy: DecodePolicy,
        share: Share,
        wires: tuple[Wire, Wire],
    ) -> None:
        self.conn, self.release, self.zygote, self.wires = conn, release, zygote, wires
        os.set_blocking(release.fileno(), False)  # read on every pass of the loop
        self.source, self.config, self.policy, self.token = source, config, policy, token
        self.run_number = run  # this process's runs so far (NOTE [parked] in `_launch`)
        self.finished = self.parked = False  # `Finished` sent; to wait for the next run after
        self.consumer = os.getppid()
        self.lock = OwnerLock(token)  # first: everything below is swept by it if we die
        self.workdir = run_folder(token)
        self.workdir.mkdir(mode=0o700)
        self.slots: SlotPool | None = None
        self.beats: Beats | None = None
        self.pool: WorkerPool | None = None
        try:
            self.plans = source.plan()
            self.groups = epoch_groups(
                [p.num_records for p in self.plans],
                chunk_ids=[p.index for p in self.plans],
                shuffle=config.shuffle,
                seed=config.seed,
                window=config.shuffle_window,
                share=share,
            )
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.lock.release()
            raise
        # The downloads in order: each group's chunks, at positions first[g] .. first[g + 1].
        order = [(i, g) for g, group in enumerate(self.groups) for i in group.chunks]
        self.first = list(itertools.accumulate((len(g.chunks) for g in self.groups), initial=0))
        self.collected = [0] * len(self.groups)
        self.state = State(deliver_at=self.groups[0].ranges[0][0] if self.groups else 0)
        self.task_ids = 0
        self.restarts: dict[tuple[int, int], int] = {}
        self.prefetch = Prefetcher(source, config, self.plans, order, self.workdir)
        self.rows = config.rows_for(policy.fixed_shape)  # a task's samples
        self.waiter = Waiter()

    # ---- set-up -------------------------------------------------------------------------
    def _prefetch(self) -> None:
        """Downloads the delivering group's chunks; `prefetch_chunks` ahead once group 0 is in."""
        g = min(self.state.deliver_group, len(self.groups) - 1)
        ahead = not self.groups or self.collected[0] == len(self.groups[0].chunks)
        limit = max(self.first[g + 1], self.first[g] + self.config.prefetch_chunks * ahead)
        self.prefetch.start(self.state, limit)

    def start(self) -> None:
        self._prefetch()  # the first chunks download while the workers boot
        slot_bytes = slot_bytes_for(self.config, self.policy)
        self.slots = SlotPool(self.token, self.config.slots, slot_bytes)
        self.state.free_slots = list(range(len(self.slots)))
        self.beats = Beats(self.token, self.config.workers)
        opener = self.source.opener()
        args = (opener, self.policy, self.wires, self.slots.prefix, slot_bytes, self.beats.name)
        self.zygote.set_args(self.workdir / "worker-args.pkl", args)
        self.pool = WorkerPool(self.zygote, self.beats, self.config)
        self.pool.start(self.config.workers)
        self.conn.send(Ready(tuple(self.slots.names)))

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        self.start()
        assert self.pool is not None
        st = self.state
        while st.deliver_group < len(self.groups):
            self._prefetch()  # after _deliver: a group delivered moves the download window on
            self._dispatch()
            if self.pool.changed:
                self.conn.send(Workers(self.pool.pids()))
            # Releases are read every pass, waited for only when no slot is free (a wakeup
            # costs ~40 us of CPU here, an empty read ~1 us). A wait that times out: a stall.
            waited = [] if st.free_slots else [self.release]
            handles = [self.conn, self.prefetch.wake_fd, *self.pool.waitables(), *waited]
            ready = self.waiter.wait(handles, timeout=1.0)
            st.stats["stalls"] += not ready
            self._on_releases()
            if self.conn in ready and self._on_consumer():
                return
            results, deaths = self.pool.poll(ready)
            for worker, result in results:
                self._on_result(worker, result)
            for death in deaths:
                self._on_death(death)
            for pos in self.prefetch.collect(self.state):
                self._on_chunk(pos)
            self.pool.check()
            if os.getppid() != self.consumer:
                return  # the consumer is gone and nobody will read what we make
            self._deliver()
        self.conn.send(Finished(dict(st.stats)))
        self.finished = True
        self._linger()

    def _linger(self) -> None:
        """After the run's last message the workers go, but the slots stay until the consumer
        is done or gone: it may not have mapped them yet (it does when it reads Ready)."""
        assert self.pool is not None
        self.pool.stop()
        while os.getppid() == self.consumer:
            ready = wait([self.conn, self.release], timeout=1.0)
            self._on_releases()
            if self.conn in ready and self._on_consumer():
                return

    def _on_consumer(self) -> bool:
        """Handles consumer messages; True when the run must stop."""
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if isinstance(msg, Stop):
                    self.parked = msg.park
                    return True
                if isinstance(msg, Grow) and not self.finished:  # after it: for a next run
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
        for run, slot in RELEASE.iter_unpack(data):
            if run == self.run_number:  # not a view of an earlier run, released late
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
    def _on_chunk(self, pos: int) -> None:
        """A download finished: once its group has all its chunks, the group's tasks queue."""
        st = self.state
        g = st.chunks[pos].group
        self.collected[g] += 1
        group = self.groups[g]
        if self.collected[g] < len(group.chunks):
            return
        chunks = [st.chunks[p] for p in range(self.first[g], self.first[g + 1])]
        ends = self.config.split_ends
        queue_group(st, g, group, chunks, self.rows, workers=self.config.workers,
                    first=ends and g == 0, last=ends and g == len(self.groups) - 1)  # fmt: skip

    def _dispatch(self) -> None:
        assert self.pool is not None
        st = self.state
        idle = self.pool.idle()
        while idle and st.pending:
            g, start, end, slot = st.pending[0]
            if slot < 0:
                if not st.free_slots:
                    if not self.pool.busy() and not free_a_slot(st, (g, start)):
                        break
                    if not st.free_slots:
                        break
                slot = st.free_slots.pop()
            heapq.heappop(st.pending)
            worker = idle.pop()
            self.task_ids += 1
            chunks = [st.chunks[p] for p in range(self.first[g], self.first[g + 1])]
            ids = [self.plans[c.plan_index].index for c in chunks]
            task = build_task(self.task_ids, g, self.groups[g], chunks, ids, start, end, slot)
            worker.task, worker.task_id = (g, start, end, slot), task.task_id
            death = self.pool.send(worker, task)
            if death is not None:
                self._on_death(death)

    def _on_result(self, worker: WorkerSlot, result: TaskDone | TaskFailed) -> None:
        if worker.task is None or result.task_id != worker.task_id:
            return
        g, start, end, slot = worker.task
        worker.task = None
        st = self.state
        chunk_id = self.plans[self.groups[g].chunks[0]].index
        if isinstance(result, TaskFailed):
            st.free_slots.append(slot)
            st.done[(g, start)] = Done(None, end, Failed(result.error))
            return
        covered_end = start + result.covered
        if covered_end < end:  # the slot filled up: the rest is a task of its own
            heapq.heappush(st.pending, (g, covered_end, end, -1))
        st.done[(g, start)] = Done(
            slot,
            covered_end,
            BatchReady(slot, result.nbytes, result.rows, chunk_id, result.errors, result.notes),
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
            g, start, end, slot = worker.task
            tries = self.restarts.get((g, start), 0) + 1
            self.restarts[(g, start)] = tries
            if tries > MAX_TASK_RESTARTS:
                ids = [self.plans[i].index for i in self.groups[g].chunks]
                where = f"chunk {ids[0]}" if len(ids) == 1 else f"a task drawing on chunks {ids}"
                raise WorkerError(
                    f"worker {death.pid} {death.describe()} on {where} (records "
                    f"{start}-{end}), {tries} times; the chunk may hold an image that crashes "
                    "the decoder (or, when hung, one that takes longer than worker_timeout="
                    f"{self.config.worker_timeout:g} s)",
                    pid=death.pid,
                    exitcode=death.exitcode,
                )
            heapq.heappush(self.state.pending, (g, start, end, slot))
        self.pool.respawn(worker.seat)

    # ---- delivery -------------------------------------------------------------------------
    def _deliver(self) -> None:
        st = self.state
        while st.deliver_group < len(self.groups):
            g = st.deliver_group
            done = st.done.pop((g, st.deliver_at), None)
            if done is None:
                return
            if isinstance(done.message, Failed):
                self.conn.send(done.message)
                self._linger()
                raise _Delivered()
            after = self.groups[g].next_start(done.end)
            if isinstance(done.message, BatchReady):
                st.stats["samples"] += done.message.rows
                st.stats["skipped"] += len(done.message.errors)
                last = after is None and g == len(self.groups) - 1
                self.conn.send(
                    dataclasses.replace(done.message, last=True) if last else done.message
                )
            if after is not None:
                st.deliver_at = after
                continue
            # Delivered whole: no task can need its files again (evictions redo only tasks
            # of undelivered groups).
            gone = [st.chunks.pop(pos) for pos in range(self.first[g], self.first[g + 1])]
            kept = {c.path for c in st.chunks.values()}  # padding may hold the same files
            for chunk in gone:
                if chunk.owned and chunk.path is not None and chunk.path not in kept:
                    chunk.path.unlink(missing_ok=True)
            st.deliver_group += 1
            if st.deliver_group < len(self.groups):
                st.deliver_at = self.groups[st.deliver_group].ranges[0][0]

    # ---- teardown -------------------------------------------------------------------------
    def close(self, *, park: bool = False) -> None:
        """Stops workers and the zygote, unlinks shared memory, removes the folder, unlocks.
        Idempotent. The lock goes last: until then a sweep cannot mistake the run for dead.
        `park` (NOTE [parked] in `_launch`): the zygote stays, the download threads are joined.
        """
        # Names first: unlinking leaves every mapping valid, and a slow stop below must not
        # keep the segments listed in /dev/shm.
        if self.slots is not None:
            self.slots.close()
        if self.beats is not None:
            self.beats.close()
        if self.pool is not None:
            self.pool.stop()
        if not park:
            self.zygote.close()
        self.prefetch.close(wait=park)
        self.waiter.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(Exception):
            self.source.close()
        self.lock.release()


class _Delivered(Exception):
    """A run-ending error was handed to the consumer; stop quietly."""
