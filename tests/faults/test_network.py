"""Network faults between JobClient and the real server, injected by a loopback proxy.

Each fault either completes with the server's exact bytes (re-fetching at most one chunk's
worth, counted at the proxy) or fails after the documented attempts with a DownloadError
naming the chunk. 401/403/404 are attempted exactly once.
"""

from __future__ import annotations

import email.utils
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from engine_helpers import ClientOptions, ClientTimings, expected_keys

from pixcrawler import load_dataset
from pixcrawler_engine._errors import (
    AuthenticationError,
    DownloadError,
    NetworkError,
    PixCrawlerError,
)
from pixcrawler_engine.sources._jobapi import JobClient
from pixcrawler_engine.sources._manifest import ChunkInfo

from ._proxy import Fault, FaultProxy, proxied

if TYPE_CHECKING:
    from typing_extensions import Unpack

pytestmark = pytest.mark.timeout(10, func_only=True)

CHUNK = "/chunks/0"
FAST: ClientTimings = {"timeout": 1.0, "retries": 3, "backoff": 0.01, "retry_after_cap": 3.0}


@pytest.fixture
def proxy(server) -> Iterator[FaultProxy]:
    with proxied(server.url) as p:
        yield p


@pytest.fixture
def chunk(server, proxy: FaultProxy) -> ChunkInfo:
    """Chunk 0 of "demo", its URL on the proxy (the manifest is fetched through it)."""
    with JobClient(proxy.url, server.api_key, **FAST) as c:
        found = c.get_job("demo").chunks[0]
    proxy.requests.clear()
    assert found.url.startswith(proxy.url)
    return found


def expected(server) -> bytes:
    return (server.store / "jobs/demo/chunks/0.zip").read_bytes()


def fetch(
    server, proxy: FaultProxy, chunk: ChunkInfo, dest: Path, **kw: Unpack[ClientOptions]
) -> Path:
    options: ClientOptions = {**FAST, **kw}
    with JobClient(proxy.url, server.api_key, **options) as c:
        return c.fetch_chunk(chunk, dest)


def assert_identical(server, proxy: FaultProxy, path: Path, chunk: ChunkInfo) -> None:
    assert path.read_bytes() == expected(server)
    # Re-fetched bytes: at most one chunk's worth on top of the chunk itself.
    assert proxy.body_bytes(CHUNK) <= 2 * chunk.size_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def assert_failed(info: pytest.ExceptionInfo[DownloadError], attempts: int, cause: str) -> None:
    message = str(info.value)
    assert info.value.chunk_id == 0
    assert "chunk 0" in message and f"after {attempts} attempt" in message and cause in message
    assert "/api/v1/jobs/demo/chunks/0" in message


# ------------------------------------------------------------------- faults that heal


def test_reset_mid_body_resumes(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("reset", after_bytes=chunk.size_bytes // 2))
    path = fetch(server, proxy, chunk, tmp_path)
    assert_identical(server, proxy, path, chunk)
    first, second = proxy.seen(CHUNK)
    if first.body_bytes and "range" in second.headers:  # bytes that arrived are not re-fetched
        assert second.status == 206


def test_truncated_body_resumes_exactly_where_it_stopped(server, proxy, chunk, tmp_path) -> None:
    cut = chunk.size_bytes // 3
    proxy.add(Fault("truncate", after_bytes=cut))
    path = fetch(server, proxy, chunk, tmp_path)
    assert_identical(server, proxy, path, chunk)
    _, second = proxy.seen(CHUNK)
    assert second.headers["range"] == f"bytes={cut}-" and second.status == 206
    assert proxy.body_bytes(CHUNK) == chunk.size_bytes  # nothing fetched twice


def test_stalled_response_times_out_and_resumes(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("stall", after_bytes=100, seconds=8))
    start = time.monotonic()
    path = fetch(server, proxy, chunk, tmp_path, timeout=0.5)
    assert time.monotonic() - start < 4
    assert_identical(server, proxy, path, chunk)
    assert proxy.seen(CHUNK)[1].headers["range"] == "bytes=100-"


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried(server, proxy, chunk, tmp_path, status: int) -> None:
    proxy.add(Fault("status", status=status, times=2))
    path = fetch(server, proxy, chunk, tmp_path)
    assert_identical(server, proxy, path, chunk)
    assert [s.status for s in proxy.seen(CHUNK)] == [status, status, 200]


def test_retry_after_seconds_is_honoured(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("status", status=429, headers={"Retry-After": "1"}))
    start = time.monotonic()
    path = fetch(server, proxy, chunk, tmp_path)
    assert 0.9 <= time.monotonic() - start < 5
    assert_identical(server, proxy, path, chunk)
    assert [s.status for s in proxy.seen(CHUNK)] == [429, 200]


def test_retry_after_http_date_is_honoured(server, proxy, chunk, tmp_path) -> None:
    # HTTP dates have whole seconds: "now + 2 s" is between 1 and 2 s away.
    date = email.utils.formatdate(time.time() + 2, usegmt=True)
    proxy.add(Fault("status", status=503, headers={"Retry-After": date}))
    start = time.monotonic()
    path = fetch(server, proxy, chunk, tmp_path)
    assert 0.9 <= time.monotonic() - start < 5
    assert_identical(server, proxy, path, chunk)


def test_retry_after_is_capped(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("status", status=429, headers={"Retry-After": "3600"}))
    start = time.monotonic()
    path = fetch(server, proxy, chunk, tmp_path, retry_after_cap=0.2)
    assert time.monotonic() - start < 3
    assert_identical(server, proxy, path, chunk)


def test_range_answered_with_full_200_restarts(server, proxy, chunk, tmp_path) -> None:
    cut = chunk.size_bytes // 2
    proxy.add(Fault("truncate", after_bytes=cut), Fault("ignore_range"))
    path = fetch(server, proxy, chunk, tmp_path)
    assert_identical(server, proxy, path, chunk)
    _, second = proxy.seen(CHUNK)
    assert second.headers.get("range") == f"bytes={cut}-"  # asked to resume
    assert second.status == 200 and second.body_bytes == chunk.size_bytes  # got everything


def test_corrupt_body_is_a_failed_attempt(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("corrupt"))
    path = fetch(server, proxy, chunk, tmp_path)
    assert_identical(server, proxy, path, chunk)
    assert len(proxy.seen(CHUNK)) == 2


def test_same_origin_redirect_keeps_the_key(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("redirect", location=proxy.url))
    path = fetch(server, proxy, chunk, tmp_path)
    assert_identical(server, proxy, path, chunk)
    first, second = proxy.seen(CHUNK)
    assert first.status == 302 and second.status == 200
    assert second.headers["authorization"] == f"Bearer {server.api_key}"


# ------------------------------------------------------------------- faults that fail


def test_server_errors_every_time_fail_after_three_attempts(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("status", status=503, times=10))
    with pytest.raises(DownloadError) as info:
        fetch(server, proxy, chunk, tmp_path)
    assert_failed(info, 3, "HTTP 503")
    assert len(proxy.seen(CHUNK)) == 3


def test_reset_every_time_fails_after_three_attempts(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("reset", after_bytes=10, times=10))
    with pytest.raises(DownloadError) as info:
        fetch(server, proxy, chunk, tmp_path)
    assert_failed(info, 3, "reset")
    assert len(proxy.seen(CHUNK)) == 3
    assert not (tmp_path / "0.zip").exists()


def test_corrupt_every_time_fails_and_leaves_no_file(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("corrupt", times=10))
    with pytest.raises(DownloadError) as info:
        fetch(server, proxy, chunk, tmp_path)
    assert_failed(info, 3, "sha256 mismatch")
    assert len(proxy.seen(CHUNK)) == 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("who", "status"), [("wrong", 401), ("limited", 403), ("missing", 404)])
def test_client_errors_are_attempted_once(
    server, proxy, chunk, tmp_path, who: str, status: int
) -> None:
    key = {"wrong": "pxc-wrong-key", "limited": server.limited_key}.get(who, server.api_key)
    if who == "missing":
        chunk = ChunkInfo(
            index=0,
            url=chunk.url.replace("/demo/", "/no-such-job/"),
            num_images=1,
            size_bytes=10,
            sha256="0" * 64,
        )
    with (
        JobClient(proxy.url, key, **FAST) as c,
        pytest.raises(DownloadError) as info,
    ):
        c.fetch_chunk(chunk, tmp_path)
    assert info.value.chunk_id == 0
    assert f"HTTP {status}" in str(info.value) and "after 1 attempt" in str(info.value)
    assert key not in str(info.value)
    assert [s.status for s in proxy.seen("/chunks/")] == [status]


def test_cross_origin_redirect_drops_the_key(server, proxy, chunk, tmp_path) -> None:
    with proxied(server.url) as other:  # another origin: a different port
        proxy.add(Fault("redirect", location=other.url))
        with pytest.raises(DownloadError) as info:
            fetch(server, proxy, chunk, tmp_path)
        [arrived] = other.seen(CHUNK)
    assert proxy.seen(CHUNK)[0].headers["authorization"] == f"Bearer {server.api_key}"
    assert "authorization" not in arrived.headers  # the key never reached the other origin
    assert arrived.status == 401
    assert_failed(info, 1, "HTTP 401")


def test_chunk_url_on_another_origin_gets_no_key(server, proxy, chunk, tmp_path) -> None:
    with proxied(server.url) as other:
        elsewhere = ChunkInfo(
            index=0,
            url=chunk.url.replace(proxy.url, other.url),
            num_images=chunk.num_images,
            size_bytes=chunk.size_bytes,
            sha256=chunk.sha256,
        )
        with pytest.raises(DownloadError) as info:
            fetch(server, proxy, elsewhere, tmp_path)
        [arrived] = other.seen(CHUNK)
    assert "authorization" not in arrived.headers and arrived.status == 401
    assert_failed(info, 1, "HTTP 401")


def test_close_interrupts_a_retry_wait(server, proxy, chunk, tmp_path) -> None:
    proxy.add(Fault("status", status=429, headers={"Retry-After": "30"}))
    honour_retry_after: ClientTimings = {**FAST, "retry_after_cap": 30.0}
    client = JobClient(proxy.url, server.api_key, **honour_retry_after)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.fetch_chunk(chunk, tmp_path)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 5
    while not proxy.seen(CHUNK) and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    start = time.monotonic()
    client.close()
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - start < 1
    [error] = errors
    assert isinstance(error, DownloadError) and "closed" in str(error)


# ------------------------------------------------------------------- manifests and TLS


def test_manifest_server_errors_are_retried(server, proxy) -> None:
    proxy.add(Fault("status", match="/jobs/demo", status=502, times=2))
    with JobClient(proxy.url, server.api_key, **FAST) as c:
        assert c.get_job("demo").job_id == "demo"
    assert [s.status for s in proxy.seen("/jobs/demo")] == [502, 502, 200]


def test_manifest_unreachable_after_attempts_is_network_error(server, proxy) -> None:
    proxy.add(Fault("reset", match="/jobs/demo", times=10))
    with JobClient(proxy.url, server.api_key, **FAST) as c, pytest.raises(NetworkError) as info:
        c.get_job("demo")
    assert "3 attempt" in str(info.value) and proxy.url in str(info.value)
    assert len(proxy.seen("/jobs/demo")) == 3


def test_manifest_auth_errors_are_attempted_once(server, proxy) -> None:
    with JobClient(proxy.url, "pxc-wrong", **FAST) as c, pytest.raises(AuthenticationError):
        c.get_job("demo")
    assert len(proxy.seen("/jobs/demo")) == 1


def test_malformed_json_is_a_clear_error(server, proxy) -> None:
    proxy.add(Fault("status", match="/jobs/demo", status=200, body=b"{not json"))
    with JobClient(proxy.url, server.api_key, **FAST) as c, pytest.raises(PixCrawlerError) as info:
        c.get_job("demo")
    assert "malformed JSON" in str(info.value)
    proxy.add(Fault("status", match="/jobs/demo", status=200, body=b'{"job_id": "demo"}'))
    with JobClient(proxy.url, server.api_key, **FAST) as c, pytest.raises(PixCrawlerError) as info:
        c.get_job("demo")
    assert "malformed job manifest" in str(info.value)


def test_tls_with_a_ca_bundle_and_without(server, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with proxied(server.url, tls=context) as proxy:
        assert proxy.url.startswith("https://")
        with JobClient(proxy.url, server.api_key, verify_ssl=str(bundle), **FAST) as c:
            chunk = c.get_job("demo").chunks[0]
            assert chunk.url.startswith(proxy.url)
            path = c.fetch_chunk(chunk, tmp_path / "dl")
        assert path.read_bytes() == expected(server)
        before = proxy.connections
        with JobClient(proxy.url, server.api_key, **FAST) as c, pytest.raises(NetworkError) as info:
            c.get_job("demo")
        assert proxy.connections == before + 1  # a certificate error is not retried
        assert "verify_ssl" in str(info.value)
        with JobClient(proxy.url, server.api_key, **FAST) as c, pytest.raises(DownloadError) as err:
            c.fetch_chunk(chunk, tmp_path / "dl2")
        assert "TLS" in str(err.value) and "after 1 attempt" in str(err.value)


def test_key_never_logged_under_faults(server, proxy, chunk, tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)  # httpx and httpcore log every request at DEBUG
    proxy.add(Fault("truncate", after_bytes=50), Fault("status", status=503))
    path = fetch(server, proxy, chunk, tmp_path)
    assert path.read_bytes() == expected(server)
    proxy.add(Fault("status", status=401))
    with pytest.raises(DownloadError) as info:
        fetch(server, proxy, chunk, tmp_path / "again")
    assert any("retrying" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        assert server.api_key not in record.getMessage()
    assert server.api_key not in str(info.value)


def test_a_run_downloads_its_first_chunk_alone(server, proxy) -> None:
    # The first batch waits on the first chunk only. Started beside the next ones, its
    # download shared the link with them (cold first batch 0.80 s, alone 0.63 s: epochs bench).
    proxy.add(Fault("slow", match="/chunks/0", seconds=1.0))
    with load_dataset(
        "demo", base_url=proxy.url, api_key=server.api_key, num_workers=2, progress=False
    ) as ds:
        keys = [key for batch in ds.iter_engine_batches() for key in batch.keys]
    assert keys == expected_keys(server.store)
    chunks = [s for s in proxy.seen("/chunks/") if s.method == "GET"]
    (first,) = [s for s in chunks if s.path.endswith("/chunks/0")]
    others = [s for s in chunks if s is not first]
    assert len(others) == ds.num_chunks - 1
    assert min(s.at for s in others) >= first.at + 1.0  # none before the first was answered
