"""`pixcrawler pack` and `pixcrawler serve`: exit codes, messages, signals, and secrets."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import ServerProcess
from PIL import Image

from pixcrawler.cli import main
from pixcrawler_engine.sources import _store


def _source(root: Path) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (9, 7), (i, 9, 9)).save(root / label / f"{i}.png")
    return root


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixcrawler", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ----------------------------------------------------------------------------- pack


def test_pack_as_a_process(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    result = _run("pack", str(src), "--store", str(tmp_path / "s"), "--job-id", "j1")
    assert result.returncode == 0, result.stderr
    assert "Packed" in result.stdout
    job = _store.read_job(tmp_path / "s", "j1")
    assert job["num_images"] == 6 and job["chunk_size"] == 500 and job["status"] == "completed"


def test_pack_options(tmp_path: Path) -> None:
    src = _source(tmp_path / "src")
    runner = CliRunner()
    args = ["pack", str(src), "--store", str(tmp_path / "s"), "--chunk-size", "4"]
    result = runner.invoke(main, [*args, "--job-id", "p", "--status", "processing"])
    assert result.exit_code == 0, result.output
    job = _store.read_job(tmp_path / "s", "p")
    assert (job["status"], job["progress"], len(job["chunks"])) == ("processing", 0, 2)
    result = runner.invoke(main, [*args, "--job-id", "q", "--status", "failed", "--progress", "42"])
    assert result.exit_code == 0, result.output
    job = _store.read_job(tmp_path / "s", "q")
    assert (job["status"], job["progress"]) == ("failed", 42)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("not-an-image", r"b/x\.png.*not a supported image"),
        ("bad-job-id", "invalid job id"),
        ("missing-in-jsonl", r"gone\.png \(line 1"),
        ("empty", "holds no images"),
    ],
)
def test_pack_errors_exit_1(tmp_path: Path, setup: str, message: str) -> None:
    src, job_id = _source(tmp_path / "src"), "job"
    if setup == "not-an-image":
        (src / "b" / "x.png").write_text("plain text")
    elif setup == "bad-job-id":
        job_id = "../../x"
    elif setup == "missing-in-jsonl":
        src = tmp_path / "list.jsonl"
        src.write_text(json.dumps({"file": "gone.png", "label": "a"}) + "\n")
    elif setup == "empty":
        src = tmp_path / "empty"
        src.mkdir()
    result = _run("pack", str(src), "--store", str(tmp_path / "s"), "--job-id", job_id)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "s" / "jobs").exists() or not any((tmp_path / "s" / "jobs").iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["pack", "{src}", "--store", "{store}"],  # no --job-id
        ["pack", "{src}", "--job-id", "j"],  # no --store
        ["pack", "{missing}", "--store", "{store}", "--job-id", "j"],
        ["pack", "{src}", "--store", "{store}", "--job-id", "j", "--chunk-size", "0"],
        ["pack", "{src}", "--store", "{store}", "--job-id", "j", "--status", "done"],
        ["pack", "{src}", "--store", "{store}", "--job-id", "j", "--progress", "101"],
        ["serve", "{missing}", "--api-key", "k"],
        ["serve", "{store}", "--port", "-1", "--api-key", "k"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    names = {"src": _source(tmp_path / "src"), "store": tmp_path, "missing": tmp_path / "nope"}
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == 2, result.output


def test_help_and_module_entry_point() -> None:
    result = _run("--help")
    assert result.returncode == 0
    assert "pack" in result.stdout and "serve" in result.stdout
    assert CliRunner().invoke(main, ["serve", "--help"]).exit_code == 0


# ----------------------------------------------------------------------------- serve


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signals(server_factory, sig: signal.Signals) -> None:
    server: ServerProcess = server_factory()
    r = httpx.get(
        server.url + "/api/v1/jobs", headers={"Authorization": f"Bearer {server.api_key}"}
    )
    assert r.status_code == 200
    assert server.stop(sig) == 0
    out = server.output()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert out.splitlines()[0].startswith("Serving ")


def test_serve_stops_with_a_download_in_flight(server_factory, tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[server]\ngraceful_timeout = 1\n")
    server: ServerProcess = server_factory("--config", str(config))
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = server.url + "/api/v1/jobs/demo/chunks/0"
    with httpx.Client(timeout=30) as client, client.stream("GET", url, headers=headers) as r:
        next(r.iter_raw(1024))  # the response has started and is not finished
        assert server.stop(signal.SIGTERM) == 0


def test_serve_key_from_the_environment_is_never_printed(server_factory) -> None:
    key = "env-secret-key-31337"
    server: ServerProcess = server_factory(keys_file=None, api_key_env=key)
    ok = httpx.get(server.url + "/api/v1/jobs/demo", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    bad = httpx.get(server.url + "/api/v1/jobs", headers={"Authorization": "Bearer env-secret-k"})
    assert bad.status_code == 401
    assert server.stop() == 0
    out = server.output()
    assert "GET /api/v1/jobs/demo" in out
    assert "env-secret" not in out


def test_serve_errors_exit_1(tmp_path: Path, store: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["serve", str(tmp_path), "--api-key", "k", "--port", "0"])
    assert result.exit_code == 1 and "not a job store" in result.stderr
    result = runner.invoke(
        main,
        ["serve", str(store), "--port", "0", "--host", "0.0.0.0"],
        env={"PIXCRAWLER_API_KEY": ""},
    )
    assert result.exit_code == 1 and "needs an API key" in result.stderr
    for flag in ("--api-key", "--keys-file", "--generate-key"):
        assert flag in result.stderr
    bad_keys = tmp_path / "keys.json"
    bad_keys.write_text('{"k": 5}')
    result = runner.invoke(main, ["serve", str(store), "--keys-file", str(bad_keys)])
    assert result.exit_code == 1 and "keys file" in result.stderr


def test_serve_port_in_use_exits_1(store: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run("serve", str(store), "--port", str(port), "--api-key", "k")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
    assert "in use" in result.stderr


# ------------------------------------------------------------------- serve without a key


def test_serve_on_loopback_needs_no_key_and_says_so(server_factory, tmp_path: Path) -> None:
    server: ServerProcess = server_factory(keys_file=None)
    first = server.lines[0]
    assert first.startswith("Serving ") and "with no API key" in first and "loopback" in first
    jobs = httpx.get(server.url + "/api/v1/jobs")
    assert jobs.status_code == 200 and {j["job_id"] for j in jobs.json()["jobs"]} >= {"demo"}
    # The CLI and the SDK talk to it without a key.
    env = {"PIXCRAWLER_API_KEY": None, "PIXCRAWLER_BASE_URL": None}
    listed = CliRunner().invoke(main, ["list", "--base-url", server.url], env=env)
    assert listed.exit_code == 0 and "demo" in listed.stdout, listed.output
    from pixcrawler import load_dataset

    with load_dataset("demo", base_url=server.url, api_key=None, progress=False) as ds:
        assert ds.num_images == 120
    assert server.stop() == 0


def test_serve_beyond_loopback_with_a_generated_key(server_factory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "jobs").mkdir(parents=True)
    server: ServerProcess = server_factory(
        "--host", "0.0.0.0", "--generate-key", store=store, keys_file=None
    )
    key_file = store / ".pixcrawler-api-key"
    key = key_file.read_text().strip()
    assert key and key_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    url = server.url.replace("0.0.0.0", "127.0.0.1")
    assert httpx.get(url + "/api/v1/jobs").status_code == 401
    ok = httpx.get(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and ok.json() == {"jobs": []}
    assert server.stop() == 0
    out = server.output()
    assert str(key_file) in out and key not in out  # where to read it, never the key
    # A restart keeps the key, so that clients keep working.
    again: ServerProcess = server_factory(
        "--host", "0.0.0.0", "--generate-key", store=store, keys_file=None
    )
    assert key_file.read_text().strip() == key
    assert again.stop() == 0
