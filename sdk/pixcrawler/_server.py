"""The reference job API server (DESIGN §2): a Starlette app over a local job store, under uvicorn.

    GET       /api/v1/jobs                          {"jobs": [summary, ...]} the key may read
    GET       /api/v1/jobs/{job_id}                 the job manifest, chunk urls made absolute
    GET|HEAD  /api/v1/jobs/{job_id}/chunks/{index}  the chunk zip; ETag, Range, If-Range

Auth is `Authorization: Bearer <key>`: 401 for a missing or unknown key, 403 for a key without
access to the job (whether it exists or not, so a key cannot probe for other jobs), 404 for an
unknown job or chunk. A server on a loopback interface may run without keys (`keys=None`):
then every request may read every job (see `_server_keys`). Every error body is
`{"error": "..."}`. Paths come from the store's own validated job ids, never from the request
path, so nothing outside the store is ever served.

`serve` owns the listening socket: it binds it (port 0 picks a free port), prints
`Serving <store> on http://HOST:PORT` and hands it to uvicorn. SIGTERM and SIGINT shut down
gracefully with exit status 0. Keys are never logged.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pixcrawler._server_keys import Access, is_loopback, load_keys
from pixcrawler_engine._errors import NotFoundError
from pixcrawler_engine.sources import _store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Access", "ServerConfig", "create_app", "load_keys", "parse_range", "serve"]

_BLOCK = 256 * 1024
_INDEX = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Defaults of `pixcrawler serve`, read from the `[server]` table of `configs/server.toml`.

    Attributes:
        host: interface to listen on; loopback by default, since the store is served as is.
        port: TCP port; 0 picks a free one (printed on the first line of stdout).
        graceful_timeout: seconds open responses get to finish on shutdown.
        log_level: uvicorn's log level.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    graceful_timeout: int = 5
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a host name or address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an int from 0 to 65535, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(
                f"port must be an int from 0 to 65535 (0: any free port), got {self.port}"
            )
        if (
            isinstance(self.graceful_timeout, bool)
            or not isinstance(self.graceful_timeout, int)
            or self.graceful_timeout < 0
        ):
            raise ValueError(
                f"graceful_timeout must be whole seconds >= 0, got {self.graceful_timeout!r}"
            )
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise ValueError(f"log_level must be one of {levels}, got {self.log_level!r}")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> ServerConfig:
        """Reads the `[server]` table of a TOML file; keyword overrides that are not None win."""
        with open(path, "rb") as f:
            table = tomllib.load(f).get("server", {})
        unknown = set(table) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in [server] of {os.fspath(path)}: {sorted(unknown)}")
        return cls(**{**table, **{k: v for k, v in overrides.items() if v is not None}})


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parses a single-range `Range` header against a resource of `size` bytes.

    Returns:
        (start, end) with `end` exclusive, or None when the header is to be ignored (another
        unit, several ranges, or not a valid byte range: RFC 9110 §14.2 says to ignore it and
        send the whole resource, where Starlette's FileResponse answers 400).

    Raises:
        ValueError: the range is valid but unsatisfiable (start past the end, or `bytes=-0`).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or (not first and last.isdigit())):
        return None
    if last and not last.isdigit():
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError("unsatisfiable")
        return max(size - n, 0), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise ValueError("unsatisfiable")
    end = min(int(last) + 1, size) if last else size
    return start, end


class _ChunkResponse(Response):
    """Streams `[start, end)` of an open file; HEAD sends the headers only.

    The file is opened by the endpoint (so a vanished chunk is a 404, not a broken response)
    and closed here whatever happens. Reads are `pread` in a worker thread, a block at a time:
    a chunk is never held in memory whole. A client that disconnects stops the stream.
    """

    def __init__(
        self, file: Any, *, start: int, end: int, status_code: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status_code=status_code, headers=headers, media_type="application/zip")
        self._file = file
        self._start = start
        self._end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            if scope["method"] == "HEAD" or self._start >= self._end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                await self._stream(send)
                tg.cancel_scope.cancel()
        finally:
            self._file.close()

    async def _stream(self, send: Send) -> None:
        fd, pos = self._file.fileno(), self._start
        while pos < self._end:
            block = await anyio.to_thread.run_sync(os.pread, fd, min(_BLOCK, self._end - pos), pos)
            if not block:
                raise RuntimeError(f"chunk file {self._file.name} shrank while being served")
            pos += len(block)
            await send({"type": "http.response.body", "body": block, "more_body": pos < self._end})


def create_app(store: str | os.PathLike[str], keys: Mapping[str, Access] | None) -> Starlette:
    """The job API over `store` for the given keys (see `load_keys`); None: no auth at all."""
    store = Path(store)
    key_table = None if keys is None else dict(keys)

    def access_of(request: Request) -> Access:
        if key_table is None:
            return "*"
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "missing API key: send 'Authorization: Bearer <api_key>'")
        found: Access | None = None
        for key, access in key_table.items():
            # compare_digest on every key: the time taken says nothing about which one matched.
            if hmac.compare_digest(key.encode(), given.encode()):
                found = access
        if found is None:
            raise HTTPException(401, "invalid API key")
        return found

    def authorize(request: Request, job_id: str) -> None:
        access = access_of(request)
        if access != "*" and job_id not in access:
            raise HTTPException(403, f"this API key has no access to job {job_id!r}")

    def list_jobs(request: Request) -> Response:
        access = access_of(request)
        jobs = [j for j in _store.list_jobs(store) if access == "*" or j["job_id"] in access]
        return JSONResponse({"jobs": jobs})

    def get_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        authorize(request, job_id)
        job = _store.read_job(store, job_id)
        for chunk in job.get("chunks", []):
            chunk["url"] = str(request.url_for("chunk", job_id=job_id, index=str(chunk["index"])))
        return JSONResponse(job)

    def get_chunk(request: Request) -> Response:
        job_id, index = request.path_params["job_id"], request.path_params["index"]
        authorize(request, job_id)
        if _INDEX.fullmatch(index) is None:
            raise NotFoundError(f"chunk {index!r} of job {job_id!r} not found")
        job = _store.read_job(store, job_id)
        path = _store.chunk_path(store, job_id, int(index))
        etag = f'"{job["chunks"][int(index)]["sha256"]}"'
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed by _ChunkResponse
        except FileNotFoundError as exc:  # replaced by a re-pack since read_job
            raise NotFoundError(f"chunk {index} of job {job_id!r} not found") from exc
        size = os.fstat(file.fileno()).st_size
        headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": "private"}
        if etag in _split_etags(request.headers.get("if-none-match", "")):
            file.close()
            return Response(status_code=304, headers=headers)
        start, end, status = 0, size, 200
        header = request.headers.get("range")
        # If-Range: the range applies only to the representation the client already has.
        if header is not None and request.headers.get("if-range", etag) == etag:
            try:
                parsed = parse_range(header, size)
            except ValueError:
                file.close()
                return JSONResponse(
                    {"error": f"range {header!r} not satisfiable: the chunk has {size} bytes"},
                    status_code=416,
                    headers={**headers, "content-range": f"bytes */{size}"},
                )
            if parsed is not None:
                (start, end), status = parsed, 206
                headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
        headers["content-length"] = str(end - start)
        return _ChunkResponse(file, start=start, end=end, status_code=status, headers=headers)

    def error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            headers = {"www-authenticate": "Bearer"} if exc.status_code == 401 else None
            return JSONResponse({"error": exc.detail}, exc.status_code, headers=headers)
        if isinstance(exc, NotFoundError):
            return JSONResponse({"error": str(exc)}, 404)
        return JSONResponse({"error": "internal server error"}, 500)

    routes = [
        Route("/api/v1/jobs", list_jobs, methods=["GET"]),
        Route("/api/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/v1/jobs/{job_id}/chunks/{index}", get_chunk, methods=["GET"], name="chunk"),
    ]
    handlers: Any = {HTTPException: error, NotFoundError: error, Exception: error}
    return Starlette(routes=routes, exception_handlers=handlers)


def _split_etags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def serve(
    store: str | os.PathLike[str],
    *,
    keys: Mapping[str, Access] | None,
    config: ServerConfig | None = None,
) -> None:
    """Serves `store` until SIGTERM or SIGINT, then returns (the CLI exits 0).

    Prints `Serving <store> on http://HOST:PORT` (flushed) once the socket listens, so a
    caller that passed port 0 can read the port from the first line of stdout; without keys
    the line says so (`Serving <store> with no API key (...) on http://HOST:PORT`).

    Args:
        store: the job store.
        keys: the key table (`load_keys`); None serves without auth, on loopback only.
        config: host, port and the rest.

    Raises:
        ValueError: not a job store, or no keys for a host other than loopback.
        OSError: the address cannot be bound (in use, not ours).
    """
    config = config or ServerConfig()
    if not (Path(store) / "jobs").is_dir():
        raise ValueError(
            f"{os.fspath(store)} is not a job store (no jobs/ folder): run `pixcrawler pack` first"
        )
    app = create_app(store, keys)
    family, _, _, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    if keys is None and not is_loopback(str(address[0])):
        raise ValueError(
            f"serving on {config.host} (not a loopback interface) needs an API key: pass "
            "--api-key, set PIXCRAWLER_API_KEY, pass --keys-file, or --generate-key to make one"
        )
    how = ""
    if keys is None:
        how = " with no API key (loopback only: anyone on this machine may read it)"
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        uv = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level=config.log_level,
                lifespan="off",
                timeout_graceful_shutdown=config.graceful_timeout,
                server_header=False,
            )
        )
        with _exit_quietly(uv):
            print(f"Serving {os.fspath(store)}{how} on http://{shown}:{port}", flush=True)
            uv.run(sockets=[sock])
    finally:
        sock.close()


@contextmanager
def _exit_quietly(server: uvicorn.Server) -> Iterator[None]:
    """Turns SIGTERM and SIGINT into a graceful stop with exit status 0.

    uvicorn installs its own handlers while it runs, and re-raises the signal it caught once
    it has shut down, which would kill the process (SIGTERM) or raise KeyboardInterrupt
    (SIGINT). The handlers installed here receive that re-raised signal and do nothing; a
    signal that arrives before uvicorn has started asks it to stop as soon as it does.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
