"""How the engine's processes start: the supervisor's command line, the workers' context.

NOTE [bootstrap]: the consumer starts the supervisor as a fresh interpreter
(`python -c "...bootstrap()" <conn fd> <release fd>`), not as a multiprocessing child: spawn
would re-run the caller's `__main__` (a script without an `if __name__ == "__main__"` guard
would start itself again). Its arguments arrive over the pipe, pickled with dill, so lambdas and
`__main__` functions travel by value. Workers fork from a fork server the supervisor boots
first thing, preloaded with `_warm`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BOOTSTRAP", "WORKER_ENV", "worker_context"]

BOOTSTRAP = "from pixcrawler_engine.runtime._entry import bootstrap; bootstrap()"
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
    ctx.set_forkserver_preload(["pixcrawler_engine.runtime._warm"])
    forkserver.ensure_running()  # returns at once; the server imports in the background
    return ctx
