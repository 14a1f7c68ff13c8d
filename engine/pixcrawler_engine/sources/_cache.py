"""The disk cache of verified chunks, shared by runs and processes: `ChunkCache`.

Layout under the cache root (`$PIXCRAWLER_CACHE`, else `$XDG_CACHE_HOME/pixcrawler`, else
`~/.cache/pixcrawler`):

    chunks/<version>/<sha256>.zip      a verified chunk of job version <version>
    chunks/<version>/<sha256>.ok       its stamp: the file's identity when last verified
    chunks/<version>/.job              the job id of that version (for `pixcrawler cache`)
    partial/<version>/<sha256>/        a download in progress (`<index>.zip.part`, resumable)
    locks/<version>-<sha256>.lock      one process downloads a chunk at a time
    stores/<sha256>.ok                 a `file://` store's chunk file seen to match (its stamp)

The file system is the index, so any number of processes can share one cache without a
database: an entry appears only by `os.replace` of a complete, sha256-verified file (a reader
never sees half a chunk), a hit bumps its stamp's mtime (the LRU clock), and eviction unlinks
the oldest entries until the total is under the limit. Unlinking an entry another process has
open is safe on POSIX (its reader keeps the inode). Entries used in the last `grace_s` seconds
are never evicted, because a run may have fetched a chunk that its decode workers have not
opened yet: the limit is therefore soft by at most the chunks in flight.

A hit is checked before it is handed out (NOTE [stamps] in `_stamp`): a truncated or altered
entry is a miss, removed under the chunk's lock and fetched again, never delivered.

`ChunkCache` owns everything under its root; nothing else writes there. `CachedSource`
(`_cached_source`) puts a job source's downloads through it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pixcrawler_engine.sources._stamp import file_matches, stamp_matches, stamp_path, write_stamp

__all__ = ["ENV_CACHE", "CacheWarning", "ChunkCache", "default_cache_dir", "disk_error"]

ENV_CACHE = "PIXCRAWLER_CACHE"
_ENV_ALIAS = "PIXCRAWLER_CACHE_DIR"  # the variable's first name, still honoured
# Errors of the cache's disk, not of the download: the chunk can still be fetched uncached.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_LIMIT = 10 * 2**30


class CacheWarning(UserWarning):
    """The chunk cache cannot be used (read-only, full); the run goes on without it."""


def default_cache_dir() -> Path:
    """`$PIXCRAWLER_CACHE` (or `$PIXCRAWLER_CACHE_DIR`), else `$XDG_CACHE_HOME/pixcrawler`,
    else `~/.cache/pixcrawler`."""
    explicit = os.environ.get(ENV_CACHE) or os.environ.get(_ENV_ALIAS)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "pixcrawler"


def disk_error(exc: BaseException) -> OSError | None:
    """The OSError of a full, read-only or forbidden disk behind `exc` (its causes), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _safe_version(version: str) -> str:
    """A file-name-safe form of a job version (a server-supplied, untrusted string)."""
    if _SAFE.fullmatch(version) and version not in (".", ".."):
        return version
    import hashlib

    return "h-" + hashlib.sha256(version.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    mtime: float


class ChunkCache:
    """Verified chunk files keyed by (job version, sha256), with a size limit and LRU eviction.

    Args:
        root: the cache folder; None means `default_cache_dir()`.
        limit_bytes: total size of cached chunks (and partial downloads) above which the least
            recently used go.
        grace_s: entries used this recently are never evicted (see the module docstring).

    Raises:
        ValueError: a negative limit or grace.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        limit_bytes: int = DEFAULT_LIMIT,
        grace_s: float = 120.0,
    ) -> None:
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
            raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or grace_s < 0:
            raise ValueError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.limit_bytes = limit_bytes
        self.grace_s = float(grace_s)

    def __repr__(self) -> str:
        return f"ChunkCache({os.fspath(self.root)!r}, limit_bytes={self.limit_bytes})"

    # ------------------------------------------------------------------------------ lookups

    def path_for(self, version: str, sha256: str) -> Path:
        """Where the entry of one chunk lives (whether or not it is cached)."""
        if _SHA256.fullmatch(sha256) is None:
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
        return self.root / "chunks" / _safe_version(version) / f"{sha256}.zip"

    @property
    def store_stamps(self) -> Path:
        """Stamps of `file://` store chunks (read where they lie): `VerifiedFiles`' folder."""
        return self.root / "stores"

    def get(self, version: str, sha256: str, size: int, *, verify: bool = True) -> Path | None:
        """The cached file of a chunk, or None. A hit becomes the most recently used entry.

        Args:
            verify: hash the entry (besides checking its size): something outside the cache
                may have truncated or altered it. A bad entry is a miss; `fetch` replaces it.
        """
        path = self.path_for(version, sha256)
        try:
            st = path.stat()
            if st.st_size != size:
                return None
            if verify and not stamp_matches(path, st):  # NOTE [stamps]
                if not file_matches(path, size, sha256):
                    return None
                write_stamp(path, st)  # the identity seen before hashing: safe if it moved
        except FileNotFoundError:
            return None
        with contextlib.suppress(OSError):
            os.utime(stamp_path(path))  # the LRU clock; a read-only cache still serves hits
        return path

    def fetch(
        self,
        version: str,
        sha256: str,
        size: int,
        download: Callable[[Path], Path],
        *,
        job_id: str | None = None,
    ) -> Path:
        """The cached file of a chunk, downloaded first if needed.

        Args:
            version: the job version.
            sha256: the chunk's sha256 (64 hex digits).
            size: the chunk's size in bytes.
            download: `download(dest_dir) -> path` fetches and verifies the chunk into
                `dest_dir` (`JobClient.fetch_chunk`); `dest_dir` is kept across runs, so a
                download that resumes a `.part` file there continues where a killed run stopped.
            job_id: the job the version belongs to, noted for `pixcrawler cache info|clear`.

        Raises:
            OSError: the cache's disk refused a write (full, read-only); `disk_error` tells.

        Returns:
            The path of the entry; it stays valid while open even if it is evicted later.
        """
        hit = self.get(version, sha256, size)
        if hit is not None:
            return hit
        final = self.path_for(version, sha256)
        with self._lock(version, sha256):
            hit = self.get(version, sha256, size)  # another process may have won the race
            if hit is not None:
                return hit
            # A bad entry goes only under the lock: whoever holds it may be replacing it.
            final.unlink(missing_ok=True)
            partial = self.root / "partial" / _safe_version(version) / sha256
            partial.mkdir(parents=True, exist_ok=True)
            got = Path(download(partial))
            final.parent.mkdir(parents=True, exist_ok=True)
            if job_id is not None:
                _note_job(final.parent, job_id)
            if got.resolve().is_relative_to(partial.resolve()):
                os.replace(got, final)
            else:  # the chunk was local already (a store): copy it in, atomically
                tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
                try:
                    shutil.copyfile(got, tmp)
                    os.replace(tmp, final)
                finally:
                    tmp.unlink(missing_ok=True)
            write_stamp(final, final.stat())  # `download` verified what it wrote
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):
                partial.parent.rmdir()  # only if no other download of this version is open
        self.evict(protect=final)
        return final

    # ----------------------------------------------------------------------------- eviction

    def entries(self) -> list[_Entry]:
        """Every cached chunk and partial download, least recently used first."""
        found: list[_Entry] = []
        for path in self._walk(self.root / "chunks", files=True):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                used = st.st_mtime
                with contextlib.suppress(OSError):
                    used = stamp_path(path).stat().st_mtime  # the LRU clock, when stamped
                found.append(_Entry(path, st.st_size, used))
        for path in self._walk(self.root / "partial", files=False):
            size, mtime = 0, 0.0
            with contextlib.suppress(FileNotFoundError):
                for part in path.iterdir():
                    st = part.stat()
                    size, mtime = size + st.st_size, max(mtime, st.st_mtime)
            found.append(_Entry(path, size, mtime))
        found.sort(key=lambda e: e.mtime)
        return found

    def size_bytes(self) -> int:
        """The bytes the cache holds now."""
        return sum(e.size for e in self.entries())

    def evict(self, *, protect: Path | None = None) -> int:
        """Removes least recently used entries until the cache fits its limit.

        Args:
            protect: an entry that must stay (the one just added).

        Returns:
            The bytes freed.
        """
        entries = self.entries()
        total = sum(e.size for e in entries)
        freed = 0
        recent = time.time() - self.grace_s
        for entry in entries:
            if total - freed <= self.limit_bytes:
                break
            if entry.path == protect or entry.mtime > recent:
                continue
            if self._remove(entry):
                freed += entry.size
        return freed

    def versions(self) -> dict[str, tuple[str | None, int, int]]:
        """Per job version (as stored): (job id if known, cached chunks, bytes)."""
        out: dict[str, tuple[str | None, int, int]] = {}
        for entry in self.entries():
            version = entry.path.parent.name
            job, chunks, size = out.get(version, (None, 0, 0))
            if job is None:
                job = _job_of(self.root / "chunks" / version)
            out[version] = (job, chunks + (not entry.path.is_dir()), size + entry.size)
        return out

    def clear(self, *, version: str | None = None, job_id: str | None = None) -> int:
        """Removes every entry, or those of one job version or one job; returns the bytes freed.

        A download in progress (its lock held) is left alone; a run reading the cache at the
        time keeps the files it has open and fetches again what it opens later.
        """
        wanted = None
        if version is not None or job_id is not None:
            wanted = {
                v
                for v, (job, _, _) in self.versions().items()
                if (version is None or v in (version, _safe_version(version)))
                and (job_id is None or job == job_id)
            }
        freed = 0
        for entry in self.entries():
            if wanted is not None and entry.path.parent.name not in wanted:
                continue
            if self._remove(entry):
                freed += entry.size
        if wanted is None:
            shutil.rmtree(self.store_stamps, ignore_errors=True)
        for sub in ("chunks", "partial"):
            with contextlib.suppress(FileNotFoundError):
                for folder in (self.root / sub).iterdir():
                    if wanted is None or folder.name in wanted:
                        if not any(folder.glob("*.zip")):
                            (folder / ".job").unlink(missing_ok=True)
                            for stamp in folder.glob("*.ok"):  # of entries gone meanwhile
                                stamp.unlink(missing_ok=True)
                        with contextlib.suppress(OSError):
                            folder.rmdir()  # only once empty
        return freed

    def check_writable(self) -> None:
        """Raises the OSError that a write into the cache would meet (read-only, no room)."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".probe-{uuid.uuid4().hex}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)  # a full disk refuses a block, not an empty file
        finally:
            probe.unlink(missing_ok=True)

    def drop_partial(self, version: str, sha256: str) -> None:
        """Removes a chunk's partial download (after the disk refused it), if nobody writes it."""
        self._try_remove_partial(self.root / "partial" / _safe_version(version) / sha256)

    # ---------------------------------------------------------------------------- internals

    @staticmethod
    def _walk(top: Path, *, files: bool) -> Iterator[Path]:
        """`top/<version>/<name>` entries: files (cached chunks) or folders (partials)."""
        try:
            versions = list(top.iterdir())
        except FileNotFoundError:
            return
        for version in versions:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for path in version.iterdir():
                    if path.name.startswith("."):
                        continue  # a copy in progress
                    if (files and path.suffix == ".zip") or (not files and path.is_dir()):
                        yield path

    @contextlib.contextmanager
    def _lock(self, version: str, sha256: str) -> Iterator[None]:
        """An exclusive `flock` for one chunk; the kernel drops it if the holder dies."""
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{_safe_version(version)}-{sha256}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _remove(self, entry: _Entry) -> bool:
        """Removes a cached chunk, or a partial download nobody holds; False if it is held."""
        if entry.path.is_dir():
            return self._try_remove_partial(entry.path)
        entry.path.unlink(missing_ok=True)
        stamp_path(entry.path).unlink(missing_ok=True)
        return True

    def _try_remove_partial(self, path: Path) -> bool:
        """Removes an abandoned partial download; False while a process is downloading it."""
        lock = self.root / "locks" / f"{path.parent.name}-{path.name}.lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            shutil.rmtree(path, ignore_errors=True)
            return True
        finally:
            os.close(fd)


def _note_job(folder: Path, job_id: str) -> None:
    """Writes `folder/.job` once (atomically); the cache works without it."""
    note = folder / ".job"
    if note.exists():
        return
    tmp = folder / f".job.{uuid.uuid4().hex}.tmp"
    with contextlib.suppress(OSError):
        tmp.write_text(job_id, encoding="utf-8")
        os.replace(tmp, note)
    tmp.unlink(missing_ok=True)


def _job_of(folder: Path) -> str | None:
    try:
        return (folder / ".job").read_text(encoding="utf-8")[:256] or None
    except (OSError, UnicodeDecodeError):
        return None
