"""What `load_dataset` and the CLI make of an address: job ids, local paths, base URLs, other APIs.

A bare name is a job id even when a local folder has that name; a base URL ending in `/api/v1`
or `/v1` (as the public platform's clients pass it) works; a server that answers in the public
platform's own shape (paginated job lists, integer ids, FastAPI 422 bodies) gets one clear
error, and every 4xx body's message is shown. The platform cannot run here: its answers are
injected by the fault proxy in front of the real server.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ServerProcess
from faults._proxy import Fault, FaultProxy, proxied
from test_sdk_parquet import PHOTOS, shards

from pixcrawler import NotFoundError, PixCrawlerError, load_dataset
from pixcrawler._parquet_ref import is_parquet_address
from pixcrawler.cli import main
from pixcrawler_engine.sources._jobapi import JobClient

__all__ = ["shards"]  # a fixture, imported for pytest to find

JSON = {"content-type": "application/json"}


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[FaultProxy]:
    with proxied(server.url) as p:
        yield p


def _cli(*args: str) -> tuple[int, str]:
    env = {"PIXCRAWLER_API_KEY": None, "PIXCRAWLER_BASE_URL": None}
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.output


# --------------------------------------------------------------------- job id or path


def test_a_bare_name_is_a_job_id_even_beside_a_folder_of_that_name(
    server: ServerProcess, shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("demo", "photos"):
        (tmp_path / name).mkdir()
        shutil.copy(shards / "train-00000-of-00001.parquet", tmp_path / name / "train.parquet")
    monkeypatch.chdir(tmp_path)
    assert not is_parquet_address("demo") and not is_parquet_address("photos")
    assert is_parquet_address("./demo") and is_parquet_address("~/x") and is_parquet_address("/x")
    key, url = server.api_key, server.url
    with load_dataset("demo", api_key=key, base_url=url, progress=False) as job:
        assert job.num_images == 120  # the job, not the 7 rows of ./demo
    with load_dataset("./demo", progress=False) as local:
        assert local.num_images == len(PHOTOS)
    with load_dataset("demo", source="parquet", progress=False) as local:
        assert local.num_images == len(PHOTOS)
    with pytest.raises(NotFoundError) as info:
        load_dataset("photos", api_key=key, base_url=url)
    message = str(info.value)
    assert "job 'photos' not found" in message
    assert "'./photos'" in message and "source='parquet'" in message
    with pytest.raises(ValueError, match="source must be"):
        load_dataset("demo", source="folder", api_key=key, base_url=url)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- base URLs


@pytest.mark.parametrize("suffix", ["/api/v1", "/api/v1/", "/v1"])
def test_a_base_url_ending_in_the_api_version_works(server: ServerProcess, suffix: str) -> None:
    url = server.url + suffix
    with load_dataset("demo", api_key=server.api_key, base_url=url, progress=False) as ds:
        assert ds.num_images == 120
        image, _ = next(iter(ds))
        assert image.ndim == 3
    code, out = _cli("info", "demo", "--api-key", server.api_key, "--base-url", url)
    assert code == 0 and "Dataset: demo" in out, out


# ------------------------------------------------------- another API, and error bodies


def test_a_paginated_job_list_is_another_api(server: ServerProcess, proxy: FaultProxy) -> None:
    page = {"items": [{"id": 12, "name": "cats", "status": "completed"}], "total": 1, "page": 1}
    proxy.add(Fault("status", match="/api/v1/jobs", status=200, body=json.dumps(page).encode(),
                    headers=JSON, times=2))  # fmt: skip
    with (
        JobClient(proxy.url + "/api/v1", server.api_key) as client,
        pytest.raises(PixCrawlerError, match=r"does not serve dataset chunks \(job API v1\)"),
    ):
        client.list_jobs()
    code, out = _cli("list", "--api-key", server.api_key, "--base-url", proxy.url)
    assert code == 1 and "paginated" in out and "does not serve dataset chunks" in out, out
    assert len(out.strip().splitlines()) == 1


def test_an_integer_job_id_is_another_api(server: ServerProcess, proxy: FaultProxy) -> None:
    job = {"id": 12, "name": "cats", "status": "completed", "progress": 100, "image_count": 40}
    proxy.add(Fault("status", match="/api/v1/jobs/12", status=200, body=json.dumps(job).encode(),
                    headers=JSON))  # fmt: skip
    with pytest.raises(PixCrawlerError) as info:
        load_dataset("12", api_key=server.api_key, base_url=proxy.url + "/api/v1")
    message = str(info.value)
    assert "does not serve dataset chunks (job API v1)" in message
    assert "integer job id" in message and "malformed" not in message


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        (
            {"detail": [{"loc": ["path", "job_id"], "msg": "Input should be a valid integer"}]},
            "path.job_id: Input should be a valid integer",
        ),
        ({"error": {"message": "job ids are numbers"}}, "job ids are numbers"),
    ],
)
def test_a_422_is_another_api_and_its_message_is_shown(
    server: ServerProcess, proxy: FaultProxy, body: dict[str, object], shown: str
) -> None:
    proxy.add(Fault("status", match="/api/v1/jobs/demo", status=422,
                    body=json.dumps(body).encode(), headers=JSON, times=2))  # fmt: skip
    with pytest.raises(PixCrawlerError) as info:
        load_dataset("demo", api_key=server.api_key, base_url=proxy.url)
    assert shown in str(info.value) and "does not serve dataset chunks" in str(info.value)
    code, out = _cli("info", "demo", "--api-key", server.api_key, "--base-url", proxy.url)
    assert code == 1 and shown in out, out


def test_every_4xx_body_is_shown(server: ServerProcess) -> None:
    with pytest.raises(NotFoundError) as missing:
        load_dataset("nope", api_key=server.api_key, base_url=server.url)
    assert "(the server said: job 'nope' not found" in str(missing.value)
    code, out = _cli("info", "demo", "--api-key", "wrong-key-1", "--base-url", server.url)
    assert code == 1 and "(the server said: invalid API key)" in out, out
    assert "wrong-key-1" not in out
    code, out = _cli("info", "demo", "--api-key", server.limited_key, "--base-url", server.url)
    assert code == 1 and "this API key has no access to job 'demo'" in out, out
