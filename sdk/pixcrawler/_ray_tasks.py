"""What a Ray task runs, without importing Ray: one chunk read into Arrow tables, or exported.

`pixcrawler.ray` wraps `read_chunk` in one read task per chunk, and `pixcrawler._ray_export`
wraps `export_part`; both run in Ray worker processes, where they reach the chunk through a
`LocalChunks` of their own (downloaded with the job API client's retries into a private folder,
read in place from a `file://` store, or through the shared `cache_dir`) and decode it with the
engine's `decode_records`, under the dataset's decode policy, in the engine's order.

The API key: the dataset's address (a `JobRef` or `ParquetRef`, with its manifest) is put in
Ray's object store once, *sealed*, that is without its key; the key travels inside each task in
a `TaskKey`, which pickles with the task and shows as `***`. It is never put in a process's
argv or environment, nor logged.

Columns of the tables (`output_schema`):

    image        fixed_shape_tensor<uint8>[H, W, C] (decoded), or binary: the file as stored
    mask         fixed_shape_tensor<uint8>[H, W] or binary, only for sources with masks
    label        int64 class index when the job lists its classes (`labels`, as `to_torch`
                 numbers them), else string: the label as JSON
    key          string: the sample's name in its chunk (zip member, `file:row`)
    chunk        int32, index int64 (its position in the unshuffled dataset)
    orig_width   int32, orig_height int32: the stored size
    metadata     string: the sample's other manifest fields as JSON
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pixcrawler._chunks import Credential, JobRef, LocalChunks
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler_engine._config import DecodePolicy, OnError
from pixcrawler_engine._errors import DecodeError, PixCrawlerError
from pixcrawler_engine.runtime._batch import schema_for
from pixcrawler_engine.runtime._chunk import decode_records
from pixcrawler_engine.runtime._schedule import record_order
from pixcrawler_engine.sources._base import ChunkReader
from pixcrawler_engine.sources._record import Record
from pixcrawler_engine.sources.parquet._token import split_token, with_token

__all__ = [
    "ReadSpec",
    "TaskKey",
    "export_part",
    "output_schema",
    "read_chunk",
    "seal",
    "unseal",
]

Ref = JobRef | ParquetRef


class TaskKey:
    """An API key (or Parquet token) inside a Ray task: pickled with it, never shown."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "TaskKey(***)" if self._value is not None else "TaskKey(None)"

    def __reduce__(self) -> tuple[Any, ...]:
        # Deliberately carries the key (a `Credential` would drop it): the task needs it.
        return (TaskKey, (self._value,))


def seal(ref: Ref) -> tuple[Ref, TaskKey]:
    """The ref without its key, for the object store, and the key, for the tasks."""
    if isinstance(ref, JobRef):
        return dataclasses.replace(ref, credential=Credential(None)), TaskKey(
            ref.credential.reveal()
        )
    parquet, token = split_token(ref.parquet)
    return dataclasses.replace(ref, parquet=parquet), TaskKey(token)


def unseal(ref: Ref, key: TaskKey) -> Ref:
    """The ref with its key back, inside the task."""
    if isinstance(ref, JobRef):
        return dataclasses.replace(ref, credential=Credential(key._value))
    return dataclasses.replace(ref, parquet=with_token(ref.parquet, key._value))


@dataclass(frozen=True, kw_only=True)
class ReadSpec:
    """How every read task of one Ray dataset reads its chunk.

    Attributes:
        policy: the decode policy (its shape fixed), or None for the files as stored.
        on_error: what a sample that cannot be read does (`policy.on_error` when decoding).
        shuffle: the engine's seeded order within the chunk.
        seed: the shuffle's seed.
        rows: the most samples in one block.
        block_bytes: the most bytes of images in one block (Ray's `target_max_block_size`).
        classes: the job's class names: labels become their index when there are some.
        masks: the source has segmentation masks.
    """

    policy: DecodePolicy | None
    on_error: OnError = "raise"
    shuffle: bool = False
    seed: int = 0
    rows: int = 64
    block_bytes: int = 128 << 20
    classes: tuple[str, ...] = ()
    masks: bool = False


def output_schema(spec: ReadSpec) -> pa.Schema:
    """The schema of every table `read_chunk` yields for `spec`."""
    label = pa.int64() if spec.classes else pa.string()
    if spec.policy is not None:
        schema = schema_for(spec.policy.fixed_shape, masks=spec.masks)
    else:
        schema = schema_for((1, 1, 1), masks=spec.masks)
        schema = schema.set(0, pa.field("image", pa.binary()))
        if spec.masks:
            schema = schema.set(1, pa.field("mask", pa.binary()))
    return schema.set(schema.get_field_index("label"), pa.field("label", label))


def read_chunk(ref: Ref, spec: ReadSpec, chunk: int) -> Iterator[pa.Table]:
    """The samples of one chunk as tables of at most `spec.rows` rows, in the engine's order.

    Raises:
        DownloadError: the chunk could not be fetched (after the client's retries).
        DecompressionError: the chunk is not a readable archive.
        DecodeError: a bad sample with `on_error="raise"`.
        PixCrawlerError: a label that is not one of the job's classes.
    """
    cache = LocalChunks(ref)
    try:
        reader, records = cache.open(chunk)
        if spec.shuffle:
            records = [records[i] for i in record_order(len(records), seed=spec.seed, chunk=chunk)]
        schema = output_schema(spec)
        index = {name: i for i, name in enumerate(spec.classes)}
        batches = (
            _decoded(records, reader, spec, chunk)
            if spec.policy
            else _stored(records, reader, spec, chunk)
        )
        for batch in batches:
            yield _table(batch, schema, index)
    finally:
        cache.discard()


def _decoded(
    records: Sequence[Record], reader: ChunkReader, spec: ReadSpec, chunk: int
) -> Iterator[pa.RecordBatch]:
    policy = spec.policy
    assert policy is not None and policy.fixed_shape is not None
    image_bytes = int(np.prod(policy.fixed_shape)) * (2 if spec.masks else 1)
    rows = max(1, min(spec.rows, spec.block_bytes // image_bytes))
    for start in range(0, len(records), rows):
        batch, _, errors = decode_records(
            records[start : start + rows], reader.read, policy, chunk=chunk
        )
        _warn(errors, spec.on_error)
        if batch.num_rows:
            yield batch


def _stored(
    records: Sequence[Record], reader: ChunkReader, spec: ReadSpec, chunk: int
) -> Iterator[pa.RecordBatch]:
    """The files as stored, with the size their header gives (nothing is decoded)."""
    from pixcrawler_engine.decode._headers import as_view, sniff

    rows: list[tuple[Record, bytes, bytes | None, int | None, int | None]] = []
    size = 0
    errors: list[tuple[str, str]] = []
    for record in records:
        try:
            data = bytes(reader.read(record.ref))  # a copy: Ray ships it to another process
            mask = None
            if spec.masks and record.mask_ref is not None:
                mask = bytes(reader.read(record.mask_ref))
        except DecodeError as exc:
            error = DecodeError(
                f"chunk {chunk}, sample {record.key!r}: {exc}", chunk_id=chunk, key=record.key
            )
            if spec.on_error == "raise":
                raise error from exc
            errors.append((record.key, str(error)))
            continue
        header = sniff(as_view(data))
        width = height = None
        if header is not None:
            width, height = header.width, header.height
            if header.orientation >= 5:  # rotated by 90 degrees: as the engine reports it
                width, height = height, width
        rows.append((record, data, mask, width, height))
        size += len(data) + len(mask or b"")
        if len(rows) >= spec.rows or size >= spec.block_bytes:
            yield _stored_batch(rows, chunk, spec.masks)
            rows, size = [], 0
    _warn(errors, spec.on_error)
    if rows:
        yield _stored_batch(rows, chunk, spec.masks)


def _stored_batch(
    rows: list[tuple[Record, bytes, bytes | None, int | None, int | None]],
    chunk: int,
    masks: bool,
) -> pa.RecordBatch:
    columns: dict[str, pa.Array] = {"image": pa.array([r[1] for r in rows], pa.binary())}
    if masks:
        columns["mask"] = pa.array([r[2] for r in rows], pa.binary())
    columns.update(
        label=pa.array([json.dumps(r[0].label) for r in rows], pa.string()),
        key=pa.array([r[0].key for r in rows], pa.string()),
        chunk=pa.array([chunk] * len(rows), pa.int32()),
        index=pa.array([r[0].index for r in rows], pa.int64()),
        orig_width=pa.array([r[3] for r in rows], pa.int32()),
        orig_height=pa.array([r[4] for r in rows], pa.int32()),
        metadata=pa.array([r[0].metadata or "{}" for r in rows], pa.string()),
    )
    return pa.RecordBatch.from_pydict(columns)


def _warn(errors: list[tuple[str, str]], on_error: str) -> None:
    if on_error == "warn" and errors:
        from pixcrawler_engine.runtime._stream import SampleWarning

        for _key, message in errors:
            warnings.warn(message, SampleWarning, stacklevel=3)


def _table(batch: pa.RecordBatch, schema: pa.Schema, index: dict[str, int]) -> pa.Table:
    """A batch in the output schema: labels as class indices when the job has classes."""
    labels = batch.column("label")
    if index:
        values = []
        for text, key in zip(labels.to_pylist(), batch.column("key").to_pylist(), strict=True):
            label = json.loads(text)
            if not isinstance(label, str) or label not in index:
                raise PixCrawlerError(
                    f"chunk {batch.column('chunk')[0]}, sample {key!r}: label {label!r} is not "
                    "one of the job's labels, so it has no class index; the job's manifest "
                    "must list every label"
                )
            values.append(index[label])
        labels = pa.array(values, pa.int64())
    columns = [labels if name == "label" else batch.column(name) for name in schema.names]
    return pa.Table.from_arrays(columns, schema=schema)


def export_part(
    ref: JobRef,
    target: str,
    state: dict[str, Any],
    *,
    format: str,
    policy: DecodePolicy | None,
    chunk: int,
    keep: int,
    rows: int,
) -> dict[str, Any]:
    """Writes one chunk's part of an export in progress (see `pixcrawler_engine` `write_part`).

    Returns:
        The export's state after the part was written.
    """
    from pixcrawler_engine.export._part import write_part

    cache = LocalChunks(ref)
    try:
        reader, records = cache.open(chunk)
        return write_part(
            target,
            state,
            ref.manifest,
            format=format,
            policy=policy,
            chunk=chunk,
            path=Path(cache.path(chunk)),
            records=records,
            keep=keep,
            reader=reader,
            rows=rows,
        )
    finally:
        cache.discard()
