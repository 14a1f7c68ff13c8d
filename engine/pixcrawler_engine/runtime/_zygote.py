"""The zygote: a single-threaded process that forks decode workers when the supervisor asks.

NOTE [zygote]: the supervisor runs download threads, and a process with threads must never
fork. So its first act, while it has no thread and before it imports what it can do without,
is to fork the zygote (`_entry._fork_zygote`), which imports and warms up the decoders once,
with no thread of its own, and forks every worker from there: a worker costs a fork, not an
interpreter and its imports. Forking the zygote rather than starting an interpreter for it
saves that interpreter's start and imports, ~80 ms before a first batch on 2 busy cores; a
zygote started again later (the first one died), when the supervisor has threads, is a fresh
interpreter (`Zygote.start`). The zygote and the workers are named `pxc-zygote` and
`pxc-worker` (what `ps -o comm` and `top` show). The two talk over a `SOCK_SEQPACKET` socket:

    supervisor -> zygote:  b"A" <path>             the workers' arguments (a dill file)
                           b"S" <seat> <request>   fork a worker for this seat on the socket
                                                   end that comes with it (one fd)
    zygote -> supervisor:  b"P" <request> <pid>    forked
                           b"X" <pid> <exitcode>   a worker ended (the zygote reaps them)
                           b"E" <text>             the zygote cannot serve (then it exits)

A worker talks to the supervisor only through the socket end it was given, so the supervisor
learns of its death from its own handle (EOF, or a failed send), at once, and a worker learns of
the supervisor's death the same way. The zygote is not a single point of failure: a worker
outlives it, and the supervisor starts another zygote when it needs one. It exits when the
supervisor's end of its socket closes, and serves the supervisor's runs one after another (NOTE
[parked] in `_launch`): a late report (of a worker gone before it was read, or of the last
run) names a request, numbered for the supervisor's life, that no worker of this run has.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcrawler_engine._errors import WorkerError
from pixcrawler_engine.runtime._memory import libc
from pixcrawler_engine.runtime._worker_args import dumps_args, load_args

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

__all__ = ["ZYGOTE_MAIN", "Zygote", "forked", "main"]

ZYGOTE_MAIN = "from pixcrawler_engine.runtime._zygote import main; main()"
_SEAT_PID = struct.Struct("<ii")
_MAX_MESSAGE = 4096
# glibc's mallopt parameters that the `MALLOC_*_` variables set at a process's start.
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3}


class Zygote:
    """The supervisor's handle on its zygote process (see NOTE [zygote])."""

    def __init__(
        self, env: dict[str, str], *, forked: tuple[int, socket.socket] | None = None
    ) -> None:
        """A handle on no zygote yet (`start` makes one), or on the child `forked` (its pid,
        and this end of its socket) that `_entry._fork_zygote` made."""
        self.env = env
        self.proc: subprocess.Popen[bytes] | _Forked | None = None
        self.sock: socket.socket | None = None
        self.args_path: Path | None = None
        self.requests = 0  # workers asked for so far: each request's number
        if forked is not None:
            self.proc, self.sock = _Forked(forked[0]), forked[1]

    def start(self) -> None:
        """Starts a fresh zygote interpreter; it warms up while the supervisor goes on."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", ZYGOTE_MAIN, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=self.env,
                stdin=subprocess.DEVNULL,
            )
        self.sock = mine
        if self.args_path is not None:
            self._send(b"A" + os.fsencode(self.args_path))

    @property
    def alive(self) -> bool:
        return self.sock is not None

    def set_args(self, path: Path, args: tuple[Any, ...]) -> None:
        """Writes the workers' arguments to `path` and names it to the zygote (and again to a
        restarted one). Plain pickle when it will do, else dill (`_worker_args`)."""
        path.write_bytes(dumps_args(list(sys.path), args))
        self.args_path = path
        self._send(b"A" + os.fsencode(path))

    def spawn(self, seat: int) -> tuple[Connection, int]:
        """Asks for a worker at `seat` on a new socket; returns the supervisor's end of it (EOF
        when the worker dies, or the zygote before forking it) and the request's number."""
        if self.sock is None:
            self.start()
        self.requests += 1
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            try:
                assert self.sock is not None
                asked = b"S" + _SEAT_PID.pack(seat, self.requests)
                socket.send_fds(self.sock, [asked], [theirs.fileno()])
            except OSError:
                self._gone()  # mine then reads EOF: the worker is redone like a dead one
        from multiprocessing.connection import Connection

        return Connection(mine.detach()), self.requests

    def receive(self) -> list[tuple[bytes, int, int]]:
        """Reads what the zygote reported: (kind, a, b) for P (request, pid) and X (pid, code).

        Raises:
            WorkerError: the zygote reported that it cannot serve (`E`).
        """
        reports: list[tuple[bytes, int, int]] = []
        reset = False
        while self.sock is not None:
            try:
                data = self.sock.recv(_MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except ConnectionResetError:
                if reset:
                    data = b""
                else:  # it exited with our messages unread: what it sent follows, then EOF
                    reset = True
                    continue
            except OSError:
                data = b""
            if not data:
                self.lost()
                break
            kind, body = data[:1], data[1:]
            if kind == b"E":
                said = body.decode(errors="replace")
                raise WorkerError(f"the worker zygote cannot start workers: {said}")
            reports.append((kind, *_SEAT_PID.unpack(body)))
        return reports

    def _gone(self) -> None:
        """A send failed: reads what the zygote said last (its `E` raises), then forgets it."""
        try:
            self.receive()
        finally:
            self.lost()

    def lost(self) -> None:
        """Forgets a zygote that died (or is being replaced); the next spawn starts another."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        """Closes the socket (the zygote exits on EOF) and reaps it; idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _send(self, message: bytes) -> None:
        if self.sock is None:
            return
        try:
            self.sock.send(message)
        except OSError:
            self._gone()


class _Forked:
    """A forked zygote, stopped and reaped like a `subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"zygote {self.pid}", timeout or 0.0)
            else:
                time.sleep(0.005)
        return self.returncode


# ---- the zygote process ----------------------------------------------------------------------
def forked(fd: int, env: dict[str, str]) -> None:
    """The supervisor's forked child (`_entry._fork_zygote`) becomes the zygote, as a fresh
    interpreter would (only its socket and standard streams open, stdin empty, the workers'
    environment), and never returns."""
    code = 0
    try:
        os.closerange(3, fd)
        os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        glibc = libc()
        for name, param in _MALLOPT.items():  # read by glibc only when a process starts
            if glibc is not None and name in env:
                glibc.mallopt(param, int(env[name]))
        main(fd)
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        os._exit(code)


def _set_name(name: bytes) -> None:
    """What `ps -o comm` and `top` show for this process (Linux; elsewhere nothing)."""
    glibc = libc()
    if glibc is not None:
        glibc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def main(fd: int | None = None) -> None:
    """Entry point of the zygote: warm up, then fork workers on request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the consumer decides what stops
    _set_name(b"pxc-zygote")
    sock = socket.socket(fileno=int(sys.argv[1]) if fd is None else fd)
    from pixcrawler_engine.runtime._worker import warm_up, worker_main

    try:
        warm_up()
    except Exception as exc:  # a broken install: say so instead of dying silently
        sock.send(b"E" + f"the decoders cannot start: {type(exc).__name__}: {exc}".encode())
        return
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through wake_w
    children: set[int] = set()
    try:
        _serve(sock, wake_r, wake_w, children, worker_main)
    finally:
        _end_workers(children, grace=1.0)


def _serve(
    sock: socket.socket, wake_r: int, wake_w: int, children: set[int], worker_main: Any
) -> None:
    """Forks workers on request until the supervisor's end closes; `children`: those alive."""
    args: tuple[Any, ...] | None = None
    while True:
        children.difference_update(_reap(sock))
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [], 5.0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        if sock.fileno() not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 1)
        except OSError:
            return  # the supervisor is gone (it closed with reports unread)
        if not data:
            return  # the supervisor is gone
        if data[:1] == b"A":
            try:
                args = load_args(Path(os.fsdecode(data[1:])))
            except Exception as exc:  # e.g. a transform whose module this process cannot import
                message = f"the workers' arguments cannot be loaded: {type(exc).__name__}: {exc}"
                sock.send(b"E" + message.encode()[: _MAX_MESSAGE - 1])
                return
        elif data[:1] == b"S" and fds:
            seat, request = _SEAT_PID.unpack(data[1:])
            if args is None:
                os.close(fds[0])  # no arguments yet: the supervisor sees EOF and asks again
                continue
            pid = os.fork()
            if pid == 0:
                _become_worker(sock, (wake_r, wake_w), fds[0], seat, args, worker_main)
            children.add(pid)
            os.close(fds[0])
            try:
                sock.send(b"P" + _SEAT_PID.pack(request, pid))
            except OSError:
                return  # the supervisor is gone


def _reap(sock: socket.socket) -> list[int]:
    """Reaps ended workers and reports their exit codes; returns their pids."""
    reaped: list[int] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append(pid)
        with contextlib.suppress(OSError):
            sock.send(b"X" + _SEAT_PID.pack(pid, os.waitstatus_to_exitcode(status)))


def _end_workers(children: set[int], grace: float) -> None:
    """Reaps the workers (ending: their supervisor is gone) before the zygote exits, SIGKILLed
    after `grace` s: none is left to init, often the training script in a container."""
    deadline = time.monotonic() + grace
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)


def _become_worker(
    sock: socket.socket,
    wake: tuple[int, int],
    fd: int,
    seat: int,
    args: tuple[Any, ...],
    worker_main: Any,
) -> None:
    """The forked child: drops the zygote's handles and runs the worker loop, then exits."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _set_name(b"pxc-worker")
        sock.close()
        for end in wake:
            os.close(end)
        from pixcrawler_engine.runtime._protocol import Channel

        worker_main(Channel(fd), *args, seat=seat)
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        os._exit(code)
