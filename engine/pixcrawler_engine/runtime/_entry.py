"""The supervisor process's entry points: its interpreter's `bootstrap` and `supervisor_main`.

See NOTE [bootstrap] in `_launch` for how the consumer starts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from pixcrawler_engine.runtime._zygote import Zygote

__all__ = ["WORKER_ENV", "bootstrap", "supervisor_main"]

# How long a run stopped halfway waits for its running downloads before it parks; its
# consumer waits `_run.PARK_TIMEOUT` for it, past this and the workers' 2 s stop.
PARK_DOWNLOAD_WAIT = 1.0

# The zygote's (and so the workers') allocator settings; the supervisor keeps glibc's defaults.
WORKER_ENV = {
    # glibc's malloc trimming slows Pillow in long-lived processes (measured, see README).
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
}


def bootstrap() -> None:
    """Entry point of the supervisor interpreter (see NOTE [bootstrap] in `_launch`).

    argv holds the file descriptors of its two pipes. It serves runs one after another (NOTE
    [parked] in `_launch`); for each, the messages are `Prepare` (a spare's, while it waits:
    NOTE [spare]), any number; then the caller's `sys.path` (so that its objects unpickle
    here), or None to exit; then the run's arguments (`_launch.dump_run`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the consumer handles Ctrl-C
    # First of all, before any import it can do without: the zygote's imports (numpy, pyarrow
    # and the decoders) are the longest step to a first batch.
    zygote = _fork_zygote({**os.environ, **WORKER_ENV})
    from multiprocessing.connection import Connection

    from pixcrawler_engine.runtime import _supervisor  # noqa: F401  (every run needs it)
    from pixcrawler_engine.runtime._shm import sweep_stale

    conn = Connection(int(sys.argv[1]))
    release = Connection(int(sys.argv[2]), writable=False)
    sweep_stale()  # before the run's arguments: a spare does it while it waits
    while True:
        run = _next_run(conn)
        if run is None:
            # No run came (a spare or a parked supervisor no longer wanted, or its consumer
            # died: NOTE [spare] in `_launch`): the zygote holds nothing, and may be mid-import,
            # so no polite wait.
            zygote.lost()
            os._exit(0)
        code = supervisor_main(conn, release, zygote, run)
        if code is not None:
            zygote.close()
            with contextlib.suppress(Exception):
                conn.close()
            # Download threads may sit in a socket read; they must not keep this process alive.
            os._exit(code)


def _next_run(conn: Connection) -> tuple[Any, ...] | None:
    """The next run's arguments (token, run number, source, config, policy, share, wires), or
    None when the consumer sends this process away or is gone."""
    from pixcrawler_engine.runtime._launch import Prepare, load_run
    from pixcrawler_engine.runtime._protocol import Stop

    try:
        while True:
            message = conn.recv()
            if message is None or isinstance(message, Stop):  # a stop that came after parking
                return None
            if not isinstance(message, Prepare):
                break
            message.apply()
        sys.path[:] = message
        return load_run(conn.recv_bytes())
    except (EOFError, OSError):
        return None


def _fork_zygote(env: dict[str, str]) -> Zygote:
    """Forks the zygote (NOTE [zygote]) before this process imports anything it can do without
    (~30 ms of imports sooner), and returns the handle on it."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        try:
            from pixcrawler_engine.runtime._zygote import forked

            forked(theirs.fileno(), env)
        finally:
            os._exit(1)  # `forked` never returns; an import that fails must not go on here
    theirs.close()
    from pixcrawler_engine.runtime._zygote import Zygote

    return Zygote(env, forked=(pid, mine))


def supervisor_main(
    conn: Connection, release: Connection, zygote: Zygote, run: tuple[Any, ...]
) -> int | None:
    """One run of the supervisor process: None when it parks for the next (NOTE [parked] in
    `_launch`), else the exit code of the process."""
    from pixcrawler_engine.runtime._protocol import ExceptionWrapper, Failed, Parked
    from pixcrawler_engine.runtime._supervisor import Supervisor, _Delivered

    supervisor = None
    code: int | None = 0
    try:
        supervisor = Supervisor(conn, release, zygote, *run)
        supervisor.run()
        # A download still running after PARK_DOWNLOAD_WAIT: the process exits instead.
        if supervisor.parked and supervisor.prefetch.settle(PARK_DOWNLOAD_WAIT):
            code = None
    except (_Delivered, SystemExit):
        pass
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            conn.send(Failed(ExceptionWrapper.wrap(exc, f"in the supervisor (pid {os.getpid()})")))
    finally:
        if supervisor is not None:
            try:
                supervisor.close(park=code is None)
                if code is None:
                    conn.send(Parked())
            except BaseException:
                code = 1
    return code
