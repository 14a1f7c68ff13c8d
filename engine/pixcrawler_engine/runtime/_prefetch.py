"""Chunk downloads ahead of decoding: a thread pool fetches, the supervisor's loop collects.

The pool runs `Source.fetch` and `Source.records` (blocking I/O) for up to `max_workers`
chunks at a time, `prefetch_chunks` ahead of delivery, except while a run's first group (its
first chunk, in dataset order) downloads: the supervisor then asks for that group alone, as the
first batch waits on it and downloads beside it would share its link. A finished download
writes one byte to a pipe (`wake_fd`) so that the supervisor's `wait` wakes; only the
supervisor's thread reads the results and changes the `State`. Sources refuse a chunk whose
records do not match its plan's count: the epoch's order is computed from those counts (NOTE
[epoch order] in `_epoch`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pixcrawler_engine._config import EngineConfig
from pixcrawler_engine.runtime._protocol import ExceptionWrapper
from pixcrawler_engine.runtime._schedule import Chunk, State
from pixcrawler_engine.sources._base import ChunkPlan, Source
from pixcrawler_engine.sources._record import Record

__all__ = ["Prefetcher"]


class Prefetcher:
    """Downloads the chunks of a run in delivery order, a bounded number ahead.

    `order[i]` is (plan position, group) of the run's i-th chunk download (a chunk appears
    again when padding repeats it).
    """

    def __init__(
        self,
        source: Source,
        config: EngineConfig,
        plans: list[ChunkPlan],
        order: list[tuple[int, int]],
        workdir: Path,
    ) -> None:
        self.source = source
        self.config = config
        self.plans = plans
        self.order = order
        self.workdir = workdir
        self.executor = ThreadPoolExecutor(config.max_workers, thread_name_prefix="pxc-fetch")
        self.fetched: list[tuple[int, Future[tuple[Path, bool, Sequence[Record]]]]] = []
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)

    def start(self, st: State, limit: int) -> None:
        """Starts the downloads before position `limit` that the pool allows."""
        limit = min(len(self.order), limit)
        while st.next_download < limit and st.downloads < self.config.max_workers:
            pos = st.next_download
            plan_index, group = self.order[pos]
            st.chunks[pos] = Chunk(plan_index, group)
            future = self.executor.submit(self._fetch, self.plans[plan_index])
            future.add_done_callback(lambda _f: os.write(self._wake_w, b"x"))
            self.fetched.append((pos, future))
            st.next_download += 1
            st.downloads += 1

    def _fetch(self, plan: ChunkPlan) -> tuple[Path, bool, Sequence[Record]]:
        path, owned = self.source.fetch(plan.index, self.workdir)
        records = self.source.records(plan.index, path)
        return path, owned, records

    def collect(self, st: State) -> list[int]:
        """Records finished downloads in the state; returns their positions."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_fd, 4096)
        still, finished = [], []
        for pos, future in self.fetched:
            if not future.done():
                still.append((pos, future))
                continue
            st.downloads -= 1
            finished.append(pos)
            chunk = st.chunks[pos]
            plan = self.plans[chunk.plan_index]
            try:
                chunk.path, chunk.owned, chunk.records = future.result()
            except Exception as exc:
                chunk.error = ExceptionWrapper.wrap(exc, f"downloading chunk {plan.index}")
                continue
            st.stats["chunks"] += 1
            if chunk.path is not None and chunk.owned:
                st.stats["bytes_downloaded"] += chunk.path.stat().st_size
        self.fetched = still
        return finished

    def settle(self, timeout: float) -> bool:
        """Cancels the downloads not started and waits up to `timeout` s for the running ones;
        True when none is left (a run stopped halfway may then park: NOTE [parked])."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        return not futures.wait([f for _, f in self.fetched], timeout).not_done

    def close(self, *, wait: bool = False) -> None:
        """Cancels downloads not started; idempotent.

        Without `wait`, the wake pipe stays open: a download still running calls back into it,
        and a closed (or reused) descriptor there would be worse than two descriptors kept until
        the supervisor exits. With `wait` (a supervisor that parks once its downloads are done:
        NOTE [parked] in `_launch`), the threads are joined, their callbacks run, and the pipe
        is closed.
        """
        self.executor.shutdown(wait=wait, cancel_futures=True)
        if wait and self._wake_w >= 0:
            for fd in (self.wake_fd, self._wake_w):
                os.close(fd)
            self.wake_fd = self._wake_w = -1
