"""Chunk access inside one process: a picklable job address and a per-process chunk cache.

`JobRef` is what framework adapters carry into DataLoader workers: the job's manifest and how
to reach it, never a live connection. Its API key travels in a `Credential`, which process
pipes (multiprocessing's `ForkingPickler`, used by DataLoader workers) carry but which plain
`pickle` drops, so a dataset saved to a file never holds the key.

`LocalChunks` belongs to one process (it checks the pid on every use, because a forked child
must not share its parent's open files or connection). It downloads each chunk at most once
into its own folder, keeps the last few chunk archives open, and reads single samples from
them. It owns that folder: it removes it when the process ends (a `multiprocessing` finalizer,
which also runs in DataLoader workers) and removes folders of dead processes on start.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import multiprocessing.util
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pixcrawler_engine.runtime._shm import pid_alive
from pixcrawler_engine.sources._base import (
    ChunkReader,
    JobSource,
    Source,
    SubsetSource,
    ZipOpener,
    read_zip_manifest,
)
from pixcrawler_engine.sources._jobapi import JobClient
from pixcrawler_engine.sources._manifest import ChunkInfo, JobManifest
from pixcrawler_engine.sources._record import Record

if TYPE_CHECKING:
    from pixcrawler._parquet_ref import ParquetRef
    from pixcrawler_engine.sources._cache import ChunkCache

__all__ = ["Credential", "JobRef", "LocalChunks"]

_ENV_KEY = "PIXCRAWLER_API_KEY"
_TMP_PREFIX = "pixcrawler-chunks-"
_TMP_NAME = re.compile(re.escape(_TMP_PREFIX) + r"(\d+)-")
# Open chunk archives kept per process: enough for a batch of a shuffled epoch, which draws on
# a block of up to 2 x shuffle_window - 1 chunks, and few enough that file descriptors never
# run short.
OPEN_CHUNKS = 32


class Credential:
    """An API key that crosses process pipes but is never written by plain `pickle`.

    `pickle.dumps(credential)` gives an empty credential, which falls back to the
    `PIXCRAWLER_API_KEY` variable of the process that loads it. Pickles made by
    multiprocessing for a child process (through `ForkingPickler`) carry the key.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def reveal(self) -> str | None:
        """The key, or `PIXCRAWLER_API_KEY` for an empty credential."""
        return self._value if self._value is not None else os.environ.get(_ENV_KEY)

    def __repr__(self) -> str:
        return "Credential(***)" if self._value is not None else "Credential(None)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Credential, (None,))


def _reduce_for_child(credential: Credential) -> tuple[Any, ...]:
    return (Credential, (credential._value,))


# Process pipes only: the key reaches a DataLoader worker started with spawn or forkserver.
ForkingPickler.register(Credential, _reduce_for_child)


@dataclass(frozen=True, kw_only=True)
class JobRef:
    """Everything a process needs to reach a job's chunks: no connection, no open file.

    Attributes:
        base_url: the API or store URL the manifest came from.
        credential: the API key.
        timeout: seconds a request may go without progress.
        verify_ssl: verify TLS certificates (or a CA bundle path).
        manifest: the job's manifest.
        cache_dir: the engine's disk cache of chunks (`pixcrawler_engine.sources._cache`), shared by
            processes and runs; None downloads into a private folder per process.
        cache_limit_bytes: the cache's size limit (least recently used chunks go first).
        store_stamps: for a `file://` job, the folder of its chunks' stamps (`JobClient`'s
            `stamps`); None hashes them in every process.
    """

    base_url: str
    credential: Credential
    timeout: float
    verify_ssl: bool | str
    manifest: JobManifest
    cache_dir: str | None = None
    cache_limit_bytes: int = 10 * 2**30
    store_stamps: str | None = None

    @property
    def is_local(self) -> bool:
        """Whether chunks are read in place from a `file://` store (nothing is downloaded)."""
        return urlsplit(self.base_url).scheme.lower() == "file"

    def client(self) -> JobClient:
        """A new client for this job; the caller closes it."""
        return JobClient(
            self.base_url,
            self.credential.reveal(),
            timeout=self.timeout,
            verify_ssl=self.verify_ssl,
            stamps=self.store_stamps,
        )

    def cache(self) -> ChunkCache | None:
        """The shared chunk cache, or None (no `cache_dir`, or a store read in place)."""
        if self.cache_dir is None or self.is_local:
            return None
        from pixcrawler_engine.sources._cache import ChunkCache

        return ChunkCache(self.cache_dir, limit_bytes=self.cache_limit_bytes)

    def source(self, chunks: list[int] | None = None) -> Source:
        """An engine source over the job (some `chunks` only, in that order); caller closes it."""
        source: Source = JobSource(self.client(), self.manifest)
        cache = self.cache()
        if cache is not None:
            from pixcrawler_engine.sources._cached_source import CachedSource

            source = CachedSource(source, cache)
        if chunks is not None:
            source = SubsetSource(source, chunks)
        return source


class LocalChunks:
    """This process's chunk files of one job, and random access to their samples.

    A `ParquetRef`'s chunks (row groups) are fetched by its source into this process's
    private folder, as the engine fetches them, and read back through that source.

    Args:
        ref: the job (or the Parquet data).
    """

    def __init__(self, ref: JobRef | ParquetRef) -> None:
        self.ref = ref
        self.pid = os.getpid()
        self._source: Source | None = None  # a Parquet ref's, made on first use
        self._dir: Path | None = None
        self._paths: dict[int, Path] = {}
        self._bypass = False  # the shared cache's disk failed: download privately
        self._open: OrderedDict[int, tuple[ChunkReader, Sequence[Record]]] = OrderedDict()
        self._by_index = {c.index: c for c in ref.manifest.chunks}
        self._chunk_order = [c.index for c in ref.manifest.chunks]
        self._starts: list[int] = []
        total = 0
        for c in ref.manifest.chunks:
            self._starts.append(total)
            total += c.num_images
        self.num_images = total

    # ---- positions ----------------------------------------------------------------------
    def locate(self, index: int) -> tuple[int, int]:
        """(chunk index, row within the chunk) of dataset position `index`."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_images}")
        pos = bisect.bisect_right(self._starts, index) - 1
        return self._chunk_order[pos], index - self._starts[pos]

    def first_index(self, chunk: int) -> int:
        """The dataset position of a chunk's first sample."""
        return self._starts[self._chunk_order.index(chunk)]

    # ---- files --------------------------------------------------------------------------
    def path(self, chunk: int) -> Path:
        """A local, verified file of `chunk`, downloaded at most once by this process."""
        path = self._paths.get(chunk)
        if path is None and not isinstance(self.ref, JobRef):
            path, _ = self._parquet().fetch(chunk, self._private_dir())
            self._paths[chunk] = path
        if path is None:
            assert isinstance(self.ref, JobRef)
            info = self._by_index[chunk]
            # A connection per chunk, closed at once: chunks are large and fetched once, and
            # no socket is left for garbage collection (or a forked child) to deal with.
            with self.ref.client() as client:
                if self.ref.is_local:
                    # A store chunk is read in place after its sha256 check: no folder needed.
                    path = client.fetch_chunk(info, Path(tempfile.gettempdir()))
                elif self.ref.cache_dir is not None:
                    path = self._fetch_shared(client, info)  # the shared cache
                else:
                    path = client.fetch_chunk(info, self._private_dir())
            self._paths[chunk] = path
        return path

    def open(self, chunk: int) -> tuple[ChunkReader, Sequence[Record]]:
        """The open archive of `chunk` and its records, in dataset order."""
        entry = self._open.get(chunk)
        if entry is not None:
            self._open.move_to_end(chunk)
            return entry
        path = self.path(chunk)
        if isinstance(self.ref, JobRef) and self.ref.cache_dir is not None and not path.exists():
            # Evicted from the shared cache (or cleared) since this process fetched it.
            del self._paths[chunk]
            path = self.path(chunk)
        if not isinstance(self.ref, JobRef):
            source = self._parquet()
            return self._keep(chunk, (source.opener().open(str(path)), source.records(chunk, path)))
        records = read_zip_manifest(path, chunk, self.first_index(chunk))
        if len(records) != self._by_index[chunk].num_images:
            from pixcrawler_engine._errors import DecompressionError

            raise DecompressionError(
                f"chunk {chunk}: manifest.jsonl lists {len(records)} samples but the job says "
                f"{self._by_index[chunk].num_images}; reload the dataset (the job changed)",
                chunk_id=chunk,
            )
        return self._keep(chunk, (ZipOpener().open(str(path)), records))

    def _keep(
        self, chunk: int, entry: tuple[ChunkReader, Sequence[Record]]
    ) -> tuple[ChunkReader, Sequence[Record]]:
        self._open[chunk] = entry
        while len(self._open) > OPEN_CHUNKS:
            _, (reader, _) = self._open.popitem(last=False)
            reader.close()
        return entry

    def sample(self, index: int) -> tuple[bytes | memoryview, Record]:
        """The encoded bytes and the record of dataset position `index`."""
        chunk, row = self.locate(index)
        reader, records = self.open(chunk)
        record = records[row]
        return reader.read(record.ref), record

    def close(self) -> None:
        """Closes the open archives; downloaded files stay until the process ends."""
        while self._open:
            _, (reader, _) = self._open.popitem()
            with contextlib.suppress(Exception):
                reader.close()
        if self._source is not None:
            self._source.close()
            self._source = None

    def __del__(self) -> None:
        # Parquet rows files are plain open files: close them with the cache (this process's).
        if os.getpid() == getattr(self, "pid", None):
            with contextlib.suppress(Exception):
                self.close()

    def discard(self) -> None:
        """Closes everything and removes this cache's private folder now."""
        self.close()
        if self._dir is not None and os.getpid() == self.pid:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._paths.clear()

    # ---- internals ----------------------------------------------------------------------
    def _parquet(self) -> Source:
        if self._source is None:
            self._source = self.ref.source()
        return self._source

    def _private_dir(self) -> Path:
        if self._dir is None:
            _sweep_dead_dirs()
            self._dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
            # multiprocessing's finalizers also run when a DataLoader worker exits (atexit
            # does not); the pid check inside keeps forked children off the parent's folder.
            multiprocessing.util.Finalize(
                self, shutil.rmtree, args=(str(self._dir),), kwargs={"ignore_errors": True},
                exitpriority=10,
            )  # fmt: skip
        return self._dir

    def _fetch_shared(self, client: JobClient, info: ChunkInfo) -> Path:
        # The engine's disk cache: shared by processes and runs, one download per chunk.
        from pixcrawler_engine._errors import DownloadError
        from pixcrawler_engine.sources._cache import CacheWarning, disk_error

        assert isinstance(self.ref, JobRef)
        cache = self.ref.cache()
        if cache is None or self._bypass:
            return client.fetch_chunk(info, self._private_dir())
        manifest = self.ref.manifest
        try:
            return cache.fetch(
                manifest.version,
                info.sha256,
                info.size_bytes,
                lambda dest: Path(client.fetch_chunk(info, dest)),
                job_id=manifest.job_id,
            )
        except (DownloadError, OSError) as exc:
            cause = disk_error(exc)
            if cause is None:
                raise
            self._bypass = True  # one warning per process, then around the cache
            cache.drop_partial(manifest.version, info.sha256)
            warnings.warn(
                f"the chunk cache at {cache.root} cannot be written ({cause.strerror or cause}): "
                "this process downloads chunks into a temporary folder; free space there, or "
                "pass cache_dir= another folder (cache_dir=False: no cache)",
                CacheWarning,
                stacklevel=2,
            )
            return client.fetch_chunk(info, self._private_dir())


def _sweep_dead_dirs() -> None:
    """Removes chunk folders whose process is gone (killed before it could clean up)."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = _TMP_NAME.match(entry.name)
            if match is None or not entry.is_dir():
                continue
            pid = int(match.group(1))
            if pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)


def record_metadata(record: Record) -> dict[str, Any]:
    """The manifest fields of a sample other than `file` and `label`."""
    value = json.loads(record.metadata or "{}")
    return value if isinstance(value, dict) else {}
