"""Supervisor faults, and workers killed at the two moments that matter, on real processes.

- The supervisor is SIGKILLed mid-run: the consumer raises a `WorkerError` naming its pid and
  the signal within seconds, the batch it holds stays readable, every process of the run
  exits (no orphan), and no segment of that run is left once the next run has started.
- A worker is SIGKILLed right after it published a batch (it is idle, its result delivered),
  and while it decodes (mid-task, its result not yet written): either way the run completes
  with every key exactly once, in order.
- A consumer that starts reading only after the supervisor has decoded the whole (small) job
  still gets every batch: the slots outlive the run until the consumer closes it.

Both worker moments are made deterministic with one worker: the first by leaving it no free
slot (it can only wait once it has published), the second by giving it a first task of large
PNGs that takes seconds of CPU, and killing it after a fraction of a second of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from engine_helpers import (
    POLICY,
    expected_keys,
    job_source,
    reference_pixels,
    shm_names,
    small_config,
    wait_gone,
)

from pixcrawler_engine import Stream, WorkerError
from pixcrawler_engine._config import ROW_OVERHEAD, SLOT_OVERHEAD
from pixcrawler_engine.decode._image import decode_image

from .bad_data import chunk_zip, digits, encode, png, tally, write_job

GRACE = 5.0  # seconds the consumer may take to notice a dead supervisor
SLOW_TASK = 2.5  # seconds of CPU the first task of job "slow" takes at least


def _family(pid: int) -> list[psutil.Process]:
    """Every descendant of `pid`: the zygote and the workers."""
    return psutil.Process(pid).children(recursive=True)


def test_sigkill_of_the_supervisor_raises_worker_error_and_leaves_nothing(store: Path) -> None:
    expected = expected_keys(store)
    with Stream(job_source(store), config=small_config(batch_rows=2), policy=POLICY) as stream:
        it = iter(stream)
        kept = next(it)  # a batch the caller still holds when the supervisor dies
        keys = list(kept.keys)
        family = _family(stream.pid)
        names = [p.name() for p in family]
        assert set(stream.worker_pids) <= {p.pid for p in family}
        assert "pxc-zygote" in names, names
        token = stream._state.token
        assert any(n.startswith(f"pxc_{token}_") for n in shm_names())
        folder = Path(tempfile.gettempdir(), f"pxc-run-{token}")
        assert folder.is_dir()
        tally(faults=1)
        os.kill(stream.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(WorkerError) as info:
            for batch in it:  # batches already on their way may still arrive
                keys.extend(batch.keys)
        noticed = time.monotonic() - killed
    assert noticed < GRACE, f"the consumer took {noticed:.1f} s to notice"
    error = info.value
    assert error.pid == stream.pid and error.exitcode == -signal.SIGKILL
    assert str(stream.pid) in str(error) and re.search(r"-9\b|SIGKILL", str(error)), str(error)
    assert keys == expected[: len(keys)]  # what arrived did so in order, once
    # The held batch is still readable: its mapping outlives the segment's owner.
    for key, image in zip(kept.keys, kept.images, strict=True):
        np.testing.assert_array_equal(image, reference_pixels(store, key, POLICY))
    del kept
    orphans = wait_gone([p.pid for p in family], 10.0)
    assert orphans == [], f"still running after the supervisor died: {orphans}"
    # The consumer reclaimed what the killed supervisor owned: its lock was free.
    left = {n for n in shm_names() if n.startswith(f"pxc_{token}")}
    assert left == set(), f"segments of the killed run are left: {sorted(left)}"
    assert not folder.exists(), "the killed supervisor's download folder is left"


def test_sigkill_of_a_worker_right_after_it_published(store: Path) -> None:
    config = small_config(num_workers=1, num_slots=2, batch_rows=4)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        first = next(it)  # held: its slot stays leased
        keys = list(first.keys)
        # The only worker decodes the next batch into the other slot and publishes it; with
        # no free slot it can then only wait. That batch's BatchReady, waiting in our pipe,
        # proves the worker published it and the supervisor took it.
        assert stream._state.conn.poll(60), "the second batch never came"
        victim = stream.worker_pids[0]
        tally(faults=1, samples=len(expected_keys(store)))
        os.kill(victim, signal.SIGKILL)
        assert wait_gone([victim], 10.0) == []
        del first
        for batch in it:
            keys.extend(batch.keys)
        stats = stream.stats
    assert keys == expected_keys(store)  # nothing lost, nothing twice
    assert stats["worker_restarts"] == 1


def test_a_consumer_that_starts_late_still_gets_every_batch(tmp_path: Path) -> None:
    """A small job can be decoded whole before its consumer reads a single message.

    The supervisor must then keep the slots it announced (they hold the batches) until the
    consumer closes the stream, not unlink them as it finishes.
    """
    chunks = [
        [(f"{c}-{i}.png", encode(digits()[3 * c + i], "PNG")) for i in range(3)] for c in (0, 1)
    ]
    write_job(tmp_path, "small", [chunk_zip(c) for c in chunks])
    expected = [name for c in chunks for name, _ in c]
    with Stream(job_source(tmp_path, "small"), config=small_config(), policy=POLICY) as stream:
        tally(faults=1, samples=len(expected))
        # Let the supervisor run ahead: every batch fits in the pool, so nothing waits for us.
        with contextlib.suppress(psutil.TimeoutExpired):
            psutil.Process(stream.pid).wait(6.0)
        keys = [key for batch in stream for key in batch.keys]
    assert keys == expected


def test_a_run_that_fails_before_its_consumer_maps_the_slots_raises_its_error(
    tmp_path: Path,
) -> None:
    """A run whose first chunk fails at once must keep its slots, as a finished one does,
    until its consumer has read the error: it may not have mapped them yet. It used to remove
    them on its way out, and the consumer raised a `SharedMemoryError` about segments that
    another process removed instead of the run's error."""
    from pixcrawler_engine import DecompressionError

    write_job(tmp_path, "junk", [b"<html>502 Bad Gateway</html>"], counts=[1])
    with Stream(job_source(tmp_path, "junk"), config=small_config(), policy=POLICY) as stream:
        # The run fails within milliseconds; we read its first message seconds later.
        with contextlib.suppress(psutil.TimeoutExpired):
            psutil.Process(stream.pid).wait(3.0)
        with pytest.raises(DecompressionError, match="cannot be read as a zip"):
            next(iter(stream))
    assert not wait_gone([stream.pid], 10.0)  # and goes once the consumer is done


@pytest.fixture(scope="module")
def slow_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Job "slow": one chunk of copies of a 35-megapixel PNG, enough of them to take at least
    `SLOW_TASK` seconds of CPU to decode (measured here: decoders get faster), then 4 digits."""
    from skimage import data

    big = data.chelsea().repeat(16, axis=0).repeat(16, axis=1)  # a real photo, 7216x4800
    h, w, _ = big.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), big.reshape(h, -1)], axis=1)
    big_png = png(w, h, 8, 2, rows.tobytes(), level=1)
    del big, rows
    decode_image(big_png, POLICY)  # the first decode also loads the decoders (OpenCV, libvips)
    began = time.process_time()
    decode_image(big_png, POLICY)
    copies = min(200, math.ceil(SLOW_TASK / max(time.process_time() - began, 1e-3)))
    chunks = [
        [(f"big{i}.png", big_png) for i in range(copies)],
        [(f"digit{i}.png", encode(d, "PNG")) for i, d in enumerate(digits()[:4])],
    ]
    store = tmp_path_factory.mktemp("slow")
    write_job(store, "slow", [chunk_zip(c) for c in chunks])
    return store, [name for c in chunks for name, _ in c]


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _first_worker(supervisor: int, deadline: float) -> psutil.Process:
    """The first decode worker: a child of the zygote, itself a child of the supervisor."""
    tick = threading.Event()
    while time.monotonic() < deadline:
        for proc in _family(supervisor):
            try:
                if proc.name() == "pxc-worker":
                    return proc
            except psutil.Error:
                continue
        tick.wait(0.01)
    raise AssertionError("no worker started")


def test_sigkill_of_a_worker_while_it_decodes(slow_store: tuple[Path, list[str]]) -> None:
    store, expected = slow_store
    copies = sum(k.startswith("big") for k in expected)
    # Two slots: the run cannot finish (and take its slots along) before we read it.
    config = small_config(num_workers=1, batch_rows=copies, num_slots=2)
    with Stream(job_source(store, "slow"), config=config, policy=POLICY) as stream:
        deadline = time.monotonic() + 60
        # The only worker's first task is the big PNGs (seconds of CPU): kill it once it has
        # spent 0.4 s of CPU (its start-up takes about 0.1 s), surely mid-decode.
        worker = _first_worker(stream.pid, deadline)
        tick = threading.Event()
        while _cpu(worker) < 0.4:
            assert time.monotonic() < deadline, "the worker never got busy"
            tick.wait(0.01)
        busy = _cpu(worker)
        tally(faults=1, samples=len(expected))
        worker.kill()
        keys = [key for batch in stream for key in batch.keys]
        stats = stream.stats
    assert busy < SLOW_TASK / 2  # it was still decoding the big PNGs when it died
    assert keys == expected
    assert stats["worker_restarts"] == 1


@pytest.mark.parametrize("late", [0.0, 2.0])
def test_decoders_that_cannot_start_are_named_to_the_consumer(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: float
) -> None:
    # An OpenCV that imports but cannot run (a numpy ABI mismatch, say). The zygote's report
    # was lost (its socket resets before the queued report reads), so the consumer heard
    # "died 4 times; see its error output above" with nothing above; and one that came late
    # (after the failed run had unlinked its slots) heard "another process removed it".
    (tmp_path / "cv2.py").write_text(
        "def setNumThreads(n):\n    raise RuntimeError('this OpenCV build is broken')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the engine's processes only
    stream = Stream(job_source(store), config=small_config(), policy=POLICY)
    time.sleep(late)  # the caller does something else before its first batch
    with stream, pytest.raises(WorkerError, match="this OpenCV build is broken"):
        next(iter(stream))


# Keeps every batch (so it holds its slots) and SIGKILLs the workers after the first one.
KEEP_AND_KILL = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from engine_helpers import job_source, small_config
    from pixcrawler_engine import DecodePolicy, Stream
    from pathlib import Path

    config = small_config(batch_rows=8, num_slots=2, slot_bytes={slot_bytes})
    stream = Stream(job_source(Path({store!r}), "slow"), config=config,
                    policy=DecodePolicy(image_size=(32, 32)))
    kept, keys = [], []
    for i, batch in enumerate(stream):
        kept.append(batch)
        keys += batch.keys
        if i == 0:
            for pid in stream.worker_pids:
                os.kill(pid, signal.SIGKILL)
    print(json.dumps(keys))
    """
)


def test_a_dead_workers_task_lends_its_slot_to_an_earlier_one(tmp_path: Path) -> None:
    # Task A (8 small digits) fills its slot at 4: its rest waits for a slot. Task B (8 large
    # ones) still decodes when the consumer, keeping every batch, kills the workers: B goes
    # back with its slot, behind A's rest, which had none to get: the run hung forever.
    small = [encode(np.stack([d] * 3, axis=-1), "PNG") for d in digits()[:8]]
    large = [encode(np.stack([d] * 3, axis=-1).repeat(80, 0).repeat(80, 1), "PNG")
             for d in digits()[8:16]]  # fmt: skip
    samples = [(f"{i:02d}.png", data) for i, data in enumerate(small + large)]
    write_job(tmp_path / "store", "slow", [chunk_zip(samples)])
    slot_bytes = SLOT_OVERHEAD + 4 * (32 * 32 * 3 + ROW_OVERHEAD)
    script = KEEP_AND_KILL.format(tests=str(Path(__file__).parents[1]),
                                  store=str(tmp_path / "store"), slot_bytes=slot_bytes)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [name for name, _ in samples]
