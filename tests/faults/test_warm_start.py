"""The supervisor that waits for a dataset's next pass, on real processes: launched ahead (NOTE
[spare] in `runtime._launch`) or parked by the pass before (NOTE [parked]).

A dataset's second pass runs on the supervisor of its first, parked with its zygote and nothing
else; a waiting supervisor leaves no process, segment or folder behind after `close()`, garbage
collection, or its consumer's death; what one run leaves behind never reaches the next.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from engine_helpers import (
    corrupt_one_sample,
    expected_keys,
    reference_pixels,
    shm_names,
    wait_gone,
)

from pixcrawler import load_dataset
from pixcrawler_engine import DecodePolicy
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.runtime._launch import Spare
from pixcrawler_engine.runtime._protocol import RELEASE, Grow

OPTIONS: dict[str, Any] = {"num_workers": 2, "progress": False, "image_size": 16, "batch_rows": 8}


def _family(pid: int) -> list[int]:
    """`pid` and its descendants (a spare supervisor and its zygote)."""
    try:
        proc = psutil.Process(pid)
        return [pid, *(p.pid for p in proc.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _wait_spare(ds: Any, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while ds._spare.pid is None:
        assert time.monotonic() < deadline, "no spare supervisor was launched"
        time.sleep(0.01)
    return int(ds._spare.pid)


def _zygote_of(supervisor: int) -> int:
    """The zygote of a parked supervisor, once its workers are gone: its only descendant."""
    deadline = time.monotonic() + 10.0
    while len(family := _family(supervisor)) != 2:
        assert time.monotonic() < deadline, f"the parked supervisor's processes: {family}"
        time.sleep(0.01)
    return family[1]


def _left_by(supervisor: int) -> set[str]:
    """The /dev/shm names and run folders of the runs `supervisor` served."""
    folders = Path(tempfile.gettempdir()).glob(f"pxc-run-{supervisor}_*")
    return {n for n in shm_names() if n.startswith(f"pxc_{supervisor}_")} | {
        p.name for p in folders
    }


def test_the_next_pass_runs_on_the_supervisor_the_last_one_parked(store: Path) -> None:
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        passes = ds.iter_engine_batches()
        first = [*next(passes).keys]
        (stream,) = list(ds._streams)
        supervisor = stream.pid
        first += [key for batch in passes for key in batch.keys]
        assert ds._spare.pid == supervisor  # parked by its pass, no other launched
        zygote = _zygote_of(supervisor)  # its workers have exited
        deadline = time.monotonic() + 10.0
        while left := _left_by(supervisor):  # the run's slots, lock and folder go
            assert time.monotonic() < deadline, f"a parked supervisor keeps {left}"
            time.sleep(0.01)
        passes = ds.iter_engine_batches()
        second = [*next(passes).keys]
        (stream,) = list(ds._streams)
        assert stream.pid == supervisor and _family(supervisor)[1] == zygote
        second += [key for batch in passes for key in batch.keys]
        assert ds._spare.pid == supervisor
    assert first == second == expected_keys(store)
    assert wait_gone([supervisor, zygote], 10.0) == []


def test_a_parked_supervisor_keeps_nothing_of_its_runs(store: Path) -> None:
    """Descriptors, threads and memory of a supervisor parked after pass 1 and after pass 6
    are the same: each run's pipes and download threads go with it."""
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        seen = []
        for _ in range(6):
            for _ in ds.iter_engine_batches():
                pass
            supervisor = psutil.Process(int(ds._spare.pid or 0))
            _zygote_of(supervisor.pid)  # its run has ended: its workers are gone
            deadline = time.monotonic() + 10.0
            while _left_by(supervisor.pid):  # its lock goes last, after the threads
                assert time.monotonic() < deadline, "a parked supervisor is still tearing down"
                time.sleep(0.01)
            seen.append((supervisor.num_fds(), supervisor.num_threads()))
            rss = supervisor.memory_info().rss
            if len(seen) == 1:
                first_rss = rss
        assert len(set(seen)) == 1, seen  # each run used to keep 2 descriptors
        assert rss < first_rss + 8 * 2**20


def test_a_release_from_an_earlier_run_frees_no_slot_of_the_next(store: Path) -> None:
    """A view of pass 1 released during pass 2 (from another thread, as it closed) reaches the
    same supervisor: it must not free a slot of pass 2, whose views would be overwritten."""
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        expected = [np.array(batch.images) for batch in ds.iter_engine_batches()]
        held = []
        for batch in ds.iter_engine_batches():
            held.append(batch)
            if len(held) == 1:
                (stream,) = list(ds._streams)
                state = stream._state
                assert state.run == 1  # the supervisor's second run
            for slot in range(len(state.slots)):  # every slot of pass 1, released late
                os.write(state.release_fd, RELEASE.pack(state.run - 1, slot))
        assert len(held) == len(expected)
        for batch, pixels in zip(held, expected, strict=True):
            assert np.array_equal(batch.images, pixels)


def test_a_grow_that_crosses_the_runs_end_reaches_no_next_run(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer asks for a slot (it holds them all) as the supervisor sends `Finished`: the
    supervisor, which then parks, must not answer with a slot the next pass would map."""
    from pixcrawler_engine.runtime import _run

    park = _run._park

    def grow_then_park(state: Any) -> bool:
        if state.finished:
            state.conn.send(Grow())  # what `_receive` sends when every slot is held
        return park(state)

    monkeypatch.setattr(_run, "_park", grow_then_park)
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        first = [(b.keys, np.array(b.images)) for b in ds.iter_engine_batches()]
        second = [(b.keys, np.array(b.images)) for b in ds.iter_engine_batches()]
    assert len(first) == len(second)
    for (keys, pixels), (again, same) in zip(first, second, strict=True):
        assert keys == again and np.array_equal(pixels, same)


def test_a_parked_supervisor_killed_between_passes_is_replaced(store: Path) -> None:
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        for _ in ds.iter_engine_batches():
            pass
        parked = int(ds._spare.pid or 0)
        family = [parked, _zygote_of(parked)]
        os.kill(parked, signal.SIGKILL)
        assert wait_gone([parked], 10.0) == []
        passes = ds.iter_engine_batches()
        keys = [*next(passes).keys]
        (stream,) = list(ds._streams)
        assert stream.pid != parked
        keys += [key for batch in passes for key in batch.keys]
    assert keys == expected_keys(store)
    assert wait_gone(family, 10.0) == []  # its zygote followed it


def test_a_parked_supervisor_whose_zygote_was_killed_starts_another(store: Path) -> None:
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        for _ in ds.iter_engine_batches():
            pass
        parked = int(ds._spare.pid or 0)
        zygote = _zygote_of(parked)
        os.kill(zygote, signal.SIGKILL)
        passes = ds.iter_engine_batches()
        keys = [*next(passes).keys]
        (stream,) = list(ds._streams)
        assert stream.pid == parked
        keys += [key for batch in passes for key in batch.keys]
        assert zygote not in _family(parked)
    assert keys == expected_keys(store)


def test_a_pass_stopped_halfway_parks_its_supervisor(store: Path) -> None:
    """A `break` (a training loop of fixed steps per epoch): the supervisor ends the run and
    parks; the batch kept from it stays valid, and the next pass runs on it from the start."""
    policy = DecodePolicy(image_size=(16, 16))
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        for batch in ds.iter_engine_batches():
            kept, (stream,) = batch, list(ds._streams)
            supervisor = stream.pid
            break
        assert ds._spare.pid == supervisor
        zygote = _zygote_of(supervisor)
        assert not _left_by(supervisor)  # torn down before it said `Parked`
        for key, pixels in zip(kept.keys, kept.images, strict=True):
            assert np.array_equal(pixels, reference_pixels(store, key, policy))
        passes = ds.iter_engine_batches()
        keys = [*next(passes).keys]
        (stream,) = list(ds._streams)
        assert stream.pid == supervisor and _family(supervisor)[1] == zygote
        keys += [key for batch in passes for key in batch.keys]
    assert keys == expected_keys(store)


def test_a_failed_pass_stops_its_supervisor(store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "store"
    shutil.copytree(store / "jobs" / "demo", bad / "jobs" / "demo")
    corrupt_one_sample(bad, "demo", chunk=3)  # after the first batch
    with load_dataset("demo", base_url=bad.as_uri(), **OPTIONS) as ds:
        passes = ds.iter_engine_batches()
        next(passes)
        (stream,) = list(ds._streams)
        family = _family(stream.pid)
        with pytest.raises(DecodeError):
            for _ in passes:
                pass
        assert ds._spare.pid is None  # an engine error: nothing of that run is kept
        assert wait_gone(family, 10.0) == []


def _settled(pid: int) -> bool:
    """Waits until `pid` uses no CPU for 0.5 s (a spare done with its imports)."""
    proc = psutil.Process(pid)
    deadline, last = time.monotonic() + 20.0, -1.0
    while time.monotonic() < deadline:
        used = sum(proc.cpu_times()[:2])
        if used == last:
            return True
        last = used
        time.sleep(0.5)
    return False


def test_a_shuffled_datasets_spare_imports_numpy_while_it_waits(store: Path) -> None:
    """The shuffle's order is numpy's: the spare of a shuffled dataset imports numpy while it
    waits (it used to at its pass's start, ~0.1 s before the first task); the spare of an
    unshuffled one stays without it, as its supervisor does."""
    for shuffle in (True, False):
        with load_dataset("demo", base_url=store.as_uri(), shuffle=shuffle, **OPTIONS) as ds:
            ds._launch_ahead()
            spare = _wait_spare(ds)
            assert _settled(spare)
            maps = Path(f"/proc/{spare}/maps").read_text()
            assert ("_multiarray_umath" in maps) == shuffle, shuffle


def test_close_stops_the_spare_and_its_zygote(store: Path) -> None:
    ds = load_dataset("demo", base_url=store.as_uri(), **OPTIONS)
    for _ in ds.iter_engine_batches():
        pass
    spare = _wait_spare(ds)
    family = _family(spare)
    ds.close()
    assert ds._spare.pid is None
    assert wait_gone(family, 10.0) == []


def test_garbage_collection_stops_the_spare(store: Path) -> None:
    ds = load_dataset("demo", base_url=store.as_uri(), **OPTIONS)
    for _ in ds.iter_engine_batches():
        pass
    family = _family(_wait_spare(ds))
    del ds
    gc.collect()
    assert wait_gone(family, 10.0) == []


def test_a_spare_sent_away_while_its_zygote_imports_exits_at_once() -> None:
    spare = Spare()
    spare.refill()
    assert spare.pid is not None
    family = _family(spare.pid)
    began = time.monotonic()
    spare.close()
    assert wait_gone(family, 10.0) == []
    assert time.monotonic() - began < 3.0
    spare.refill()  # a closed spare launches nothing more
    assert spare.pid is None


def test_a_forked_child_neither_uses_nor_stops_the_parents_spare() -> None:
    spare = Spare()
    spare.refill()
    assert spare.pid is not None
    pid = os.fork()
    if pid == 0:  # the child: like a DataLoader worker holding a copy of the dataset
        took = spare.take()
        spare.refill()
        spare.close()
        os._exit(0 if took is None else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    launched = spare.take()
    assert launched is not None and launched.usable()  # still there, still alive
    family = _family(launched.proc.pid)
    launched.close()
    spare.close()
    assert wait_gone(family, 10.0) == []


CONSUMER = textwrap.dedent(
    """
    import json, sys, time
    from pixcrawler import load_dataset
    ds = load_dataset("demo", base_url={url!r}, **{options!r})
    for _ in ds.iter_engine_batches():
        pass
    while ds._spare.pid is None:
        time.sleep(0.01)
    print(json.dumps({{"spare": ds._spare.pid}}), flush=True)
    time.sleep(60)
    """
)


def test_sigkill_of_the_consumer_takes_the_spare_along(store: Path) -> None:
    script = CONSUMER.format(url=store.as_uri(), options=OPTIONS)
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the consumer script printed nothing"
        spare, deadline = json.loads(line)["spare"], time.monotonic() + 10.0
        family = _family(spare)
        # A spare's zygote may be forking, a parked one's workers exiting.
        while len(family) != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
            family = _family(spare)
        assert len(family) == 2  # the supervisor and its zygote
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_gone(family, 10.0) == []


def test_warm_start_false_keeps_no_spare(store: Path) -> None:
    with load_dataset("demo", base_url=store.as_uri(), warm_start=False, **OPTIONS) as ds:
        for _ in ds.iter_engine_batches():
            pass
        assert ds._spare.pid is None


def test_the_spare_is_told_the_modules_its_run_unpickles(store: Path) -> None:
    from pixcrawler_engine.runtime._launch import modules_of
    from pixcrawler_engine.sources._base import JobSource

    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        source = ds.ref.source()
        named = modules_of((source, lambda x: x, {"a": "os"}))
        source.close()
    assert JobSource.__module__ in named and "__main__" not in named and "os" not in named


def test_a_conversion_uses_a_waiting_spare_but_launches_none(store: Path) -> None:
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        images, _ = ds.to_arrays()
        assert len(images) == 120 and ds._spare.pid is None  # a one-off: nothing kept
        for _ in ds.iter_engine_batches():
            pass
        spare = _wait_spare(ds)
        family = _family(spare)
        ds.to_arrays()
        assert ds._spare.pid is None  # taken, not replaced
    assert wait_gone(family, 10.0) == []


def test_to_tensorflow_launches_its_first_pass_ahead(store: Path) -> None:
    # TensorFlow traces its pipeline (~0.1 s) while the first pass's supervisor starts.
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS) as ds:
        tf_dataset = ds.to_tensorflow(batch_size=8)
        spare = _wait_spare(ds)
        began = time.time()
        elements = iter(tf_dataset)
        next(elements)
        (stream,) = list(ds._streams)
        assert stream.pid == spare and psutil.Process(spare).create_time() < began
        assert sum(len(images) for images, _ in elements) + 8 == len(expected_keys(store))
    with load_dataset("demo", base_url=store.as_uri(), **OPTIONS, warm_start=False) as ds:
        ds.to_tensorflow(batch_size=8)
        assert ds._spare.pid is None
