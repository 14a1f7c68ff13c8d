"""How the engine's processes start: the supervisor's command line and the workers' environment.

NOTE [bootstrap]: the consumer starts the supervisor as a fresh interpreter
(`python -c "...bootstrap()" <conn fd> <release fd>`), not as a multiprocessing child: spawn
would re-run the caller's `__main__` (a script without an `if __name__ == "__main__"` guard
would start itself again). Its arguments arrive over the pipe, pickled with dill, so lambdas and
`__main__` functions travel by value. The supervisor's first act is to start the zygote (see
NOTE [zygote]), which warms up the decoders while the supervisor reads its arguments; workers
are forked from the zygote. A stream is thus the consumer, the supervisor, the zygote and the
workers: no fork server, no resource tracker.
"""

from __future__ import annotations

__all__ = ["BOOTSTRAP", "WORKER_ENV"]

BOOTSTRAP = "from pixcrawler_engine.runtime._entry import bootstrap; bootstrap()"
# The zygote's (and so the workers') allocator settings; the supervisor keeps glibc's defaults.
WORKER_ENV = {
    # glibc's malloc trimming slows Pillow in long-lived processes (measured, see README).
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
    "OMP_NUM_THREADS": "1",
}
