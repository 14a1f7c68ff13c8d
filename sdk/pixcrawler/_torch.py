"""PyTorch datasets over a PixCrawler job: map-style (random access) here, and the iterable
(streamed: epochs, ranks, resume) in `_torch_iterable`.

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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils.data

from pixcrawler._chunks import JobRef, LocalChunks, record_metadata
from pixcrawler._info import class_index
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler._torch_iterable import TorchIterableDataset
from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode._image import decode_image
from pixcrawler_engine.runtime._stream import Batch, SampleWarning
from pixcrawler_engine.sources._record import Record

__all__ = ["TorchDataset", "TorchIterableDataset", "torch_dataset"]

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
        output = _Output(dataset.ref, transform)
        return TorchIterableDataset(
            dataset.ref,
            dataset.config,
            dataset.policy,
            output,
            output.class_to_idx,
            transform,
            batch_size=batch_size,
            drop_last=drop_last,
            pin_memory=pin_memory,
            metadata=_metadata if metadata else None,
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
