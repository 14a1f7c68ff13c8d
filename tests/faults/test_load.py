"""Load: many tiny chunks read by a slow consumer keep memory, descriptors and /dev/shm flat.

A job of 1,000 chunks of two real 32x32 digits (scikit-learn) is read by a consumer that
pauses after every batch, so the supervisor runs against backpressure for the whole run and
every per-chunk cost (a download, a manifest, a task, a slot round trip) repeats 1,000 times.
A `TreeMonitor` samples the supervisor's process tree and this process every 50 ms. Between
the first and the last batch, the last quarter of the samples is compared with the first:

- RSS (summed over the tree and this process, ~570 MiB) grows by at most 8 MiB between the
  means of the two quarters, which lie 750 chunks apart: a leak of 12 KiB a chunk (a kept
  batch of pixels, a chunk's records) fails it, and of 1 KiB a chunk in the 10,000-chunk
  soak. Measured noise: under 1 MiB of growth (it more often shrinks, by up to 12 MiB).
- Open file descriptors (summed) grow by at most 4: the two download threads and the two
  workers may each hold one chunk file at a sampling instant, never one per chunk. A worker
  holds the chunk files of its latest two groups (`KEEP_GROUPS`; a group is one chunk here)
  and of its current task, which may be an older group's redone after an eviction,
  never more: a file kept open after its group was delivered would keep its disk space.
- /dev/shm pages of the run's segments do not grow at all, and the pool never grows: every
  slot is back in the pool before the consumer asks for more.

Nothing may be OOM-killed or restarted, every key arrives once, in order, and each chunk (two
images, `batch_rows=2`) is one batch: a per-chunk cost paid twice would double the run.

The 1,000-chunk run takes about 10 s on a 2-core machine and is in the default suite; a soak
over 10,000 chunks (about 70 s) is gated behind PIXCRAWLER_SLOW_TESTS=1 (`make test-all`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from engine_helpers import job_source

from pixcrawler_engine import DecodePolicy, EngineConfig, Stream
from pixcrawler_engine.runtime._worker import KEEP_GROUPS

from .bad_data import Sample, TreeMonitor, chunk_zip, digits, encode, tally, write_job

SLOW = os.environ.get("PIXCRAWLER_SLOW_TESTS") == "1"
PAUSE = 0.005  # seconds the consumer spends on each batch of two images
RSS_GROWTH = 8 << 20
FD_GROWTH = 4


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _open_chunks(pid: int) -> list[str]:
    """The chunk files a process holds open (deleted ones included)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue  # closed meanwhile
    return [link for link in links if ".zip" in link]


def _quarters(samples: list[Sample], start: float, end: float) -> tuple[list[Sample], list[Sample]]:
    steady = [s for s in samples if start <= s.t <= end and s.complete]
    assert len(steady) >= 20, f"only {len(steady)} samples between the first and last batch"
    q = len(steady) // 4
    return steady[:q], steady[-q:]


@pytest.mark.parametrize(
    "n_chunks",
    [
        pytest.param(1000, id="1000-chunks"),
        pytest.param(
            10_000,
            id="10000-chunks",
            marks=[
                pytest.mark.skipif(not SLOW, reason="set PIXCRAWLER_SLOW_TESTS=1"),
                pytest.mark.timeout(900),
            ],
        ),
    ],
)
def test_resources_stay_flat_under_a_slow_consumer(tmp_path: Path, n_chunks: int) -> None:
    pngs = [encode(d, "PNG") for d in digits()]
    chunks, expected = [], []
    for c in range(n_chunks):
        names = [f"{c:04d}-{j}.png" for j in range(2)]
        chunks.append(chunk_zip([(n, pngs[(2 * c + j) % len(pngs)]) for j, n in enumerate(names)]))
        expected += names
    write_job(tmp_path, "load", chunks)
    config = EngineConfig(num_workers=2, batch_rows=2, max_workers=2)
    policy = DecodePolicy(image_size=(32, 32))
    keys: list[str] = []
    batches = 0
    checkpoints = {len(expected) // 4 * k // 2 * 2 for k in (1, 2, 3)}
    pause = threading.Event()  # never set: a bounded wait
    began = time.monotonic()
    with Stream(job_source(tmp_path, "load"), config=config, policy=policy) as stream:
        with TreeMonitor([stream.pid], interval=0.05, include_self=True) as monitor:
            first = last = 0.0
            for batch in stream:
                if not keys:
                    first = time.monotonic()
                keys.extend(batch.keys)
                batches += 1
                assert np.asarray(batch.images).shape == (len(batch), 32, 32, 3)
                if len(keys) in checkpoints:  # the first workers live on: none was killed
                    assert all(_alive(pid) for pid in stream.worker_pids), len(keys)
                    for pid in stream.worker_pids:
                        held = _open_chunks(pid)
                        assert len(held) <= KEEP_GROUPS + 1, (len(keys), pid, held)
                pause.wait(PAUSE)
                last = time.monotonic()
        stats = stream.stats
    took = time.monotonic() - began
    tally(samples=len(expected))
    assert keys == expected
    assert stats["worker_restarts"] == 0 and stats["slots_added"] == 0
    # A chunk of `batch_rows` images is one task and one batch, not two; the first and the
    # last are cut into a piece per worker (NOTE [task sizes]).
    pieces = 2 * (config.workers - 1)
    assert batches == n_chunks + pieces, f"{batches} batches for {n_chunks} chunks of batch_rows"
    assert took < 60 * n_chunks / 1000, f"the run took {took:.0f} s"
    head, tail = _quarters(monitor.samples, first, last)

    def mean(values: list[int]) -> float:
        return sum(values) / len(values)

    rss0, rss1 = mean([s.rss for s in head]), mean([s.rss for s in tail])
    assert rss1 <= rss0 + RSS_GROWTH, f"RSS grew from {rss0 / 2**20:.0f} to {rss1 / 2**20:.0f} MiB"
    fds0, fds1 = max(s.fds for s in head), max(s.fds for s in tail)
    assert fds1 <= fds0 + FD_GROWTH, f"open files grew from {fds0} to {fds1}"
    shm0, shm1 = max(s.shm for s in head), max(s.shm for s in tail)
    assert shm0 > 0 and shm1 <= shm0, f"/dev/shm use grew from {shm0} to {shm1} bytes"


@pytest.mark.parametrize(("size", "rows"), [((32, 32), 4), ((224, 224), 8)])
def test_a_chunk_of_batch_rows_images_is_one_batch(
    tmp_path: Path, size: tuple[int, int], rows: int
) -> None:
    """A slot holds `batch_rows` images, whatever the manifest's metadata (here a short
    "source" field, as `pixcrawler pack` writes): no batch is cut into `rows - 1` and 1."""
    pngs = [encode(d, "PNG") for d in digits()[: 3 * rows]]
    chunks = []
    for c in range(3):
        names = [f"{c}-{i}.png" for i in range(rows)]
        lines = [{"file": n, "label": "x", "source": f"digits/{n}"} for n in names]
        manifest = "".join(json.dumps(line) + "\n" for line in lines).encode()
        chunks.append(
            chunk_zip(list(zip(names, pngs[c * rows :], strict=False)), manifest=manifest)
        )
    write_job(tmp_path, "rows", chunks)
    config = EngineConfig(num_workers=1, batch_rows=rows)
    with Stream(
        job_source(tmp_path, "rows"), config=config, policy=DecodePolicy(image_size=size)
    ) as stream:
        sizes = [len(batch) for batch in stream]
    assert sizes == [rows] * 3
