"""The API key never shows: not in logs, output, errors, files, or any child process.

With DEBUG logging on everywhere (this process through `caplog`; every child interpreter
through a `sitecustomize` on PYTHONPATH that calls `logging.basicConfig(level=DEBUG)`, httpx
and httpcore included) and the key in `PIXCRAWLER_API_KEY`, a real iteration (the SDK in this
process) and a real `pixcrawler download` (a subprocess) run against the `server` fixture,
next to failing calls: an unknown job, a wrong key, a key without access, and a chunk that
vanishes mid-run (an error raised in the supervisor, which holds the key). The key (and the
wrong one) must then appear 0 times in:

- the log records (message and arguments) and stdout/stderr, the children's included;
- each exception's str, repr and formatted traceback (notes and causes included);
- every file under the output, cache and temporary folders, and a pickled `Dataset`;
- `/proc/<pid>/cmdline` and `/proc/<pid>/environ` of every child process seen while the
  runs are live (supervisor, fork server, workers, resource trackers); only the `pixcrawler`
  CLI process itself has the key in its environment, because the test put it there.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

import pixcrawler
from pixcrawler_engine._errors import AuthenticationError, DownloadError, NotFoundError

from .bad_data import tally

WRONG_KEY = "pxc-wrong-key-0b7e44d1c9"
SITECUSTOMIZE = """\
import logging, sys
logging.basicConfig(
    level=logging.DEBUG,
    stream=sys.stderr,
    format="[pid %(process)d] %(name)s %(levelname)s %(message)s",
)
"""


@dataclass
class Children:
    """The argv and environment of every descendant of `roots`, read while they live."""

    roots: list[int]
    cmdlines: dict[int, set[bytes]] = field(default_factory=dict)
    environs: dict[int, set[bytes]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def look(self) -> None:
        for root in self.roots:
            try:
                procs = psutil.Process(root).children(recursive=True)
                root_argv = _read(root, "cmdline")
            except psutil.Error:
                continue
            for proc in procs:
                before = _read(proc.pid, "cmdline")
                environ = _read(proc.pid, "environ")
                after = _read(proc.pid, "cmdline")
                for argv in (before, after):
                    if argv:  # a zombie (or a process gone meanwhile) reads as empty
                        self.cmdlines.setdefault(proc.pid, set()).add(argv)
                # Between fork and exec a child is still a copy of its parent (the CLI, which
                # has the key because the test put it there): its environ is the CLI's own.
                if environ and before == after and before != root_argv:
                    self.environs.setdefault(proc.pid, set()).add(environ)

    def __enter__(self) -> Children:
        self.look()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.look()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def commands(self) -> list[str]:
        return [
            c.replace(b"\0", b" ").decode(errors="replace")
            for reads in self.cmdlines.values()
            for c in reads
        ]

    def texts(self) -> dict[str, str | bytes]:
        """Every argv and environment read, named by where it was read."""
        texts: dict[str, str | bytes] = {}
        for kind, seen in (("cmdline", self.cmdlines), ("environ", self.environs)):
            for pid, reads in seen.items():
                argv = b" | ".join(sorted(self.cmdlines.get(pid, set()))).replace(b"\0", b" ")
                texts[f"/proc/{pid}/{kind} ({argv.decode(errors='replace')[:200]})"] = b"\n".join(
                    sorted(reads)
                )
        return texts


def _read(pid: int, kind: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{kind}").read_bytes()
    except OSError:
        return b""  # it exited meanwhile


def exception_texts(exc: BaseException) -> list[str]:
    """str, repr and the formatted traceback of an exception and of its causes."""
    texts = ["".join(traceback.format_exception(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(vars(seen)), *getattr(seen, "__notes__", [])]
        seen = seen.__cause__ or seen.__context__
    return texts


def file_hits(secret: bytes, *roots: Path) -> list[str]:
    """Files under `roots` (contents or names) that contain `secret`."""
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if secret in os.fsencode(path):
                hits.append(f"{path} (name)")
            if path.is_file() and secret in path.read_bytes():
                hits.append(str(path))
    return hits


@pytest.fixture
def debug_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sitecustomize folder on PYTHONPATH: every new interpreter logs at DEBUG to stderr."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    old = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{old}" if old else str(site))
    return site


def _assert_absent(secrets: dict[str, str], where: dict[str, str | bytes]) -> None:
    found = []
    for what, text in where.items():
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        for name, secret in secrets.items():
            if secret.encode() in data:
                found.append(f"the {name} is in {what}")
    assert not found, "\n".join(found)


def test_sdk_iteration_and_failures_never_show_the_key(
    server: Any,
    server_factory: Callable[..., Any],
    store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    debug_everywhere: Path,
) -> None:
    key = server.api_key
    monkeypatch.setenv("PIXCRAWLER_API_KEY", key)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the children's temporary files
    (tmp_path / "tmp").mkdir()
    cache = tmp_path / "cache"
    for name in ("httpx", "httpcore", "pixcrawler"):
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.set_level(logging.DEBUG)
    texts: dict[str, str | bytes] = {}
    children = Children([os.getpid()])

    def look(_: object = None) -> None:
        children.look()

    # 1. A whole pass with the key from the environment; children are read at every batch.
    ds = pixcrawler.load_dataset(
        "demo", base_url=server.url, image_size=32, num_workers=2, batch_rows=8,
        cache_dir=cache, progress=True,
    )  # fmt: skip
    texts["repr(dataset)"] = repr(ds)
    texts["pickle.dumps(dataset.ref)"] = pickle.dumps(ds.ref)  # what adapters carry
    n = 0
    for _batch in ds.iter_engine_batches(desc="images"):
        look()
        n += len(_batch)
    assert n == ds.num_images
    commands = children.commands()
    assert any("bootstrap" in c for c in commands), commands  # the supervisor was seen
    assert len(children.cmdlines) >= 4, commands  # and its zygote and 2 workers, forked

    # 2. Calls that fail in this process: unknown job, wrong key, key without access.
    failures: list[BaseException] = []
    for call, expected in (
        (lambda: pixcrawler.load_dataset("no-such-job", base_url=server.url), NotFoundError),
        (
            lambda: pixcrawler.load_dataset("demo", api_key=WRONG_KEY, base_url=server.url),
            AuthenticationError,
        ),
        (
            lambda: pixcrawler.load_dataset(
                "demo", api_key=server.limited_key, base_url=server.url
            ),
            AuthenticationError,
        ),
    ):
        with pytest.raises(expected) as info:
            call()
        failures.append(info.value)

    # 3. A failure inside the supervisor, which holds the key: a chunk vanishes mid-run.
    copy = tmp_path / "store-copy"
    shutil.copytree(store, copy)
    other = server_factory(store=copy)
    doomed = pixcrawler.load_dataset("demo", base_url=other.url, image_size=32, num_workers=1)
    (copy / "jobs" / "demo" / "chunks" / "3.zip").unlink()
    with pytest.raises(DownloadError) as info:
        for _batch in doomed.iter_engine_batches(desc="images"):
            look()
    failures.append(info.value)
    assert "its traceback there" in "".join(info.value.__notes__)  # it came from a child
    tally(faults=len(failures))

    out, err = capfd.readouterr()
    # DEBUG logging really was on in the children (their httpx lines reached stderr).
    pids = {int(p) for p in re.findall(r"\[pid (\d+)\] httpx INFO HTTP Request: GET", err)}
    assert pids and os.getpid() not in pids, err[-2000:]
    assert any(r.name == "httpx" for r in caplog.records)
    texts["stdout"], texts["stderr"] = out, err
    texts["log records"] = caplog.text + "\n".join(
        f"{r.getMessage()} {r.args!r}" for r in caplog.records
    )
    for i, exc in enumerate(failures):
        texts[f"exception {i} ({type(exc).__name__})"] = "\n".join(exception_texts(exc))
    texts.update(children.texts())
    assert len(children.environs) >= 5
    hits = file_hits(key.encode(), cache, tmp_path / "tmp")
    assert not hits, hits
    _assert_absent({"API key": key, "wrong key": WRONG_KEY}, texts)
    for srv in (server, other):  # the servers' own logs (the second one at DEBUG)
        assert key not in srv.output() and WRONG_KEY not in srv.output()


def _cli(
    args: list[str], env: dict[str, str], children: Children | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Runs `pixcrawler ...`, watching its descendants while it runs."""
    cmd = [sys.executable, "-m", "pixcrawler", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if children is not None:
            children.roots.append(proc.pid)
            with children:
                out, err = proc.communicate(timeout=120)
        else:
            out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_cli_download_and_failures_never_show_the_key(
    server: Any, tmp_path: Path, debug_everywhere: Path
) -> None:
    key = server.api_key
    env = {k: v for k, v in os.environ.items() if k != "PIXCRAWLER_API_KEY"}
    env.update(PIXCRAWLER_API_KEY=key, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    children = Children([])
    common = ["--base-url", server.url, "--output-dir", str(out_dir), "--no-progress"]
    runs: dict[str, subprocess.CompletedProcess[bytes]] = {}
    runs["numpy"] = _cli(
        ["download", "demo", *common, "--format", "numpy", "--image-size", "32x32",
         "--num-workers", "2", "--cache-dir", str(cache)],
        env,
        children,
    )  # fmt: skip
    assert runs["numpy"].returncode == 0, runs["numpy"].stderr.decode()
    assert (out_dir / "demo" / "images.npy").is_file()
    runs["images"] = _cli(["download", "demo", *common, "--format", "images"], env)
    runs["unknown job"] = _cli(["download", "no-such-job", *common], env)
    runs["wrong key"] = _cli(
        ["download", "demo", *common], {**env, "PIXCRAWLER_API_KEY": WRONG_KEY}
    )
    runs["info"] = _cli(["info", "demo", "--base-url", server.url], env)
    runs["list"] = _cli(["list", "--base-url", server.url], env)
    tally(faults=2)
    assert runs["unknown job"].returncode == 1 and runs["wrong key"].returncode == 1
    commands = children.commands()
    assert any("bootstrap" in c for c in commands), commands
    bootstrapped = [p for p, reads in children.cmdlines.items() if b"bootstrap" in b"".join(reads)]
    assert len(bootstrapped) >= 4, commands  # supervisors, their zygotes and workers (forked)
    texts: dict[str, str | bytes] = {}
    for name, run in runs.items():
        texts[f"{name}: stdout"], texts[f"{name}: stderr"] = run.stdout, run.stderr
    assert b"HTTP Request: GET" in runs["numpy"].stderr  # DEBUG logging was on
    texts.update(children.texts())  # the CLI's descendants; the CLI has the key on purpose
    hits = file_hits(key.encode(), out_dir, cache, tmp_path / "tmp")
    assert not hits, hits
    _assert_absent({"API key": key, "wrong key": WRONG_KEY}, texts)
