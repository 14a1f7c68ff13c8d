"""The reference job API server, over HTTP on a loopback port: endpoints, auth, Range, traversal."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ServerProcess

from pixcrawler._server import ServerConfig, load_keys, parse_range
from pixcrawler_engine.sources import _store


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=30
    ) as c:
        yield c


def _chunk_url(index: int, job: str = "demo") -> str:
    return f"/api/v1/jobs/{job}/chunks/{index}"


def _chunk_bytes(store: Path, index: int) -> bytes:
    return _store.chunk_path(store, "demo", index).read_bytes()


# ----------------------------------------------------------------------------- endpoints


def test_list_jobs(client: httpx.Client, server: ServerProcess) -> None:
    r = client.get("/api/v1/jobs")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    jobs = {j["job_id"]: j for j in r.json()["jobs"]}
    assert set(jobs) == {"demo", "pending"}
    assert jobs == {j["job_id"]: j for j in _store.list_jobs(server.store)}
    limited = client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {server.limited_key}"})
    assert [j["job_id"] for j in limited.json()["jobs"]] == ["pending"]


def test_manifest_has_absolute_chunk_urls(client: httpx.Client, server: ServerProcess) -> None:
    r = client.get("/api/v1/jobs/demo")
    assert r.status_code == 200
    job = r.json()
    on_disk = _store.read_job(server.store, "demo")
    assert {k: v for k, v in job.items() if k != "chunks"} == {
        k: v for k, v in on_disk.items() if k != "chunks"
    }
    for served, stored in zip(job["chunks"], on_disk["chunks"], strict=True):
        assert served["url"] == f"{server.url}/api/v1/jobs/demo/chunks/{stored['index']}"
        assert {k: v for k, v in served.items() if k != "url"} == {
            k: v for k, v in stored.items() if k != "url"
        }


def test_processing_job_manifest(server: ServerProcess) -> None:
    r = httpx.get(
        f"{server.url}/api/v1/jobs/pending",
        headers={"Authorization": f"Bearer {server.limited_key}"},
    )
    assert r.status_code == 200
    assert r.json()["status"] == "processing" and r.json()["progress"] == 42


def test_every_chunk_round_trips_byte_for_byte(client: httpx.Client, server: ServerProcess) -> None:
    job = client.get("/api/v1/jobs/demo").json()

    def fetch(chunk: dict) -> tuple[dict, httpx.Response]:
        return chunk, client.get(chunk["url"])

    with ThreadPoolExecutor(4) as pool:  # concurrent downloads, as the SDK makes them
        for chunk, r in pool.map(fetch, job["chunks"]):
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/zip"
            assert r.headers["etag"] == f'"{chunk["sha256"]}"'
            assert r.headers["accept-ranges"] == "bytes"
            assert int(r.headers["content-length"]) == chunk["size_bytes"] == len(r.content)
            assert hashlib.sha256(r.content).hexdigest() == chunk["sha256"]
            assert r.content == _chunk_bytes(server.store, chunk["index"])


def test_streamed_download(client: httpx.Client, server: ServerProcess) -> None:
    parts: list[bytes] = []
    with client.stream("GET", _chunk_url(0)) as r:
        assert r.status_code == 200
        parts.extend(r.iter_bytes(chunk_size=1000))
    assert b"".join(parts) == _chunk_bytes(server.store, 0)


def test_head(client: httpx.Client, server: ServerProcess) -> None:
    r = client.head(_chunk_url(1))
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == len(_chunk_bytes(server.store, 1))
    sha = _store.read_job(server.store, "demo")["chunks"][1]["sha256"]
    assert r.headers["etag"] == f'"{sha}"'
    r = client.head(_chunk_url(1), headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == b"" and r.headers["content-length"] == "10"


# ----------------------------------------------------------------------------- Range


@pytest.mark.parametrize(
    ("header", "span"),
    [
        ("bytes=0-0", lambda n: (0, 1)),
        ("bytes=10-19", lambda n: (10, 20)),
        ("bytes=100-", lambda n: (100, n)),  # open-ended: a resumed download
        ("bytes=-50", lambda n: (n - 50, n)),  # suffix
        ("bytes=-99999999", lambda n: (0, n)),  # suffix longer than the file
        ("bytes=5-99999999", lambda n: (5, n)),  # end past the end is clipped
        ("bytes=0-", lambda n: (0, n)),
        ("BYTES = 3 - 7", lambda n: (3, 8)),
    ],
)
def test_range(client: httpx.Client, server: ServerProcess, header: str, span) -> None:
    data = _chunk_bytes(server.store, 2)
    start, end = span(len(data))
    r = client.get(_chunk_url(2), headers={"Range": header})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(data)}"
    assert int(r.headers["content-length"]) == end - start
    assert r.content == data[start:end]


@pytest.mark.parametrize("header", ["bytes={n}-", "bytes={n}-{m}", "bytes=-0"])
def test_unsatisfiable_range(client: httpx.Client, server: ServerProcess, header: str) -> None:
    n = len(_chunk_bytes(server.store, 2))
    r = client.get(_chunk_url(2), headers={"Range": header.format(n=n, m=n + 10)})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{n}"
    assert "not satisfiable" in r.json()["error"]


@pytest.mark.parametrize(
    "header", ["bytes=abc", "bytes=9-3", "items=0-5", "bytes=0-1,5-9", "bytes=", "bytes=1-x"]
)
def test_invalid_range_is_ignored(client: httpx.Client, server: ServerProcess, header: str) -> None:
    # RFC 9110 §14.2: a Range header that is invalid, of another unit, or (here) with several
    # ranges, is ignored, and the whole chunk is sent.
    r = client.get(_chunk_url(2), headers={"Range": header})
    assert r.status_code == 200 and r.content == _chunk_bytes(server.store, 2)


def test_if_range(client: httpx.Client, server: ServerProcess) -> None:
    data = _chunk_bytes(server.store, 3)
    etag = client.head(_chunk_url(3)).headers["etag"]
    fresh = client.get(_chunk_url(3), headers={"Range": "bytes=100-", "If-Range": etag})
    assert fresh.status_code == 206 and fresh.content == data[100:]
    for stale in ('"0123abcd"', f"W/{etag}", "Wed, 21 Oct 2015 07:28:00 GMT"):
        r = client.get(_chunk_url(3), headers={"Range": "bytes=100-", "If-Range": stale})
        assert r.status_code == 200, stale
        assert r.content == data and "content-range" not in r.headers


def test_if_none_match(client: httpx.Client) -> None:
    etag = client.head(_chunk_url(0)).headers["etag"]
    r = client.get(_chunk_url(0), headers={"If-None-Match": f'"other", {etag}'})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert client.get(_chunk_url(0), headers={"If-None-Match": '"other"'}).status_code == 200


# ----------------------------------------------------------------------------- errors and auth


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/jobs/demo", _chunk_url(0)])
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong-key", "Basic cHhjOnB4Yw==", "Bearer", "pxc-test-key-all-5f1c2a"]
)
def test_401(server: ServerProcess, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.get(server.url + path, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["error"]


@pytest.mark.parametrize("path", ["/api/v1/jobs/demo", _chunk_url(0), "/api/v1/jobs/nope"])
def test_403(server: ServerProcess, path: str) -> None:
    # A limited key learns nothing about jobs outside its grant, existing or not.
    r = httpx.get(server.url + path, headers={"Authorization": f"Bearer {server.limited_key}"})
    assert r.status_code == 403 and "no access" in r.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/jobs/nope",
        "/api/v1/jobs/nope/chunks/0",
        _chunk_url(8),
        _chunk_url(10**12),
        "/api/v1/jobs/demo/chunks/abc",
        "/api/v1/jobs/demo/chunks/-1",
        "/api/v1/jobs/demo/chunks/0.zip",
        "/api/v1/other",
        "/",
    ],
)
def test_404(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json" and r.json()["error"]


def test_405(client: httpx.Client) -> None:
    r = client.post("/api/v1/jobs/demo")
    assert r.status_code == 405 and r.json()["error"]


def _raw_get(url: str, target: str, key: str) -> tuple[int, bytes]:
    """Sends `target` byte for byte (no client-side normalisation of `..` or `%2e`)."""
    parts = urlsplit(url)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        response = b""
        while block := sock.recv(65536):
            response += block
    status = int(response.split(b" ", 2)[1])
    return status, response


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/jobs/../../secret.txt",
        "/api/v1/jobs/demo/../../../secret.txt",
        "/api/v1/jobs/demo/chunks/../../../../secret.txt",
        "/api/v1/jobs/demo/chunks/..%2f..%2f..%2f..%2fsecret.txt",
        "/api/v1/jobs/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/api/v1/jobs/%2e%2e/chunks/0",
        "/api/v1/jobs/..%2f..%2fstore/chunks/0",
        "/api/v1/jobs/%2fetc%2fpasswd",
        "/api/v1/jobs/%2Fetc%2Fpasswd/chunks/0",
        "/api/v1/jobs/demo%2fjob.json",
        "/api/v1/jobs/demo/chunks/%2e%2e%2fjob.json",
        "//etc/passwd",
        "/api/v1/jobs/..%5c..%5csecret.txt",
        "/api/v1/jobs/demo/chunks/0%00.zip",
    ],
)
def test_traversal_is_refused(server: ServerProcess, target: str) -> None:
    secret = server.store.parent / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    status, response = _raw_get(server.url, target, server.api_key)
    assert status in (400, 404), response[:300]
    assert b"TOP-SECRET" not in response and b"root:" not in response
    assert b'"job_id"' not in response  # not even the job's own manifest


def test_api_key_is_never_logged(client: httpx.Client, server: ServerProcess) -> None:
    client.get("/api/v1/jobs/demo")
    httpx.get(server.url + "/api/v1/jobs", headers={"Authorization": "Bearer wrong-secret-77"})
    httpx.get(server.url + "/api/v1/jobs/demo", headers={"Authorization": "Bearer " + "x" * 40})
    out = server.output()
    assert "GET /api/v1/jobs" in out  # the access log is there...
    for key in (server.api_key, server.limited_key, "wrong-secret-77", "x" * 40):
        assert key not in out  # ...without any key


# ----------------------------------------------------------------------------- units


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=-1000", 100) == (0, 100)
    assert parse_range("bytes=0-1000", 100) == (0, 100)
    for ignored in ("bytes=a-b", "bytes=5-1", "pages=1-2", "bytes=1-2,4-5", "bytes=-", "bytes"):
        assert parse_range(ignored, 100) is None, ignored
    for unsatisfiable in ("bytes=100-", "bytes=100-200", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(unsatisfiable, 100)


def test_load_keys(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"a": "*", "b": ["j1", "j2"]}')
    keys = load_keys(api_key="env-key", keys_file=keys_file)
    assert keys == {"a": "*", "b": frozenset({"j1", "j2"}), "env-key": "*"}
    with pytest.raises(ValueError, match="no API key"):
        load_keys()
    for bad in ('["a"]', '{"a": 3}', '{"a": [1]}', "not json", '{"": "*"}'):
        keys_file.write_text(bad)
        with pytest.raises(ValueError, match="keys file") as info:
            load_keys(keys_file=keys_file)
        assert '"a"' not in str(info.value)  # a key is never echoed back


def test_server_config(tmp_path: Path) -> None:
    repo_config = Path(__file__).resolve().parent.parent / "configs" / "server.toml"
    assert ServerConfig.from_toml(repo_config) == ServerConfig()
    assert ServerConfig.from_toml(repo_config, port=0, host=None).port == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        ServerConfig.from_toml(bad)
    for kwargs in ({"port": 70000}, {"port": "80"}, {"host": ""}, {"log_level": "loud"}):
        with pytest.raises(ValueError):
            ServerConfig(**kwargs)
