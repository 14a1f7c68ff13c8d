"""One chunk's part of an export, written by any process that can read the chunk: `write_part`.

`export_job` writes parts in its own process (see NOTE [resumable export] in `_driver`), unless
it is given a `ChunkRunner`, which writes them elsewhere: on a Ray cluster, one task per chunk
(`pixcrawler._ray_export`). A task calls `write_part` with the chunk's file, records and reader;
it writes the part exactly as the local export does (the same format writer, the same pieces,
so the same bytes) under a temporary name and renames it when complete. The export's folder
must be visible to every process that writes parts (a shared file system on a cluster).

Only the process running `export_job` owns the work folder (its lock and `state.json`); a task
reads the state it was given and returns what it would have saved (see `TaskWorkspace`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine.export._files import ImagesWriter, NumpyWriter, ZipWriter
from pixcrawler_engine.export._order import Selection
from pixcrawler_engine.export._parquet import ParquetWriter
from pixcrawler_engine.export._state import Workspace
from pixcrawler_engine.export._writers import FormatWriter, Piece
from pixcrawler_engine.sources._base import ChunkPlan, ChunkReader
from pixcrawler_engine.sources._record import Record

__all__ = ["WRITERS", "ChunkRunner", "TaskWorkspace", "write_part"]

WRITERS: dict[str, type[FormatWriter]] = {
    "numpy": NumpyWriter,
    "images": ImagesWriter,
    "zip": ZipWriter,
    "parquet": ParquetWriter,
}


class ChunkRunner(Protocol):
    """Writes the parts of some chunks somewhere else than the exporting process.

    Called by `export_job` with its open work folder (`ws.state` holds the options and
    whatever the format saved, like the Parquet label kind), the job's manifest, the chunks
    without a committed part, in dataset order, and `done(n)` to call as n more images are
    written. It returns
    when every chunk's part is committed, and raises if one could not be written (the parts
    committed so far stay: the next run resumes). State a task returns is the runner's to
    merge into `ws.state` and save.
    """

    def __call__(
        self,
        ws: Workspace,
        manifest: Any,
        todo: Sequence[ChunkPlan],
        done: Callable[[int], None],
    ) -> None: ...


class TaskWorkspace(Workspace):
    """The work folder as a task sees it: no lock, and a state it keeps to itself.

    `save()` writes nothing: the exporting process owns `state.json`; `write_part` returns
    the state, and the runner merges it.
    """

    def __init__(self, target: Path, state: dict[str, Any]) -> None:
        super().__init__(target)
        self.state = dict(state)

    def save(self) -> None:
        pass


def write_part(
    target: str | Path,
    state: dict[str, Any],
    manifest: Any,
    *,
    format: str,
    policy: DecodePolicy | None,
    chunk: int,
    path: Path,
    records: Sequence[Record],
    keep: int,
    reader: ChunkReader,
    rows: int,
) -> dict[str, Any]:
    """Writes and commits the part of one chunk of an export in progress.

    Args:
        target: the export's folder (as `export_job` got it).
        state: the export's state (`ws.state` of the exporting process).
        manifest: the job's manifest.
        format: the export format.
        policy: the decode policy (None: the stored bytes, as for `export_job`).
        chunk: the chunk.
        path: its local file.
        records: its records, in dataset order; the export's selection (its seeded shuffle,
            recorded in `state`) orders them as a local export does.
        keep: how many of them the export writes (the chunk's `num_records` in the export's
            plan: fewer than all for the last chunk under `max_samples`).
        reader: an open reader of `path` (the caller closes it).
        rows: samples per piece (`EngineConfig.batch_rows`, as the local export uses).

    Returns:
        The state after the part was written (the format may have fixed something in it).

    Raises:
        DecodeError: a bad sample with `on_error="raise"`; nothing is committed.
        PixCrawlerError: the format cannot write a sample (said why).
    """
    from pixcrawler_engine.runtime._batch import image_views
    from pixcrawler_engine.runtime._chunk import decode_records
    from pixcrawler_engine.runtime._stream import SampleWarning

    records = Selection.from_identity(state).records(chunk, list(records), keep)
    ws = TaskWorkspace(Path(target), state)
    writer = WRITERS[format](ws, manifest, policy=policy, threads=1)
    try:
        if policy is None:
            writer.chunk_file(chunk, path, records, owned=False, rows=rows)
            return ws.state
        writer.begin_chunk(chunk)
        try:
            # The pieces of the engine's run: `rows` records each, bad samples left out.
            for start in range(0, len(records), rows):
                batch, _, errors = decode_records(
                    records[start : start + rows], reader.read, policy, chunk=chunk
                )
                if policy.on_error == "warn":
                    for _key, message in errors:
                        warnings.warn(message, SampleWarning, stacklevel=2)
                if batch.num_rows:
                    writer.write(Piece(chunk, batch, pixels=image_views(batch)))
            writer.commit_chunk()
        except BaseException:
            writer.abort_chunk()
            raise
        return ws.state
    finally:
        writer.close()
