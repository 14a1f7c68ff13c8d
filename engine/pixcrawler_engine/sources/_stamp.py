"""Stamps of verified files: trust a cached chunk again without hashing it.

NOTE [stamps]: the disk is not ours alone, so a hit is checked before it is handed out: a
truncated or altered entry is a miss, removed under the chunk's lock and fetched again, never
delivered. Hashing every hit cost an epoch ~55 ms of CPU per 48 MB chunk (sha256 at ~0.9 GB/s
here), the first of them before the epoch's first batch. So an entry's stamp records its
identity (device, inode, size, mtime and ctime in ns) when it was last verified, and a hit
whose identity still matches is trusted without hashing. Nothing here writes an entry after
its `os.replace` (the LRU clock is the stamp's mtime), and any write, truncation, `utime` or
replacement by anyone else changes the entry's ctime, which the kernel sets and no user can
choose: such an entry is hashed again. Damage below the file system (a bad disk block) leaves
the identity alone; the zip's CRC of each member still catches it at decode time, as a bad
sample.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "VerifiedFiles",
    "file_matches",
    "sha256_of",
    "stamp_matches",
    "stamp_path",
    "write_stamp",
]

_BLOCK = 1 << 20


def stamp_path(entry: Path) -> Path:
    """Where an entry's stamp lives; its mtime is the cache's LRU clock."""
    return entry.with_suffix(".ok")


def _identity(st: os.stat_result) -> str:
    """What any change to a file changes (NOTE [stamps])."""
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def stamp_matches(entry: Path, st: os.stat_result, stamp: Path | None = None) -> bool:
    """Whether `entry` (as `st` describes it now) is the file its stamp (beside it, unless
    given) says was verified."""
    try:
        return (stamp or stamp_path(entry)).read_text(encoding="ascii") == _identity(st)
    except (OSError, UnicodeDecodeError):
        return False


def write_stamp(entry: Path, st: os.stat_result, stamp: Path | None = None) -> None:
    """Records that `entry`, as `st` describes it, was verified (atomically; the cache works
    without it, hashing every hit, e.g. when read-only)."""
    stamp = stamp or stamp_path(entry)
    tmp = stamp.with_name(f".{stamp.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(_identity(st), encoding="ascii")
        os.replace(tmp, stamp)
    except OSError:
        tmp.unlink(missing_ok=True)


def sha256_of(path: Path, limit: int | None = None) -> tuple[Any, int]:
    """The sha256 of the file (of its first `limit` bytes and a block, if given), and the bytes
    read."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
            done += len(block)
            if limit is not None and done > limit:
                break
    return digest, done


def file_matches(path: Path, size: int, sha256: str) -> bool:
    """Whether `path` has exactly `size` bytes with this sha256 (size checked first, cheaply)."""
    try:
        if path.stat().st_size != size:
            return False
        return sha256_of(path)[0].hexdigest() == sha256
    except FileNotFoundError:
        return False


class VerifiedFiles:
    """The files of a `file://` store seen to match their sha256, by identity: in memory, and
    as stamps in `folder` (the chunk cache's `stores/`) when given, so that a store's chunks
    are hashed once per file rather than once per pass; each pass is a new process."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._seen: set[tuple[str, str]] = set()  # (path, identity)

    def trusted(self, path: Path, st: os.stat_result, sha256: str) -> bool:
        """Whether `path`, as `st` describes it now, was seen to match `sha256`."""
        key = (str(path), _identity(st))
        if key in self._seen:
            return True
        if self.folder is None or not stamp_matches(path, st, self.folder / f"{sha256}.ok"):
            return False
        self._seen.add(key)
        return True

    def add(self, path: Path, st: os.stat_result, sha256: str) -> None:
        """Records that `path`, as `st` described it before it was hashed, matched `sha256`
        (a stamp the folder refuses, e.g. read-only, only means hashing it next time)."""
        self._seen.add((str(path), _identity(st)))
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                return
            write_stamp(path, st, self.folder / f"{sha256}.ok")
