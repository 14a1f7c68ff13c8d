"""A decode worker's memory: given back after large samples, kept for small ones.

glibc's malloc returns freed memory to the system eagerly (trimming the heap top, unmapping
large blocks), which costs Pillow dearly on small images in a long-lived process: the same
pages are given back and faulted in again for every image. Workers therefore run with a high
trim threshold and a fixed 32 MiB mmap threshold (`MALLOC_*` in their environment, see
`_entry.WORKER_ENV`). The price is that a worker stays at the peak of its largest image:
249 MB after one ARTeFACT sample against 88 MB with glibc's defaults.

`MemoryKeeper` pays it back: after each task it reads the process's anonymous RSS (one read of
/proc/self/status, ~10 us) and, when it grew by more than `TRIM_ABOVE` since the last time,
returns the free heap to the system (`malloc_trim(0)`, and Arrow's pool's unused memory).
Small-image work never reaches the threshold, so it keeps the fast settings.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

__all__ = ["TRIM_ABOVE", "MemoryKeeper", "anon_rss", "libc", "release"]

TRIM_ABOVE = 32 << 20


@functools.cache
def libc() -> Any:
    """glibc, or None (another C library, another OS: nothing to trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # By its soname: ctypes.util.find_library would fork ldconfig from a decode worker.
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc has it, musl does not
    except (OSError, AttributeError):
        return None
    return libc


def release() -> None:
    """Returns free memory to the system: glibc's heap, and Arrow's pool if it is loaded."""
    glibc = libc()
    if glibc is not None:
        glibc.malloc_trim(0)
    arrow = sys.modules.get("pyarrow")
    if arrow is not None:
        arrow.default_memory_pool().release_unused()


def anon_rss() -> int:
    """This process's anonymous resident memory in bytes (heap and private maps; 0 if unknown).

    File-backed pages (code, memory-mapped inputs) and shared memory are left out: trimming
    cannot give them back, and shared-memory slots would look like growth.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class MemoryKeeper:
    """Trims a worker's heap after a task that grew it by more than `threshold` bytes."""

    def __init__(self, threshold: int = TRIM_ABOVE) -> None:
        self.threshold = threshold
        self.floor = anon_rss()
        self.trims = 0

    def after_task(self) -> bool:
        """Called after every task; True when it gave memory back."""
        now = anon_rss()
        if now - self.floor <= self.threshold:
            self.floor = min(self.floor, now)
            return False
        release()
        self.trims += 1
        # What is left is in use (or cannot be trimmed): measure growth from there.
        self.floor = anon_rss()
        return True
