"""Process faults on real processes: killed or stopped workers, killed consumers, Ctrl-C."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from engine_helpers import (
    POLICY,
    expected_keys,
    job_source,
    shm_names,
    small_config,
    wait_gone,
    wait_no_shm,
)

from pixcrawler_engine import Stream
from pixcrawler_engine.runtime._shm import sweep_stale

CONSUMER = textwrap.dedent(
    """
    import json, signal, sys, time
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, also when pytest runs as a
    # background job (`make test &`), whose children start with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from engine_helpers import job_source, small_config, POLICY
    from pixcrawler_engine import Stream
    from pathlib import Path

    stream = Stream(job_source(Path({store!r})), config=small_config(batch_rows=2), policy=POLICY)
    it = iter(stream)
    batch = next(it)
    pids = {{"supervisor": stream.pid, "workers": list(stream.worker_pids)}}
    print(json.dumps({{**pids, "token": stream._state.token}}), flush=True)
    time.sleep(60)
    """
)


# Closes runs at moments of their start-up: after their `Ready`, while the zygote forks workers.
CLOSE_IN_START_UP = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from engine_helpers import job_source, small_config, POLICY
    from pixcrawler_engine import Stream
    from pathlib import Path

    for i in range(20):
        stream = Stream(job_source(Path({store!r})), config=small_config(), policy=POLICY)
        stream._state.conn.recv()  # Ready: the slots exist and the workers are being forked
        time.sleep(i * 0.005)
        stream.close()
    """
)


@contextmanager
def _consumer(store: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A consumer process in a session of its own, past its first batch, and its children."""
    script = CONSUMER.format(tests=str(Path(__file__).parents[1]), store=str(store))
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the consumer script printed nothing"
        try:
            yield proc, json.loads(line)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("victims", ["one", "all"])
def test_sigkill_workers_mid_run_delivers_every_sample_once(store: Path, victims: str) -> None:
    config = small_config(batch_rows=2, num_slots=3)
    keys: list[str] = []
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        for i, batch in enumerate(stream):
            keys.extend(batch.keys)
            if i == 1:
                targets = stream.worker_pids[:1] if victims == "one" else stream.worker_pids
                for pid in targets:
                    os.kill(pid, signal.SIGKILL)
        assert stream.stats["worker_restarts"] >= 1
    assert keys == expected_keys(store)


def test_stopped_worker_is_timed_out_and_replaced(store: Path) -> None:
    config = small_config(batch_rows=2, num_slots=3, worker_timeout=2.0)
    keys: list[str] = []
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        for i, batch in enumerate(stream):
            keys.extend(batch.keys)
            if i == 0:
                for pid in stream.worker_pids:  # both: one of them surely holds a task
                    os.kill(pid, signal.SIGSTOP)
        assert stream.stats["worker_restarts"] >= 1
    assert keys == expected_keys(store)


def test_sigkill_of_the_consumer_takes_supervisor_and_workers_along(store: Path) -> None:
    before = shm_names()
    with _consumer(store) as (proc, pids):
        children = [pids["supervisor"], *pids["workers"]]
        proc.kill()
        proc.wait(5)
    assert wait_gone(children, 10.0) == []
    # The supervisor unlinks its slots on the way out (or its resource tracker does).
    assert wait_no_shm(shm_names() - before, 5.0) == set()


def test_ctrl_c_in_the_consumer_stops_everything(store: Path) -> None:
    before = shm_names()
    with _consumer(store) as (proc, pids):
        children = [pids["supervisor"], *pids["workers"]]
        os.killpg(proc.pid, signal.SIGINT)  # the terminal sends it to the whole group
        proc.wait(10)
        assert proc.returncode != 0
    assert wait_gone(children, 5.0) == []
    assert wait_no_shm(shm_names() - before, 5.0) == set()


def test_sigkill_of_the_whole_group_is_reclaimed_by_the_next_run(store: Path) -> None:
    before = shm_names()
    with _consumer(store) as (proc, pids):
        children = [pids["supervisor"], *pids["workers"]]
        os.killpg(proc.pid, signal.SIGKILL)  # takes the resource tracker along too
        proc.wait(5)
    assert wait_gone(children, 10.0) == []
    # Whatever the killed run left is gone once the next run has started.
    with Stream(job_source(store), config=small_config(), policy=POLICY) as stream:
        next(iter(stream))
        assert not {n for n in shm_names() - before if n.startswith(f"pxc_{pids['token']}")}
    assert not Path(tempfile.gettempdir(), f"pxc-run-{pids['token']}").exists()


def test_sweep_takes_only_runs_whose_owner_lock_is_free(tmp_path: Path) -> None:
    from pixcrawler_engine.runtime._shm import OwnerLock, SlotPool, run_folder

    dead_token, live_token = "1_deadbeef00000001", f"{os.getpid()}_deadbeef00000002"
    # A dead run: its owner lock was taken and dropped by a process that is gone now.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from pixcrawler_engine.runtime._shm import OwnerLock, SlotPool, "
            f"run_folder; OwnerLock({dead_token!r}); SlotPool({dead_token!r}, 2, 4096); "
            f"run_folder({dead_token!r}).mkdir()",
        ],
        check=True,
    )
    assert {f"pxc_{dead_token}_0", f"pxc_{dead_token}.lock"} <= shm_names()
    live = OwnerLock(live_token)
    pool = SlotPool(live_token, 1, 4096)
    try:
        removed = sweep_stale()
        assert f"pxc_{dead_token}_0" in removed and f"pxc_{dead_token}_1" in removed
        assert not any(n.startswith(f"pxc_{dead_token}") for n in shm_names())
        assert not run_folder(dead_token).exists()
        assert {f"pxc_{live_token}_0", f"pxc_{live_token}.lock"} <= shm_names()
    finally:
        pool.close()
        live.release()
    assert not any(n.startswith(f"pxc_{live_token}") for n in shm_names())


def test_a_run_closed_while_its_workers_start_ends_quietly(store: Path) -> None:
    # Closing unlinks the run's segments first; a worker forked just before then found its
    # beat counter gone and died with a traceback blaming "another process" (9 runs of 20).
    script = CLOSE_IN_START_UP.format(tests=str(Path(__file__).parents[1]), store=str(store))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=99)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_a_forked_child_that_drops_its_copy_of_a_run_leaves_the_parents_alone(
    store: Path,
) -> None:
    # A forked child (a DataLoader worker, say) inherits the consumer's stream, its suspended
    # iterator and its views. Dropping them there released the parent's slots to its
    # supervisor, which reused them under the parent's views, and stopped the parent's run.
    config = small_config(batch_rows=2, num_slots=3)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        batches = iter(stream)
        first, second = next(batches), next(batches)
        kept = np.array(first.images)
        pid = os.fork()
        if pid == 0:
            try:
                del first  # its view's lease finalizes here
                gc.collect()
                stream.close()
            finally:
                os._exit(0)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        rest = [key for batch in batches for key in batch.keys]
        keys = [*first.keys, *second.keys, *rest]
        assert np.array_equal(first.images, kept)  # its slot was not handed out again
    assert keys == expected_keys(store)


# The consumer stands in for a container's first process: orphans of its tree come to it.
SUBREAPER = textwrap.dedent(
    """
    import ctypes, json, sys, time
    import psutil
    assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # CHILD_SUBREAPER
    sys.path.insert(0, {tests!r})
    from engine_helpers import job_source, small_config, POLICY
    from pixcrawler_engine import Stream
    from pathlib import Path

    for _ in range(2):
        with Stream(job_source(Path({store!r})), config=small_config(), policy=POLICY) as s:
            rows = sum(len(batch) for batch in s)
    time.sleep(0.5)
    left = [(p.pid, p.name(), p.status()) for p in psutil.Process().children()]
    print(json.dumps({{"rows": rows, "left": left}}))
    """
)


def test_no_worker_is_left_to_init(store: Path) -> None:
    # The zygote exited as soon as its supervisor closed, before reaping the workers that
    # were ending: init inherited them, and a container whose first process is the training
    # script (which reaps nothing) gathered zombies, 2 a run here.
    script = SUBREAPER.format(tests=str(Path(__file__).parents[1]), store=str(store))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=99)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["rows"] == len(expected_keys(store))
    assert result["left"] == []


def test_a_source_that_cannot_be_pickled_leaves_no_process(store: Path) -> None:
    # The supervisor was launched, then the arguments failed to pickle: nothing stopped it
    # while the traceback (kept by a notebook, or here by pytest) held its pipe.
    source = job_source(store)
    source.cache = (i for i in range(3))  # type: ignore[attr-defined]  # a user's attribute
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(TypeError, match="pickle") as failed:
        Stream(source, config=small_config(), policy=POLICY)
    new = [p.pid for p in psutil.Process().children() if p.pid not in before]
    assert wait_gone(new, 10.0) == [] and failed.value is not None
