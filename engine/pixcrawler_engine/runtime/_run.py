"""A run's state on the consumer's side, and its end: the supervisor parked or stopped.

Kept apart from `Stream` so that its finalizer holds no cycle (`shutdown` gets the state, not
the stream), and so that a view, whose release needs the state, keeps no stream alive.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from pixcrawler_engine.runtime._launch import Launched, Spare
from pixcrawler_engine.runtime._protocol import RELEASE, Parked, Stop
from pixcrawler_engine.runtime._shm import sweep_run

__all__ = ["PARK_TIMEOUT", "RunState", "shutdown"]

# A run stopped halfway parks once its workers end their task (a pool stop's grace is 2 s).
PARK_TIMEOUT = 5.0


@dataclass
class RunState:
    """Everything teardown needs, kept apart from `Stream` so the finalizer holds no cycle.

    Only the process that started the run stops it or releases its slots: a forked child (a
    DataLoader worker) that drops its copy of a stream, iterator or view closes its own copies
    of the pipes and mappings, and nothing else.
    """

    owner: int = field(default_factory=os.getpid)
    proc: Any = None
    token: str = ""
    run: int = 0  # the run's number on its supervisor (NOTE [parked] in `_launch`)
    launched: Launched | None = None
    home: Spare | None = None  # where the supervisor parks when the run ends (NOTE [parked])
    finished: bool = False  # `Finished` read
    failed: bool = False  # the run raised (the supervisor is not parked)
    conn: Any = None
    release_fd: int = -1
    release_conn: Any = None
    slots: list[Any] = field(default_factory=list)
    live_leases: int = 0
    closed: bool = False
    unresponsive: bool = False  # the supervisor missed its heartbeat: no polite stop
    stats: dict[str, Any] = field(default_factory=dict)

    def release(self, slot: int) -> None:
        # Runs from garbage collection, in any thread: one atomic pipe write, no lock.
        self.live_leases -= 1
        if not self.closed and self.owner == os.getpid():
            with contextlib.suppress(OSError):
                os.write(self.release_fd, RELEASE.pack(self.run, slot))


def shutdown(state: RunState) -> None:
    """Ends the run: parks its supervisor for the next one (NOTE [parked] in `_launch`), or stops
    it: ask, wait, terminate, kill, reclaim. Safe to call any number of times."""
    if state.closed:
        return
    state.closed = True
    mine = state.owner == os.getpid()
    if not (mine and _park(state)):
        if mine and state.proc is not None:
            _stop(state.proc, state)
        for conn in (state.conn, state.release_conn):
            with contextlib.suppress(Exception):
                conn.close()
    # The views still out keep this state: not the dataset's spare, nor the process.
    state.home = state.launched = None
    while state.slots:
        state.slots.pop().close()  # unmaps now, or when the last view is gone


def _park(state: RunState) -> bool:
    """Puts the run's supervisor back into its home `Spare`: at once after `Finished`, and
    for a run stopped halfway (a `break`) once it says `Parked`. False when the run failed,
    has no home, or its supervisor did not park (it then exits)."""
    home, launched = state.home, state.launched
    if state.failed or state.unresponsive or home is None or home.closed or launched is None:
        return False
    try:
        state.conn.send(Stop(park=True))
    except OSError:
        return False
    if not state.finished and not _parked(state.conn):
        return False
    home.park(launched)
    return True


def _parked(conn: Any) -> bool:
    """Whether the supervisor of a run stopped halfway says `Parked` (its workers stop after
    their task, within `PARK_TIMEOUT`); what it sent before is dropped."""
    deadline = time.monotonic() + PARK_TIMEOUT
    try:
        while (left := deadline - time.monotonic()) > 0 and conn.poll(left):
            if isinstance(conn.recv(), Parked):
                return True
    except (EOFError, OSError):
        pass
    return False


def _stop(proc: subprocess.Popen[bytes], state: RunState) -> None:
    steps: tuple[tuple[Any, float], ...] = ((proc.kill, 2.0),)
    if not state.unresponsive:
        with contextlib.suppress(Exception):
            state.conn.send(Stop())
        steps = ((None, 5.0), (proc.terminate, 2.0), (proc.kill, 2.0))
    for stop, grace in steps:
        if stop is not None:
            stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            break
    # A supervisor that was killed could not clean up: its lock is free now, so this can.
    sweep_run(state.token)
