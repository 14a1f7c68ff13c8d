"""The supervisor's wait: one epoll set kept across iterations, not one built per call.

`multiprocessing.connection.wait` creates and fills a new selector on every call (26 us for
nine handles here, growing with the number of workers); the supervisor's loop calls it several
times per task. `Waiter.wait` keeps one selector and only adds and removes what changed.
"""

from __future__ import annotations

import contextlib
import selectors
from typing import Any

__all__ = ["Waiter"]


class Waiter:
    """Waits until some of a set of handles (objects with `fileno()`, or fds) are readable."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._registered: dict[int, Any] = {}  # fd -> the handle registered for it

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        """The handles that are readable (or closed by their peer) within `timeout` seconds."""
        wanted = {h if isinstance(h, int) else h.fileno(): h for h in handles}
        for fd in [fd for fd, h in self._registered.items() if not _same(wanted.get(fd), h)]:
            self._forget(fd)
        for fd, handle in wanted.items():
            if fd not in self._registered:
                self._selector.register(fd, selectors.EVENT_READ, handle)
                self._registered[fd] = handle
        return [key.data for key, _ in self._selector.select(timeout)]

    def close(self) -> None:
        self._selector.close()
        self._registered.clear()

    def _forget(self, fd: int) -> None:
        # A closed fd has left epoll already (and its number may be reused): never mind.
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(fd)
        del self._registered[fd]


def _same(a: Any, b: Any) -> bool:
    """The same handle: the same object (a connection, a socket), or the same plain fd."""
    return a is b or (isinstance(a, int) and a == b)
