"""Shared-memory slots: the supervisor creates and unlinks them, everyone else only attaches.

Segment names are `pxc_<owner pid>_<run token>_<slot>`. The owner pid lets a later run tell a
segment left behind by a killed run (its owner is gone) from one in use, and `sweep_stale`
unlinks the former: atexit handlers and finalizers never run on SIGKILL.

NOTE [resource tracker]: Python's `SharedMemory` registers every attach with the resource
tracker, which unlinks the segment when the attaching process exits, even though its owner still
uses it (CPython gh-82300); and its `close()` unmaps memory that raw-address views (Arrow foreign
buffers) may still read. Attach-only processes therefore map `/dev/shm/<name>` with `mmap`
themselves (`Mapping`). The owner keeps `SharedMemory` and stays registered on purpose: if the
supervisor is SIGKILLed, its tracker unlinks what it had created.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

__all__ = ["PREFIX", "SlotPool", "attach", "sweep_stale"]

PREFIX = "pxc_"
_SHM_DIR = Path("/dev/shm")
_NAME = re.compile(rf"^{PREFIX}(\d+)_")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (it may belong to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(owner_pid: int | None = None) -> list[str]:
    """Unlinks segments whose owner is dead (or all of `owner_pid`'s); returns their names."""
    if not _SHM_DIR.is_dir():
        return []
    removed = []
    for path in _SHM_DIR.iterdir():
        match = _NAME.match(path.name)
        if not match:
            continue
        pid = int(match.group(1))
        if (owner_pid is not None and pid == owner_pid) or (
            owner_pid is None and not pid_alive(pid)
        ):
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
    return removed


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, or None where there is no such mount."""
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Mapping:
    """A slot mapped by a process that did not create it (a worker or the consumer).

    It never unlinks. `close()` unmaps only when no view of `buf` is left; otherwise the
    memory stays mapped until the last view is garbage-collected.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        # Mapping the file directly keeps this process out of the resource tracker.
        fd = os.open(_SHM_DIR / name, os.O_RDWR)
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
    """Maps an existing slot for reading and writing, without owning it."""
    return Mapping(name)


class SlotPool:
    """The fixed-size slots of one run. Created by, and only unlinked by, the supervisor."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.token = secrets.token_hex(4)
        self._segments: list[SharedMemory] = []
        free = shm_free_bytes()
        if free is not None and count * slot_bytes > free:
            raise MemoryError(
                f"/dev/shm has {free / 2**20:.0f} MiB free but the engine needs "
                f"{count} slots x {slot_bytes / 2**20:.1f} MiB = "
                f"{count * slot_bytes / 2**20:.0f} MiB;"
                " lower num_slots, batch_rows or image_size, or give the container more shared"
                " memory (docker run --shm-size=1g)"
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
        name = f"{PREFIX}{os.getpid()}_{self.token}_{len(self._segments)}"
        self._segments.append(SharedMemory(name=name, create=True, size=self.slot_bytes))
        return len(self._segments) - 1

    def close(self) -> None:
        """Unmaps and unlinks every slot; idempotent."""
        while self._segments:
            shm = self._segments.pop()
            try:
                shm.close()
            except BufferError:  # a view is still alive here; unlinking is what matters
                pass
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
