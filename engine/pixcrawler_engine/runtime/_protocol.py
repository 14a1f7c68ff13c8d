"""Messages between the consumer, the supervisor and the workers, and errors that cross them.

Every message is a frozen dataclass; none carries pixels (those stay in shared memory).

    consumer -> supervisor:  Grow() | Ping() | Stop(park)  (released slots: `RELEASE` on a pipe)
    supervisor -> consumer:  Ready(slots) | Workers(pids) | BatchReady(...) | SlotsAdded(names)
                             | Pong() | Failed(error) | Finished(stats) | Parked()
    supervisor -> worker:    Task(...) | None (exit)
    worker -> supervisor:    WorkerReady() | TaskDone(...) | TaskFailed(...)
"""

from __future__ import annotations

import pickle
import select
import socket
import struct
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pixcrawler_engine._errors import PixCrawlerError

if TYPE_CHECKING:
    from pixcrawler_engine.sources._listing import RecordLines

__all__ = [
    "RELEASE",
    "BatchReady",
    "Channel",
    "ExceptionWrapper",
    "Failed",
    "Finished",
    "Grow",
    "Parked",
    "Ping",
    "Pong",
    "Ready",
    "SlotsAdded",
    "Stop",
    "Task",
    "TaskDone",
    "TaskFailed",
    "WorkerReady",
    "Workers",
]

# One released slot, as the consumer writes it to its pipe: (run number, slot). A supervisor
# serves runs one after another (NOTE [parked] in `_launch`): a view of an earlier run may be
# released during a later one, which must not take it for one of its own slots.
RELEASE = struct.Struct("<ii")


class Channel:
    """A worker's end of its socket to the supervisor, framed as `Connection` frames messages (a
    4-byte big-endian length, then the pickle), without importing `multiprocessing` (~8 ms of a
    zygote's start-up, before any first batch). Raises EOFError when the peer is gone."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._sock.sendall(_FRAME.pack(len(data)) + data)

    def recv(self) -> Any:
        (size,) = _FRAME.unpack(self._read(_FRAME.size))
        return pickle.loads(self._read(size))

    def poll(self, timeout: float) -> bool:
        """Whether a message (or EOF) arrives within `timeout` seconds."""
        return bool(select.select([self._sock], [], [], timeout)[0])

    def close(self) -> None:
        self._sock.close()

    def _read(self, size: int) -> bytearray:
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            n = self._sock.recv_into(view[got:])
            if not n:
                raise EOFError("the supervisor closed the channel")
            got += n
        return data


_FRAME = struct.Struct("!i")  # what multiprocessing's Connection writes before a message


@dataclass(frozen=True)
class ExceptionWrapper:
    """An exception caught in another process, with its type and formatted traceback."""

    exc_bytes: bytes | None
    type_name: str
    message: str
    where: str
    tb: str

    @classmethod
    def wrap(cls, exc: BaseException, where: str) -> ExceptionWrapper:
        exc_bytes: bytes | None
        try:
            exc_bytes = pickle.dumps(exc)
            pickle.loads(exc_bytes)
        except Exception:  # an exception that cannot be rebuilt travels as text
            exc_bytes = None
        tb = "".join(traceback.format_exception(exc))
        return cls(exc_bytes, type(exc).__qualname__, str(exc), where, tb)

    def reraise(self) -> None:
        exc: BaseException
        if self.exc_bytes is not None:
            exc = pickle.loads(self.exc_bytes)
        else:
            exc = PixCrawlerError(f"{self.type_name}: {self.message}")
        exc.add_note(f"raised {self.where}; its traceback there:\n{self.tb}")
        raise exc


# consumer -> supervisor
@dataclass(frozen=True)
class Grow:
    """The consumer holds every slot and waits: the supervisor adds one."""


@dataclass(frozen=True)
class Stop:
    """The consumer is done with the run. `park`: to keep the process and its zygote for the
    consumer's next run (NOTE [parked] in `_launch`), which it says with `Parked`."""

    park: bool = False


@dataclass(frozen=True)
class Ping:
    """The consumer has heard nothing for a while: the supervisor answers `Pong` at once."""


# supervisor -> consumer
@dataclass(frozen=True)
class Ready:
    slots: tuple[str, ...]


@dataclass(frozen=True)
class Workers:
    """The worker processes now running (sent when one starts or is replaced)."""

    pids: tuple[int, ...]


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Parked:
    """After `Stop(park=True)`: the run is torn down and the process waits for the next."""


@dataclass(frozen=True)
class SlotsAdded:
    names: tuple[str, ...]


@dataclass(frozen=True)
class BatchReady:
    slot: int
    nbytes: int
    rows: int
    chunk: int
    errors: tuple[tuple[str, str], ...] = ()  # (key, message) of samples skipped by on_error
    notes: tuple[tuple[str, str], ...] = ()  # (key, message): what decoders said (`_chatter`)
    last: bool = False  # the run's last batch: `Finished` follows (NOTE [last batch] in `_stream`)


@dataclass(frozen=True)
class Failed:
    error: ExceptionWrapper


@dataclass(frozen=True)
class Finished:
    stats: dict[str, Any] = field(default_factory=dict)


# supervisor -> worker
@dataclass(frozen=True)
class Task:
    """Records to decode into `slot`, drawn from one chunk or (shuffled) from several.

    `parts[i]` is the position in `chunks`/`paths` of record i's chunk; None when all come
    from the first. Records travel as their manifest lines, which the worker builds (NOTE
    [manifest lines] in `sources._listing`), or as plain tuples (`Record._make` rebuilds them):
    a named tuple pickles through a Python call each, which cost the supervisor ~6 us an image.
    `group` is the task's group in the run's order (groups are dispatched in order).
    """

    task_id: int
    chunks: tuple[int, ...]
    paths: tuple[str, ...]
    records: RecordLines | tuple[tuple[Any, ...], ...]
    slot: int
    parts: tuple[int, ...] | None = None
    group: int = 0


# worker -> supervisor
@dataclass(frozen=True)
class WorkerReady:
    """Sent once a worker has set up: only then it gets tasks."""


@dataclass(frozen=True)
class TaskDone:
    task_id: int
    nbytes: int
    rows: int
    covered: int  # records consumed: rows + skipped; fewer than given when the slot filled up
    errors: tuple[tuple[str, str], ...] = ()
    notes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TaskFailed:
    task_id: int
    error: ExceptionWrapper
