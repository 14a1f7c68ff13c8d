"""A fault-injecting HTTP/1.1 reverse proxy on loopback, between a client and the real server.

The proxy owns its listening socket and one thread per connection; `close()` stops them all
(stalled responses wake up at once). Every request is recorded (`requests`) with its headers,
the fault applied and the body bytes sent, so tests can count attempts and re-fetched bytes.

Faults (`Fault.kind`), each applied to the next `times` requests whose path contains `match`:

    reset         send `after_bytes` of the body, then a TCP reset
    truncate      send the full Content-Length but only `after_bytes` of the body, then FIN
    stall         send `after_bytes` of the body, then nothing for `seconds`
    slow          wait `seconds`, then send the whole response
    status        answer `status` with `headers` and `body` (500/502/503, 429 + Retry-After, ...)
    ignore_range  forward without Range/If-Range, so the server answers a full 200
    corrupt       flip one byte in the middle of the body (same length)
    redirect      answer 302 to `location` + the same path (another origin, or this one)

The client's Host header is forwarded, so the server builds absolute chunk URLs on the proxy;
JSON bodies are also rewritten from the upstream origin to the proxy's, as a reverse proxy does.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy", "Seen", "proxied"]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


@dataclass
class Fault:
    """One fault; see the module docstring for the kinds."""

    kind: str
    match: str = "/chunks/"
    times: int = 1
    after_bytes: int = 0
    seconds: float = 5.0
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"injected fault\n"
    location: str = ""


@dataclass
class Seen:
    """One request the proxy received, and what it did."""

    method: str
    path: str
    headers: dict[str, str]
    fault: str | None
    status: int
    body_bytes: int = 0
    client_port: int = 0  # the client's end of the connection (which process asked)
    at: float = 0.0  # time.monotonic() when the request came


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS is set up here, in the connection's thread, so that a client that rejects the
        # certificate only ends its own connection.
        with self.proxy._lock:
            self.proxy.connections += 1
        if self.proxy.tls is not None:
            try:
                request = self.proxy.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
        try:
            super().finish_request(request, client_address)
        finally:
            if self.proxy.tls is not None:
                request.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that give up mid-response are the point of these tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    def do_HEAD(self) -> None:
        self._proxy()

    def _proxy(self) -> None:
        proxy = self.server.proxy
        self.close_connection = True
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        fault = proxy._take(self.path)
        seen = Seen(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in headers.items()},
            fault=fault.kind if fault else None,
            status=0,
            client_port=self.client_address[1],
            at=time.monotonic(),
        )
        with proxy._lock:
            proxy.requests.append(seen)
        if fault is not None and fault.kind == "status":
            seen.status = fault.status
            self._send(fault.status, list(fault.headers.items()), fault.body, seen)
            return
        if fault is not None and fault.kind == "redirect":
            seen.status = 302
            self._send(302, [("Location", fault.location + self.path)], b"", seen)
            return
        if fault is not None and fault.kind == "slow":
            proxy._stop.wait(fault.seconds)
        if fault is not None and fault.kind == "ignore_range":
            headers = {k: v for k, v in headers.items() if k.lower() not in ("range", "if-range")}
        status, out_headers, body = proxy._forward(self.command, self.path, headers)
        seen.status = status
        if fault is not None and fault.kind == "corrupt" and body:
            mutable = bytearray(body)
            mutable[len(body) // 2] ^= 0xFF
            body = bytes(mutable)
        cut = fault.kind if fault is not None else None
        if cut in ("reset", "truncate", "stall"):
            assert fault is not None
            self._send(status, out_headers, body, seen, limit=fault.after_bytes)
            if cut == "stall":
                proxy._stop.wait(fault.seconds)
            elif cut == "reset":
                proxy._stop.wait(0.05)  # let the sent bytes arrive before the reset
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            return
        self._send(status, out_headers, body, seen)

    def _send(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        seen: Seen,
        limit: int | None = None,
    ) -> None:
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        sent = body if limit is None else body[:limit]
        # Counted before the write: the client may have read it all, and the test counted,
        # before this thread runs again.
        seen.body_bytes = len(sent)
        try:
            self.wfile.write(sent)
            self.wfile.flush()
        except OSError:
            seen.body_bytes = 0
            return


class FaultProxy:
    """A reverse proxy to `upstream` on a free loopback port; `url` is its origin.

    Args:
        upstream: the origin of the real server, like `http://127.0.0.1:8000`.
        tls: a server-side SSL context: the proxy then speaks HTTPS to its clients.
    """

    def __init__(self, upstream: str, *, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.tls = tls
        self.faults: list[Fault] = []
        self.requests: list[Seen] = []
        self.connections = 0  # TCP connections accepted, requests or not
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, *faults: Fault) -> FaultProxy:
        """Adds faults; they apply in the order given."""
        with self._lock:
            self.faults.extend(faults)
        return self

    def seen(self, match: str = "") -> list[Seen]:
        """The requests whose path contains `match`."""
        with self._lock:
            return [s for s in self.requests if match in s.path]

    def body_bytes(self, match: str = "") -> int:
        """Body bytes sent in answer to the requests whose path contains `match`."""
        return sum(s.body_bytes for s in self.seen(match))

    def close(self) -> None:
        """Stops serving; stalled responses end at once. Idempotent."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _take(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match in path:
                    fault.times -= 1
                    return fault
        return None

    def _forward(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        parts = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        finally:
            conn.close()
        if "json" in resp.getheader("Content-Type", ""):
            # Absolute URLs the server built for the upstream origin (or for the Host it was
            # given, in plain http) are made to point at this proxy.
            host = headers.get("Host") or headers.get("host") or ""
            for origin in (self.upstream, f"http://{host}"):
                body = body.replace(origin.encode(), self.url.encode())
        return resp.status, out, body


@contextlib.contextmanager
def proxied(upstream: str, *faults: Fault, tls: ssl.SSLContext | None = None) -> Any:
    """`with proxied(server.url, Fault(...)) as proxy:` starts and stops a proxy."""
    proxy = FaultProxy(upstream, tls=tls).add(*faults)
    try:
        yield proxy
    finally:
        proxy.close()
