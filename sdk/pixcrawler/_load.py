"""`load_dataset`: a job id or a Parquet address, credentials and decode options become a `Dataset`.

It reads the job manifest (or the Parquet footers) and nothing else; the data moves only when
the `Dataset` is iterated or converted.
"""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit

from pixcrawler._cache_choice import job_cache, store_stamps
from pixcrawler._chunks import Credential, JobRef
from pixcrawler._dataset import Dataset
from pixcrawler._parquet_ref import ParquetRef, is_parquet_address, local_lookalike
from pixcrawler._server_keys import is_loopback
from pixcrawler_engine._config import ColorMode, DecodePolicy, EngineConfig, OnError, ResizeMode
from pixcrawler_engine._errors import AuthenticationError, NotFoundError
from pixcrawler_engine.sources._jobapi import JobClient

__all__ = ["DEFAULT_BASE_URL", "ENV_API_KEY", "ENV_BASE_URL", "load_dataset"]

DEFAULT_BASE_URL = "https://api.pixcrawler.com"


ENV_API_KEY = "PIXCRAWLER_API_KEY"


ENV_BASE_URL = "PIXCRAWLER_BASE_URL"


_SCHEMES = ("http", "https", "file")


def load_dataset(
    job_id: str | os.PathLike[str],
    api_key: str | None = None,
    base_url: str | None = None,
    max_workers: int = 4,
    timeout: float = 300,
    verify_ssl: bool | str = True,
    *,
    num_workers: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    resize: ResizeMode = "stretch",
    color: ColorMode = "RGB",
    shuffle: bool = False,
    seed: int = 0,
    shuffle_window: int = 8,
    on_error: OnError = "raise",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | bool | None = None,
    cache_limit: int | None = None,
    batch_rows: int | None = None,
    source: Literal["job", "parquet"] | None = None,
    copy: bool = False,
    warm_start: bool = True,
) -> Dataset:
    """Load a PixCrawler dataset (or Hugging Face-style Parquet shards) with lazy loading.

    Only the job manifest (the Parquet footers) is read here; chunks (row groups) are
    downloaded and decoded when the dataset is iterated or converted.

    Args:
        job_id: Job/dataset identifier, or a Parquet address: a `.parquet` file, a folder of
            them, a glob (`data/train-*.parquet`), a `file://` URL or an `http(s)://` URL of
            a `.parquet` file. Its rows are the images, one chunk per row group; `base_url`
            and `cache_dir` do not apply to it. A local path must say it is one (`./photos`,
            `/data/photos`, `~/photos`, `file://...` or a `.parquet` suffix): a bare
            `photos` is a job id, even when a folder of that name exists.
        api_key: PixCrawler API key; default: the `PIXCRAWLER_API_KEY` variable. A
            `file://` store needs none. For a Parquet URL, a bearer token sent to its
            origin (a private Hugging Face dataset); only one passed here is sent.
        base_url: API base URL, or `file:///path/to/store` for a local job store; default:
            the `PIXCRAWLER_BASE_URL` variable, else `https://api.pixcrawler.com`.
        max_workers: Number of parallel chunk downloads.
        timeout: Seconds a request may go without progress.
        verify_ssl: Verify SSL certificates (or the path of a CA bundle to trust).
        num_workers: Decode processes; default one per CPU core.
        image_size: Output size, `(height, width)` or an int for a square; default: each
            image keeps its own size.
        resize: How images reach `image_size`: `stretch`, `crop` (cover and centre-crop),
            `pad` (fit inside, zero padding) or `fit` (fit inside, keep the aspect ratio).
        color: `RGB` (3 channels), `L` (grayscale, 1 channel) or `keep` (as stored).
        shuffle: Shuffle every pass (epoch) in its own order: a block shuffle that mixes the
            samples of `shuffle_window` chunks at a time. The order depends only on the seed
            and the epoch (`Dataset.set_epoch`), not on num_workers or ranks.
        seed: Seed of the shuffle.
        shuffle_window: Chunks whose samples the shuffle mixes: their files are on disk
            together (about `shuffle_window` x the chunk size, compressed), and an epoch's
            first batch waits for all of them. 1 mixes only within each chunk.
        on_error: A corrupt image `raise`s (default), is `skip`ped, or skipped with a `warn`ing.
        progress: Show a progress bar for whole passes over the data.
        cache_dir: Where verified chunks are kept between passes, runs and processes (one
            download per machine); default: `$PIXCRAWLER_CACHE`, else
            `$XDG_CACHE_HOME/pixcrawler`, else `~/.cache/pixcrawler`. `False` downloads into
            a temporary folder per pass instead. A `file://` store is read in place, uncached.
            A folder that cannot be written gives a `CacheWarning` and no cache.
        cache_limit: Bytes the cache may hold (default 10 GiB); the least recently used
            chunks go first. It must hold at least the job's largest chunk.
        batch_rows: Images per engine batch (the unit of transfer from the decoders); by
            default 64, or more for small images (up to 1 MiB of pixels, 1,024 images).
        source: `"job"` or `"parquet"` to say what `job_id` is; default: a job id unless
            it is a Parquet address as described above.
        copy: Hand out private, writable arrays from iteration (one copy per batch) instead
            of read-only views of the engine's shared memory (zero-copy, the default).
        warm_start: Keep a pass's engine processes (its supervisor and decoder zygote, idle
            between passes) for the next pass, so that epochs after the first skip their
            start-up; `False` starts them when each pass begins.

    Returns:
        Dataset object for iteration and conversion.

    Raises:
        AuthenticationError: Invalid API key (or none given for an HTTP API).
        NotFoundError: Job not found.
        JobNotCompleteError: Job still processing; `.progress` says how far it is.
        NetworkError: The API could not be reached.
        ValueError: An unsupported URL scheme or a bad option (a `cache_limit` smaller than
            a chunk); the message says what works.

    Example:
        >>> dataset = load_dataset("job_123", api_key="key")
        >>> for image, label in dataset:
        ...     print(image.shape)
    """
    if source not in (None, "job", "parquet"):
        raise ValueError(f"source must be 'job', 'parquet' or None, got {source!r}")
    parquet = source == "parquet" or (source is None and is_parquet_address(job_id))
    key = api_key if api_key is not None else os.environ.get(ENV_API_KEY) or None
    url = base_url if base_url is not None else os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    if scheme not in _SCHEMES and not parquet:
        raise ValueError(
            f"unsupported base_url {url!r}: use https://host (the PixCrawler API), http://host "
            "(a local `pixcrawler serve`) or file:///path/to/store (a local job store)"
        )
    policy = DecodePolicy(
        image_size=_image_size(image_size), resize=resize, color=color, on_error=on_error
    )
    config = EngineConfig(
        num_workers=num_workers,
        max_workers=max_workers,
        batch_rows=batch_rows,
        timeout=timeout,
        verify_ssl=verify_ssl,
        shuffle=shuffle,
        seed=seed,
        shuffle_window=shuffle_window,
        cache_dir=os.fspath(cache_dir) if isinstance(cache_dir, (str, os.PathLike)) else None,
        warm_start=warm_start,
    )
    if cache_limit is not None:
        config = config.replace(cache_limit_bytes=cache_limit)
    if parquet:
        ref: JobRef | ParquetRef = ParquetRef.open(
            job_id, token=api_key, timeout=config.timeout, verify_ssl=verify_ssl
        )
        return Dataset(ref, config=config, policy=policy, progress=progress, copy=copy)
    if not isinstance(job_id, str):
        raise ValueError(f"job_id must be a job id string or a Parquet address, got {job_id!r}")
    if key is None and scheme != "file" and not is_loopback(urlsplit(url).hostname or ""):
        # A server on this machine may run without keys (`pixcrawler serve` on loopback).
        raise AuthenticationError(
            f"no API key for {url}: pass api_key='...' to load_dataset or set the "
            f"{ENV_API_KEY} environment variable"
        )
    with JobClient.from_config(url, key, config) as client:
        try:
            manifest = client.get_job(job_id)
        except NotFoundError as exc:
            note = local_lookalike(job_id)
            if note is None:
                raise
            raise NotFoundError(f"{exc}{note}") from exc
    cache = None if scheme == "file" else job_cache(cache_dir, config.cache_limit_bytes, manifest)
    config = config.replace(cache_dir=None if cache is None else os.fspath(cache.root))
    ref = JobRef(
        base_url=url,
        credential=Credential(key),
        timeout=config.timeout,
        verify_ssl=verify_ssl,
        manifest=manifest,
        cache_dir=config.cache_dir,
        cache_limit_bytes=config.cache_limit_bytes,
        store_stamps=store_stamps(cache_dir) if scheme == "file" else None,
    )
    return Dataset(ref, config=config, policy=policy, progress=progress, copy=copy)


def _image_size(value: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)):
        return tuple(value)  # type: ignore[return-value]  # DecodePolicy checks the rest
    raise ValueError(
        f"image_size must be (height, width) or an int for a square, got {value!r}; "
        "for example image_size=224 or image_size=(224, 224)"
    )
