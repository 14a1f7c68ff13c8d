"""JobClient against the real server and a real store: manifests, error mapping, schemes."""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from engine_helpers import ClientOptions, ClientTimings

from pixcrawler_engine._config import EngineConfig
from pixcrawler_engine._errors import (
    AuthenticationError,
    DownloadError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
    PixCrawlerError,
)
from pixcrawler_engine.sources._jobapi import JobClient
from pixcrawler_engine.sources._manifest import ChunkInfo, JobManifest

if TYPE_CHECKING:
    from typing_extensions import Unpack

pytestmark = pytest.mark.timeout(10, func_only=True)

FAST: ClientTimings = {"timeout": 5.0, "retries": 3, "backoff": 0.01, "retry_after_cap": 1.0}


def client(url: str, key: str | None, **kw: Unpack[ClientOptions]) -> JobClient:
    options: ClientOptions = {**FAST, **kw}
    return JobClient(url, key, **options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------------- http(s)


def test_list_jobs(server) -> None:
    with client(server.url, server.api_key) as c:
        jobs = c.list_jobs()
    assert {j["job_id"] for j in jobs} == {"demo", "pending"}


def test_list_jobs_limited_key_sees_only_its_jobs(server) -> None:
    with client(server.url, server.limited_key) as c:
        assert [j["job_id"] for j in c.list_jobs()] == ["pending"]


def test_get_job_manifest(server) -> None:
    with client(server.url, server.api_key) as c:
        manifest = c.get_job("demo")
    assert isinstance(manifest, JobManifest)
    assert manifest.job_id == "demo" and manifest.status == "completed"
    assert manifest.num_images == 120 and manifest.chunk_size == 16
    assert len(manifest.chunks) == 8
    assert [c.index for c in manifest.chunks] == list(range(8))
    assert sum(c.num_images for c in manifest.chunks) == 120
    assert manifest.size_bytes == sum(c.size_bytes for c in manifest.chunks)
    assert isinstance(manifest.labels, tuple) and "0" in manifest.labels
    for chunk in manifest.chunks:
        assert chunk.url == f"{server.url}/api/v1/jobs/demo/chunks/{chunk.index}"
        local = server.store / "jobs" / "demo" / "chunks" / f"{chunk.index}.zip"
        assert chunk.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()


def test_wrong_key_is_authentication_error_without_the_key(server) -> None:
    key = "pxc-wrong-key-0123456789"
    with client(server.url, key) as c, pytest.raises(AuthenticationError) as info:
        c.get_job("demo")
    message = str(info.value)
    assert "401" in message and "PIXCRAWLER_API_KEY" in message
    assert key not in message and key not in repr(info.value)


def test_missing_key_is_authentication_error(server) -> None:
    with client(server.url, None) as c, pytest.raises(AuthenticationError, match="missing"):
        c.list_jobs()


def test_limited_key_is_forbidden_on_other_jobs(server) -> None:
    with client(server.url, server.limited_key) as c, pytest.raises(AuthenticationError) as info:
        c.get_job("demo")
    assert "403" in str(info.value) and "'demo'" in str(info.value)
    assert server.limited_key not in str(info.value)


def test_unknown_job_is_not_found(server) -> None:
    with client(server.url, server.api_key) as c, pytest.raises(NotFoundError, match="no-such-job"):
        c.get_job("no-such-job")


def test_job_id_is_quoted_into_the_path(server) -> None:
    # A job id cannot walk the URL path: "../jobs" must reach the server as one segment.
    with client(server.url, server.api_key) as c, pytest.raises(NotFoundError):
        c.get_job("../jobs")


def test_pending_job_is_not_complete(server) -> None:
    with client(server.url, server.limited_key) as c:
        with pytest.raises(JobNotCompleteError) as info:
            c.get_job("pending")
        assert info.value.progress == 42 and info.value.status == "processing"
        assert "42% complete" in str(info.value)
        manifest = c.get_job("pending", require_complete=False)
    assert manifest.status == "processing" and manifest.progress == 42


def test_job_not_complete_pickles_with_its_attributes(server) -> None:
    with client(server.url, server.api_key) as c, pytest.raises(JobNotCompleteError) as info:
        c.get_job("pending")
    again = pickle.loads(pickle.dumps(info.value))
    assert again.progress == 42 and again.status == "processing"


def test_server_down_is_network_error_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with client(url, "k") as c, pytest.raises(NetworkError) as info:
        c.get_job("demo")
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert url in message and "3 attempt" in message and "server runs" in message
    assert "base_url" in message


@pytest.mark.parametrize(
    "url", ["ftp://example.com", "s3://bucket/store", "localhost:8000", "example.com", ""]
)
def test_unsupported_scheme_is_value_error(url: str) -> None:
    with pytest.raises(ValueError, match=r"https://host.*file:///path/to/store"):
        JobClient(url, "k")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"timeout": 0}, "timeout"),
        ({"retries": 0}, "retries"),
        ({"backoff": -1}, "backoff"),
        ({"verify_ssl": "/no/such/ca.pem"}, "CA bundle"),
    ],
)
def test_bad_settings_are_value_errors(kw: ClientOptions, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        JobClient("http://127.0.0.1:1", "k", **kw)


def test_api_key_with_a_newline_is_refused_without_echo() -> None:
    with pytest.raises(ValueError) as info:
        JobClient("http://127.0.0.1:1", "secret\nvalue")
    assert "secret" not in str(info.value)


def test_client_pickles_without_its_pool_and_hides_the_key(server) -> None:
    original = client(server.url, server.api_key)
    original.get_job("demo")  # the pool exists now and must not be pickled
    assert server.api_key not in repr(original)
    copy = pickle.loads(pickle.dumps(original))
    original.close()
    with copy:
        assert copy.get_job("demo").job_id == "demo"


def test_from_config_takes_the_network_settings(server) -> None:
    config = EngineConfig(timeout=7.0, retries=2, backoff=0.01, retry_after_cap=0.5)
    with JobClient.from_config(server.url, server.api_key, config) as c:
        assert c.timeout == 7.0
        assert c.get_job("demo").job_id == "demo"


def test_closed_client_refuses_work(server) -> None:
    c = client(server.url, server.api_key)
    c.close()
    c.close()  # idempotent
    with pytest.raises(PixCrawlerError, match="closed"):
        c.get_job("demo")


def test_key_not_in_debug_logs(server, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log requests and headers at DEBUG
    with client(server.url, server.api_key) as c:
        manifest = c.get_job("demo")
        c.fetch_chunk(manifest.chunks[0], tmp_path)
    with client(server.url, server.limited_key) as c, pytest.raises(AuthenticationError):
        c.get_job("demo")
    assert caplog.records, "expected httpx/httpcore debug records"
    for record in caplog.records:
        text = record.getMessage()
        assert server.api_key not in text and server.limited_key not in text


# ------------------------------------------------------------------------------------ file://


def test_file_store_lists_and_reads_jobs(store: Path) -> None:
    with JobClient(store.as_uri(), None) as c:
        assert {j["job_id"] for j in c.list_jobs()} == {"demo", "pending"}
        manifest = c.get_job("demo")
    assert manifest.job_id == "demo" and len(manifest.chunks) == 8
    assert manifest.chunks[0].url == (store / "jobs/demo/chunks/0.zip").as_uri()


def test_file_store_fetch_returns_the_store_file(store: Path, tmp_path: Path) -> None:
    reported: list[int] = []
    with JobClient(store.as_uri(), None) as c:
        chunk = c.get_job("demo").chunks[1]
        path = c.fetch_chunk(chunk, tmp_path, on_bytes=reported.append)
    assert path == store / "jobs/demo/chunks/1.zip"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == chunk.sha256
    assert sum(reported) == chunk.size_bytes
    assert not list(tmp_path.iterdir())  # nothing copied


def test_file_store_errors(store: Path) -> None:
    with JobClient(store.as_uri() + "/", None) as c:
        with pytest.raises(NotFoundError, match="nope"):
            c.get_job("nope")
        with pytest.raises(JobNotCompleteError) as info:
            c.get_job("pending")
        assert info.value.progress == 42
    with JobClient((store / "missing").as_uri(), None) as c, pytest.raises(NotFoundError):
        c.get_job("demo")
    with pytest.raises(ValueError, match="local path"):
        JobClient("file://otherhost/store", None)


def test_file_store_detects_a_damaged_chunk(store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    damaged = copy / "jobs/demo/chunks/2.zip"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with JobClient(copy.as_uri(), None) as c:
        chunk = c.get_job("demo").chunks[2]
        with pytest.raises(DownloadError) as info:
            c.fetch_chunk(chunk, tmp_path / "dl")
    assert info.value.chunk_id == 2 and "re-pack" in str(info.value)


def test_file_store_refuses_chunk_paths_outside_the_store(store: Path, tmp_path: Path) -> None:
    outside = ChunkInfo(index=0, url=(tmp_path / "x.zip").as_uri(), num_images=1, size_bytes=1,
                        sha256="0" * 64)  # fmt: skip
    with JobClient(store.as_uri(), None) as c, pytest.raises(DownloadError, match="outside"):
        c.fetch_chunk(outside, tmp_path)
