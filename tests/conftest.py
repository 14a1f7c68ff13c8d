"""Shared fixtures: real demo images, a packed job store, the real server, and a /dev/shm guard.

demo_source     a source folder: digits 0-2 (20 each) and 60 bundled photos (5 each of 12)
store           a store with job "demo" (chunk_size 16, several chunks) and job "pending"
                (status processing, progress 42)
server          `python -m pixcrawler serve store --port 0` as a real subprocess; API_KEY
                reads every job, LIMITED_KEY only "pending"
server_factory  starts more servers (for tests that stop them); each is stopped at teardown
no_leaked_shm   autouse: fails a test that leaves a new `pxc_*` segment in /dev/shm
fresh_cache     autouse: each test gets an empty chunk cache of its own ($PIXCRAWLER_CACHE),
                so that no test reads another's chunks or writes into the user's ~/.cache
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from pixcrawler import _demo_data
from pixcrawler_engine.sources import _pack

API_KEY = "pxc-test-key-all-5f1c2a"
LIMITED_KEY = "pxc-test-key-limited-9d04e7"
SHM = Path("/dev/shm")
SHM_PREFIX = "pxc_"
STARTUP_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 10.0
CACHE_VARS = ("PIXCRAWLER_CACHE", "PIXCRAWLER_CACHE_DIR", "XDG_CACHE_HOME")


@dataclass
class ServerProcess:
    """A running `pixcrawler serve` subprocess and everything it printed so far."""

    url: str
    api_key: str
    limited_key: str
    store: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _readers: list[threading.Thread] = field(default_factory=list)

    def output(self) -> str:
        """Everything the server printed (stdout and stderr); complete once it has exited."""
        if self.proc.poll() is not None:
            _close_pipes(self.proc, self._readers)
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Sends `sig` and returns the exit status (the server must exit within 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
            pytest.fail(f"server pid {self.proc.pid} ignored signal {sig} for {SHUTDOWN_TIMEOUT}s")
        finally:
            _close_pipes(self.proc, self._readers)


def _close_pipes(proc: subprocess.Popen[str], readers: list[threading.Thread]) -> None:
    """Waits for the readers to reach the end of the pipes, then closes them."""
    for reader in readers:
        reader.join(timeout=SHUTDOWN_TIMEOUT)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def start_server(
    store: Path, keys_file: Path | None, *extra: str, api_key_env: str | None = None
) -> ServerProcess:
    """Starts `python -m pixcrawler serve` on a free loopback port and waits for its URL.

    Args:
        store: the store to serve.
        keys_file: passed as `--keys-file` (None: no keys file).
        extra: more command-line arguments.
        api_key_env: a key put in PIXCRAWLER_API_KEY (keys never go on the command line).
    """
    env = {k: v for k, v in os.environ.items() if k != "PIXCRAWLER_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    if api_key_env is not None:
        env["PIXCRAWLER_API_KEY"] = api_key_env
    cmd = [sys.executable, "-m", "pixcrawler", "serve", str(store), "--port", "0"]
    cmd += ["--host", "127.0.0.1", *extra]
    if keys_file is not None:
        cmd += ["--keys-file", str(keys_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    first: queue.Queue[str | None] = queue.Queue()

    # Both pipes are drained for the server's whole life: a full pipe would block it.
    def drain(stream: object, is_stdout: bool) -> None:
        told = False
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)
            if is_stdout and not told:
                first.put(line)
                told = True
        if is_stdout and not told:
            first.put(None)

    readers = [
        threading.Thread(target=drain, args=(proc.stdout, True), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, False), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        line = first.get(timeout=STARTUP_TIMEOUT)
    except queue.Empty:
        line = None
    if line is None or " on http://" not in line:
        proc.kill()
        proc.wait(timeout=SHUTDOWN_TIMEOUT)
        _close_pipes(proc, readers)
        pytest.fail(f"server did not start (exit {proc.returncode}):\n{''.join(lines)}")
    url = line.rsplit(" on ", 1)[1].strip()
    return ServerProcess(
        url=url,
        api_key=API_KEY,
        limited_key=LIMITED_KEY,
        store=store,
        proc=proc,
        lines=lines,
        _readers=readers,
    )


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small source folder of real images: 3 digit classes x 20, and 12 photo classes x 5."""
    src = tmp_path_factory.mktemp("demo_source")
    _demo_data.build_digits(src, limit=20, classes=(0, 1, 2))
    _demo_data.build_photos(src, n=60, seed=0)
    return src


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """A packed store: "demo" (120 images, chunks of 16) and "pending" (processing, 42%)."""
    root = tmp_path_factory.mktemp("store_parent") / "store"
    _pack.pack(demo_source, root, "demo", chunk_size=16, created_at="2024-01-01T00:00:00Z")
    # "pending" is packed from a JSONL list of the digits: small, and the other input form.
    listing = root.parent / "pending.jsonl"
    with listing.open("w", encoding="utf-8") as f:
        for path in sorted(demo_source.glob("[0-9]/*.png")):
            line = {"file": os.path.relpath(path, listing.parent), "label": path.parent.name}
            f.write(json.dumps(line) + "\n")
    _pack.pack(listing, root, "pending", chunk_size=16, status="processing", progress=42)
    return root


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keys file granting API_KEY every job and LIMITED_KEY only "pending"."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({API_KEY: "*", LIMITED_KEY: ["pending"]}), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def server(store: Path, keys_file: Path) -> Iterator[ServerProcess]:
    """The real `pixcrawler serve` over `store` on an ephemeral loopback port."""
    proc = start_server(store, keys_file)
    try:
        yield proc
    finally:
        code = proc.stop(signal.SIGTERM)
        assert code == 0, f"server exited with {code}:\n{proc.output()}"


@pytest.fixture
def server_factory(store: Path, keys_file: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts extra servers; stops leftovers at teardown.

    `factory(*extra_args, store=store, keys_file=keys_file, api_key_env=None)` takes the
    arguments of `start_server`, with the session's store and keys file by default.
    """
    started: list[ServerProcess] = []

    def factory(
        *extra: str,
        store: Path = store,
        keys_file: Path | None = keys_file,
        api_key_env: str | None = None,
    ) -> ServerProcess:
        started.append(start_server(store, keys_file, *extra, api_key_env=api_key_env))
        return started[-1]

    yield factory
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)


def _shm_names() -> set[str]:
    """Our segments: those of runs whose owner lock is free (a dead owner) or held by a child.

    A run whose lock a process outside this tree holds is another test run on the same
    machine, not a leak of ours.
    """
    from engine_helpers import lock_holders, run_token

    try:
        names = {name for name in os.listdir(SHM) if name.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    holders = lock_holders()
    ours = set()
    for name in names:
        token = run_token(name)
        if token in holders:
            if holders[token] in mine or holders[token] is None:
                ours.add(name)
            continue
        # No lock file: not a run of this version; judge by the pid its name starts with.
        owner = token.split("_", 1)[0]
        if not owner.isdigit() or int(owner) in mine or not psutil.pid_exists(int(owner)):
            ours.add(name)
    return ours


@pytest.fixture(autouse=True)
def no_leaked_shm() -> Iterator[None]:
    """Fails the test if a `pxc_*` segment it created is still in /dev/shm 5 s after it ended.

    Teardown of an engine run is asynchronous (the supervisor unlinks after its workers
    exit), so leftovers get a bounded grace period before they count as leaked.
    """
    before = _shm_names()
    yield
    deadline = time.monotonic() + 5.0
    wake = threading.Event()  # never set: a bounded wait that no signal handler can cut short
    delay = 0.01
    while (leaked := _shm_names() - before) and time.monotonic() < deadline:
        wake.wait(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.25)
    if leaked:
        for name in leaked:  # clean up, so one leak does not fail every later test
            (SHM / name).unlink(missing_ok=True)
        pytest.fail(f"shared-memory segments leaked into {SHM}: {sorted(leaked)}")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The chunk cache of session- and module-scoped fixtures (made before any test's own)."""
    root = tmp_path_factory.mktemp("session-cache")
    saved = {k: os.environ.get(k) for k in CACHE_VARS}
    os.environ.pop("PIXCRAWLER_CACHE_DIR", None)
    os.environ["PIXCRAWLER_CACHE"] = str(root / "pixcrawler")
    os.environ["XDG_CACHE_HOME"] = str(root)  # nothing may fall back to ~/.cache
    try:
        yield root
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def fresh_cache(
    _session_cache: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """An empty chunk cache for this test: `load_dataset`'s default `cache_dir`."""
    root = tmp_path_factory.mktemp("cache") / "pixcrawler"
    monkeypatch.setenv("PIXCRAWLER_CACHE", str(root))
    return root
