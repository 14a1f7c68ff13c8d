"""The framework conversions of a `Dataset`: `to_torch`, `to_tensorflow`, `to_ray`, `preview`.

A mixin, so that the facade's module stays short; torch, tensorflow and ray are imported only
inside the methods. The adapters see the dataset through what `Dataset` offers (its `ref`,
`config`, `policy`, `info` and passes), never through this class.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

if TYPE_CHECKING:
    import ray.data
    import tensorflow as tf

    from pixcrawler._info import DatasetInfo
    from pixcrawler._torch import TorchDataset, TorchIterableDataset

__all__ = ["Frameworks"]


class Frameworks:
    """Conversions to PyTorch, TensorFlow and Ray, and the preview grid (mixed into `Dataset`)."""

    @property
    def info(self) -> DatasetInfo:
        raise NotImplementedError  # `Dataset` has it

    @overload
    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        iterable: Literal[False] = False,
        metadata: bool = False,
    ) -> TorchDataset: ...

    @overload
    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        iterable: Literal[True],
        batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        metadata: bool = False,
    ) -> TorchIterableDataset: ...

    @overload
    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        iterable: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        metadata: bool = False,
    ) -> TorchDataset | TorchIterableDataset: ...

    def to_torch(
        self,
        transform: Callable[[Any], Any] | None = None,
        *,
        iterable: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        metadata: bool = False,
    ) -> TorchDataset | TorchIterableDataset:
        """Convert to PyTorch Dataset.

        The map-style form (default) reads single images from a per-process chunk cache, so
        `len()`, indexing, `random_split` and `DataLoader(shuffle=True, num_workers=...)`
        work. The iterable form streams through the engine and shards chunks across
        DataLoader workers and `torch.distributed` ranks. Both give `(image, label)`; with
        `batch_size` the iterable gives whole batches: read it with
        `DataLoader(torch_dataset, batch_size=None)`.

        Args:
            transform: Optional transform function: per image, of the (H, W, C) uint8 array
                (a private copy), else images become float (C, H, W) tensors in [0, 1]; with
                `batch_size`, of each batch's uint8 (B, H, W, C) tensor.
            iterable: Return a `torch.utils.data.IterableDataset` instead.
            batch_size: Images per item (iterable only): a uint8 (B, H, W, C) tensor sharing
                the engine's memory where it can (no copy; valid for as long as you keep it),
                else copied once, and an int64 (B,) tensor of labels.
            drop_last: Drop a last batch shorter than `batch_size`.
            pin_memory: Make batches in pinned memory, for `.to("cuda", non_blocking=True)`
                (warns and does nothing without an accelerator); or use DataLoader's.
            metadata: Add a third element: the manifest's fields and the `key` of each image.

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
        try:
            from pixcrawler import _torch
        except ImportError as exc:
            raise ImportError(
                "to_torch() needs PyTorch: pip install 'pixcrawler-sdk[torch]' (or torch)"
            ) from exc
        return _torch.torch_dataset(
            cast(Any, self),
            transform,
            iterable=iterable,
            batch_size=batch_size,
            drop_last=drop_last,
            pin_memory=pin_memory,
            metadata=metadata,
        )

    def to_tensorflow(
        self, *, batch_size: int | None = None, drop_last: bool = False, metadata: bool = False
    ) -> tf.data.Dataset:
        """Convert to TensorFlow Dataset.

        Engine batches cross into TensorFlow whole (one copy each); single images are those
        batches `unbatch()`ed inside TensorFlow.

        Args:
            batch_size: Make elements batches of (B, H, W, C) images and (B,) labels, built by
                the engine (faster than `.batch(B)`; `unbatch()` undoes it). None: single images.
            drop_last: Drop a last batch shorter than `batch_size` (the spec's batch
                dimension is then B, else None).
            metadata: Add a third element: the manifest's fields and the `key` of each image,
                as JSON strings.

        Returns:
            TensorFlow Dataset object of `(image, label)`: uint8 (H, W, C) images (a
            dimension is None when it varies) and int64 class indices for string labels,
            with a known cardinality unless bad images are skipped.

        Example:
            >>> tf_dataset = dataset.to_tensorflow()
            >>> tf_dataset = tf_dataset.batch(32).prefetch(1)
            >>> model.fit(tf_dataset, epochs=10)
        """
        from pixcrawler._tensorflow import to_tensorflow

        return to_tensorflow(
            cast(Any, self), batch_size=batch_size, drop_last=drop_last, metadata=metadata
        )

    def preview(self, path: str | os.PathLike[str], n: int = 8, *, tile: int = 96) -> Path:
        """Draw a labelled grid of `n` samples per class (a row each, masks overlaid) into the
        PNG at `path`; only what the grid needs is decoded, at `tile` size. Returns `path`."""
        from pixcrawler._preview import draw_preview

        return draw_preview([(self.info.job_id, cast(Any, self))], path, n=n, tile=tile)

    def to_ray(self, *, decode: bool = True, **read_args: Any) -> ray.data.Dataset:
        """Convert to a Ray Dataset: one Ray read task per chunk (see `pixcrawler.ray`).

        Tasks decode as the engine does (`image_size`, `resize`, `color`, `on_error`); rows
        come in dataset (or seeded shuffle) order under Ray's `preserve_order`. Columns:
        `image` (fixed_shape_tensor, uint8 H x W x C), `label` (class index when the job lists
        its classes), `key`, `chunk`, `index`, `orig_width`, `orig_height`, `metadata`.

        Args:
            decode: decode the images, which must have one shape (`image_size=`); False
                gives the files as stored (a binary `image` column).
            read_args: passed to `ray.data.read_datasource` (`concurrency`, `num_cpus`, ...).

        Raises:
            ImportError: Ray Data is not installed (`pip install 'pixcrawler-sdk[ray]'`).
            ValueError: decoded images would differ in shape (the message says what to pass).

        Example:
            >>> ds = dataset.to_ray().select_columns(["image", "label"])
            >>> for batch in ds.iter_torch_batches(batch_size=64): ...
        """
        try:
            from pixcrawler import ray as pixcrawler_ray
        except ImportError as exc:
            if exc.name is None or exc.name.split(".")[0] != "ray":
                raise
            raise ImportError(
                "to_ray() needs Ray Data, which is not installed: pip install "
                "'pixcrawler-sdk[ray]' (or pip install 'ray[data]')"
            ) from exc
        return pixcrawler_ray.read_dataset(cast(Any, self), decode=decode, **read_args)
