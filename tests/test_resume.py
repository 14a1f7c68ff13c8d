"""Interrupted downloads resume: SIGKILL, Ctrl-C and a lost connection, on real processes.

Each test runs `python -m pixcrawler download` through the fault-injecting proxy, which
stalls (or breaks) one chunk part-way, so the run is interrupted with some chunks written,
one half-downloaded and the rest untouched. The same command run again must fetch only what
is missing (the half chunk with `Range`) and write the same bytes an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ServerProcess
from faults._proxy import Fault, FaultProxy, proxied

from pixcrawler.cli import main

STALL = 200_000  # bytes of the stalled chunk that reach the client before the stall
STALLED = 3  # the chunk the proxy stalls (chunks 0-2 are written by then)
CHUNKS = 8  # the demo job: 120 images in chunks of 16


def _env(server: ServerProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXCRAWLER_")}
    return {**env, "PIXCRAWLER_API_KEY": server.api_key, "PYTHONUNBUFFERED": "1"}


def _args(url: str, out: Path, *extra: str) -> list[str]:
    common = ["--base-url", url, "--output-dir", str(out), "--no-progress"]
    return ["download", "demo", *common, *extra]


def _start(
    server: ServerProcess, url: str, out: Path, *extra: str, new_session: bool = False
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pixcrawler", *_args(url, out, *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(server),
        start_new_session=new_session,  # its own process group, as a terminal job has
    )


def _wait_until_stalled(proc: subprocess.Popen[str], out: Path, ahead: int = 0) -> None:
    """Waits (bounded) until chunks 0-2 are committed, chunk 3 is partly on disk, and the
    `ahead` chunks after it are downloaded (but cannot be written before chunk 3)."""
    work = out / "demo" / ".pixcrawler"
    partial = work / "download" / f"{STALLED}.zip.part"
    prefetched = [work / "download" / f"{STALLED + 1 + i}.zip" for i in range(ahead)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        done = {p.name.split(".")[0] for p in work.glob("parts/[0-9]*")}
        stalled = partial.exists() and partial.stat().st_size == STALL
        if len(done) >= STALLED and stalled and all(p.exists() for p in prefetched):
            return
        if proc.poll() is not None:
            pytest.fail(f"download exited early ({proc.returncode}):\n{proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"download did not reach chunk {STALLED}:\n{proc.communicate()}")


def _rerun(server: ServerProcess, out: Path, *extra: str) -> FaultProxy:
    """Runs the same command again through a clean proxy; returns the proxy to inspect."""
    with proxied(server.url) as proxy:
        result = subprocess.run(
            [sys.executable, "-m", "pixcrawler", *_args(proxy.url, out, *extra)],
            capture_output=True,
            text=True,
            env=_env(server),
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    return proxy


def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of an export (its work folder aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".pixcrawler" not in p.parts
    }


def _reference(server: ServerProcess, out: Path, *extra: str) -> dict[str, str]:
    """The files of an uninterrupted run of the same command."""
    args = _args(server.url, out, *extra)
    result = CliRunner().invoke(main, args, env={"PIXCRAWLER_API_KEY": server.api_key})
    assert result.exit_code == 0, result.output
    return _digest(out / "demo")


def _chunk_requests(proxy: FaultProxy) -> dict[int, dict[str, str]]:
    return {int(s.path.rsplit("/", 1)[1]): s.headers for s in proxy.seen("/chunks/")}


def _assert_interrupted(out: Path) -> None:
    """Nothing of an interrupted export looks complete."""
    state = json.loads((out / "demo" / ".pixcrawler" / "state.json").read_text())
    assert state["phase"] == "writing"
    assert [p.name for p in (out / "demo").iterdir()] == [".pixcrawler"]


@pytest.mark.parametrize(
    "extra",
    [("--format", "parquet"), ("--format", "numpy", "--image-size", "32x32", "--num-workers", "1")],
    ids=["parquet-pass-through", "numpy-decoded"],
)
def test_sigkill_then_rerun_continues(server: ServerProcess, tmp_path: Path, extra: tuple) -> None:
    extra = ("--max-workers", "2", *extra)
    expected = _reference(server, tmp_path / "reference", *extra)
    out = tmp_path / "out"
    with proxied(server.url, Fault("stall", match=f"/chunks/{STALLED}", after_bytes=STALL)) as p:
        proc = _start(server, p.url, out, *extra)
        # While one thread waits on chunk 3, the other fetches the next three (prefetch 4).
        _wait_until_stalled(proc, out, ahead=3)
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.communicate(timeout=10)
    _assert_interrupted(out)

    proxy = _rerun(server, out, *extra)
    requests = _chunk_requests(proxy)
    # Written chunks and verified downloads are not fetched again; the half chunk resumes.
    assert sorted(requests) == [STALLED, 7]
    assert requests[STALLED].get("range") == f"bytes={STALL}-"
    assert _digest(out / "demo") == expected


@pytest.mark.parametrize(
    ("extra", "group"),
    [
        (("--format", "images"), False),
        (("--format", "numpy", "--image-size", "32x32", "--num-workers", "1"), True),
    ],
    ids=["images-process", "numpy-decoded-process-group"],
)
def test_ctrl_c_exits_130_and_the_rerun_completes(
    server: ServerProcess, tmp_path: Path, extra: tuple, group: bool
) -> None:
    """Ctrl-C in a terminal reaches the whole process group (decoders too), or one process."""
    extra = ("--max-workers", "1", *extra)
    expected = _reference(server, tmp_path / "reference", *extra)
    out = tmp_path / "out"
    with proxied(server.url, Fault("stall", match=f"/chunks/{STALLED}", after_bytes=STALL)) as p:
        proc = _start(server, p.url, out, *extra, new_session=group)
        _wait_until_stalled(proc, out)
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "run the same command again to resume" in stderr
    _assert_interrupted(out)
    _rerun(server, out, *extra)
    assert _digest(out / "demo") == expected


def test_lost_connection_fails_clearly_and_the_rerun_completes(
    server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Every attempt at chunk 4 (1.8 MB) loses its connection after 50 kB: the download
    # gives up after its attempts, each of which resumed where the last one broke off.
    reset = Fault("reset", match="/chunks/4", times=10, after_bytes=50_000)
    extra = ("--format", "zip", "--max-workers", "1")
    with proxied(server.url, reset) as proxy:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pixcrawler",
                *_args(proxy.url, out, "--format", "zip", "--max-workers", "1"),
            ],
            capture_output=True,
            text=True,
            env=_env(server),
            timeout=120,
            check=False,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: chunk 4 could not be downloaded")
    _assert_interrupted(out)

    proxy = _rerun(server, out, *extra)
    requests = _chunk_requests(proxy)
    assert sorted(requests) == list(range(4, CHUNKS))
    kept = int(requests[4]["range"].removeprefix("bytes=").rstrip("-"))
    assert kept >= 50_000  # what the broken attempts had received is not fetched again
    job = json.loads((server.store / "jobs" / "demo" / "job.json").read_text())
    for chunk in job["chunks"]:
        data = (out / "demo" / "chunks" / f"{chunk['index']}.zip").read_bytes()
        assert hashlib.sha256(data).hexdigest() == chunk["sha256"]
