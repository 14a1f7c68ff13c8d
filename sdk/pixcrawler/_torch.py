"""PyTorch datasets over a PixCrawler job: map-style (random access) and iterable (streamed).

This module imports torch at the top; only `Dataset.to_torch` and the
unpickling of these datasets in DataLoader workers import it, so `import pixcrawler` stays
light. The classes live at module level because DataLoader workers started with `spawn` must
find them by name.

Both datasets hold a `JobRef` (the manifest and how to reach the job) or a `ParquetRef`,
never a live connection or open file, so they pickle cheaply into workers; each process
opens its own `LocalChunks` on first use. The API key crosses to workers through process
pipes only (see `Credential`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data

from pixcrawler._chunks import JobRef, LocalChunks, record_metadata
from pixcrawler._info import class_index
from pixcrawler._labels import LabelCoder
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler._rebatch import check_batch_size, count_batches, rebatch
from pixcrawler._torch_tensors import alloc, can_pin, images_tensor, pinned_alloc
from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode._image import decode_image
from pixcrawler_engine.runtime._chunk import decode_records
from pixcrawler_engine.runtime._stream import Batch, SampleWarning, Stream
from pixcrawler_engine.sources._record import Record

__all__ = ["TorchDataset", "TorchIterableDataset", "shard_chunks", "torch_dataset"]

Transform = Callable[[Any], Any]  # an (H, W, C) array, or a (B, H, W, C) tensor for batches


class _Output:
    """Turns a decoded image and its label into what the dataset returns."""

    def __init__(self, ref: JobRef | ParquetRef, transform: Transform | None) -> None:
        self.transform = transform
        self.class_to_idx = class_index(tuple(ref.manifest.labels))

    @property
    def classes(self) -> list[str]:
        return list(self.class_to_idx)

    def __call__(self, image: np.ndarray, label: Any) -> tuple[Any, Any]:
        if self.transform is not None:
            # Transforms may write into the array or hand it to torch.from_numpy: give them
            # a private, writable one rather than a view of shared memory.
            out = self.transform(image if image.flags.writeable else image.copy())
        else:
            # Like torchvision's ToTensor: (C, H, W) float32 in [0, 1].
            out = torch.from_numpy(np.array(image.transpose(2, 0, 1), dtype=np.float32))
            out.div_(255.0)
        if isinstance(label, str) and label in self.class_to_idx:
            label = self.class_to_idx[label]
        return out, label


class TorchDataset(torch.utils.data.Dataset[tuple[Any, ...]]):
    """A map-style dataset: `len()`, `dataset[i]`, `random_split`, shuffled DataLoaders.

    Each process fetches a chunk at most once (from the shared chunk cache, which downloads it
    once per machine, or into its own folder with `cache_dir=False`) and decodes only the
    image asked for. An image that cannot be decoded follows `on_error`: `"raise"` raises
    `DecodeError`; `"skip"` returns the item of the next index that decodes instead (wrapping
    to 0 past the end), and `"warn"` does the same with a `SampleWarning` naming both indices.
    The replacement depends only on the index, so every DataLoader worker, epoch and run
    agrees; `len()` stays the job's image count, and the replacement appears twice an epoch.

    Attributes:
        class_to_idx: class name -> label index, in the job's `labels` order.
        classes: the class names, index order.
    """

    def __init__(
        self,
        ref: JobRef | ParquetRef,
        policy: DecodePolicy,
        transform: Transform | None,
        *,
        metadata: bool = False,
    ) -> None:
        self.ref = ref
        self.policy = policy
        self.transform = transform
        self.metadata = metadata
        self._output = _Output(ref, transform)
        self.class_to_idx = self._output.class_to_idx
        self.classes = self._output.classes
        self._len = sum(c.num_images for c in ref.manifest.chunks)
        self._cache: LocalChunks | None = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        index = int(index)
        if index < 0:
            index += self._len
        cache = self._chunk_cache()
        cache.locate(index)  # an IndexError for an index out of range, whatever on_error says
        image, record = self._decode(cache, index)
        item = self._output(image, record.label)
        if self.metadata:
            return (*item, {"key": record.key, **record_metadata(record)})
        return item

    def _decode(self, cache: LocalChunks, index: int) -> tuple[np.ndarray, Record]:
        """The image of `index`, or under skip/warn of the next index that decodes."""
        at = index
        for _ in range(self._len):
            try:
                return self._decode_at(cache, at)
            except DecodeError as exc:
                if self.policy.on_error == "raise":
                    raise
                after = (at + 1) % self._len
                if self.policy.on_error == "warn":
                    warnings.warn(
                        f"{exc}; index {index} gives the image of index {after} instead",
                        SampleWarning,
                        stacklevel=3,
                    )
                at = after
        raise DecodeError(
            f"none of the {self._len} images of job {self.ref.manifest.job_id!r} can be "
            f"decoded (on_error={self.policy.on_error!r} looked for a replacement of index "
            f"{index}); check the decode options or the job"
        )

    def _decode_at(self, cache: LocalChunks, index: int) -> tuple[np.ndarray, Record]:
        data, record = cache.sample(index)
        try:
            return decode_image(data, self.policy), record
        except DecodeError as exc:
            chunk, _ = cache.locate(index)
            raise type(exc)(
                f"chunk {chunk}, sample {record.key!r} (index {index}): {exc}",
                chunk_id=chunk,
                key=record.key,
            ) from exc

    def __repr__(self) -> str:
        return f"TorchDataset(job_id={self.ref.manifest.job_id!r}, len={self._len})"

    def _chunk_cache(self) -> LocalChunks:
        # A forked worker inherits the parent's cache: its open files and connection belong
        # to the parent, so it starts its own (and leaves the parent's alone).
        if self._cache is None or self._cache.pid != os.getpid():
            self._cache = LocalChunks(self.ref)
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # per process: never pickled
        return state


def shard_chunks(chunks: list[int], shard: int, num_shards: int) -> list[int]:
    """The chunks of one shard: every `num_shards`-th, starting at `shard`."""
    return chunks[shard::num_shards]


def _distributed() -> tuple[int, int]:
    """(rank, world size) of `torch.distributed`, or (0, 1) outside a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TorchIterableDataset(torch.utils.data.IterableDataset[Any]):
    """An iterable dataset streamed by the engine, sharded so that no image is decoded twice.

    The job's chunks are split over `torch.distributed` ranks, then over the DataLoader
    workers of each rank. In the main process (`num_workers=0`) a shard streams through the
    engine's decode processes; inside a DataLoader worker it is decoded in that worker
    (DataLoader already provides the processes). Call `set_epoch(epoch)` before each epoch
    to reshuffle (with `shuffle=True`), as with `DistributedSampler`.

    With `batch_size`, each item is a whole batch `(images, labels)`: images a uint8
    (B, H, W, C) tensor, labels an int64 (B,) tensor of class indices (a list where labels are
    neither class names nor ints); read it with `DataLoader(dataset, batch_size=None)`. A batch
    that lies inside one engine batch shares the engine's shared-memory slot (no copy; the
    slot stays leased while the tensor lives, so it stays valid after the next batch), one
    that spans engine batches is copied once. Inside DataLoader workers each worker batches its
    own chunks, so an epoch may end with up to one short batch per worker.

    Attributes:
        class_to_idx: class name -> label index, in the job's `labels` order.
        classes: the class names, index order.
    """

    def __init__(
        self,
        ref: JobRef | ParquetRef,
        config: EngineConfig,
        policy: DecodePolicy,
        transform: Transform | None,
        *,
        batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        metadata: bool = False,
    ) -> None:
        check_batch_size(batch_size, optional=True)
        self.ref = ref
        self.config = config
        self.policy = policy
        self.transform = transform
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.metadata = metadata
        self.epoch = 0
        self._output = _Output(ref, transform)
        self.class_to_idx = self._output.class_to_idx
        self.classes = self._output.classes

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the shuffle (the same on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Images (or batches, with `batch_size`) of this rank's shard, read in one process.

        Fewer come out when bad images are skipped; with DataLoader workers and `batch_size`,
        up to one short batch more per worker.
        """
        rank, world = _distributed()
        mine = set(self._rank_chunks(rank, world))
        images = sum(c.num_images for c in self.ref.manifest.chunks if c.index in mine)
        batches = count_batches(images, self.batch_size, self.drop_last)
        return images if batches is None else batches

    def __iter__(self) -> Iterator[Any]:
        rank, world = _distributed()
        chunks = self._rank_chunks(rank, world)
        info = torch.utils.data.get_worker_info()
        if info is None:
            batches = self._stream(chunks)
        else:
            batches = self._decode_here(shard_chunks(chunks, info.id, info.num_workers))
        try:
            if self.batch_size is None:
                yield from self._samples(batches)
            else:
                yield from self._batches(batches, pin=self.pin_memory and info is None)
        finally:
            batches.close()  # stops the engine pass now, not when the generator is collected

    def _rank_chunks(self, rank: int, world: int) -> list[int]:
        chunks = [c.index for c in self.ref.manifest.chunks if c.num_images]
        if self.config.shuffle:
            # Every rank draws the same permutation, so the shards stay disjoint.
            rng = np.random.default_rng([self.config.seed, self.epoch])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return shard_chunks(chunks, rank, world)

    def _rows(self) -> int:
        # Engine batches no bigger than the requested ones: then every requested batch that
        # does not cross a chunk boundary is one engine batch, handed out without a copy.
        rows = self.config.batch_rows
        return rows if self.batch_size is None else min(rows, self.batch_size)

    def _samples(self, batches: Iterator[Batch]) -> Iterator[tuple[Any, ...]]:
        for batch in batches:
            images = batch.images
            meta = _metadata(batch)[0] if self.metadata else None
            for i, label in enumerate(batch.labels):
                item = self._output(images[i], label)
                yield item if meta is None else (*item, meta[i])

    def _batches(self, batches: Iterator[Batch], *, pin: bool) -> Iterator[tuple[Any, ...]]:
        pin = pin and can_pin()
        coder = LabelCoder(self.class_to_idx)

        def extract(batch: Batch) -> tuple[Any, ...]:
            labels = coder(batch)
            return (labels, *_metadata(batch)) if self.metadata else (labels,)

        for rows in rebatch(
            batches,
            self.batch_size,
            drop_last=self.drop_last,
            shape=self.policy.fixed_shape,
            extract=extract,
            alloc=pinned_alloc if pin else alloc,
        ):
            images = images_tensor(rows, pin=pin)
            labels = rows.columns[0]
            if isinstance(labels, np.ndarray):
                labels = torch.from_numpy(labels)
                if pin:
                    labels = labels.pin_memory()
            if self.transform is not None:
                images = self.transform(images)
            yield (images, labels, *rows.columns[1:])

    def _stream(self, chunks: list[int]) -> Generator[Batch, None, None]:
        if not chunks:
            return
        source = self.ref.source(chunks)
        config = self.config.replace(seed=self.config.seed + self.epoch, batch_rows=self._rows())
        try:
            stream = Stream(source, config=config, policy=self.policy)
        finally:
            source.close()  # the supervisor has its own copy
        with stream:
            yield from stream

    def _decode_here(self, chunks: list[int]) -> Generator[Batch, None, None]:
        cache = LocalChunks(self.ref)
        rows = self._rows()
        try:
            for chunk in chunks:
                reader, records = cache.open(chunk)
                if self.config.shuffle:
                    rng = np.random.default_rng([self.config.seed, self.epoch, chunk])
                    records = [records[i] for i in rng.permutation(len(records))]
                # A batch of rows at a time bounds the memory of variable-size images.
                for start in range(0, len(records), rows):
                    batch, _, errors = decode_records(
                        records[start : start + rows], reader.read, self.policy, chunk=chunk
                    )
                    if self.policy.on_error == "warn":
                        for _key, message in errors:
                            warnings.warn(message, SampleWarning, stacklevel=2)
                    yield Batch(batch)
        finally:
            cache.discard()


def torch_dataset(
    dataset: Any,
    transform: Transform | None,
    *,
    iterable: bool,
    batch_size: int | None,
    drop_last: bool,
    pin_memory: bool,
    metadata: bool,
) -> TorchDataset | TorchIterableDataset:
    """`Dataset.to_torch`: the options checked, the dataset made (`dataset`: its facade)."""
    if transform is not None and not callable(transform):
        raise TypeError(f"transform must be callable, got {type(transform).__name__}")
    if iterable:
        return TorchIterableDataset(
            dataset.ref,
            dataset.config,
            dataset.policy,
            transform,
            batch_size=batch_size,
            drop_last=drop_last,
            pin_memory=pin_memory,
            metadata=metadata,
        )
    options = {"batch_size": batch_size, "drop_last": drop_last, "pin_memory": pin_memory}
    asked = [name for name, value in options.items() if value not in (None, False)]
    if asked:
        raise ValueError(
            f"{', '.join(asked)} apply to to_torch(iterable=True, ...), whose items are "
            "batches made by the engine; a map-style dataset is batched and pinned by "
            "DataLoader(torch_dataset, batch_size=..., pin_memory=...)"
        )
    return TorchDataset(dataset.ref, dataset.policy, transform, metadata=metadata)


def _metadata(batch: Batch) -> tuple[list[dict[str, Any]]]:
    """Each sample's manifest fields and its key, as dicts (only when asked: JSON per row)."""
    return ([{"key": key, **meta} for key, meta in zip(batch.keys, batch.metadata, strict=True)],)
