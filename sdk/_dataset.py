"""The user facade: `load_dataset` and the lazy `Dataset` that iterates and converts a job.

`load_dataset` reads the job manifest and nothing else. Every pass over the data (`__iter__`,
`iter_batches`, `to_arrays`, `to_dataframe`, a TensorFlow epoch) starts its own engine
`Stream` (a supervisor process with decode workers, see `pixcrawler.engine._stream`) and closes
it when the pass ends or is abandoned; the `Dataset` tracks the passes still running and
`close()` stops them. Images handed out by `__iter__` and `iter_batches` are read-only views
of the engine's shared memory where possible: copy what you keep for long.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload
from urllib.parse import urlsplit

import numpy as np

from pixcrawler._arrays import check_size, concat, label_array, memory_limit, stack_images
from pixcrawler._chunks import Credential, JobRef
from pixcrawler._info import DatasetInfo, format_bytes
from pixcrawler._parquet_ref import ParquetRef, is_parquet_address
from pixcrawler.engine._config import ColorMode, DecodePolicy, EngineConfig, OnError, ResizeMode
from pixcrawler.engine._errors import AuthenticationError
from pixcrawler.engine._jobapi import JobClient
from pixcrawler.engine._sources import Source
from pixcrawler.engine._stream import Batch, Stream

if TYPE_CHECKING:
    import pandas as pd
    import tensorflow as tf

    from pixcrawler._torch import TorchDataset, TorchIterableDataset

__all__ = ["DEFAULT_BASE_URL", "Dataset", "load_dataset"]

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
    on_error: OnError = "raise",
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_rows: int = 64,
) -> Dataset:
    """Load a PixCrawler dataset (or Hugging Face-style Parquet shards) with lazy loading.

    Only the job manifest (the Parquet footers) is read here; chunks (row groups) are
    downloaded and decoded when the dataset is iterated or converted.

    Args:
        job_id: Job/dataset identifier, or a Parquet address: a `.parquet` file, a folder of
            them, a glob (`data/train-*.parquet`), a `file://` URL or an `http(s)://` URL of
            a `.parquet` file. Its rows are the images, one chunk per row group; `base_url`
            and `cache_dir` do not apply to it.
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
        shuffle: Shuffle chunk order and samples within chunks, on every pass.
        seed: Seed of the shuffle.
        on_error: A corrupt image `raise`s (default), is `skip`ped, or skipped with a `warn`ing.
        progress: Show a progress bar for whole passes over the data.
        cache_dir: Keep downloaded chunks here between runs; default: a temporary folder.
        batch_rows: Images per engine batch (the unit of transfer from the decoders).

    Returns:
        Dataset object for iteration and conversion.

    Raises:
        AuthenticationError: Invalid API key (or none given for an HTTP API).
        NotFoundError: Job not found.
        JobNotCompleteError: Job still processing; `.progress` says how far it is.
        NetworkError: The API could not be reached.
        ValueError: An unsupported URL scheme or a bad option; the message says what works.

    Example:
        >>> dataset = load_dataset("job_123", api_key="key")
        >>> for image, label in dataset:
        ...     print(image.shape)
    """
    parquet = is_parquet_address(job_id)
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
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
    )
    if parquet:
        ref: JobRef | ParquetRef = ParquetRef.open(
            job_id, token=api_key, timeout=config.timeout, verify_ssl=verify_ssl
        )
        return Dataset(ref, config=config, policy=policy, progress=progress)
    if not isinstance(job_id, str):
        raise ValueError(f"job_id must be a job id string or a Parquet address, got {job_id!r}")
    if key is None and scheme != "file":
        raise AuthenticationError(
            f"no API key for {url}: pass api_key='...' to load_dataset or set the "
            f"{ENV_API_KEY} environment variable"
        )
    with JobClient.from_config(url, key, config) as client:
        manifest = client.get_job(job_id)
    ref = JobRef(
        base_url=url,
        credential=Credential(key),
        timeout=config.timeout,
        verify_ssl=verify_ssl,
        manifest=manifest,
        cache_dir=config.cache_dir,
    )
    return Dataset(ref, config=config, policy=policy, progress=progress)


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


class Dataset:
    """A PixCrawler dataset, loaded lazily: iterate it, batch it, or convert it.

    Created by `load_dataset`. Usable as a context manager; `close()` stops passes still
    running. Each pass over the data decodes it afresh, in dataset order (or the seeded
    shuffle order).
    """

    def __init__(
        self,
        ref: JobRef | ParquetRef,
        *,
        config: EngineConfig,
        policy: DecodePolicy,
        progress: bool = True,
    ) -> None:
        self._ref = ref
        self._config = config
        self._policy = policy
        self._progress = progress
        self._info = DatasetInfo.from_manifest(ref.manifest)
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        self._closed = False

    # ---- metadata ---------------------------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        """Get dataset metadata and statistics."""
        return self._info

    @property
    def num_images(self) -> int:
        """Total number of images in dataset."""
        return self._info.num_images

    @property
    def num_chunks(self) -> int:
        """Total number of chunks."""
        return self._info.num_chunks

    @property
    def chunk_size(self) -> int:
        """Images per chunk (typically 500)."""
        return self._info.chunk_size

    @property
    def policy(self) -> DecodePolicy:
        """How images are decoded (size, resize mode, color, error handling)."""
        return self._policy

    @property
    def config(self) -> EngineConfig:
        """The engine settings every pass uses."""
        return self._config

    def __len__(self) -> int:
        return self._info.num_images

    def __repr__(self) -> str:
        return (
            f"Dataset(job_id={self._info.job_id!r}, num_images={self.num_images}, "
            f"num_chunks={self.num_chunks}, size={format_bytes(self._info.size_bytes)!r})"
        )

    # ---- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Stops every pass still running and releases their processes and memory."""
        self._closed = True
        for stream in list(self._streams):
            stream.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        """Iterate through dataset one image at a time.

        Yields:
            Tuple of (image, label) where:
            - image: numpy array (H, W, C), uint8, read-only (copy it to modify or keep it)
            - label: label data (str, int, dict, etc.)

        Example:
            >>> for image, label in dataset:
            ...     process(image, label)
        """
        for batch in self.iter_engine_batches(desc="images"):
            images = batch.images
            for i, label in enumerate(batch.labels):
                yield images[i], label

    def iter_batches(
        self, batch_size: int = 32, drop_last: bool = False
    ) -> Iterator[tuple[np.ndarray, list[Any]]]:
        """Iterate through dataset in batches.

        Batches are views of the engine's memory when they lie inside one engine batch
        (`batch_rows`), else copies.

        Args:
            batch_size: Number of images per batch.
            drop_last: Drop last incomplete batch.

        Yields:
            Tuple of (images, labels) where:
            - images: numpy array (B, H, W, C)
            - labels: list of labels

        Raises:
            ValueError: The images differ in size (pass `image_size=` to `load_dataset`).

        Example:
            >>> for images, labels in dataset.iter_batches(batch_size=64):
            ...     train_model(images, labels)
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        parts: list[np.ndarray] = []
        labels: list[Any] = []
        for batch in self.iter_engine_batches(desc="images"):
            images = stack_images(batch.images, parts[0].shape[1:] if parts else None)
            batch_labels = batch.labels
            start, n = 0, len(batch_labels)
            while start < n:
                take = min(batch_size - len(labels), n - start)
                if not parts and take == batch_size:
                    # A whole batch inside one engine batch: hand out the view, no copy.
                    yield images[start : start + take], batch_labels[start : start + take]
                else:
                    # A copy: the piece may outlive its engine batch (and the pass, for the
                    # last one), and it is copied into the joined batch anyway.
                    parts.append(images[start : start + take].copy())
                    labels.extend(batch_labels[start : start + take])
                    if len(labels) == batch_size:
                        yield concat(parts), labels
                        parts, labels = [], []
                start += take
        if labels and not drop_last:
            yield concat(parts), labels

    def iter_engine_batches(self, *, desc: str | None = None) -> Iterator[Batch]:
        """The engine's batches of one pass, as they arrive (see `pixcrawler.engine.Batch`).

        Args:
            desc: the progress bar's label; None shows no bar.
        """
        yield from self._run(self._ref.source(), self._config, desc=desc)

    def _run(self, source: Source, config: EngineConfig, *, desc: str | None) -> Iterator[Batch]:
        if self._closed:
            raise ValueError("this dataset is closed; load it again with load_dataset()")
        total = sum(p.num_records for p in source.plan())
        if total == 0:
            source.close()
            return
        bar = self.progress_bar(total, desc)
        try:
            stream = Stream(source, config=config, policy=self._policy)
        finally:
            # The supervisor got its own copy of the source; this one's connection can go.
            source.close()
        self._streams.add(stream)
        try:
            for batch in stream:
                yield batch
                if bar is not None:
                    bar.update(len(batch))
        finally:
            stream.close()
            self._streams.discard(stream)
            if bar is not None:
                bar.close()

    def progress_bar(self, total: int, desc: str | None) -> Any:
        """A tqdm bar for `total` images, or None when progress is off or `desc` is None."""
        if not self._progress or desc is None:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"{self._info.job_id}: {desc}", unit="img", leave=False)

    # ---- conversions ------------------------------------------------------------------
    def to_arrays(self, max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Load entire dataset into numpy arrays.

        Warning: Loads all data into memory. Use only for small datasets. The size is
        checked before anything is allocated.

        Args:
            max_bytes: The most bytes `X` may take; default half the memory available now.

        Returns:
            Tuple of (X, y) where:
            - X: images array (N, H, W, C), uint8
            - y: labels array (N,): str or int labels as such, others as objects

        Raises:
            MemoryError: `X` would exceed `max_bytes` (nothing was allocated).
            ValueError: The images differ in size (pass `image_size=` to `load_dataset`).

        Example:
            >>> X, y = dataset.to_arrays()
            >>> X_train, X_test, y_train, y_test = train_test_split(X, y)
        """
        limit = memory_limit(max_bytes)
        fixed = self._policy.fixed_shape
        if fixed is not None:
            check_size(self.num_images, int(np.prod(fixed)), limit, fixed)
        x: np.ndarray | None = None
        labels: list[Any] = []
        for batch in self.iter_engine_batches(desc="to_arrays"):
            if x is None:
                images0 = batch.images
                shape = images0.shape[1:] if isinstance(images0, np.ndarray) else images0[0].shape
                check_size(self.num_images, int(np.prod(shape)), limit, shape)
                x = np.empty((self.num_images, *shape), dtype=np.uint8)
            n = len(labels)
            images = stack_images(batch.images, x.shape[1:])
            x[n : n + len(images)] = images
            labels.extend(batch.labels)
        if x is None:
            x = np.empty((0, 0, 0, 0), dtype=np.uint8)
        return x[: len(labels)], label_array(labels)

    def to_dataframe(self, max_bytes: int | None = None) -> pd.DataFrame:
        """Convert dataset to pandas DataFrame.

        Args:
            max_bytes: The most bytes the images may take; default half the memory
                available now.

        Returns:
            DataFrame with columns:
            - image: numpy array (H, W, C), a copy
            - label: label data
            - metadata: dict of additional info (the job manifest's fields)
            - key, height, width: the sample's name in its chunk and the image's size

        Raises:
            MemoryError: The images would exceed `max_bytes`.

        Example:
            >>> df = dataset.to_dataframe()
            >>> df.head()
        """
        import pandas as pd

        limit = memory_limit(max_bytes)
        fixed = self._policy.fixed_shape
        if fixed is not None:
            check_size(self.num_images, int(np.prod(fixed)), limit, fixed)
        images = np.empty(self.num_images, dtype=object)
        columns: dict[str, list[Any]] = {"label": [], "metadata": [], "key": []}
        sizes: list[tuple[int, int]] = []
        used = 0
        for batch in self.iter_engine_batches(desc="to_dataframe"):
            for image in batch.images:
                used += image.nbytes
                if used > limit:  # variable sizes: known only as they arrive
                    check_size(self.num_images, used // max(1, len(sizes)), limit, None)
                images[len(sizes)] = np.array(image)  # a copy: the row outlives the batch
                sizes.append(image.shape[:2])
            columns["label"].extend(batch.labels)
            columns["metadata"].extend(batch.metadata)
            columns["key"].extend(batch.keys)
        n = len(sizes)
        return pd.DataFrame(
            {
                "image": images[:n],
                "label": columns["label"],
                "metadata": columns["metadata"],
                "key": columns["key"],
                "height": np.array([s[0] for s in sizes], dtype=np.int64),
                "width": np.array([s[1] for s in sizes], dtype=np.int64),
            }
        )

    @overload
    def to_torch(
        self,
        transform: Callable[[np.ndarray], Any] | None = None,
        *,
        iterable: Literal[False] = False,
    ) -> TorchDataset: ...

    @overload
    def to_torch(
        self, transform: Callable[[np.ndarray], Any] | None = None, *, iterable: Literal[True]
    ) -> TorchIterableDataset: ...

    @overload
    def to_torch(
        self, transform: Callable[[np.ndarray], Any] | None = None, *, iterable: bool = False
    ) -> TorchDataset | TorchIterableDataset: ...

    def to_torch(
        self, transform: Callable[[np.ndarray], Any] | None = None, *, iterable: bool = False
    ) -> TorchDataset | TorchIterableDataset:
        """Convert to PyTorch Dataset.

        The map-style form (default) reads single images from a per-process chunk cache, so
        `len()`, indexing, `random_split` and `DataLoader(shuffle=True, num_workers=...)`
        work. The iterable form streams through the engine and shards chunks across
        DataLoader workers and `torch.distributed` ranks. Both give `(image, label)`.

        Args:
            transform: Optional transform function, called with the (H, W, C) uint8 array;
                without one, images become float tensors (C, H, W) in [0, 1].
            iterable: Return a `torch.utils.data.IterableDataset` instead.

        Returns:
            PyTorch Dataset object; labels are class indices for the job's string labels.

        Example:
            >>> from torchvision import transforms
            >>> transform = transforms.Compose([
            ...     transforms.ToTensor(),
            ...     transforms.Normalize(mean=[0.5], std=[0.5])
            ... ])
            >>> torch_dataset = dataset.to_torch(transform=transform)
            >>> dataloader = DataLoader(torch_dataset, batch_size=32)
        """
        from pixcrawler._loaders import to_torch

        return to_torch(self, transform, iterable=iterable)

    def to_tensorflow(self) -> tf.data.Dataset:
        """Convert to TensorFlow Dataset.

        Returns:
            TensorFlow Dataset object of `(image, label)`: uint8 (H, W, C) images (a
            dimension is None when it varies) and int64 class indices for string labels.

        Example:
            >>> tf_dataset = dataset.to_tensorflow()
            >>> tf_dataset = tf_dataset.batch(32).prefetch(1)
            >>> model.fit(tf_dataset, epochs=10)
        """
        from pixcrawler._loaders import to_tensorflow

        return to_tensorflow(self)

    # ---- for the adapters -------------------------------------------------------------
    @property
    def ref(self) -> JobRef | ParquetRef:
        """The picklable address of the job (manifest, URL, key) for other processes."""
        return self._ref

    def run(
        self, chunks: list[int] | None, config: EngineConfig, *, desc: str | None = None
    ) -> Iterator[Batch]:
        """One engine pass over some chunks (all when None) with the given settings."""
        yield from self._run(self._ref.source(chunks), config, desc=desc)
