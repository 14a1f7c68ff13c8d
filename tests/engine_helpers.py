"""Helpers shared by the engine tests: sources over the test store and process checks."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import psutil

from pixcrawler_engine import DecodePolicy, EngineConfig, JobSource, Stream
from pixcrawler_engine.sources._jobapi import JobClient

if TYPE_CHECKING:
    from typing_extensions import Unpack


class ClientTimings(TypedDict, total=False):
    """The timeout and retry settings of `JobClient`, as tests pass them around."""

    timeout: float
    retries: int
    backoff: float
    retry_after_cap: float


class ClientOptions(ClientTimings, total=False):
    """Every keyword setting of `JobClient`."""

    verify_ssl: bool | str


class EngineOptions(TypedDict, total=False):
    """The fields of `EngineConfig`, for helpers that pass them on as keywords."""

    num_workers: int | None
    max_workers: int
    prefetch_chunks: int
    batch_rows: int
    num_slots: int | None
    slot_bytes: int | None
    timeout: float
    retries: int
    backoff: float
    retry_after_cap: float
    worker_timeout: float
    verify_ssl: bool | str
    shuffle: bool
    seed: int
    cache_dir: str | None
    cache_limit_bytes: int


def job_source(store: Path, job_id: str = "demo") -> JobSource:
    client = JobClient(f"file://{store}", None)
    return JobSource(client, client.get_job(job_id))


def expected_keys(store: Path, job_id: str = "demo") -> list[str]:
    """Every sample key of a packed job, in dataset order, read straight from the zips."""
    import json

    keys = []
    chunks = sorted((store / "jobs" / job_id / "chunks").glob("*.zip"), key=lambda p: int(p.stem))
    for path in chunks:
        with zipfile.ZipFile(path) as zf:
            for line in zf.read("manifest.jsonl").decode().splitlines():
                keys.append(json.loads(line)["file"])
    return keys


def run_keys(stream: Stream) -> list[str]:
    keys: list[str] = []
    for batch in stream:
        keys.extend(batch.keys)
    return keys


def small_config(**kw: Unpack[EngineOptions]) -> EngineConfig:
    base: EngineOptions = {"num_workers": 2, "batch_rows": 8, "max_workers": 2}
    base.update(kw)
    return EngineConfig(**base)


POLICY = DecodePolicy(image_size=(32, 32))


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Waits (bounded) until every pid has exited; returns those still alive."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("pxc_")}


def run_token(name: str) -> str:
    """The run a /dev/shm name belongs to: `pxc_<pid>_<hex>_<i>` or `pxc_<pid>_<hex>.lock`."""
    return "_".join(name[len("pxc_") :].removesuffix(".lock").split("_", 2)[:2])


def lock_holders() -> dict[str, int | None]:
    """Run token -> the pid holding its owner lock (from /proc/locks), None when it is free."""
    inodes: dict[int, int] = {}
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK":  # "->" lines are waiters: skipped
                inodes[int(fields[5].rsplit(":", 1)[1])] = int(fields[4])
    holders: dict[str, int | None] = {}
    for path in Path("/dev/shm").glob("pxc_*.lock"):
        try:
            holders[run_token(path.name)] = inodes.get(path.stat().st_ino)
        except FileNotFoundError:
            continue
    return holders


def segments_of(pids: set[int]) -> set[str]:
    """The /dev/shm names of the runs whose owner lock one of `pids` holds."""
    holders = lock_holders()
    return {name for name in shm_names() if holders.get(run_token(name)) in pids}


def wait_no_shm(names: set[str], timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = names & shm_names()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def reference_pixels(
    store: Path, key: str, policy: DecodePolicy, job_id: str = "demo"
) -> np.ndarray:
    from pixcrawler_engine.decode._image import decode_image

    for path in (store / "jobs" / job_id / "chunks").glob("*.zip"):
        with zipfile.ZipFile(path) as zf:
            if key in zf.namelist():
                return decode_image(zf.read(key), policy)
    raise KeyError(key)


def corrupt_one_sample(store: Path, job_id: str, chunk: int = 0, row: int = 3) -> str:
    """Rewrites one chunk so that sample `row` is a truncated file named broken<ext>.

    The job's manifest (sha256, size) is updated, so only decoding can notice.
    """
    import hashlib
    import json

    path = store / "jobs" / job_id / "chunks" / f"{chunk}.zip"
    with zipfile.ZipFile(path) as zf:
        lines = [json.loads(x) for x in zf.read("manifest.jsonl").decode().splitlines()]
        members = {e["file"]: zf.read(e["file"]) for e in lines}
    entry = lines[row]
    data = members.pop(entry["file"])
    new_name = "broken" + Path(entry["file"]).suffix
    members[new_name] = data[: len(data) // 3]
    entry["file"] = new_name
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for e in lines:
            zf.writestr(e["file"], members[e["file"]])
        zf.writestr("manifest.jsonl", "".join(json.dumps(e) + "\n" for e in lines))
    tmp.replace(path)
    job_path = store / "jobs" / job_id / "job.json"
    job = json.loads(job_path.read_text())
    for c in job["chunks"]:
        if c["index"] == chunk:
            c["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            c["size_bytes"] = path.stat().st_size
    job["size_bytes"] = sum(c["size_bytes"] for c in job["chunks"])
    job_path.write_text(json.dumps(job))
    return new_name
