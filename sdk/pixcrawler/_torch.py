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
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data

from pixcrawler._chunks import JobRef, LocalChunks
from pixcrawler._info import class_index
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode._image import decode_image
from pixcrawler_engine.runtime._batch import image_views, labels_of
from pixcrawler_engine.runtime._chunk import decode_records
from pixcrawler_engine.runtime._stream import SampleWarning, Stream

__all__ = ["TorchDataset", "TorchIterableDataset", "shard_chunks"]

Transform = Callable[[np.ndarray], Any]


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


class TorchDataset(torch.utils.data.Dataset[tuple[Any, Any]]):
    """A map-style dataset: `len()`, `dataset[i]`, `random_split`, shuffled DataLoaders.

    Each process downloads a chunk at most once (into its own cache folder, or the shared
    `cache_dir`) and decodes only the image asked for. A corrupt image raises `DecodeError`
    whatever `on_error` says: an index must give an item (the iterable form can skip).

    Attributes:
        class_to_idx: class name -> label index, in the job's `labels` order.
        classes: the class names, index order.
    """

    def __init__(
        self, ref: JobRef | ParquetRef, policy: DecodePolicy, transform: Transform | None
    ) -> None:
        self.ref = ref
        self.policy = policy
        self.transform = transform
        self._output = _Output(ref, transform)
        self.class_to_idx = self._output.class_to_idx
        self.classes = self._output.classes
        self._len = sum(c.num_images for c in ref.manifest.chunks)
        self._cache: LocalChunks | None = None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        index = int(index)
        if index < 0:
            index += self._len
        cache = self._chunk_cache()
        data, record = cache.sample(index)
        try:
            image = decode_image(data, self.policy)
        except DecodeError as exc:
            chunk, _ = cache.locate(index)
            raise DecodeError(
                f"chunk {chunk}, sample {record.key!r} (index {index}): {exc}",
                chunk_id=chunk,
                key=record.key,
            ) from exc
        return self._output(image, record.label)

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


class TorchIterableDataset(torch.utils.data.IterableDataset[tuple[Any, Any]]):
    """An iterable dataset streamed by the engine, sharded so that no image is decoded twice.

    The job's chunks are split over `torch.distributed` ranks, then over the DataLoader
    workers of each rank. In the main process (`num_workers=0`) a shard streams through the
    engine's decode processes; inside a DataLoader worker it is decoded in that worker
    (DataLoader already provides the processes). Call `set_epoch(epoch)` before each epoch
    to reshuffle (with `shuffle=True`), as with `DistributedSampler`.

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
    ) -> None:
        self.ref = ref
        self.config = config
        self.policy = policy
        self.transform = transform
        self.epoch = 0
        self._output = _Output(ref, transform)
        self.class_to_idx = self._output.class_to_idx
        self.classes = self._output.classes

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the shuffle (the same on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Images of this rank's shard (fewer come out when bad images are skipped)."""
        rank, world = _distributed()
        mine = set(self._rank_chunks(rank, world))
        return sum(c.num_images for c in self.ref.manifest.chunks if c.index in mine)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        rank, world = _distributed()
        chunks = self._rank_chunks(rank, world)
        info = torch.utils.data.get_worker_info()
        if info is None:
            yield from self._stream(chunks)
        else:
            yield from self._decode_here(shard_chunks(chunks, info.id, info.num_workers))

    def _rank_chunks(self, rank: int, world: int) -> list[int]:
        chunks = [c.index for c in self.ref.manifest.chunks if c.num_images]
        if self.config.shuffle:
            # Every rank draws the same permutation, so the shards stay disjoint.
            rng = np.random.default_rng([self.config.seed, self.epoch])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return shard_chunks(chunks, rank, world)

    def _stream(self, chunks: list[int]) -> Iterator[tuple[Any, Any]]:
        if not chunks:
            return
        source = self.ref.source(chunks)
        config = self.config.replace(seed=self.config.seed + self.epoch)
        try:
            stream = Stream(source, config=config, policy=self.policy)
        finally:
            source.close()  # the supervisor has its own copy
        with stream:
            for batch in stream:
                images = batch.images
                for i, label in enumerate(batch.labels):
                    yield self._output(images[i], label)

    def _decode_here(self, chunks: list[int]) -> Iterator[tuple[Any, Any]]:
        cache = LocalChunks(self.ref)
        rows = self.config.batch_rows
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
                    images = image_views(batch)
                    labels = labels_of(batch)
                    for i, label in enumerate(labels):
                        yield self._output(images[i], label)
        finally:
            cache.discard()
