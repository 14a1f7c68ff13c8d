"""Entry points of the engine's processes: the supervisor's interpreter and the workers' context.

NOTE [bootstrap]: the consumer starts the supervisor as a fresh interpreter
(`python -c "...bootstrap()" <conn fd> <release fd>`), not as a multiprocessing child: spawn
would re-run the caller's `__main__` (a script without an `if __name__ == "__main__"` guard
would start itself again). Its arguments arrive over the pipe, pickled with dill, so lambdas and
`__main__` functions travel by value. Workers fork from a fork server the supervisor boots
first thing, preloaded with `_warm`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from pixcrawler.engine._config import DecodePolicy, EngineConfig
from pixcrawler.engine._protocol import ExceptionWrapper, Failed
from pixcrawler.engine._shm import sweep_stale
from pixcrawler.engine._sources import Source
from pixcrawler.engine._supervisor import Supervisor, _Delivered

__all__ = ["BOOTSTRAP", "WORKER_ENV", "bootstrap", "supervisor_main", "worker_context"]

BOOTSTRAP = "from pixcrawler.engine._launch import bootstrap; bootstrap()"
WORKER_ENV = {
    # glibc's malloc trimming slows Pillow in long-lived processes (measured, see README).
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
}


def worker_context() -> Any:
    """The multiprocess context workers start from, with its fork server booting.

    Workers fork from a single-threaded server that imported and warmed up the decoder once:
    fast to start (one import for all of them) and safe (never a fork of a threaded process).
    """
    import multiprocess
    from multiprocess import forkserver

    ctx = multiprocess.get_context("forkserver")
    ctx.set_forkserver_preload(["pixcrawler.engine._warm"])
    forkserver.ensure_running()  # returns at once; the server imports in the background
    return ctx


def bootstrap() -> None:
    """Entry point of the supervisor interpreter (see NOTE [bootstrap] in `_stream`).

    argv holds the file descriptors of its two pipes; the first message is the caller's
    `sys.path` (so that its objects unpickle here), the second the run's arguments.
    """
    from multiprocess.connection import Connection as DillConnection

    conn = DillConnection(int(sys.argv[1]))
    release = DillConnection(int(sys.argv[2]), writable=False)
    worker_context()  # boots while we read our arguments
    try:
        sys.path[:] = conn.recv()
        source, config, policy = conn.recv()
    except (EOFError, OSError):
        os._exit(0)  # the consumer went away before the run began
    supervisor_main(conn, release, source, config, policy)


def supervisor_main(
    conn: Connection,
    release: Connection,
    source: Source,
    config: EngineConfig,
    policy: DecodePolicy,
) -> None:
    """The body of the supervisor process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the consumer handles Ctrl-C
    sweep_stale()
    supervisor = None
    code = 0
    try:
        supervisor = Supervisor(conn, release, source, config, policy)
        supervisor.run()
    except (_Delivered, SystemExit):
        pass
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            conn.send(Failed(ExceptionWrapper.wrap(exc, f"in the supervisor (pid {os.getpid()})")))
    finally:
        if supervisor is not None:
            supervisor.close()
        with contextlib.suppress(Exception):
            conn.close()
        # Download threads may sit in a socket read; they must not keep this process alive.
        os._exit(code)
