"""Which chunk cache a `load_dataset` of a job uses: the default folder, another, or none.

The checks happen here, once, before any data moves: a cache folder that cannot be written
gives one `CacheWarning` and the dataset runs uncached (as pip does with an unwritable cache);
a limit smaller than the job's largest chunk is a `ValueError`, since nothing could stay cached.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pixcrawler_engine.sources._cache import CacheWarning, ChunkCache, default_cache_dir
from pixcrawler_engine.sources._manifest import JobManifest

__all__ = ["cache_root", "job_cache", "store_stamps"]


def cache_root(cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """The cache folder `cache_dir` names (None or True: the default one), or None (False).

    Raises:
        ValueError: `cache_dir` is none of those.
    """
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    if isinstance(cache_dir, (str, os.PathLike)) and os.fspath(cache_dir):
        return Path(os.fspath(cache_dir)).expanduser()
    raise ValueError(
        f"cache_dir must be a folder, True (the default folder) or False (no cache), "
        f"got {cache_dir!r}"
    )


def store_stamps(cache_dir: str | os.PathLike[str] | bool | None) -> str | None:
    """Where a `file://` job's chunks, read in place, keep their stamps: in the cache folder
    (no chunk is copied there, and its limit does not apply), or None with `cache_dir=False`.
    A folder that cannot be written only means hashing the chunks again on every pass."""
    root = cache_root(cache_dir)
    return None if root is None else os.fspath(ChunkCache(root).store_stamps)


def job_cache(
    cache_dir: str | os.PathLike[str] | bool | None, limit: int, manifest: JobManifest
) -> ChunkCache | None:
    """The cache for `manifest`'s chunks, or None (disabled, or not writable: warned).

    Args:
        cache_dir: None or True for the default folder, a path, or False for no cache.
        limit: the size limit in bytes.
        manifest: the job, whose largest chunk the limit must hold.

    Raises:
        ValueError: a bad `cache_dir` or `limit`, or a limit below the largest chunk.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"cache_limit must be a number of bytes >= 0, got {limit!r}")
    root = cache_root(cache_dir)
    if root is None:
        return None
    largest = max(manifest.chunks, key=lambda c: c.size_bytes, default=None)
    if largest is not None and limit < largest.size_bytes:
        raise ValueError(
            f"cache_limit={limit:,} bytes is smaller than chunk {largest.index} of job "
            f"{manifest.job_id!r} ({largest.size_bytes:,} bytes): no chunk could stay cached. "
            "Pass a larger cache_limit (the default is 10 GiB; the whole job is "
            f"{sum(c.size_bytes for c in manifest.chunks):,} bytes), or cache_dir=False to "
            "download into a temporary folder on every pass"
        )
    cache = ChunkCache(root, limit_bytes=limit)
    try:
        cache.check_writable()
    except OSError as exc:
        warnings.warn(
            f"the chunk cache folder {cache.root} cannot be written ({exc.strerror or exc}): "
            "this dataset downloads its chunks again on every pass. Set PIXCRAWLER_CACHE (or "
            "pass cache_dir=) to a writable folder, or cache_dir=False to silence this",
            CacheWarning,
            stacklevel=3,
        )
        return None
    return cache
