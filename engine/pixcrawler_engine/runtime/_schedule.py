"""The supervisor's bookkeeping: chunks in flight, worker handles, finished tasks, slot size.

Tasks are keyed (group, position): a group of the epoch's order (see NOTE [epoch order] in
`_epoch`) and a position in its order; chunks are keyed by their place in the run's download
order.

Plain data, owned and mutated by the supervisor's one thread (see NOTE [scheduling] in
`_supervisor`); the prefetcher's threads never touch it.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from pixcrawler_engine._config import ROW_OVERHEAD, SLOT_OVERHEAD, DecodePolicy, EngineConfig
from pixcrawler_engine.runtime._epoch import Group
from pixcrawler_engine.runtime._protocol import BatchReady, ExceptionWrapper, Failed, Task
from pixcrawler_engine.sources._listing import slice_records, task_records
from pixcrawler_engine.sources._record import Record

__all__ = [
    "ROW_OVERHEAD",
    "SLOT_OVERHEAD",
    "Chunk",
    "Done",
    "State",
    "WorkerSlot",
    "build_task",
    "chunk_order",
    "free_a_slot",
    "queue_group",
    "record_order",
    "slot_bytes_for",
    "task_spans",
]


def chunk_order(num_chunks: int, *, shuffle: bool, seed: int) -> list[int]:
    """The positions of a run's chunks (in its plan) in the chunk-level shuffle's order.

    The plan's order, or with `shuffle` the permutation seeded by `seed` alone: epoch 0 of the
    engine's order with `shuffle_window=1`, which exports and `pixcrawler.ray` deliver.
    """
    if not shuffle:
        return list(range(num_chunks))
    import numpy as np  # only here: the supervisor stays light

    return [int(i) for i in np.random.default_rng(seed).permutation(num_chunks)]


def record_order(num_records: int, *, seed: int, chunk: int) -> list[int]:
    """A chunk's records in the chunk-level shuffle (see `chunk_order`): seeded by the seed and
    the chunk id."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, chunk]).permutation(num_records)]


def slot_bytes_for(config: EngineConfig, policy: DecodePolicy) -> int:
    """The size of one slot: a whole batch of fixed-size images, or `slot_bytes`."""
    if config.slot_bytes is not None:
        return config.slot_bytes
    shape = policy.fixed_shape
    if shape is None:
        return 64 << 20
    size = config.rows_for(shape) * (math.prod(shape) + ROW_OVERHEAD) + SLOT_OVERHEAD
    return -(-size // 4096) * 4096


@dataclass
class Chunk:
    plan_index: int
    group: int
    records: Sequence[Record] | None = None
    path: Path | None = None
    owned: bool = False
    error: ExceptionWrapper | None = None


@dataclass
class WorkerSlot:
    """One worker seat's current process, known by the supervisor's end of its socket."""

    seat: int
    conn: Connection
    request: int  # the zygote request that forks it (see `_zygote`)
    pid: int | None = None  # reported by the zygote once forked
    task: tuple[int, int, int, int] | None = None  # (group, start, end, slot)
    task_id: int = 0
    ready: bool = False  # imports done (WorkerReady); only then it gets tasks
    born: float = field(default_factory=time.monotonic)
    beat: int = -1  # its beat counter when last seen moving, and when that was
    beat_at: float = field(default_factory=time.monotonic)
    hung: bool = False  # killed by the supervisor for silence


@dataclass
class Done:
    slot: int | None
    end: int
    message: BatchReady | Failed | None = None


@dataclass
class State:
    chunks: dict[int, Chunk] = field(default_factory=dict)
    pending: list[tuple[int, int, int, int]] = field(default_factory=list)  # heap
    done: dict[tuple[int, int], Done] = field(default_factory=dict)
    free_slots: list[int] = field(default_factory=list)
    deliver_group: int = 0  # the group delivering now, and the position it delivers next
    deliver_at: int = 0
    next_download: int = 0
    downloads: int = 0
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "samples": 0,
            "skipped": 0,
            "chunks": 0,
            "worker_restarts": 0,
            "bytes_downloaded": 0,
            "slots_added": 0,
            "stalls": 0,
        }
    )


def build_task(
    task_id: int, g: int, group: Group, chunks: list[Chunk], ids: list[int], start: int,
    end: int, slot: int,
) -> Task:  # fmt: skip
    """The task of positions [start, end) of group `g`, whose chunks (with `ids`) are on disk."""
    if len(chunks) == 1 and group.key is None:  # the dataset order: a slice of one chunk
        chunk = chunks[0]
        assert chunk.records is not None and chunk.path is not None
        rows = slice_records(chunk.records, start, end)
        return Task(task_id, (ids[0],), (str(chunk.path),), rows, slot, group=g)
    picked = group.rows(start, end)
    used = sorted({part for part, _ in picked})
    at = {part: i for i, part in enumerate(used)}
    return Task(
        task_id,
        tuple(ids[i] for i in used),
        tuple(str(chunks[i].path) for i in used),
        task_records([c.records or () for c in chunks], picked),  # all listed once queued
        slot,
        tuple(at[part] for part, _ in picked) if len(used) > 1 else None,
        g,
    )


def queue_group(
    st: State, g: int, group: Group, chunks: list[Chunk], rows: int, *, workers: int = 1,
    first: bool = False, last: bool = False,
) -> None:  # fmt: skip
    """Group `g` has all its chunks: its tasks queue (or its failure). `first` and `last`:
    it is the run's first or last group (see `task_spans`)."""
    failed = next((c.error for c in chunks if c.error is not None), None)
    if failed is not None:
        st.done[(g, group.ranges[0][0])] = Done(None, group.ranges[-1][1], Failed(failed))
        return
    for start, end in task_spans(group.ranges, rows, workers=workers, first=first, last=last):
        heapq.heappush(st.pending, (g, start, end, -1))


def task_spans(
    ranges: Sequence[tuple[int, int]], rows: int, *, workers: int = 1, first: bool = False,
    last: bool = False,
) -> list[tuple[int, int]]:  # fmt: skip
    """`ranges` cut into decode tasks of `rows` positions, each within one range.

    NOTE [task sizes]: with tasks of `rows`, a run's first batch waits for one worker to
    decode a whole task while the others decode later ones, and at its end one worker decodes
    the last task while the others have nothing left. So the run's first task (`first`) and
    its last `workers` tasks (`last`) are cut into one piece per worker: the first batch
    comes when every worker has decoded its share, and the workers finish within a piece of
    each other.
    """
    spans = [(a, min(a + rows, hi)) for lo, hi in ranges for a in range(lo, hi, rows)]
    if workers < 2:
        return spans
    tail = len(spans) - workers if last else len(spans)
    out = []
    for i, span in enumerate(spans):
        out += _pieces(span, workers) if (first and i == 0) or i >= tail else [span]
    return out


def _pieces(span: tuple[int, int], n: int) -> list[tuple[int, int]]:
    """`span` cut into min(n, its length) pieces whose lengths differ by at most one."""
    lo, hi = span
    n = min(n, hi - lo)
    return [(lo + (hi - lo) * k // n, lo + (hi - lo) * (k + 1) // n) for k in range(n)]


def free_a_slot(st: State, key: tuple[int, int]) -> bool:
    """Frees a slot for the task at `key` (none is free, and no worker is busy), taking it
    from a task that must wait behind it anyway: one put back pending with its slot (its
    worker died), else the latest finished one, which is done again later. False: none."""
    for i, (g, start, end, slot) in enumerate(st.pending):
        if slot >= 0 and (g, start) > key:
            st.pending[i] = (g, start, end, -1)  # keys are unique: the heap's order holds
            st.free_slots.append(slot)
            return True
    later = [k for k, d in st.done.items() if k > key and d.slot is not None]
    if not later:
        return False
    last = max(later)
    done = st.done.pop(last)
    assert done.slot is not None
    st.free_slots.append(done.slot)
    heapq.heappush(st.pending, (last[0], last[1], done.end, -1))
    return True
