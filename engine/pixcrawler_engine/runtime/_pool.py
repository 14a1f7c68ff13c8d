"""The supervisor's decode workers: seats, their processes, deaths, hangs and replacements.

A seat is a place for one worker; its process may change. The pool knows each process only by
the supervisor's end of its socket (and the pid the zygote reports): EOF on that socket, or a
failed send, is the process's death, noticed at once, whatever the zygote knows. A worker is
hung when its beat counter (`_shm.Beats`, bumped at every sample) has not moved for
`worker_timeout` seconds while it has a task: the pool kills it, and its EOF follows.

The pool never decides what happens to a dead worker's task: `poll` returns the deaths, and the
supervisor requeues the tasks and asks for replacements (`respawn`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from pixcrawler_engine._config import EngineConfig
from pixcrawler_engine._errors import WorkerError
from pixcrawler_engine.runtime._protocol import Task, TaskDone, TaskFailed, WorkerReady
from pixcrawler_engine.runtime._schedule import WorkerSlot
from pixcrawler_engine.runtime._shm import Beats
from pixcrawler_engine.runtime._zygote import Zygote

__all__ = ["Death", "WorkerPool"]

WORKER_START_TIMEOUT = 120.0
MAX_ZYGOTE_STARTS = 4  # a zygote that keeps dying (a broken install) is an error, not a loop


@dataclass(frozen=True)
class Death:
    """A worker process that ended: its seat, pid and exit code (None when unknown)."""

    worker: WorkerSlot
    pid: int | None
    exitcode: int | None
    hung: bool

    def describe(self) -> str:
        if self.hung:
            return "hung"
        if self.exitcode is None:
            return "died"
        if self.exitcode < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-self.exitcode).name}"
        return f"exited with code {self.exitcode}"


class WorkerPool:
    """The worker processes of one run, forked by its zygote."""

    def __init__(self, zygote: Zygote, beats: Beats, config: EngineConfig) -> None:
        self.zygote = zygote
        self.beats = beats
        self.config = config
        self.workers: list[WorkerSlot] = []
        self.exit_codes: dict[int, int] = {}
        self.zygote_starts = 1
        self.changed = False  # the set of worker pids changed since `pids()` was last read

    # ---- processes --------------------------------------------------------------------------
    def start(self, seats: int) -> None:
        for seat in range(seats):
            self.respawn(seat)

    def respawn(self, seat: int) -> None:
        """Asks the zygote for a worker at `seat` (a new zygote first, if it died)."""
        if not self.zygote.alive:
            self.zygote_starts += 1
            if self.zygote_starts > MAX_ZYGOTE_STARTS:
                raise WorkerError(
                    f"the worker zygote died {MAX_ZYGOTE_STARTS} times; see its error output "
                    "above (a broken install, or the machine is out of memory)"
                )
        conn, request = self.zygote.spawn(seat)
        self.workers.append(WorkerSlot(seat, conn, request))

    def pids(self) -> tuple[int, ...]:
        self.changed = False
        return tuple(w.pid for w in self.workers if w.pid is not None)

    def waitables(self) -> list[Any]:
        handles: list[Any] = [w.conn for w in self.workers]
        if self.zygote.sock is not None:
            handles.append(self.zygote.sock)
        return handles

    # ---- events -------------------------------------------------------------------------------
    def poll(self, ready: list[Any]) -> tuple[list[tuple[WorkerSlot, Any]], list[Death]]:
        """Reads what the ready handles say: (worker, TaskDone/TaskFailed) results, deaths."""
        if self.zygote.sock is not None and self.zygote.sock in ready:
            self._on_zygote()
        results: list[tuple[WorkerSlot, Any]] = []
        deaths: list[Death] = []
        for worker in [w for w in self.workers if w.conn in ready]:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):  # dead, possibly halfway through a message
                deaths.append(self._bury(worker))
                continue
            if isinstance(message, WorkerReady):
                worker.ready = True
            elif isinstance(message, (TaskDone, TaskFailed)):
                results.append((worker, message))
        return results, deaths

    def send(self, worker: WorkerSlot, task: Task) -> Death | None:
        """Gives `task` to `worker`; its Death if the send failed (it is gone)."""
        worker.beat_at = time.monotonic()  # silence is measured from the task's start
        try:
            worker.conn.send(task)
        except OSError:
            return self._bury(worker)
        return None

    def check(self) -> None:
        """Kills workers silent for `worker_timeout` during a task; fails on a stuck start."""
        now = time.monotonic()
        counts = self.beats.counts
        for w in self.workers:
            if not w.ready:
                if now - w.born > WORKER_START_TIMEOUT:
                    raise WorkerError(
                        f"a worker did not start within {WORKER_START_TIMEOUT:.0f} s; the "
                        "machine may be out of memory or processes",
                        pid=w.pid,
                    )
                continue
            if counts[w.seat] != w.beat:
                w.beat, w.beat_at = counts[w.seat], now
            elif w.task is not None and not w.hung and now - w.beat_at > self.config.worker_timeout:
                w.hung = True
                self._kill(w)

    def idle(self) -> list[WorkerSlot]:
        return [w for w in self.workers if w.ready and w.task is None]

    def busy(self) -> bool:
        return any(w.task is not None for w in self.workers)

    # ---- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Asks every worker to exit, waits (bounded) for their EOF, kills the rest; idempotent.
        The zygote stays (the supervisor's `close` ends it, or keeps it for the next run)."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        deadline = time.monotonic() + 2.0
        pending = [w for w in self.workers if w.pid is not None]  # others never started
        for w in self.workers:
            if w.pid is None:
                w.conn.close()
        while pending and (left := deadline - time.monotonic()) > 0:
            ready = wait([w.conn for w in pending], timeout=left)
            for w in [w for w in pending if w.conn in ready]:
                try:
                    w.conn.recv()  # a last result nobody waits for, or EOF
                except (EOFError, OSError):
                    w.conn.close()
                    pending.remove(w)
        for w in pending:
            self._kill(w)
            w.conn.close()
        self.workers.clear()

    # ---- internals ----------------------------------------------------------------------------
    def _on_zygote(self) -> None:
        for kind, a, b in self.zygote.receive():
            if kind == b"P":  # a report for an earlier run names a request no worker has
                worker = next((w for w in self.workers if w.request == a), None)
                if worker is not None:
                    worker.pid = b
                    self.changed = True
            elif kind == b"X":
                self.exit_codes[a] = b

    def _bury(self, worker: WorkerSlot) -> Death:
        self.workers.remove(worker)
        worker.conn.close()
        self.changed = True
        code = None if worker.pid is None else self._exit_code(worker.pid)
        return Death(worker, worker.pid, code, worker.hung)

    def _exit_code(self, pid: int) -> int | None:
        """The code the zygote reports for `pid`; waits a little, it may be on its way."""
        deadline = time.monotonic() + 1.0
        while pid not in self.exit_codes and self.zygote.alive:
            left = deadline - time.monotonic()
            if left <= 0 or self.zygote.sock is None or not wait([self.zygote.sock], left):
                break
            self._on_zygote()
        return self.exit_codes.pop(pid, None)

    @staticmethod
    def _kill(worker: WorkerSlot) -> None:
        if worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
