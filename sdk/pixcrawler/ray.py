"""Ray Data over PixCrawler datasets: a datasource with one read task per chunk.

    >>> import ray
    >>> from pixcrawler import load_dataset
    >>> dataset = load_dataset("job_123", api_key="key", image_size=(224, 224))
    >>> ds = dataset.to_ray()                      # a ray.data.Dataset
    >>> for batch in ds.select_columns(["image", "label"]).iter_torch_batches(batch_size=64):
    ...     train(batch["image"], batch["label"])  # (64, 224, 224, 3) uint8, int64

Every source works: the job API, a `file://` store, Parquet shards. Each read task reaches its
chunk as the engine does (the job API client's retries; `DownloadError` names the chunk) and
decodes it with the engine's `decode_records` under the dataset's decode policy, `on_error`
included, in the engine's order: read tasks come in dataset order, or with `shuffle=True` in the
engine's chunk-level permutation (chunks, then samples within each chunk: epoch 0 with
`shuffle_window=1`), so with Ray's `DataContext.get_current().execution_options.preserve_order
= True` the rows arrive exactly as `Dataset.iter_batches` gives them. A task reads one chunk,
so samples of several chunks mix only through Ray's own `random_shuffle()`. Ray places and
streams the tasks, and runs a task again when its worker dies.

Columns are listed in `pixcrawler._ray_tasks`: `image` is a `fixed_shape_tensor` (Ray keeps it as
is, in blocks and in Parquet), labels are class indices when the job lists its classes, and a
`key` column names every sample. Images must have one shape (`image_size=`, with `color` RGB or
L); `decode=False` gives the files as stored instead.

This module imports Ray; `import pixcrawler` never does, nor do the engine's processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pixcrawler._chunks import JobRef
from pixcrawler._info import class_index
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler._ray_tasks import ReadSpec, TaskKey, output_schema, read_chunk, seal, unseal
from pixcrawler_engine._config import DecodePolicy, EngineConfig, OnError
from pixcrawler_engine.runtime._schedule import chunk_order

__all__ = ["PixCrawlerDatasource", "RaySource", "read_dataset"]

# Ray Data's default target block size; a read task cuts its chunk into blocks of this size.
_BLOCK_BYTES = 128 << 20


class RaySource(Protocol):
    """What `read_dataset` reads: a `pixcrawler.Dataset` (or anything shaped like it)."""

    @property
    def ref(self) -> JobRef | ParquetRef: ...
    @property
    def policy(self) -> DecodePolicy: ...
    @property
    def config(self) -> EngineConfig: ...


def read_dataset(dataset: RaySource, *, decode: bool = True, **read_args: Any) -> ray.data.Dataset:
    """A Ray dataset of a PixCrawler dataset: `ray.data.read_datasource` over its chunks.

    Args:
        dataset: the dataset (`load_dataset(...)`); its decode policy, `shuffle`, `seed` and
            `batch_rows` apply.
        decode: decode the images (they must have one shape); False gives the files as
            stored, in a binary `image` column.
        read_args: passed to `ray.data.read_datasource` (`concurrency`, `num_cpus`,
            `ray_remote_args`, ...). There is one read task per chunk whatever
            `override_num_blocks` says; it defaults to the number of chunks, so that Ray
            keeps each task's blocks as they are (a larger value has Ray split them).

    Raises:
        ValueError: decoded images would differ in shape (the message says what to pass).
    """
    config = dataset.config
    source = PixCrawlerDatasource(
        dataset.ref,
        dataset.policy if decode else None,
        on_error=dataset.policy.on_error,
        shuffle=config.shuffle,
        seed=config.seed,
        batch_rows=config.rows_for(dataset.policy.fixed_shape if decode else None),
    )
    if "override_num_blocks" not in read_args and "parallelism" not in read_args:
        # Ray asks for ~200 blocks and splits the output of fewer read tasks to get them
        # (SplitBlocks): blocks of a few images each, which halved the throughput measured.
        read_args["override_num_blocks"] = max(1, source.num_read_tasks)
    return ray.data.read_datasource(source, **read_args)


class PixCrawlerDatasource(Datasource):
    """A Ray Data datasource over a PixCrawler job or Parquet shards: one read task per chunk.

    Args:
        ref: the dataset's address (`Dataset.ref`).
        policy: the decode policy, whose images must have one shape; None reads the files
            as stored.
        on_error: what a sample that cannot be read does, when `policy` is None.
        shuffle: read in the engine's chunk-level shuffle order (`shuffle_window=1`, epoch 0).
        seed: the shuffle's seed.
        batch_rows: the most samples in one block.

    Raises:
        ValueError: `policy` gives images of different shapes.
    """

    def __init__(
        self,
        ref: JobRef | ParquetRef,
        policy: DecodePolicy | None,
        *,
        on_error: OnError = "raise",
        shuffle: bool = False,
        seed: int = 0,
        batch_rows: int = 64,
    ) -> None:
        super().__init__()
        if policy is not None and policy.fixed_shape is None:
            raise ValueError(
                "to_ray() needs images of one shape for its fixed_shape_tensor column, but "
                f"image_size={policy.image_size}, resize={policy.resize!r}, "
                f"color={policy.color!r} keeps each image's own shape: load the dataset with "
                'image_size=(H, W) (resize other than "fit", color "RGB" or "L"), or call '
                "to_ray(decode=False) for the files as stored"
            )
        classes = tuple(class_index(tuple(ref.manifest.labels)))
        masks = isinstance(ref, ParquetRef) and ref.parquet.columns.mask is not None
        self._spec = ReadSpec(
            policy=policy,
            on_error=policy.on_error if policy is not None else on_error,
            shuffle=shuffle,
            seed=seed,
            rows=batch_rows,
            block_bytes=_BLOCK_BYTES,
            classes=classes if len(classes) == len(ref.manifest.labels) else (),
            masks=masks,
        )
        self._sealed, self._key = seal(ref)
        self._job_id = ref.manifest.job_id
        self._chunks = [(c.index, c.num_images, c.size_bytes) for c in ref.manifest.chunks]
        self._shared: Any = None  # the sealed ref in the object store, put on first use

    @property
    def num_read_tasks(self) -> int:
        """One per chunk that holds samples."""
        return sum(1 for _, n, _ in self._chunks if n)

    @property
    def schema(self) -> pa.Schema:
        """The schema of every block."""
        return output_schema(self._spec)

    def get_name(self) -> str:
        return "PixCrawler"

    def __repr__(self) -> str:
        shape = self._spec.policy.fixed_shape if self._spec.policy else "stored files"
        return (
            f"PixCrawlerDatasource(job_id={self._job_id!r}, chunks={len(self._chunks)}, "
            f"images={shape})"
        )

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._task_bytes(n, size) for _, n, size in self._chunks)

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: Any = None,
    ) -> list[ReadTask]:
        """One read task per non-empty chunk, in delivery order; `parallelism` is not used."""
        if self._shared is None:
            self._shared = ray.put(self._sealed)
        # Rows are exact unless bad samples may be left out (Ray uses them for count()).
        exact = self._spec.on_error == "raise"
        schema = self.schema
        tasks = []
        order = chunk_order(len(self._chunks), shuffle=self._spec.shuffle, seed=self._spec.seed)
        for pos in order:
            chunk, n, size = self._chunks[pos]
            if n == 0:
                continue
            meta = BlockMetadata(
                num_rows=n if exact else None,
                size_bytes=self._task_bytes(n, size),
                input_files=None,
                exec_stats=None,
            )
            read = functools.partial(_read, self._shared, self._key, self._spec, chunk)
            tasks.append(ReadTask(read, meta, schema=schema, per_task_row_limit=per_task_row_limit))
        return tasks

    def _task_bytes(self, num_images: int, size_bytes: int) -> int:
        policy = self._spec.policy
        if policy is None or policy.fixed_shape is None:
            return int(size_bytes)
        return num_images * (int(np.prod(policy.fixed_shape)) + 256)


# The sealed ref of the last dataset read by this worker process: one `ray.get` per process,
# not one per task (Ray reuses its workers).
_SHARED: dict[str, Any] = {}


def _read(shared: Any, key: TaskKey, spec: ReadSpec, chunk: int) -> Iterator[pa.Table]:
    """A read task's body: runs in a Ray worker."""
    name = shared.hex()
    sealed = _SHARED.get(name)
    if sealed is None:
        sealed = ray.get(shared)
        _SHARED.clear()
        _SHARED[name] = sealed
    yield from read_chunk(unseal(sealed, key), spec, chunk)
