"""Chunk downloads from the real server: byte-identical, verified, resumed with Range."""

from __future__ import annotations

import email.utils
import hashlib
import time
from pathlib import Path

import pytest
from engine_helpers import ClientTimings
from faults._proxy import proxied

from pixcrawler_engine._errors import DownloadError
from pixcrawler_engine.sources._http import RetryPolicy, parse_retry_after, redact_url
from pixcrawler_engine.sources._jobapi import JobClient
from pixcrawler_engine.sources._manifest import ChunkInfo

pytestmark = pytest.mark.timeout(10, func_only=True)

FAST: ClientTimings = {"timeout": 5.0, "retries": 3, "backoff": 0.01, "retry_after_cap": 1.0}


def store_bytes(server, index: int) -> bytes:
    return (server.store / "jobs" / "demo" / "chunks" / f"{index}.zip").read_bytes()


def test_fetch_chunk_is_byte_identical(server, tmp_path: Path) -> None:
    reported: list[int] = []
    with JobClient(server.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[3]
        path = c.fetch_chunk(chunk, tmp_path, on_bytes=reported.append)
    assert path == tmp_path / "3.zip"
    data = path.read_bytes()
    assert data == store_bytes(server, 3)
    assert hashlib.sha256(data).hexdigest() == chunk.sha256
    assert sum(reported) == chunk.size_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3.zip"]  # no .part left


def test_resume_sends_range_and_yields_identical_bytes(server, tmp_path: Path) -> None:
    with proxied(server.url) as proxy, JobClient(proxy.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[0]
        assert chunk.url.startswith(proxy.url)
        full = store_bytes(server, 0)
        half = len(full) // 2
        (tmp_path / "0.zip.part").write_bytes(full[:half])
        reported: list[int] = []
        path = c.fetch_chunk(chunk, tmp_path, on_bytes=reported.append)
        [seen] = proxy.seen("/chunks/")
    assert seen.headers["range"] == f"bytes={half}-"
    assert seen.headers["if-range"] == f'"{chunk.sha256}"'
    assert seen.status == 206 and seen.body_bytes == len(full) - half
    assert path.read_bytes() == full
    assert sum(reported) == len(full)
    assert not (tmp_path / "0.zip.part").exists()


def test_wrong_part_content_is_discarded_and_refetched(server, tmp_path: Path) -> None:
    with proxied(server.url) as proxy, JobClient(proxy.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[0]
        full = store_bytes(server, 0)
        (tmp_path / "0.zip.part").write_bytes(b"\0" * (len(full) // 3))  # not a prefix
        reported: list[int] = []
        path = c.fetch_chunk(chunk, tmp_path, on_bytes=reported.append)
        seen = proxy.seen("/chunks/")
    assert path.read_bytes() == full
    assert [s.status for s in seen] == [206, 200]  # resumed, failed the sha256, started over
    assert "range" not in seen[1].headers
    assert sum(reported) == len(full)


def test_oversized_part_is_discarded(server, tmp_path: Path) -> None:
    with proxied(server.url) as proxy, JobClient(proxy.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[0]
        (tmp_path / "0.zip.part").write_bytes(b"x" * (chunk.size_bytes + 10))
        path = c.fetch_chunk(chunk, tmp_path)
        [seen] = proxy.seen("/chunks/")
    assert "range" not in seen.headers
    assert path.read_bytes() == store_bytes(server, 0)


def test_complete_part_is_verified_without_a_request(server, tmp_path: Path) -> None:
    with proxied(server.url) as proxy, JobClient(proxy.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[1]
        (tmp_path / "1.zip.part").write_bytes(store_bytes(server, 1))
        path = c.fetch_chunk(chunk, tmp_path)
        assert proxy.seen("/chunks/") == []
    assert path.read_bytes() == store_bytes(server, 1)


def test_cached_chunk_is_reused_and_a_damaged_one_replaced(server, tmp_path: Path) -> None:
    with proxied(server.url) as proxy, JobClient(proxy.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[2]
        c.fetch_chunk(chunk, tmp_path)
        c.fetch_chunk(chunk, tmp_path)
        assert len(proxy.seen("/chunks/")) == 1  # the second call found the verified file
        (tmp_path / "2.zip").write_bytes(b"damaged")
        path = c.fetch_chunk(chunk, tmp_path)
        assert len(proxy.seen("/chunks/")) == 2
    assert path.read_bytes() == store_bytes(server, 2)


def test_unknown_chunk_is_download_error_naming_it(server, tmp_path: Path) -> None:
    missing = ChunkInfo(
        index=99,
        url=f"{server.url}/api/v1/jobs/demo/chunks/99",
        num_images=1,
        size_bytes=10,
        sha256="0" * 64,
    )
    with JobClient(server.url, server.api_key, **FAST) as c, pytest.raises(DownloadError) as info:
        c.fetch_chunk(missing, tmp_path)
    assert info.value.chunk_id == 99
    message = str(info.value)
    assert "chunk 99" in message and "404" in message and "1 attempt" in message
    assert "/api/v1/jobs/demo/chunks/99" in message


def test_size_disagreeing_with_the_manifest_fails(server, tmp_path: Path) -> None:
    with JobClient(server.url, server.api_key, **FAST) as c:
        real = c.get_job("demo").chunks[0]
        wrong = ChunkInfo(
            index=0,
            url=real.url,
            num_images=real.num_images,
            size_bytes=real.size_bytes + 1,
            sha256=real.sha256,
        )
        with pytest.raises(DownloadError, match="manifest says") as info:
            c.fetch_chunk(wrong, tmp_path)
    assert "after 3 attempt" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_unusable_dest_dir_is_download_error(server, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with JobClient(server.url, server.api_key, **FAST) as c:
        chunk = c.get_job("demo").chunks[0]
        with pytest.raises(DownloadError, match="cannot use") as info:
            c.fetch_chunk(chunk, blocker / "sub")
    assert info.value.chunk_id == 0


def test_job_api_chunk_url_cannot_point_at_local_files(server, tmp_path: Path) -> None:
    local = ChunkInfo(index=0, url=(tmp_path / "x").as_uri(), num_images=1, size_bytes=1,
                      sha256="0" * 64)  # fmt: skip
    with JobClient(server.url, server.api_key) as c, pytest.raises(DownloadError, match="http"):
        c.fetch_chunk(local, tmp_path)


# ----------------------------------------------------------------------------- the helpers


def test_parse_retry_after_seconds_and_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = time.time()
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert 118 <= (parse_retry_after(date, now=now) or 0) <= 120
    past = email.utils.formatdate(now - 120, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


def test_backoff_is_full_jitter_and_retry_after_is_capped() -> None:
    policy = RetryPolicy(attempts=3, backoff=0.5, retry_after_cap=2.0)
    delays = [policy.delay(3) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in delays) and max(delays) > 1.0  # [0, 0.5 * 2**2]
    assert policy.delay(1, retry_after=1.5) == 1.5
    assert policy.delay(1, retry_after=3600) == 2.0
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(attempts=0)


def test_redact_url_drops_credentials_and_query_values() -> None:
    url = "https://user:secret@blob.example/c/0.zip?sig=abc&exp=1"
    assert redact_url(url) == "https://blob.example/c/0.zip?sig=...&exp=..."
