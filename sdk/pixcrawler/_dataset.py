"""The user facade: the lazy `Dataset` that iterates and converts a job (see `_load`).

Every pass over the data (`__iter__`, `iter_batches`, `to_arrays`, a TensorFlow epoch...) is
one engine `Stream` (see `_passes`) and one epoch: with `shuffle=True` each has its own order
(see NOTE [epoch order] in `pixcrawler_engine.runtime._epoch`). Images handed out by
`__iter__` and `iter_batches` are read-only views of the engine's shared memory where possible
(`copy=True` makes them private, writable arrays): copy what you keep for long.
"""

from __future__ import annotations

import weakref
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcrawler._arrays import collect_arrays, collect_dataframe
from pixcrawler._chunks import JobRef
from pixcrawler._frameworks import Frameworks
from pixcrawler._info import DatasetInfo, format_bytes
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler._passes import ahead_modules, run_pass
from pixcrawler._rebatch import check_batch_size, rebatch
from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine.runtime._epoch import Share
from pixcrawler_engine.runtime._launch import Spare
from pixcrawler_engine.runtime._stream import Batch, Stream
from pixcrawler_engine.sources._base import Source

if TYPE_CHECKING:
    import pandas as pd


__all__ = ["Dataset"]


class Dataset(Frameworks):
    """A PixCrawler dataset, loaded lazily: iterate it, batch it, or convert it.

    Created by `load_dataset`. Usable as a context manager; `close()` stops passes still
    running. Each pass over the data decodes it afresh and is one epoch: in dataset order, or
    with `shuffle=True` in the order of (seed, epoch). The epoch advances by one per pass;
    `set_epoch(n)` sets the next pass's.
    """

    def __init__(
        self,
        ref: JobRef | ParquetRef,
        *,
        config: EngineConfig,
        policy: DecodePolicy,
        progress: bool = True,
        copy: bool = False,
    ) -> None:
        self._ref = ref
        self._copy = copy
        self._epoch = 0
        self._config = config
        self._policy = policy
        self._progress = progress
        self._info = DatasetInfo.from_manifest(ref.manifest)
        self._streams: weakref.WeakSet[Stream] = weakref.WeakSet()
        # The next pass's supervisor: the last pass's, parked, or one started ahead (NOTE
        # [parked] and NOTE [spare] in `runtime._launch`).
        self._spare = Spare(enabled=config.warm_start)
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

    @property
    def epoch(self) -> int:
        """The epoch of the next pass (it seeds the shuffle's order)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the next pass; later passes go on from it, one each.

        As with `DistributedSampler.set_epoch`: call it with the same value on every rank
        (and in every process) so that all agree on the order.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch = epoch

    def next_epoch(self) -> int:
        """The epoch for a pass starting now; the next pass gets the one after."""
        epoch, self._epoch = self._epoch, self._epoch + 1
        return epoch

    def __repr__(self) -> str:
        return (
            f"Dataset(job_id={self._info.job_id!r}, num_images={self.num_images}, "
            f"num_chunks={self.num_chunks}, size={format_bytes(self._info.size_bytes)!r})"
        )

    # ---- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        """Stops every pass still running and releases their processes and memory."""
        self._closed = True
        self._spare.close()
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
            - image: numpy array (H, W, C), uint8, read-only (copy it to modify or keep it,
              or load the dataset with `copy=True`)
            - label: label data (str, int, dict, etc.)

        Example:
            >>> for image, label in dataset:
            ...     process(image, label)
        """
        copy = self._copy
        for batch in self.iter_engine_batches(desc="images"):
            images = batch.images
            for i, label in enumerate(batch.labels):
                yield (np.array(images[i]) if copy else images[i]), label

    def iter_batches(
        self,
        batch_size: int = 32,
        drop_last: bool = False,
        *,
        start: int = 0,
        copy: bool | None = None,
    ) -> Iterator[tuple[np.ndarray, list[Any]]]:
        """Iterate through dataset in batches.

        Batches are read-only views of the engine's memory when they lie inside one engine
        batch (`batch_rows`), else copied once.

        Args:
            batch_size: Number of images per batch.
            drop_last: Drop last incomplete batch.
            start: Skip the first `start` images of this epoch's order without decoding them
                (resume a pass: `set_epoch(epoch)`, then `start=` the images already used).
            copy: Hand out private, writable arrays (one copy per batch); default the
                dataset's `copy` (False: zero-copy views).

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
        check_batch_size(batch_size)
        copy = self._copy if copy is None else copy
        # No engine batch spans two runs of `step` images of the order, a multiple of
        # `batch_size` that fits in one: a batch is then a view of one engine batch unless it
        # spans two chunks (or refills a skipped image). Cut at every chunk's end instead,
        # the engine's batches shifted each later batch across two of them, to be copied
        # (16 of the 24 batches of 1,500 photos in chunks of 500).
        engine_rows = self._config.rows_for(self._policy.fixed_shape)
        step = batch_size * max(1, engine_rows // batch_size)
        batches = self.iter_engine_batches(desc="images", start=start, step=step)
        for rows in rebatch(batches, batch_size, drop_last=drop_last, shape=None, extract=_labels):
            owned = rows.owner is not None  # assembled from pieces: already a private copy
            yield (np.array(rows.images) if copy and not owned else rows.images), rows.columns[0]

    def iter_engine_batches(
        self,
        *,
        desc: str | None = None,
        start: int = 0,
        step: int = 1,
        share: Share | None = None,
    ) -> Iterator[Batch]:
        """The engine's batches of one pass (one epoch), as they arrive.

        Args:
            desc: the progress bar's label; None shows no bar.
            start: images of the epoch's order to skip (see `iter_batches`).
            step: no engine batch spans two runs of `step` images of the order (from `start`).
            share: the part of an epoch to deliver (ranks, resume: see
                `pixcrawler_engine.runtime._epoch.Share`); default this pass's epoch from
                `start` on. Given, the dataset's epoch does not advance.
        """
        if share is None:
            if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(self):
                raise ValueError(
                    f"start={start!r} is not a place in an epoch of {len(self)} images: pass "
                    f"an int from 0 to {len(self)} (the images of the epoch already used)"
                )
            share = Share(epoch=self.next_epoch(), start=start, step=step)
        return self._run(self._ref.source(), self._config, desc=desc, share=share)

    def _launch_ahead(self) -> None:
        """Launches the next pass's supervisor now (NOTE [spare] in `runtime._launch`).

        For what is made to be iterated: `to_tensorflow()`, whose own set-up (TensorFlow
        traces its pipeline, ~0.1 s) then overlaps the engine's start-up. Does nothing with
        `warm_start=False`, or when a supervisor waits already.
        """
        if self._closed:
            return
        source = self._ref.source()
        try:
            self._spare.refill(ahead_modules(source, self._config))
        finally:
            source.close()

    def _one_off(self, desc: str) -> Iterator[Batch]:
        """A pass for a conversion: an epoch like any, but no spare is launched after it."""
        share = Share(epoch=self.next_epoch())
        return self._run(self._ref.source(), self._config, desc=desc, share=share, ahead=False)

    def _run(
        self,
        source: Source,
        config: EngineConfig,
        *,
        desc: str | None,
        policy: DecodePolicy | None = None,
        share: Share | None = None,
        ahead: bool = True,
    ) -> Iterator[Batch]:
        if self._closed:
            raise ValueError("this dataset is closed; load it again with load_dataset()")
        return run_pass(
            source,
            config,
            policy or self._policy,
            share or Share(),
            self._streams,
            lambda total: self.progress_bar(total, desc),
            self._spare,
            ahead=ahead,
        )

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
        batches = self._one_off("to_arrays")
        return collect_arrays(batches, self.num_images, self._policy.fixed_shape, max_bytes)

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
        batches = self._one_off("to_dataframe")
        return collect_dataframe(batches, self.num_images, self._policy.fixed_shape, max_bytes)

    # ---- for the adapters -------------------------------------------------------------
    @property
    def ref(self) -> JobRef | ParquetRef:
        """The picklable address of the job (manifest, URL, key) for other processes."""
        return self._ref

    def run(
        self,
        chunks: list[int] | None,
        config: EngineConfig,
        *,
        desc: str | None = None,
        policy: DecodePolicy | None = None,
    ) -> Generator[Batch, None, None]:
        """One engine pass over some chunks (all when None) with the given settings."""
        yield from self._run(self._ref.source(chunks), config, desc=desc, policy=policy)


def _labels(batch: Batch) -> tuple[list[Any]]:
    return (batch.labels,)
