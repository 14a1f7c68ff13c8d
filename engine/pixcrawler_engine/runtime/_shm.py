"""Shared memory of a run: its owner lock, slots and beat counters, and the sweep of dead runs.

NOTE [ownership]: a run is named by a token, `<supervisor pid>_<random hex>` (the pid is for
people reading `ls /dev/shm`, and keeps pid-judging sweeps of older versions away from a live
run; ownership is never judged by it). Its supervisor creates, in /dev/shm,

    pxc_<token>.lock     held with `flock` for the supervisor's whole life
    pxc_<token>_<i>      the slots (fixed size, reserved with `posix_fallocate`)
    pxc_<token>_beats    one counter per worker seat (see `Beats`)

and `/tmp/pxc-run-<token>/` for downloads. It is the only process that unlinks them. A run is
dead when its lock can be taken: the kernel drops an `flock` when its holder dies, however it
dies, so `sweep_stale` (run at every start) removes exactly the runs whose owner is gone. A
pid would not do: containers that share /dev/shm (`--ipc=host`, Kubernetes pods) have separate
PID namespaces, where a live owner's pid looks dead. The lock file appears already locked (it is
locked under a temporary name, then renamed), so a sweep never sees a new run unlocked.

NOTE [no tracker]: segments are plain files of /dev/shm opened with `O_CREAT | O_EXCL` and
mapped with `mmap`; nothing registers them with a resource tracker (which would start a
process per stream, and unlinks segments that other processes still use, CPython gh-82300).
Attaching processes map the file the same way (`Mapping`).

/dev/shm is sparse: creating a file reserves nothing, and touching a page past the free space
is a SIGBUS in whoever writes it. `posix_fallocate` reserves every slot at creation, so a full
/dev/shm is an error at start (`SharedMemoryError`), named as such.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import shutil
import tempfile
from pathlib import Path

from pixcrawler_engine._errors import SharedMemoryError

__all__ = [
    "PREFIX",
    "Beats",
    "Mapping",
    "OwnerLock",
    "SlotPool",
    "attach",
    "pid_alive",
    "shm_free_bytes",
    "sweep_run",
    "sweep_stale",
]

PREFIX = "pxc_"
SHM_DIR = Path("/dev/shm")
_LOCK = re.compile(rf"^\.?{PREFIX}(\d+_[0-9a-f]+)\.lock(\.tmp)?$")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists in this PID namespace (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, or None where there is no such mount."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_size_text() -> str:
    """`/dev/shm (N MiB, M MiB free)` for error messages."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return "/dev/shm (not mounted)"
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    return f"/dev/shm ({size / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free)"


def run_folder(token: str) -> Path:
    """The download folder of run `token`."""
    return Path(tempfile.gettempdir()) / f"pxc-run-{token}"


class OwnerLock:
    """The `flock` that says run `token` is alive; held by its supervisor until it exits."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.path = SHM_DIR / f"{PREFIX}{token}.lock"
        tmp = SHM_DIR / f".{PREFIX}{token}.lock.tmp"
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        # The download folder's path, for a sweep whose TMPDIR differs from ours.
        os.write(self._fd, os.fsencode(run_folder(token)))
        os.rename(tmp, self.path)

    def release(self) -> None:
        """Removes the lock file, then drops the lock; idempotent."""
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


def _remove_run(token: str, lock_fd: int) -> list[str]:
    """Unlinks the segments and the download folder of a run whose lock is held by the caller.

    The folder is where the lock file says (the owner's TMPDIR), if it has the run's name.
    """
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}{token}_*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    folders = {run_folder(token)}
    with contextlib.suppress(OSError, ValueError):
        written = Path(os.fsdecode(os.pread(lock_fd, 4096, 0)))
        if written.name == run_folder(token).name and written.is_absolute():
            folders.add(written)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def sweep_run(token: str) -> list[str]:
    """Removes what run `token` left, if its owner is gone; returns the segments removed."""
    for name in (f"{PREFIX}{token}.lock", f".{PREFIX}{token}.lock.tmp"):
        removed = _sweep_lock(SHM_DIR / name)
        if removed is not None:
            return removed
    return []  # no lock file: the run never started, or cleaned up after itself


def _sweep_lock(path: Path) -> list[str] | None:
    """Takes the lock at `path` if it is free and removes its run; None if held or missing."""
    match = _LOCK.match(path.name)
    if match is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # its owner is alive, in this or another PID namespace
        removed = _remove_run(match.group(1), fd)
        path.unlink(missing_ok=True)
        return removed
    finally:
        os.close(fd)


def sweep_stale() -> list[str]:
    """Removes the segments and folders of every run whose owner is gone; returns the segments."""
    if not SHM_DIR.is_dir():
        return []
    removed: list[str] = []
    for path in SHM_DIR.iterdir():
        removed += _sweep_lock(path) or []
    return removed


class Mapping:
    """A segment mapped by a process that did not create it (a worker or the consumer).

    It never unlinks. `close()` unmaps only when no view of `buf` is left; otherwise the
    memory stays mapped until the last view is garbage-collected.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryError(
                f"the shared-memory segment /dev/shm/{name} is gone: another process removed "
                "it while this run used it (a cleanup script, or a program that deletes "
                "/dev/shm/pxc_* files); rerun, and keep other tools away from /dev/shm/pxc_*"
            ) from None
        try:
            self._mmap = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        try:
            self.buf.release()
            self._mmap.close()
        except BufferError:  # views are alive: they keep the mapping until they go
            pass


def attach(name: str) -> Mapping:
    """Maps an existing segment for reading and writing, without owning it."""
    return Mapping(name)


class _Segment:
    """A segment created (and later unlinked) by this process, its space reserved."""

    def __init__(self, name: str, size: int, what: str) -> None:
        self.name = name
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self.mmap = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise SharedMemoryError(
                f"cannot reserve {size / 2**20:.1f} MiB for {what} in {shm_size_text()}: "
                f"{exc.strerror or exc}. Lower num_slots or batch_rows (or image_size), or give "
                "the container more shared memory (docker run --shm-size=1g)"
            ) from exc
        os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mmap.close()
        (SHM_DIR / self.name).unlink(missing_ok=True)


class SlotPool:
    """The fixed-size slots of one run. Created by, and only unlinked by, the supervisor."""

    def __init__(self, token: str, count: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.prefix = f"{PREFIX}{token}_"
        self._segments: list[_Segment] = []
        free = shm_free_bytes()
        if free is not None and count * slot_bytes > free:
            raise SharedMemoryError(
                f"{shm_size_text()} cannot hold num_slots={count} slots of "
                f"{slot_bytes / 2**20:.1f} MiB ({count * slot_bytes / 2**20:.0f} MiB); lower "
                "num_slots, batch_rows or image_size, or give the container more shared memory "
                "(docker run --shm-size=1g)"
            )
        try:
            for _ in range(count):
                self.grow()
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._segments]

    def __len__(self) -> int:
        return len(self._segments)

    def grow(self) -> int:
        """Adds one slot; returns its index."""
        index = len(self._segments)
        what = f"shared-memory slot {index}"
        self._segments.append(_Segment(f"{self.prefix}{index}", self.slot_bytes, what))
        return index

    def close(self) -> None:
        """Unmaps and unlinks every slot; idempotent."""
        while self._segments:
            self._segments.pop().close()


class Beats:
    """One uint64 counter per worker seat, bumped by the worker after every sample.

    The supervisor reads them to tell a busy worker (its count moves) from a hung one: a
    worker's silence is measured per sample, not per batch of huge images.
    """

    def __init__(self, token: str, seats: int) -> None:
        self.name = f"{PREFIX}{token}_beats"
        self._segment = _Segment(self.name, max(8, 8 * seats), "the worker beat counters")
        self.counts = memoryview(self._segment.mmap).cast("Q")

    def close(self) -> None:
        self.counts.release()
        self._segment.close()
