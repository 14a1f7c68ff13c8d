"""`pixcrawler download`, `list` and `info` on the real server: output, exit codes, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import ServerProcess
from PIL import Image

from pixcrawler._info import format_bytes
from pixcrawler.cli import main
from pixcrawler_engine.sources._pack import pack


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    # Variables of the caller's shell must not leak in: each test says what it sets.
    base = {"PIXCRAWLER_API_KEY": None, "PIXCRAWLER_BASE_URL": None}
    return CliRunner().invoke(main, [str(a) for a in args], env={**base, **(env or {})})


def _one_error_line(result: Result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of two small jobs, "a" and "b" (file:// tests that change or move exports)."""
    root = tmp_path_factory.mktemp("tiny")
    for label in ("x", "y"):
        (root / "src" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (40 * i, 9, 200)).save(root / "src" / label / f"{i}.png")
    for job in ("a", "b"):
        pack(root / "src", root / "store", job, chunk_size=2)
    return root / "store"


# --------------------------------------------------------------------------- help, info


@pytest.mark.parametrize("command", [[], ["download"], ["list"], ["info"]])
def test_help_on_every_command(command: list[str]) -> None:
    result = _cli(*command, "--help", env={"PIXCRAWLER_API_KEY": "sekrit-key-123"})
    assert result.exit_code == 0 and "Usage:" in result.stdout
    assert "sekrit-key-123" not in result.output  # the key's value is never shown
    if command == ["download"]:
        for option in ("--api-key", "--output-dir", "--format", "--max-workers", "--no-progress"):
            assert option in result.stdout


def test_info_prints_the_specified_block(server: ServerProcess) -> None:
    result = _cli("info", "demo", "--api-key", server.api_key, "--base-url", server.url)
    assert result.exit_code == 0, result.output
    job = json.loads((server.store / "jobs" / "demo" / "job.json").read_text())
    names = ", ".join(job["labels"][:10]) + (", ..." if len(job["labels"]) > 10 else "")
    assert result.stdout.splitlines() == [
        "Dataset: demo",
        "Status: completed",
        f"Images: {job['num_images']:,}",
        f"Chunks: {len(job['chunks'])}",
        f"Size: {format_bytes(job['size_bytes'])}",
        "Created: 2024-01-01 00:00:00",
        f"Labels: {names} ({len(job['labels'])} classes)",
    ]


def test_info_of_a_job_in_progress(server: ServerProcess) -> None:
    env = {"PIXCRAWLER_API_KEY": server.api_key, "PIXCRAWLER_BASE_URL": server.url}
    result = _cli("info", "pending", env=env)
    assert result.exit_code == 0, result.output
    assert "Status: processing" in result.stdout and "Progress: 42%" in result.stdout


def test_list_shows_the_jobs_the_key_can_read(server: ServerProcess) -> None:
    result = _cli("list", "--base-url", server.url, env={"PIXCRAWLER_API_KEY": server.api_key})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["JOB", "ID", "STATUS", "IMAGES", "CHUNKS", "SIZE", "CREATED"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["demo", "completed", "120"],
        ["pending", "processing", "60"],
    ]
    limited = _cli("list", "--api-key", server.limited_key, "--base-url", server.url)
    assert [line.split()[0] for line in limited.stdout.splitlines()[1:]] == ["pending"]


def test_key_and_url_from_the_environment_are_never_printed(server: ServerProcess) -> None:
    env = {
        **os.environ,
        "PIXCRAWLER_API_KEY": "wrong-key-9f8e7d",
        "PIXCRAWLER_BASE_URL": server.url,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pixcrawler", "info", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: ") and "401" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "wrong-key-9f8e7d" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- downloads


def test_download_as_in_the_specification(
    server_factory: Callable[..., ServerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_store: Path,
) -> None:
    """`pixcrawler download job_123 --api-key mykey`: numpy under ./datasets, at the images'
    own size when they share one (job "a": 12x10 each)."""
    server = server_factory(store=tiny_store)
    monkeypatch.chdir(tmp_path)
    args = ("download", "a", "--api-key", server.api_key, "--no-progress")
    result = _cli(*args, env={"PIXCRAWLER_BASE_URL": server.url})
    assert result.exit_code == 0, result.output
    assert "Saved 6 images of a to datasets/a (numpy, 10x12 (the images' own size))." in (
        result.stdout
    )
    assert result.stderr == ""
    images = np.load("datasets/a/images.npy", mmap_mode="r")
    assert images.shape == (6, 10, 12, 3)
    assert np.load("datasets/a/labels.npy").shape == (6,)
    again = _cli(*args, env={"PIXCRAWLER_BASE_URL": server.url})
    assert again.exit_code == 0 and "nothing to do" in again.stdout


@pytest.mark.parametrize("fmt", ["zip", "images", "parquet"])
def test_download_formats(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    env = {"PIXCRAWLER_API_KEY": server.api_key, "PIXCRAWLER_BASE_URL": server.url}
    args = ("--format", fmt, "--output-dir", tmp_path, "--max-workers", "2", "--no-progress")
    result = _cli("download", "demo", *args, env=env)
    assert result.exit_code == 0, result.output
    out = tmp_path / "demo"
    expected = {
        "zip": ["chunks", "job.json"],
        "images": ["metadata.csv"],
        "parquet": ["data"],
    }[fmt]
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert set(expected) <= set(names)
    assert not (out / ".pixcrawler" / "parts").exists()  # cleaned once complete


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tiff"], "Invalid value for '--format'"),
        (["--image-size", "0x5"], "'0x5' is not a size"),
        (["--image-size", "224xcat"], "is not a size"),
        (["--format", "zip", "--image-size", "64x64"], "does not apply to --format zip"),
        (["--format", "numpy", "--image-size", "64x64", "--resize", "fit"], "numpy cannot stack"),
        (["--max-workers", "0"], "--max-workers"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = _cli("download", "demo", "--output-dir", tmp_path, "--api-key", "k", *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_api_key_is_a_usage_error(tmp_path: Path) -> None:
    # Only a server on this machine (loopback) may run without keys; 192.0.2.1 is TEST-NET.
    result = _cli("download", "demo", "--base-url", "http://192.0.2.1", "--output-dir", tmp_path)
    assert result.exit_code == 2 and "PIXCRAWLER_API_KEY" in result.stderr


@pytest.mark.parametrize(
    ("job", "message"),
    [("nope", "not found"), ("pending", "is processing (42% complete)")],
)
def test_jobs_that_cannot_be_downloaded_exit_1(
    server: ServerProcess, tmp_path: Path, job: str, message: str
) -> None:
    result = _cli(
        "download", job, "--api-key", server.api_key, "--base-url", server.url,
        "--output-dir", tmp_path,
    )  # fmt: skip
    assert result.exit_code == 1
    _one_error_line(result, message)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory(tiny_store: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    url = f"file://{tiny_store}"
    result = _cli("download", "a", "--base-url", url, "--output-dir", blocker, "--format", "zip")
    assert result.exit_code == 1
    _one_error_line(result, str(blocker))
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = _cli("download", "a", "--base-url", url, "--output-dir", locked, "--format", "zip")
        assert result.exit_code == 1 and list(locked.iterdir()) == []
        _one_error_line(result, "Permission denied")


def test_an_export_of_another_job_or_version_is_refused(tiny_store: Path, tmp_path: Path) -> None:
    url = f"file://{tiny_store}"
    common = ("--base-url", url, "--output-dir", tmp_path, "--format", "zip", "--no-progress")
    assert _cli("download", "a", *common).exit_code == 0
    (tmp_path / "a").rename(tmp_path / "b")  # folder b now holds job a's export
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = _cli("download", "b", *common)
    assert result.exit_code == 1
    _one_error_line(result, "holds an export of job 'a', not 'b'")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    (tmp_path / "b").rename(tmp_path / "a")
    result = _cli("download", "a", *common[:-3], "--format", "parquet", "--no-progress")
    assert result.exit_code == 1
    _one_error_line(result, "with --format zip, not --format parquet")
    src = tiny_store.parent / "src"
    Image.new("RGB", (5, 5)).save(src / "x" / "new.png")  # the job changes
    pack(src, tiny_store, "a", chunk_size=2)
    result = _cli("download", "a", *common)
    assert result.exit_code == 1
    _one_error_line(result, "re-packed")


def test_list_and_info_as_json(server: ServerProcess) -> None:
    env = {"PIXCRAWLER_API_KEY": server.api_key, "PIXCRAWLER_BASE_URL": server.url}
    listed = _cli("list", "--json", env=env)
    assert listed.exit_code == 0, listed.output
    jobs = json.loads(listed.stdout)
    assert [j["job_id"] for j in jobs] == ["demo", "pending"]
    assert jobs[0]["num_images"] == 120 and jobs[1]["status"] == "processing"
    shown = _cli("info", "pending", "--json", env=env)
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    job = json.loads((server.store / "jobs" / "pending" / "job.json").read_text())
    assert info["job_id"] == "pending" and info["status"] == "processing"
    assert info["progress"] == 42 and info["num_images"] == job["num_images"]
    assert info["num_chunks"] == len(job["chunks"]) and info["labels"] == job["labels"]
    assert info["class_to_idx"] == {name: i for i, name in enumerate(job["labels"])}


# ------------------------------------------------------------------ messages in CLI words


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["info", "nope"], "`pixcrawler list`"),
        (["info", "demo", "--api-key", "wrong-key-5"], "--api-key or PIXCRAWLER_API_KEY"),
        (["download", "demo", "--image-size", "8"], "--on-error skip"),  # a 133 MP bomb below
    ],
)
def test_errors_name_the_cli_flags_not_python_arguments(
    server: ServerProcess, tmp_path: Path, args: list[str], flag: str
) -> None:
    from pixcrawler.cli._words import PYTHON_ONLY

    env = {"PIXCRAWLER_BASE_URL": server.url, "PIXCRAWLER_API_KEY": server.api_key}
    if args[0] == "download":
        args = [*args, "--output-dir", str(tmp_path), "--max-pixels", "100", "--no-progress"]
    result = _cli(*args, env=env)
    assert result.exit_code == 1, result.output
    assert flag in result.stderr, result.stderr
    assert PYTHON_ONLY.search(result.stderr) is None, result.stderr


def test_every_python_hint_of_the_engine_has_cli_words() -> None:
    from pixcrawler.cli._words import PYTHON_ONLY, cli_words
    from pixcrawler_engine.decode._headers import describe_junk
    from pixcrawler_engine.decode._image import probe
    from pixcrawler_engine.decode._pixels import check_budget
    from pixcrawler_engine.export._size import MixedSizes
    from pixcrawler_engine.sources._api_shape import KEY_HINT, not_a_job_api

    messages = [KEY_HINT, describe_junk(memoryview(b"<html>")), str(not_a_job_api("u", "x"))]
    big = io.BytesIO()
    Image.new("L", (20, 20)).save(big, "PNG")
    try:
        check_budget(probe(big.getvalue()), 10)
    except Exception as exc:
        messages.append(str(exc))
    messages.append(str(MixedSizes("for example image_size=(32, 32)", None)))  # type: ignore[arg-type]
    messages.append("pass image_size= to shrink images, or a larger slot_bytes")
    messages.append("lower num_slots, batch_rows or image_size, or give the container more")
    messages.append("with decode=None, not image_size=(16, 16), color='RGB'; use force=True")
    messages.append("with shuffle_seed=3, max_samples=None, not shuffle_seed=None, max_samples=4")
    for message in messages:
        for command in ("download", "info", "pack", "export-images"):
            assert PYTHON_ONLY.search(cli_words(message, command)) is None, (command, message)
