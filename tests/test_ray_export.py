"""`pixcrawler download --format parquet --ray`: the local export's files, written by Ray tasks.

Each export is compared, file by file and byte for byte, with the same command without `--ray`;
Hugging Face `datasets` reads it as before. The in-process runs use this module's local Ray
instance (the command leaves a connection it did not make alone); the subprocess runs start
their own (`--ray` without a value) or fail to reach one, with a private RAY_TMPDIR, and must
leave nothing running.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from engine_helpers import corrupt_one_sample
from faults._proxy import Fault, proxied
from ray_helpers import local_ray, private_ray_tmpdir, processes_using, require_ray

from pixcrawler.cli import main
from pixcrawler_engine.sources._pack import pack

require_ray()

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    with local_ray(num_cpus=2) as tmp:
        yield tmp


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    base = {"PIXCRAWLER_API_KEY": None, "PIXCRAWLER_BASE_URL": None, "RAY_ADDRESS": None}
    return CliRunner().invoke(main, [str(a) for a in args], env={**base, **(env or {})})


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of an export but its bookkeeping, by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".pixcrawler" not in p.parts
    }


def _download(url: str, out: Path, *extra: str, job: str = "demo", key: str = "") -> Result:
    result = _cli(
        "download", job, "--base-url", url, "--output-dir", out, "--format", "parquet",
        "--no-progress", *extra, env={"PIXCRAWLER_API_KEY": key} if key else None,
    )  # fmt: skip
    return result


@pytest.mark.parametrize("size", [["--image-size", "32x32"], []], ids=["decoded", "stored"])
def test_ray_export_is_the_local_export(
    ray_local: str, server, tmp_path: Path, size: list[str]
) -> None:
    import datasets

    local = _download(server.url, tmp_path / "local", *size, key=server.api_key)
    assert local.exit_code == 0, local.output
    result = _download(server.url, tmp_path / "ray", *size, "--ray", key=server.api_key)
    assert result.exit_code == 0, result.output
    assert "Saved 120 images of demo" in result.stdout
    want, got = _files(tmp_path / "local" / "demo"), _files(tmp_path / "ray" / "demo")
    assert list(got) == [f"data/train-{i:05d}-of-00008.parquet" for i in range(8)]
    assert got == want  # the same rows, schema and bytes: one file per chunk
    assert sorted(os.listdir(tmp_path / "ray" / "demo" / ".pixcrawler")) == ["lock", "state.json"]
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "ray" / "demo" / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 120
    assert isinstance(ds.features["label"], datasets.ClassLabel)
    assert np.array(ds[0]["image"]).dtype == np.uint8


@pytest.mark.parametrize(
    ("flags", "rows"),
    [
        (["--shuffle", "--seed", "3", "--max-samples", "50", "--on-error", "skip",
          "--image-size", "16x16", "--color", "L"], (49, 50)),
        (["--shuffle", "--max-samples", "37"], (37,)),  # the files as stored, shuffled
        # The broken image and every photo over 100,000 pixels skipped: 59 digits, 5 photos left
        (["--on-error", "skip", "--image-size", "16x16", "--max-pixels", "100000"], (64,)),
    ],
    ids=["shuffled-cut-grey", "stored-shuffled-cut", "skip"],
)  # fmt: skip
def test_the_download_flags_give_the_same_files_with_ray(
    ray_local: str, bad_store: Path, tmp_path: Path, flags: list[str], rows: tuple[int, ...]
) -> None:
    url = bad_store.as_uri()  # chunk 0 holds a truncated image: skipped, or stored as it is
    local = _download(url, tmp_path / "local", *flags)
    assert local.exit_code == 0, local.output
    result = _download(url, tmp_path / "ray", *flags, "--ray")
    assert result.exit_code == 0, result.output
    want, got = _files(tmp_path / "local" / "demo"), _files(tmp_path / "ray" / "demo")
    assert got and got == want
    assert pq.read_table(tmp_path / "ray" / "demo" / "data").num_rows in rows


@pytest.fixture(scope="module")
def bad_store(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """A copy of the demo job whose chunk 0 holds one truncated image (`broken.png`)."""
    root = tmp_path_factory.mktemp("ray-export-bad") / "store"
    shutil.copytree(store / "jobs" / "demo", root / "jobs" / "demo")
    corrupt_one_sample(root, "demo")
    return root


def test_labels_without_a_class_list_are_fixed_by_the_first_chunk(
    ray_local: str, demo_source: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "ints.jsonl"
    files = sorted(demo_source.glob("[0-9]/*.png"))[:9]
    listing.write_text("".join(json.dumps({"file": str(f), "label": i}) + "\n" for i, f in
                               enumerate(files)))  # fmt: skip
    pack(listing, tmp_path / "store", "ints", chunk_size=2)
    url = (tmp_path / "store").as_uri()
    for name, extra in (("local", []), ("ray", ["--ray"])):
        result = _download(url, tmp_path / name, "--image-size", "8x8", *extra, job="ints")
        assert result.exit_code == 0, result.output
    assert _files(tmp_path / "ray" / "ints") == _files(tmp_path / "local" / "ints")
    table = pq.read_table(tmp_path / "ray" / "ints" / "data")
    assert table.column("label").to_pylist() == list(range(9))
    state = json.loads((tmp_path / "ray" / "ints" / ".pixcrawler" / "state.json").read_text())
    assert state["label_kind"] == "int" and state["phase"] == "complete"


def test_a_failing_chunk_stops_the_export_which_then_resumes(
    ray_local: str, server, tmp_path: Path
) -> None:
    local = _download(server.url, tmp_path / "local", "--image-size", "16x16", key=server.api_key)
    assert local.exit_code == 0, local.output
    out = tmp_path / "ray"
    with proxied(server.url, Fault("status", match="/chunks/3", status=404, times=9)) as proxy:
        result = _download(proxy.url, out, "--image-size", "16x16", "--ray", key=server.api_key)
    assert result.exit_code == 1
    assert "chunk 3" in result.stderr and "HTTP 404" in result.stderr, result.stderr
    assert server.api_key not in result.output
    parts = sorted(p.name for p in (out / "demo" / ".pixcrawler" / "parts").iterdir())
    assert "000003.parquet" not in parts and not [p for p in parts if p.startswith(".")]
    again = _download(server.url, out, "--image-size", "16x16", "--ray", key=server.api_key)
    assert again.exit_code == 0, again.output
    done = len([p for p in parts if p.endswith(".parquet")])
    assert f"resumed: {done} of 8 chunks were already written" in again.stdout
    assert _files(out / "demo") == _files(tmp_path / "local" / "demo")


def test_ray_writes_parquet_only(tmp_path: Path, store: Path) -> None:
    bad = _cli("download", "demo", "--base-url", store.as_uri(), "--output-dir", tmp_path,
               "--format", "numpy", "--ray")  # fmt: skip
    assert bad.exit_code == 2 and "--ray writes --format parquet only" in bad.output


def _run(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PIXCRAWLER_API_KEY")}
    cmd = [sys.executable, "-m", "pixcrawler", *args]
    return subprocess.run(
        cmd, env={**clean, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_unreachable_address_fails_fast_and_starts_nothing(store: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with private_ray_tmpdir() as tmp:
        start = time.monotonic()
        result = _run(
            "download", "demo", "--base-url", store.as_uri(), "--output-dir", str(tmp_path),
            "--format", "parquet", "--ray", f"127.0.0.1:{port}",
            env={"RAY_TMPDIR": tmp}, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert time.monotonic() - start < 30
        assert f"no Ray cluster answers at 127.0.0.1:{port}" in result.stderr
        assert "ray start --head" in result.stderr
        assert not processes_using(tmp)
    assert not (tmp_path / "demo").exists()  # nothing was written either


def test_ray_without_address_starts_and_stops_a_local_instance(store: Path, tmp_path: Path) -> None:
    with private_ray_tmpdir() as tmp:
        result = _run(
            "download", "demo", "--base-url", store.as_uri(), "--output-dir", str(tmp_path),
            "--format", "parquet", "--image-size", "8x8", "--no-progress", "--ray",
            env={"RAY_TMPDIR": tmp}, timeout=150,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""  # Ray's own chatter stays out of the command's output
        deadline = time.monotonic() + 30
        while processes_using(tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes_using(tmp)
    rows = pq.read_table(tmp_path / "demo" / "data").column("key").to_pylist()
    with zipfile.ZipFile(store / "jobs" / "demo" / "chunks" / "0.zip") as zf:
        first = json.loads(zf.read("manifest.jsonl").decode().splitlines()[0])["file"]
    assert len(rows) == 120 and rows[0] == first


def test_an_address_that_is_not_ray_fails_within_the_watchdog(
    server, store: Path, tmp_path: Path
) -> None:
    """The server's port takes TCP connections but is no Ray cluster: Ray would retry for
    minutes; the watchdog (shortened here to 5 s) ends the command with a clear error."""
    port = server.url.rsplit(":", 1)[1]
    code = (
        "import sys, pixcrawler._ray_export as m; m.INIT_TIMEOUT = 5.0\n"
        "from pixcrawler.cli import main; main(sys.argv[1:])"
    )
    with private_ray_tmpdir() as tmp:
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", code, "download", "demo", "--base-url", store.as_uri(),
             "--output-dir", str(tmp_path), "--format", "parquet", "--ray", f"127.0.0.1:{port}"],
            env={**os.environ, "RAY_TMPDIR": tmp}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        assert time.monotonic() - start < 40
        assert f"the Ray cluster at 127.0.0.1:{port} did not answer within 5 s" in result.stderr
        assert not processes_using(tmp)
    assert not (tmp_path / "demo").exists()
