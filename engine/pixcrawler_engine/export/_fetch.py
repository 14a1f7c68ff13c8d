"""How an export fetches its chunks: into its own download folder, in order, a few ahead.

`KeepDownloads` sends chunk files to `<target>/.pixcrawler/download/` (owned by the export's
`Workspace`, kept across runs so that an interrupted download resumes); `fetch_in_order`
fetches on a few daemon threads and yields the chunks in order; `release` deletes a chunk's
download once its part is committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pixcrawler_engine.export._state import Workspace
from pixcrawler_engine.sources._base import SourceWrapper

__all__ = ["KeepDownloads", "fetch_in_order", "release"]


class KeepDownloads(SourceWrapper):
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


def release(ws: Workspace, path: Path) -> None:
    """Deletes a chunk file once its part is committed, if it is the export's own download."""
    if path.parent == ws.downloads:
        path.unlink(missing_ok=True)


def fetch_in_order(
    source: KeepDownloads, chunks: list[int], workers: int, depth: int
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
