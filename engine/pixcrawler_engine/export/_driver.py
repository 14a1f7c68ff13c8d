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
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine.export._part import WRITERS, ChunkRunner
from pixcrawler_engine.export._state import Workspace
from pixcrawler_engine.export._writers import FormatWriter, Piece
from pixcrawler_engine.sources._base import ChunkPlan, SourceWrapper, SubsetSource
from pixcrawler_engine.sources._cache import CachedSource, ChunkCache

__all__ = ["EXPORT_FORMATS", "ExportResult", "export_job"]

EXPORT_FORMATS = ("numpy", "images", "zip", "parquet")
Progress = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What `export_job` did.

    Attributes:
        path: the export's folder.
        format: the format written.
        num_images: images in the job.
        chunks_written: chunks written by this run.
        chunks_resumed: chunks an earlier run had written already.
        already_complete: the folder held this complete export; nothing was done.
    """

    path: Path
    format: str
    num_images: int
    chunks_written: int
    chunks_resumed: int
    already_complete: bool


def export_job(
    source: Any,
    target: str | Path,
    *,
    format: str = "numpy",
    policy: DecodePolicy | None = None,
    config: EngineConfig | None = None,
    cache: ChunkCache | None = None,
    progress: Progress | None = None,
    runner: ChunkRunner | None = None,
) -> ExportResult:
    """Exports a job to `target`, resuming an interrupted export of the same job and options.

    Args:
        source: a `JobSource` (it has the job's `manifest`); the caller closes it.
        target: the export folder (the CLI passes `<output-dir>/<job_id>`).
        format: `numpy`, `images`, `zip` or `parquet` (the module docstrings of `_export_files`
            and `_export_parquet` describe the layouts).
        policy: how to decode; None exports the stored bytes without decoding (`zip`, and
            `images`/`parquet` in their original encoding). `numpy` needs a fixed size.
        config: engine settings (`max_workers` downloads, `num_workers` decoders, ...).
        cache: a chunk cache shared with other runs; None keeps downloads in the export's
            work folder only.
        progress: called with (images done, images in all) as the export advances.
        runner: writes the parts of the chunks to do elsewhere (one Ray task per chunk, see
            `_part`); None writes them in this process. `cache` does not apply to it.

    Returns:
        What was done.

    Raises:
        ValueError: a format/policy combination that cannot work (said how to fix).
        PixCrawlerError: the target holds another export, or fetching or decoding failed;
            what is committed stays, and the same call resumes.
        OSError: the target cannot be written.
    """
    if format not in WRITERS:
        raise ValueError(f"unknown export format {format!r}; use one of {EXPORT_FORMATS}")
    if format == "zip" and policy is not None:
        raise ValueError("the zip format keeps the chunk files as they are; it takes no policy")
    WRITERS[format].check(policy)  # before anything is written
    config = (config or EngineConfig()).replace(shuffle=False)
    manifest = source.manifest
    plans = source.plan()
    total = sum(p.num_records for p in plans)
    options: dict[str, Any] = {"format": format, "decode": None}
    if policy is not None:
        decode = dataclasses.asdict(policy)
        decode["image_size"] = list(policy.image_size) if policy.image_size else None
        options["decode"] = decode
    identity = {"job_id": manifest.job_id, "job_version": manifest.version, **options}

    ws = Workspace(Path(target))
    writer: FormatWriter | None = None
    try:
        state = ws.open(identity)
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
            )
        threads = config.workers  # PNG encoding: numpy and zlib release the GIL
        writer = WRITERS[format](ws, manifest, policy=policy, threads=threads)
        ws.sweep_temps()
        done = ws.done_chunks()
        todo = [p for p in plans if p.index not in done]
        if state["phase"] == "writing":
            writer.begin()
            if todo:
                fetcher = _fetching_source(source, ws, cache)
                counter = _Counter(total - sum(p.num_records for p in todo), total, progress)
                counter.report()
                if runner is not None:
                    runner(ws, manifest, todo, counter.add)
                elif writer.decoded:
                    assert policy is not None
                    _write_decoded(writer, fetcher, todo, config, policy, counter)
                else:
                    _write_encoded(writer, fetcher, todo, config, counter)
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
        )
    finally:
        if writer is not None:
            writer.close()
        ws.close()


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


class _KeepDownloads(SourceWrapper):
    """A source whose chunk files go to the export's download folder, not the run's temp folder.

    The run never owns them (so it never deletes them); the export deletes each one after its
    chunk's part is committed. An interrupted download stays as `<index>.zip.part`, which the
    next run resumes.
    """

    def __init__(self, source: Any, folder: Path) -> None:
        super().__init__(source)
        self.folder = folder

    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        path, _ = self.source.fetch(chunk, self.folder)
        return path, False


def _fetching_source(source: Any, ws: Workspace, cache: ChunkCache | None) -> _KeepDownloads:
    inner = CachedSource(source, cache) if cache is not None else source
    return _KeepDownloads(inner, ws.downloads)


def _release(ws: Workspace, path: Path) -> None:
    """Deletes a chunk file once its part is committed, if it is the export's own download."""
    if path.parent == ws.downloads:
        path.unlink(missing_ok=True)


def _write_encoded(
    writer: FormatWriter,
    source: _KeepDownloads,
    todo: Sequence[ChunkPlan],
    config: EngineConfig,
    counter: _Counter,
) -> None:
    """Writes the parts of formats that keep the stored bytes: no decoding, no processes."""
    depth = max(config.prefetch_chunks, config.max_workers)
    sizes = {p.index: p.num_records for p in todo}
    for chunk, path in _fetch_in_order(source, list(sizes), config.max_workers, depth):
        records = source.records(chunk, path) if writer.needs_records else None
        owned = path.parent == writer.ws.downloads
        writer.chunk_file(chunk, path, records, owned=owned, rows=config.batch_rows)
        _release(writer.ws, path)
        counter.add(sizes[chunk])


def _fetch_in_order(
    source: _KeepDownloads, chunks: list[int], workers: int, depth: int
) -> Iterator[tuple[int, Path]]:
    """Fetches chunks on `workers` threads, at most `depth` ahead; yields them in order.

    The threads are daemons: a download stuck in a socket read must not keep the process
    alive after Ctrl-C (a `ThreadPoolExecutor` would join them at exit).
    """
    jobs: queue.Queue[tuple[int, Future[Path]] | None] = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            item = jobs.get()
            if item is None:
                return
            chunk, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(source.fetch(chunk, source.folder)[0])
            except BaseException as exc:
                future.set_exception(exc)

    threads = [
        threading.Thread(target=work, name="pxc-export-fetch", daemon=True)
        for _ in range(max(1, min(workers, len(chunks))))
    ]
    for t in threads:
        t.start()
    futures: list[tuple[int, Future[Path]]] = []
    try:
        nxt = 0
        for i, chunk in enumerate(chunks):
            while nxt < len(chunks) and nxt < i + depth:
                future: Future[Path] = Future()
                futures.append((chunks[nxt], future))
                jobs.put((chunks[nxt], future))
                nxt += 1
            _, future = futures[i]
            while True:
                try:
                    path = future.result(timeout=0.5)  # wakes up for Ctrl-C
                    break
                except TimeoutError:
                    continue
            yield chunk, path
    finally:
        stop.set()
        for _, future in futures:
            future.cancel()
        for _ in threads:
            jobs.put(None)


def _write_decoded(
    writer: FormatWriter,
    source: _KeepDownloads,
    todo: Sequence[ChunkPlan],
    config: EngineConfig,
    policy: DecodePolicy,
    counter: _Counter,
) -> None:
    """Writes the parts of formats that decode, from one engine run over the missing chunks."""
    from pixcrawler_engine.runtime._stream import Stream

    pending = list(todo)  # in dataset order, as the stream delivers
    rows = 0  # samples of pending[0] written so far

    def commit_first() -> None:
        nonlocal rows
        plan = pending.pop(0)
        if writer.chunk != plan.index:
            writer.begin_chunk(plan.index)  # a chunk without samples (all skipped)
        writer.commit_chunk()
        counter.add(plan.num_records - rows)  # the skipped samples count as done too
        rows = 0
        _release(writer.ws, writer.ws.downloads / f"{plan.index}.zip")

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
                counter.add(len(batch))
                del batch
                if rows == pending[0].num_records:
                    commit_first()
        while pending:
            commit_first()
    except BaseException:
        writer.abort_chunk()
        raise
