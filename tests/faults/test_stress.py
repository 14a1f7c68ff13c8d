"""Stress (`make test-all`): workers killed at random for a whole run of 2,000 small chunks.

A killer thread SIGKILLs a random live worker every 50-200 ms while eight workers (on two cores:
oversubscribed, so deaths land at every point of a task: before its start, mid-decode, while
writing a slot, while sending its result, right after publishing) decode 2,000 chunks of four
digits. The run must deliver every sample exactly once, in order, without an error, and leave
no segment in /dev/shm and no download folder behind.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import threading
from pathlib import Path

import pytest
from engine_helpers import job_source, shm_names, wait_gone

from pixcrawler_engine import DecodePolicy, EngineConfig, Stream

from .bad_data import chunk_zip, digits, encode, tally, write_job

SLOW = os.environ.get("PIXCRAWLER_SLOW_TESTS") == "1"
CHUNKS = 2000
PER_CHUNK = 4


@pytest.mark.skipif(not SLOW, reason="the slow tier: set PIXCRAWLER_SLOW_TESTS=1")
@pytest.mark.timeout(1200)
def test_random_worker_kills_for_a_whole_run_lose_and_repeat_nothing(tmp_path: Path) -> None:
    pngs = [encode(d, "PNG") for d in digits()]
    chunks, expected = [], []
    for c in range(CHUNKS):
        names = [f"{c:04d}-{j}.png" for j in range(PER_CHUNK)]
        items = [(n, pngs[(PER_CHUNK * c + j) % len(pngs)]) for j, n in enumerate(names)]
        chunks.append(chunk_zip(items))
        expected += names
    write_job(tmp_path, "stress", chunks)
    config = EngineConfig(num_workers=8, batch_rows=4, max_workers=2, prefetch_chunks=8)
    rng = random.Random(20261129)
    stop = threading.Event()
    kills: list[int] = []
    before = shm_names()

    def killer(stream: Stream) -> None:
        while not stop.wait(rng.uniform(0.05, 0.2)):
            pids = list(stream.worker_pids)
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills.append(pid)
                except ProcessLookupError:
                    pass

    keys: list[str] = []
    with Stream(job_source(tmp_path, "stress"), config=config, policy=DecodePolicy()) as stream:
        token = stream._state.token
        thread = threading.Thread(target=killer, args=(stream,), daemon=True)
        thread.start()
        try:
            for batch in stream:
                keys.extend(batch.keys)
        finally:
            stop.set()
            thread.join()
        stats = stream.stats
    tally(faults=len(kills), samples=len(expected))
    assert keys == expected  # every sample once, in order
    assert len(kills) >= 10 and stats["worker_restarts"] >= len(kills) // 2
    assert wait_gone(kills, 10.0) == []
    assert not {n for n in shm_names() - before if n.startswith(f"pxc_{token}")}
    assert not Path(tempfile.gettempdir(), f"pxc-run-{token}").exists()
