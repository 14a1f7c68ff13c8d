"""The process runtime: a consumer's stream, its supervisor and decode workers, and their transport.

    _stream.py      the consumer: starts the supervisor, maps slots, yields batches in place
    _supervisor.py  the supervisor process: schedules, orders, delivers, restarts workers
    _schedule.py    the supervisor's bookkeeping: chunks in flight, tasks, worker handles
    _prefetch.py    chunk downloads ahead of decoding, in a thread pool
    _worker.py      the worker loop: tasks in, Arrow batches in shared-memory slots out
    _chunk.py       decoding one chunk's records into one RecordBatch (a plain function)
    _launch.py      how processes start: the supervisor's command line, the workers' context
    _entry.py       the supervisor process's entry point
    _protocol.py    the messages between the three, and errors that cross them
    _shm.py         shared-memory slots: created and unlinked by the supervisor alone
    _batch.py       the Arrow layout of a decoded batch, written and read in place

Public names are re-exported by `pixcrawler_engine`; this package imports nothing itself, so a
worker that needs one module does not load the others.
"""
