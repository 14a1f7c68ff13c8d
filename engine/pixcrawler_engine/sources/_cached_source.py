"""`CachedSource`: a job source whose chunk downloads go through the shared `ChunkCache`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pixcrawler_engine._errors import DownloadError
from pixcrawler_engine.sources._base import SourceWrapper
from pixcrawler_engine.sources._cache import ChunkCache, disk_error

__all__ = ["CachedSource"]

_log = logging.getLogger("pixcrawler_engine.cache")


class CachedSource(SourceWrapper):
    """A `JobSource` whose chunk downloads go through a `ChunkCache`.

    Chunks that are already local (a `file://` store) are read in place and never copied into
    the cache. A cached chunk is returned as not owned by the run, so the run never deletes it.
    When the cache's disk refuses a write (full, read-only), the chunk is downloaded into the
    run's own folder instead and one warning is logged per run.

    Args:
        source: a `JobSource` (anything with `.manifest` and `._client.fetch_chunk`).
        cache: the cache.
    """

    def __init__(self, source: Any, cache: ChunkCache) -> None:
        super().__init__(source)
        self._job = source  # a JobSource: its client fetches into the cache
        self.cache = cache
        self.manifest = source.manifest
        self._by_index = {c.index: c for c in source.manifest.chunks}
        self._bypass = False  # the cache's disk failed once: the rest of the run goes around it

    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        info = self._by_index[chunk]
        if info.url.lower().startswith("file:") or self._bypass:
            return self.source.fetch(chunk, workdir)
        try:
            path = self.cache.fetch(
                self.manifest.version,
                info.sha256,
                info.size_bytes,
                lambda dest: Path(self._job._client.fetch_chunk(info, dest)),
                job_id=self.manifest.job_id,
            )
        except (DownloadError, OSError) as exc:
            cause = disk_error(exc)
            if cause is None:
                raise
            self._bypass = True
            self.cache.drop_partial(self.manifest.version, info.sha256)
            _log.warning(
                "the chunk cache at %s cannot be written (%s): this run downloads its chunks "
                "into a temporary folder; free space there, or pass cache_dir= another folder "
                "(cache_dir=False: no cache)",
                self.cache.root,
                cause.strerror or cause,
            )
            return self.source.fetch(chunk, workdir)
        return path, False
