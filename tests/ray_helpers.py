"""Helpers of the Ray tests: a private Ray temp folder, Ray's processes, the engine's reference.

Every Ray instance of the tests runs with its own temp folder (`RAY_TMPDIR` and `_temp_dir`):
other test runs on the machine, and a user's Ray, never see it, and it goes at teardown.
Clusters are small: one CPU per node, a 150-256 MiB object store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import pytest

RAY_NAMES = ("raylet", "gcs_server", "plasma_store", "ray::")
SHUTDOWN_TIMEOUT = 30.0


def require_ray() -> Any:
    """The `ray` module, or a skip with its reason."""
    return pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")


@contextlib.contextmanager
def private_ray_tmpdir() -> Iterator[str]:
    """A short private folder for Ray's sessions, set as RAY_TMPDIR while the block runs.

    Short, under /tmp: Ray's Unix sockets live there and their paths are limited to 107 bytes.
    """
    folder = tempfile.mkdtemp(prefix="pxr-", dir="/tmp")
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[str]:
    """A local Ray instance in a private temp folder; rows keep their order.

    Yields the temp folder (logs are under it). At the end Ray is shut down and every one of
    its processes must be gone.
    """
    import logging

    require_ray()
    import ray
    import ray.data

    with private_ray_tmpdir() as tmp:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=256 << 20,
            include_dashboard=False,
            _temp_dir=tmp,
            logging_level=logging.ERROR,
        )
        context = ray.data.DataContext.get_current()
        saved = context.execution_options.preserve_order, context.enable_progress_bars
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        procs = ray_processes()
        try:
            yield tmp
        finally:
            procs = ray_processes()
            ray.shutdown()
            context.execution_options.preserve_order, context.enable_progress_bars = saved
            left = wait_gone(procs)
    assert procs and not left, f"Ray processes left running: {left}"


def processes_using(folder: str) -> list[str]:
    """Processes anywhere on the machine whose argv names `folder` (a Ray temp folder)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = " ".join(proc.info["cmdline"] or [])
        if folder in argv:
            found.append(f"{proc.info['pid']} {argv[:120]}")
    return found


def is_ray_process(proc: psutil.Process) -> bool:
    try:
        name = proc.name()
        argv = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return (
        name.startswith(RAY_NAMES)
        or argv.startswith("ray::")
        or "site-packages/ray/" in argv
        or any(f"/{n}" in argv for n in ("raylet", "gcs_server"))
    )


def ray_processes() -> list[psutil.Process]:
    """Ray's processes below this one (a local instance or the nodes of a test cluster)."""
    return [p for p in psutil.Process().children(recursive=True) if is_ray_process(p)]


def wait_gone(procs: list[psutil.Process], timeout: float = SHUTDOWN_TIMEOUT) -> list[str]:
    """Waits until every process has exited; returns those still running (name and pid)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [f"{p.pid} {p.name()}" for p in alive if p.is_running()]


@dataclass
class Rows:
    """What a pass gives, in order: keys, images, labels (class indices) and indices."""

    keys: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def pixels(self) -> np.ndarray:
        return np.concatenate(self.images) if self.images else np.empty((0,))


def engine_rows(dataset: Any) -> Rows:
    """The engine's pass over a `pixcrawler.Dataset`, labels as class indices."""
    rows = Rows()
    to_index = dataset.info.class_to_idx
    for batch in dataset.iter_engine_batches():
        rows.keys += list(batch.keys)
        rows.images.append(np.array(batch.images))
        rows.labels += [to_index.get(label, label) for label in batch.labels]
        rows.indices += batch.record_batch.column("index").to_pylist()
    return rows


def ray_rows(ds: Any, batch_size: int = 50) -> Rows:
    """A Ray dataset's rows, as its numpy batches give them."""
    rows = Rows()
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        rows.keys += [str(k) for k in batch["key"]]
        rows.images.append(batch["image"])
        rows.labels += batch["label"].tolist()
        rows.indices += batch["index"].tolist()
    return rows


class Killer(threading.Thread):
    """Kills, with SIGKILL, the Ray worker whose download the fault proxy stalls.

    The proxy stalls one chunk's response; the worker reading that chunk then sits in a socket
    read. Its connection is the one whose local port the proxy saw the stalled request come
    from: that process is killed, mid-read.

    Args:
        proxy: the `FaultProxy` with one `stall` fault.
        match: the stalled request's path fragment.
    """

    def __init__(self, proxy: Any, match: str, timeout: float = 60.0) -> None:
        super().__init__(daemon=True, name="ray-worker-killer")
        self.proxy = proxy
        self.match = match
        self.timeout = timeout
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stop.wait(0.05) and time.monotonic() < deadline:
            stalled = [s for s in self.proxy.seen(self.match) if s.fault == "stall"]
            if not stalled:
                continue
            for proc in ray_processes():
                with contextlib.suppress(psutil.Error):
                    if any(
                        c.laddr and c.laddr.port == stalled[0].client_port
                        for c in proc.net_connections(kind="tcp")
                    ):
                        proc.kill()
                        self.killed = proc.pid
                        return


class ObjectStoreWatch(threading.Thread):
    """Samples the object store of every node while a block runs: peak use, spills, fallback.

    `fallback` counts bytes Ray had to allocate outside the store (on disk) because it was
    full; `spilled` bytes moved out to disk. Read through Ray's internal memory-info call
    (what `ray memory --stats-only` prints): no public API gives these numbers.
    """

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="object-store-watch")
        self.interval = interval
        self.peak = 0
        self.capacity = 0
        self.fallback = 0
        self.spilled = 0
        self.samples = 0
        self._done = threading.Event()

    def sample(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        stats = get_memory_info_reply(state).store_stats
        self.peak = max(self.peak, int(stats.object_store_bytes_used))
        self.capacity = max(self.capacity, int(stats.object_store_bytes_avail))
        self.fallback = max(self.fallback, int(stats.object_store_bytes_fallback))
        self.spilled = max(self.spilled, int(stats.spilled_bytes_total))
        self.samples += 1

    def run(self) -> None:
        while not self._done.wait(self.interval):
            with contextlib.suppress(Exception):  # a sample lost to a busy raylet is fine
                self.sample()

    def __enter__(self) -> ObjectStoreWatch:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(timeout=10)
        self.sample()
