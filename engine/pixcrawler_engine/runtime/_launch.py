"""How the engine's processes start: the supervisor's launch, a spare one, one parked.

NOTE [bootstrap]: the consumer starts the supervisor as a fresh interpreter
(`python -c "...bootstrap()" <conn fd> <release fd>`), not as a multiprocessing child: spawn
would re-run the caller's `__main__` (a script without an `if __name__ == "__main__"` guard
would start itself again). Its arguments arrive over the pipe, pickled with dill
(`dump_run`), so lambdas and `__main__` functions travel by value; the messages of a run are
plain pickle. The supervisor's first act, before its own imports, is to
fork the zygote (see NOTE [zygote]), which warms up the decoders while the supervisor reads its
arguments; workers are forked from the zygote. A stream is thus the consumer, the supervisor,
the zygote and the workers: no fork server, no resource tracker.

NOTE [spare]: nothing in a supervisor's start-up (its interpreter, the zygote's interpreter and
imports: most of the time to a first batch) depends on the run's arguments, so a supervisor can
be launched ahead of time and wait for them, blocked on its pipe. A `Spare` keeps at most one
waiting supervisor for a consumer's next run: one launched ahead (`to_tensorflow()` launches its
first pass's while TensorFlow traces its pipeline), or one parked by the pass before (NOTE
[parked]). While it waits, a spare launched ahead does what needs no arguments: it sweeps stale
runs, imports the supervisor's modules and those the consumer names in `Prepare` (its source's
module). A waiting supervisor owns no resource (no segment, folder or lock: those come with
the arguments) and exits when told (None) or when its pipe closes: on `Spare.close()`, when the
consumer dies, or when the spare is garbage collected. Only the process that launched it
uses or closes it (a forked child, e.g. a DataLoader worker, sees no spare). Its environment is
the consumer's at launch time, without the API key, like any supervisor's.

NOTE [parked]: a supervisor serves runs one after another. When a `Dataset`'s pass ends
cleanly (its `Finished` read), the stream sends `Stop(park=True)` instead of stopping the
process, and puts it back into the dataset's `Spare` without waiting: the supervisor ends the
run as it would before exiting (the workers exit; slots, beats, folder and lock go) but keeps
its zygote, and waits for the next run's arguments like a spare. The next pass then starts
with no interpreter, import or zygote to pay for: a spare launched near each pass's end (as
until 2026-11-30) took ~0.29 s of CPU from that pass (a warm epoch of the demo photos over
HTTP: 2.45 CPU-s with the spare, 2.16 parked), and the next pass's first batch could wait for
its imports. A pass stopped halfway (a `break`, a fixed number of steps an epoch) parks its
supervisor too: the workers end their task and exit, the downloads running are waited for
(`_entry.PARK_DOWNLOAD_WAIT`, else the process exits), and the stream waits for `Parked`
(`_run.PARK_TIMEOUT`), dropping what was sent before it. An error, or a stream of its own,
stops the process as before. What a run leaves behind cannot reach the next: its slots'
releases carry its run number (`RELEASE`), a worker's fork report names the request it
answers (`_zygote`), and no slot is grown after `Finished`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOOTSTRAP",
    "SECRET_ENV",
    "Launched",
    "Prepare",
    "Spare",
    "dump_run",
    "launch",
    "load_run",
    "modules_of",
]

BOOTSTRAP = "from pixcrawler_engine.runtime._entry import bootstrap; bootstrap()"
# Variables a child process must not inherit: the API key never reaches another process's
# environment (it travels to the supervisor inside the source, over a pipe).
SECRET_ENV = ("PIXCRAWLER_API_KEY",)


@dataclass(frozen=True)
class Prepare:
    """To a waiting supervisor: the consumer's `sys.path` and modules its run will import."""

    sys_path: list[str]
    modules: tuple[str, ...]

    def apply(self) -> None:
        """Imports the modules now (the run's unpickling would); one that fails is left."""
        sys.path[:] = self.sys_path
        for name in self.modules:
            with contextlib.suppress(Exception):
                importlib.import_module(name)


class Launched:
    """A supervisor process started and waiting for its run's arguments (NOTE [bootstrap]).

    Attributes:
        proc: the supervisor's process.
        conn: the consumer's end of its message pipe.
        release: the write end of its slot-release pipe.
        owner: the pid of the process that launched it: only that one may use it.
        runs: the runs it was given so far (NOTE [parked]); the next one's number.
    """

    def __init__(self, proc: subprocess.Popen[bytes], conn: Any, release: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.release = release
        self.owner = os.getpid()
        self.runs = 0

    def usable(self) -> bool:
        """True in the process that launched it, while the supervisor lives."""
        return self.owner == os.getpid() and self.proc.poll() is None

    def close(self) -> None:
        """Sends it away (None, then EOF) and reaps it; idempotent, a no-op elsewhere."""
        if self.owner != os.getpid():
            return  # a forked copy: the launching process owns it
        with contextlib.suppress(Exception):
            # Said, not only EOF: a forked child (a DataLoader worker) may hold the pipe too.
            self.conn.send(None)
        for end in (self.conn, self.release):
            with contextlib.suppress(Exception):
                end.close()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def launch() -> Launched:
    """Starts a supervisor interpreter; it starts its zygote and waits for its arguments."""
    from multiprocessing.connection import Pipe

    conn, child_conn = Pipe()
    release_r, release_w = Pipe(duplex=False)
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    fds = (child_conn.fileno(), release_r.fileno())
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, *map(str, fds)], pass_fds=fds, env=env
        )
    except BaseException:
        for end in (conn, release_w):
            end.close()
        raise
    finally:
        child_conn.close()
        release_r.close()
    return Launched(proc, conn, release_w)


class Spare:
    """At most one supervisor waiting for the owner's next run (see NOTE [spare], [parked]).

    `take()` hands it over (or None), `refill()` launches one, `park()` keeps one whose run
    ended, `close()` stops it. A `weakref.finalize` closes it when the `Spare` is garbage
    collected.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self._box: list[Launched] = []
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._closed = not enabled
        self._finalizer = weakref.finalize(self, _close_all, self._box)

    def take(self) -> Launched | None:
        """The waiting supervisor, if one is alive and this process launched it."""
        with self._lock:
            launched = self._box.pop() if self._box else None
        if launched is not None and not launched.usable():
            launched.close()
            return None
        return launched

    def park(self, launched: Launched) -> None:
        """Keeps `launched`, a supervisor whose run ended, for the next run (NOTE [parked]);
        sends it away instead when one waits already or this spare is closed."""
        with self._lock:
            keep = not self._closed and not self._box and launched.owner == os.getpid()
            if keep:
                self._box.append(launched)
        if not keep:
            launched.close()

    def refill(self, modules: tuple[str, ...] = ()) -> None:
        """Launches a supervisor for the next run unless one waits, or this one is closed.

        Args:
            modules: modules the next run's arguments need (its source's): imported ahead.
        """
        with self._lock:
            if self._closed or self._box or self._owner != os.getpid():
                return
            launched = launch()
            with contextlib.suppress(OSError):  # if it died, `take` finds out
                launched.conn.send(Prepare(list(sys.path), modules))
            self._box.append(launched)

    @property
    def closed(self) -> bool:
        """True once `close()` was called (or for a disabled spare): it keeps no supervisor."""
        return self._closed

    @property
    def pid(self) -> int | None:
        """The waiting supervisor's pid, or None."""
        box = self._box
        return box[0].proc.pid if box else None

    def close(self) -> None:
        """Stops the waiting supervisor, if any; no more are launched. Idempotent."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_disabled, ())  # a copy in another process (a DataLoader worker) keeps none


def _disabled() -> Spare:
    return Spare(enabled=False)


def dump_run(run: tuple[Any, ...]) -> bytes:
    """A run's arguments as the consumer sends them: dill, so that lambdas and `__main__`
    objects travel by value (NOTE [bootstrap])."""
    from multiprocess.reduction import ForkingPickler

    return bytes(ForkingPickler.dumps(run))


def load_run(data: bytes) -> tuple[Any, ...]:
    """What `dump_run` wrote, in the supervisor."""
    from multiprocess.reduction import ForkingPickler

    return tuple(ForkingPickler.loads(data))


def modules_of(obj: object) -> tuple[str, ...]:
    """The modules that unpickling `obj` in another process imports (those loaded here).

    Read from the opcodes of its pickle (the same pickler a run's arguments travel with);
    only names of modules this process has imported are kept, so no other string can pass.
    """
    import pickletools

    from multiprocess.reduction import ForkingPickler

    strings: list[Any] = []  # what the string-pushing opcodes pushed, in order
    memo: dict[int, Any] = {}
    found = set()
    pushed = False
    for op, arg, _ in pickletools.genops(bytes(ForkingPickler.dumps(obj))):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            strings.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(arg) if isinstance(arg, int) else None)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if pushed else None
        elif op.name == "GLOBAL":
            found.add(str(arg).split(" ")[0])
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(strings[-2])
        pushed = op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE")
        pushed = pushed or op.name in ("BINGET", "LONG_BINGET", "GET")
    found.discard("__main__")  # the other process has its own
    return tuple(sorted(name for name in found if isinstance(name, str) and name in sys.modules))


def _close_all(box: list[Launched]) -> None:
    while box:
        box.pop().close()
