"""Benchmark plumbing: peak RSS over a process tree, timing, and the bench job."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil


class TreeRss:
    """Samples the RSS summed over this process and all its descendants; keeps the peak."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> TreeRss:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TreeCpu:
    """CPU seconds (user + system) spent by this process and all its descendants meanwhile.

    Each process's own counters are sampled while it lives (a process that exits between two
    samples loses at most one interval); unlike wall time on a shared machine, this does not
    grow when other jobs take the cores.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.seconds = 0.0
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    times = p.cpu_times()
                    self._seen[key] = times.user + times.system
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._sample()
        self._start = dict(self._seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(v - self._start.get(k, 0.0) for k, v in self._seen.items())


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - start


def median_of(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    runs = [fn() for _ in range(repeats)]
    return statistics.median(runs), runs


def build_bench_store(
    root: Path, *, copies: int = 1, n_photos: int = 1000, limit: int | None = None
) -> tuple[Path, str]:
    """Packs a job of 640x480-class real-photo JPEGs (demo photos) `copies` times over.

    `limit` keeps only the first `limit` JPEGs of the `n_photos` generated (about 80 % of
    them are JPEGs).
    """
    from pixcrawler._demo_data import build_photos
    from pixcrawler_engine.sources._pack import pack

    job = f"bench{copies}x" if limit is None else f"bench{copies}x{limit}"
    store = root / "store"
    if (store / "jobs" / job / "job.json").exists():
        return store, job
    src = root / f"photos-{n_photos}"
    if not src.exists():
        build_photos(src, n=n_photos)
    jsonl = root / f"{job}.jsonl"
    lines = []
    import json

    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if limit is not None:
        if len(files) < limit:
            raise ValueError(f"{n_photos} photos gave {len(files)} JPEGs, fewer than {limit}")
        files = files[:limit]
    for c in range(copies):
        for f in files:
            lines.append(
                json.dumps({"file": str(f.relative_to(root)), "label": f.parent.name, "copy": c})
            )
    jsonl.write_text("\n".join(lines) + "\n")
    # The bench's own photos, known to decode: headers are enough (decoding each one again
    # would add minutes to the 10x dataset's setup).
    pack(jsonl, store, job, chunk_size=500, verify="header")
    return store, job


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def describe_machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
