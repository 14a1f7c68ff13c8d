"""The process core under faults the first suite missed: each test failed before its fix.

- a worker dies while its replacement cannot start yet (the zygote stopped): not fatal, and the
  supervisor does not spin on the dead worker's socket;
- the zygote dies: busy workers go on, replacements come from a new zygote;
- a sweep in another PID namespace (a second container on the same /dev/shm) leaves a live run
  alone: ownership is a lock, not a pid;
- /dev/shm too small for two runs: the second fails at start naming /dev/shm, not by SIGBUS;
- a worker killed by SIGBUS is reported as a shared-memory problem;
- a stopped supervisor is a `WorkerError` within `heartbeat_timeout`;
- a stream is the consumer, its supervisor, one zygote and the workers: no fork server, no
  resource tracker; the supervisor imports no decoder or Arrow;
- `worker_timeout` measures silence per sample, not per batch;
- the zygote's report of a fork names the request it answers, not the seat: a report for a
  worker gone before it was read (or for a parked supervisor's last run) names no other.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from engine_helpers import (
    POLICY,
    expected_keys,
    job_source,
    shm_names,
    small_config,
    wait_gone,
)

from pixcrawler_engine import EngineConfig, SharedMemoryError, Stream, WorkerError

from .bad_data import tally
from .test_supervisor import _cpu, slow_store  # noqa: F401 (a fixture)

TESTS = Path(__file__).resolve().parents[1]


def _zygote(stream: Stream, timeout: float = 30.0) -> psutil.Process:
    """The stream's zygote: the supervisor's child named `pxc-zygote`."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        for proc in psutil.Process(stream.pid).children():
            with contextlib.suppress(psutil.Error):
                if proc.name() == "pxc-zygote":
                    return proc
        tick.wait(0.02)
    raise AssertionError("no zygote")


@contextlib.contextmanager
def _stopped(proc: psutil.Process) -> Iterator[None]:
    proc.suspend()
    try:
        yield
    finally:
        with contextlib.suppress(psutil.Error):
            proc.resume()


def test_a_worker_dying_while_the_zygote_is_stopped_is_not_fatal(store: Path) -> None:
    # Before: the supervisor picked idle workers by is_alive(), which stayed True while the
    # fork server (paused here) had not reported the exit: send() raised BrokenPipeError and
    # the whole stream failed.
    config = small_config(num_workers=2, batch_rows=2, num_slots=4)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        keys = list(next(it).keys)
        with _stopped(_zygote(stream)):
            victim = stream.worker_pids[0]
            os.kill(victim, signal.SIGKILL)
            assert wait_gone([victim], 10.0) == []
            tally(faults=1, samples=len(expected_keys(store)))
            for batch in it:  # the other worker does it all; no replacement can start
                keys.extend(batch.keys)
        stats = stream.stats
    assert keys == expected_keys(store)
    assert stats["worker_restarts"] >= 1


def test_a_dead_worker_does_not_spin_the_supervisor(store: Path) -> None:
    # Before: the dead worker's pipe stayed in the supervisor's wait set, readable forever,
    # and its loop ran at 100 % of a core until the fork server reported the death.
    config = small_config(num_workers=2, batch_rows=2, num_slots=3)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        held = next(it)  # we hold a slot and read no more: the supervisor has little to do
        first = len(held)
        supervisor = psutil.Process(stream.pid)
        with _stopped(_zygote(stream)):
            os.kill(stream.worker_pids[0], signal.SIGKILL)
            time.sleep(0.5)  # the death is noticed
            before = _cpu(supervisor)
            time.sleep(2.0)
            spent = _cpu(supervisor) - before
        del held
        tally(faults=1)
        keys = [key for batch in it for key in batch.keys]
    assert spent < 0.3, f"the supervisor used {spent:.2f} s of CPU in 2 s of waiting"
    assert keys == expected_keys(store)[first:]


def test_sigkill_of_the_zygote_leaves_workers_running_and_is_replaced(store: Path) -> None:
    # Before: killing the fork server made live, busy workers be declared dead (they went on
    # decoding as orphans) and the supervisor died with a bare EOFError.
    config = small_config(num_workers=2, batch_rows=2, num_slots=4)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        keys = list(next(it).keys)
        zygote = _zygote(stream)
        workers = [p.pid for p in zygote.children()]
        assert len(workers) == 2, workers
        zygote.kill()
        zygote.wait(10)
        keys += next(it).keys
        assert all(psutil.pid_exists(pid) for pid in workers), "a worker died with the zygote"
        for pid in workers:  # no worker left: the run goes on only if a new zygote starts
            os.kill(pid, signal.SIGKILL)
        tally(faults=3, samples=len(expected_keys(store)))
        for batch in it:
            keys.extend(batch.keys)
        stats = stream.stats
    assert keys == expected_keys(store)
    assert stats["worker_restarts"] == 2  # the killed workers only, not the zygote's children


SWEEP_IN_ANOTHER_NAMESPACE = [
    "unshare",
    "--pid",
    "--fork",
    "--mount-proc",
    sys.executable,
    "-c",
    "from pixcrawler_engine.runtime._shm import sweep_stale; print(sorted(sweep_stale()))",
]


def test_a_sweep_in_another_pid_namespace_leaves_a_live_run_alone(store: Path) -> None:
    # Before: the sweep judged segments by the pid in their name; in a new PID namespace that
    # pid does not exist, so it unlinked a live run's slots and the run failed.
    config = small_config(num_workers=1, batch_rows=2, num_slots=3)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        keys = list(next(it).keys)
        token = stream._state.token
        ours = {n for n in shm_names() if n.startswith(f"pxc_{token}")}
        swept = subprocess.run(SWEEP_IN_ANOTHER_NAMESPACE, capture_output=True, text=True)
        assert swept.returncode == 0, swept.stderr
        assert token not in swept.stdout
        assert ours <= shm_names()
        for batch in it:
            keys.extend(batch.keys)
    assert keys == expected_keys(store)


TWO_RUNS_IN_A_SMALL_SHM = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from engine_helpers import job_source, small_config
    from pixcrawler_engine import DecodePolicy, SharedMemoryError, Stream

    policy = DecodePolicy(image_size=(224, 224))
    config = small_config(num_workers=1, batch_rows=64, num_slots=3)  # 3 x 9.7 MB each
    first = Stream(job_source(Path({store!r})), config=config, policy=policy)
    it = iter(first)
    held = next(it)
    try:
        with Stream(job_source(Path({store!r})), config=config, policy=policy) as second:
            for batch in second:
                pass
    except SharedMemoryError as exc:
        print("SharedMemoryError:", exc)
    first.close()
    """
)


def test_a_dev_shm_too_small_for_two_runs_is_named_at_start(store: Path, tmp_path: Path) -> None:
    # Before: the second run passed the size check (the first one's slots were sparse) and a
    # worker died of SIGBUS writing past the free space: "exited with code -7 ... the chunk
    # may hold an image that crashes the decoder".
    script = tmp_path / "two_runs.py"
    script.write_text(TWO_RUNS_IN_A_SMALL_SHM.format(tests=str(TESTS), store=str(store)))
    inner = f"mount -t tmpfs -o size=40m tmpfs /dev/shm && exec {sys.executable} {script}"
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", inner], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("SharedMemoryError:"), (result.stdout, result.stderr)
    assert "/dev/shm (40 MiB" in line and "num_slots" in line, line
    assert "-7" not in line and "crashes the decoder" not in line


def test_a_worker_killed_by_sigbus_is_a_shared_memory_error(store: Path) -> None:
    config = small_config(num_workers=1, batch_rows=2, num_slots=3)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        next(it)
        tally(faults=1)
        os.kill(stream.worker_pids[0], signal.SIGBUS)
        with pytest.raises(SharedMemoryError) as info:
            for _ in it:
                pass
    assert "SIGBUS" in str(info.value) and "/dev/shm" in str(info.value)
    assert isinstance(info.value, WorkerError)


def test_a_stopped_supervisor_is_a_worker_error_within_the_heartbeat_timeout(
    store: Path,
) -> None:
    # Before: the consumer waited forever on a supervisor that was alive but stopped.
    config = small_config(num_workers=1, batch_rows=2, num_slots=2).replace(heartbeat_timeout=2.0)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        held = next(it)  # both slots taken or busy: no more batch comes without us
        supervisor = psutil.Process(stream.pid)
        with _stopped(supervisor):
            began = time.monotonic()
            with pytest.raises(WorkerError) as info:
                del held
                for _ in it:
                    pass
            waited = time.monotonic() - began
        tally(faults=1)
    assert 1.5 < waited < 10, waited
    assert str(stream.pid) in str(info.value) and "heartbeat_timeout" in str(info.value)


def test_a_stream_is_its_supervisor_one_zygote_and_the_workers(store: Path) -> None:
    config = small_config(num_workers=2, batch_rows=2, num_slots=4)
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        it = iter(stream)
        held = next(it)  # held: the run cannot end (and stop its workers) meanwhile
        supervisor = psutil.Process(stream.pid)
        family = supervisor.children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in family]
        direct = [p.name() for p in supervisor.children()]
        workers = [p.name() for p in family if p.ppid() != supervisor.pid]
        zygote = supervisor.children()[0].pid
        del held
        for _ in it:
            pass
    assert len(family) == 1 + 2, commands  # the zygote and 2 workers, nothing else
    assert direct == ["pxc-zygote"] and workers == ["pxc-worker"] * 2, (direct, workers)
    assert not any("resource_tracker" in c or "forkserver" in c for c in commands), commands
    assert set(stream.worker_pids) == {p.pid for p in family} - {zygote}


def test_the_supervisor_imports_no_decoder_or_arrow() -> None:
    # Nor httpx, for a file:// job: ~60 ms of its start, before it could read its arguments.
    code = (
        "import sys\n"
        "from pixcrawler_engine.runtime._entry import bootstrap, supervisor_main\n"
        "from pixcrawler_engine.runtime import _supervisor, _ipc\n"
        "from pixcrawler_engine.sources import _base, _jobapi\n"
        "print(sorted(set(sys.modules) & "  # a package's module comes with any of its own
        "{'pyarrow', 'PIL', 'simplejpeg', 'pyvips', 'numpy', 'pandas', 'httpx', 'dill'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_worker_arguments_are_plain_pickle_unless_they_hold_user_code(tmp_path: Path) -> None:
    """The zygote loads plain pickle without importing dill (~8 ms before a first batch); code
    defined in a user's script still travels, by dill."""
    from pixcrawler_engine.runtime._worker_args import dumps_args, load_args

    path = tmp_path / "args"
    plain = (list(sys.path), (EngineConfig(num_workers=3), "prefix", 7))  # it sets sys.path
    path.write_bytes(dumps_args(*plain))
    assert path.read_bytes()[:1] == b"P" and load_args(path) == plain[1]
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from pixcrawler_engine.runtime._worker_args import dumps_args
        def double(x):
            return 2 * x
        Path({str(path)!r}).write_bytes(dumps_args(sys.path, (double, lambda x: x + 1)))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert path.read_bytes()[:1] == b"D"
    double, plus_one = load_args(path)
    assert double(21) == 42 and plus_one(1) == 2


def test_worker_timeout_measures_silence_per_sample(
    slow_store: tuple[Path, list[str]],  # noqa: F811
) -> None:
    # Before: worker_timeout bounded a whole task; a healthy batch of huge images that took
    # longer than it was killed as hung, three times, and the run failed.
    store, expected = slow_store
    copies = sum(k.startswith("big") for k in expected)
    config = EngineConfig(
        num_workers=1, batch_rows=copies, num_slots=2, worker_timeout=0.8, max_workers=1
    )
    began = time.monotonic()
    with Stream(job_source(store, "slow"), config=config, policy=POLICY) as stream:
        keys = [key for batch in stream for key in batch.keys]
        stats = stream.stats
    took = time.monotonic() - began
    assert took > 2 * config.worker_timeout  # the big task took longer than worker_timeout
    assert keys == expected
    assert stats["worker_restarts"] == 0


def test_a_fork_report_names_its_request_not_the_seat(tmp_path: Path) -> None:
    """Two requests for one seat (a worker that died before its report was read, then its
    replacement; or a run's last request, then the next run's first: NOTE [parked]) get
    reports that tell them apart, so the first's cannot lend its pid to the second."""
    from multiprocessing.connection import wait

    from pixcrawler_engine.runtime._zygote import Zygote

    zygote = Zygote(dict(os.environ))
    zygote.start()
    ends = []
    try:
        zygote.set_args(tmp_path / "args", ())  # no arguments: each worker exits at once
        ends = [zygote.spawn(0), zygote.spawn(0)]
        (_, one), (_, two) = ends
        forked: dict[int, int] = {}
        deadline = time.monotonic() + 30.0
        while len(forked) < 2 and time.monotonic() < deadline:
            assert zygote.sock is not None
            wait([zygote.sock], 1.0)
            forked.update((a, b) for kind, a, b in zygote.receive() if kind == b"P")
        assert one != two and set(forked) == {one, two}
        assert forked[one] != forked[two]
    finally:
        for end, _ in ends:
            end.close()
        zygote.close()
