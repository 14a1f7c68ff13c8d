"""The supervisor process's entry points: its interpreter's `bootstrap` and `supervisor_main`.

See NOTE [bootstrap] in `_launch` for how the consumer starts it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from multiprocessing.connection import Connection

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine.runtime._launch import worker_context
from pixcrawler_engine.runtime._protocol import ExceptionWrapper, Failed
from pixcrawler_engine.runtime._shm import sweep_stale
from pixcrawler_engine.runtime._supervisor import Supervisor, _Delivered
from pixcrawler_engine.sources._base import Source

__all__ = ["bootstrap", "supervisor_main"]


def bootstrap() -> None:
    """Entry point of the supervisor interpreter (see NOTE [bootstrap] in `_launch`).

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
