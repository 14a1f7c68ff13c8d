"""Exports of a job to disk (`numpy`, `images`, `zip`, `parquet`), resumable: `export_job`.

The CLI's `pixcrawler download` and the SDK call this; both hand it a `JobSource`.

NOTE [resumable export]: an export is a sequence of per-chunk parts (see `_export_state`):

    open the work folder; refuse another job's, version's, format's or options' export
    phase complete?  -> nothing to do
    phase writing:   chunks without a committed part -> todo
                     formats without decoding (zip, and images/parquet without an image size):
                         fetch todo chunks in order (max_workers threads, prefetched) into
                         .pixcrawler/download/ (or the cache), write each chunk's part
                     formats that decode: one engine `Stream` over `SubsetSource(todo)`, whose
                         chunk files also land in .pixcrawler/download/; a chunk's part is
                         committed when its last sample arrives (or the next chunk starts)
                     a committed chunk's download is deleted
                     with a `ChunkRunner` (`_part`): the runner has each todo chunk's part
                         written elsewhere (one Ray task per chunk) and returns when all are
                     -> phase finalizing (saved)
    phase finalizing: the format moves its parts into place (idempotent) -> phase complete

So a run killed at any point (Ctrl-C, SIGKILL, a lost connection) leaves committed parts, a
partly downloaded chunk (`<index>.zip.part`, resumed with `Range`) and verified downloads that
are not fetched again; running the same command again writes only what is missing, and the
result is byte-for-byte what an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine.export._fetch import KeepDownloads, fetch_in_order, release
from pixcrawler_engine.export._order import SelectedSource, Selection
from pixcrawler_engine.export._part import WRITERS, ChunkRunner
from pixcrawler_engine.export._size import common_size
from pixcrawler_engine.export._state import Workspace
from pixcrawler_engine.export._writers import FormatWriter, Piece
from pixcrawler_engine.sources._base import ChunkPlan, SubsetSource
from pixcrawler_engine.sources._cache import ChunkCache
from pixcrawler_engine.sources._cached_source import CachedSource

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_job"]

EXPORT_FORMATS = ("numpy", "images", "zip", "parquet")
Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What `export_job` did.

    Attributes:
        path: the export's folder.
        format: the format written.
        num_images: images selected for the export (all of the job's by default).
        chunks_written: chunks written by this run.
        chunks_resumed: chunks an earlier run had written already.
        already_complete: the folder held this complete export; nothing was done.
        skipped: samples this run left out because they could not be decoded
            (`on_error` skip or warn).
        image_size: the (height, width) images were decoded to, if they were.
    """

    path: Path
    format: str
    num_images: int
    chunks_written: int
    chunks_resumed: int
    already_complete: bool
    skipped: int = 0
    image_size: tuple[int, int] | None = None


def export_job(
    source: Any,
    target: str | Path,
    *,
    format: str = "numpy",
    policy: DecodePolicy | None = None,
    config: EngineConfig | None = None,
    cache: ChunkCache | None = None,
    progress: Progress | None = None,
    selection: Selection | None = None,
    force: bool = False,
    runner: ChunkRunner | None = None,
) -> ExportResult:
    """Exports a job to `target`, resuming an interrupted export of the same job and options.

    Args:
        source: a `JobSource` (it has the job's `manifest`); the caller closes it.
        target: the export folder (the CLI passes `<output-dir>/<job_id>`).
        format: `numpy`, `images`, `zip` or `parquet` (the module docstrings of `_export_files`
            and `_export_parquet` describe the layouts).
        policy: how to decode; None exports the stored bytes without decoding (`zip`, and
            `images`/`parquet` in their original encoding). `numpy` needs one image size:
            without `policy.image_size`, the one every image's header says (see `_size`).
        config: engine settings (`max_workers` downloads, `num_workers` decoders, ...).
        cache: a chunk cache shared with other runs; None keeps downloads in the export's
            work folder only.
        progress: called with (images done, images in all) as the export advances.
        selection: the seeded shuffle and the first-N cut (see `_order`); all samples in
            dataset order by default.
        force: start over when `target` holds an export of other options, another job
            version or another job, instead of refusing.
        runner: writes the parts of the chunks to do elsewhere (one Ray task per chunk, see
            `_part`); None writes them in this process. `cache` does not apply to it.

    Returns:
        What was done.

    Raises:
        ValueError: a format/policy combination that cannot work (said how to fix), or a
            numpy export without an image size of images that differ in size.
        PixCrawlerError: the target holds another export, or fetching or decoding failed;
            what is committed stays, and the same call resumes.
        OSError: the target cannot be written.
    """
    if format not in WRITERS:
        raise ValueError(f"unknown export format {format!r}; use one of {EXPORT_FORMATS}")
    selection = selection or Selection()
    if format == "zip" and policy is not None:
        raise ValueError("the zip format keeps the chunk files as they are; it takes no policy")
    if format == "zip" and selection != Selection():
        raise ValueError(
            "the zip format keeps whole chunk files: it takes no shuffle or max_samples"
        )
    WRITERS[format].check(policy)  # before anything is written
    # The files' row groups follow the engine's batches: the same for any num_workers.
    config = (config or EngineConfig()).replace(shuffle=False, split_ends=False)
    manifest = source.manifest
    ws = Workspace(Path(target))
    inner = CachedSource(source, cache) if cache is not None else source
    selected = SelectedSource(inner, selection)
    fetcher = KeepDownloads(selected, ws.downloads)
    plans = selected.plan()
    total = selected.total
    options: dict[str, Any] = {"format": format, "decode": None, **selection.identity()}
    if policy is not None:
        decode = dataclasses.asdict(policy)
        decode["image_size"] = list(policy.image_size) if policy.image_size else None
        options["decode"] = decode
    identity = {"job_id": manifest.job_id, "job_version": manifest.version, **options}

    writer: FormatWriter | None = None
    try:
        state = ws.open(identity, force=force)
        if state["phase"] == "complete":
            if progress is not None:
                progress(total, total)
            return ExportResult(
                path=ws.target,
                format=format,
                num_images=total,
                chunks_written=0,
                chunks_resumed=len(plans),
                already_complete=True,
                image_size=_size_of(policy, state),
            )
        if format == "numpy" and policy is not None and policy.image_size is None:
            policy = _with_common_size(policy, ws, fetcher, plans, config)
        threads = config.workers  # PNG encoding: numpy and zlib release the GIL
        writer = WRITERS[format](ws, manifest, policy=policy, threads=threads)
        writer.order = selected
        ws.sweep_temps()
        done = ws.done_chunks()
        todo = [p for p in plans if p.index not in done]
        written = 0
        if state["phase"] == "writing":
            writer.begin()
            if todo:
                counter = _Counter(total - sum(p.num_records for p in todo), total, progress)
                counter.report()
                if runner is not None:
                    runner(ws, manifest, todo, counter.add)
                    written = sum(p.num_records for p in todo)
                elif writer.decoded:
                    assert policy is not None
                    written = _write_decoded(writer, fetcher, todo, config, policy, counter)
                else:
                    written = _write_encoded(writer, fetcher, todo, config, counter)
            state["phase"] = "finalizing"
            ws.save()
        writer.finalize()
        state["phase"] = "complete"
        ws.save()
        ws.cleanup()
        if progress is not None:
            progress(total, total)
        return ExportResult(
            path=ws.target,
            format=format,
            num_images=total,
            chunks_written=len(todo),
            chunks_resumed=len(plans) - len(todo),
            already_complete=False,
            skipped=sum(p.num_records for p in todo) - written if todo else 0,
            image_size=_size_of(policy, state),
        )
    finally:
        if writer is not None:
            writer.close()
        ws.close()


def _size_of(policy: DecodePolicy | None, state: dict[str, Any]) -> tuple[int, int] | None:
    if policy is None:
        return None
    if policy.image_size is not None:
        return policy.image_size
    size = state.get("common_size")
    return (int(size[0]), int(size[1])) if size else None


def _with_common_size(
    policy: DecodePolicy,
    ws: Workspace,
    fetcher: KeepDownloads,
    plans: Sequence[ChunkPlan],
    config: EngineConfig,
) -> DecodePolicy:
    """The policy at the size every image has (found once, then kept in the state)."""
    size = ws.state.get("common_size")
    if size is None:
        depth = max(config.prefetch_chunks, config.max_workers)

        def fetch(chunks: list[int]) -> Iterator[tuple[int, Path]]:
            return fetch_in_order(fetcher, chunks, config.max_workers, depth)

        try:
            size = list(common_size(fetcher, [p.index for p in plans], fetch))
        except ValueError:
            # Refused before anything is written: the next run may choose an image size
            # without --force, and finds the chunks fetched so far in the download folder.
            if not ws.done_chunks():
                ws.forget()
            raise
        ws.state["common_size"] = size
        ws.save()
    return dataclasses.replace(policy, image_size=(int(size[0]), int(size[1])))


@dataclass
class _Counter:
    done: int
    total: int
    callback: Progress | None

    def add(self, n: int) -> None:
        self.done += n
        self.report()

    def report(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total)


def _write_encoded(
    writer: FormatWriter,
    source: KeepDownloads,
    todo: Sequence[ChunkPlan],
    config: EngineConfig,
    counter: _Counter,
) -> int:
    """Writes the parts of formats that keep the stored bytes: no decoding, no processes.

    Returns the number of samples written.
    """
    depth = max(config.prefetch_chunks, config.max_workers)
    sizes = {p.index: p.num_records for p in todo}
    written = 0
    for chunk, path in fetch_in_order(source, list(sizes), config.max_workers, depth):
        records = source.records(chunk, path) if writer.needs_records else None
        owned = path.parent == writer.ws.downloads
        written += writer.chunk_file(chunk, path, records, owned=owned, rows=config.rows_for(None))
        release(writer.ws, path)
        counter.add(sizes[chunk])
    return written


def _write_decoded(
    writer: FormatWriter,
    source: KeepDownloads,
    todo: Sequence[ChunkPlan],
    config: EngineConfig,
    policy: DecodePolicy,
    counter: _Counter,
) -> int:
    """Writes the parts of formats that decode, from one engine run over the missing chunks.

    Returns the number of samples written.
    """
    from pixcrawler_engine.runtime._stream import Stream

    pending = list(todo)  # in output order, as the stream delivers
    rows = 0  # samples of pending[0] written so far
    written = 0

    def commit_first() -> None:
        nonlocal rows
        plan = pending.pop(0)
        if writer.chunk != plan.index:
            writer.begin_chunk(plan.index)  # a chunk without samples (all skipped)
        writer.commit_chunk()
        counter.add(plan.num_records - rows)  # the skipped samples count as done too
        rows = 0
        release(writer.ws, writer.ws.downloads / f"{plan.index}.zip")

    subset = SubsetSource(source, [p.index for p in todo])
    try:
        with Stream(subset, config=config, policy=policy) as stream:
            for batch in stream:
                chunk = int(batch.record_batch.column("chunk")[0].as_py())
                while pending[0].index != chunk:  # chunks the stream passed without a sample
                    commit_first()
                if writer.chunk != chunk:
                    writer.begin_chunk(chunk)
                # batch.images are views into shared memory: written out now, never kept.
                writer.write(Piece(chunk, batch.record_batch, pixels=batch.images))
                rows += len(batch)
                written += len(batch)
                counter.add(len(batch))
                del batch
                if rows == pending[0].num_records:
                    commit_first()
        while pending:
            commit_first()
    except BaseException:
        writer.abort_chunk()
        raise
    return written
