"""`pixcrawler download` options beyond the specification's, on the real server.

numpy at the images' own size (and the refusal of mixed sizes), --on-error, --color, --shuffle
and --seed (the order `load_dataset` gives), --max-samples, --force on a changed resumed export,
and --ca-bundle against a TLS front.
"""

from __future__ import annotations

import json
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from conftest import ServerProcess, start_server
from engine_helpers import corrupt_one_sample
from faults._proxy import proxied
from PIL import Image

from pixcrawler import _demo_data, load_dataset
from pixcrawler.cli import main
from pixcrawler.cli._words import PYTHON_ONLY
from pixcrawler_engine.sources._pack import pack

DIGITS = 30  # digits 0-2, 10 each, 32x32: one size


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    base = {"PIXCRAWLER_API_KEY": None, "PIXCRAWLER_BASE_URL": None}
    return CliRunner().invoke(main, [str(a) for a in args], env={**base, **(env or {})})


@pytest.fixture(scope="module")
def digit_server(
    tmp_path_factory: pytest.TempPathFactory, keys_file: Path
) -> Iterator[ServerProcess]:
    """Jobs "digits" (30 real digits, chunks of 8) and "broken" (the same, one truncated)."""
    root = tmp_path_factory.mktemp("digits")
    src = _demo_data.build_digits(root / "src", limit=10, classes=(0, 1, 2))
    pack(src, root / "store", "digits", chunk_size=8)
    pack(src, root / "store", "broken", chunk_size=8)
    corrupt_one_sample(root / "store", "broken", chunk=1, row=2)
    server = start_server(root / "store", keys_file)
    try:
        yield server
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.output()


def _env(server: ServerProcess) -> dict[str, str]:
    return {"PIXCRAWLER_API_KEY": server.api_key, "PIXCRAWLER_BASE_URL": server.url}


def _get(server: ServerProcess, what: str) -> int:
    """How many GETs of `what` the server has logged so far."""
    return sum(1 for line in server.output().splitlines() if f"GET {what}" in line)


def _no_python_words(result: Result) -> None:
    assert PYTHON_ONLY.search(result.output) is None, result.output
    assert "site-packages" not in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------- numpy, its own size


def test_numpy_keeps_the_images_own_size(digit_server: ServerProcess, tmp_path: Path) -> None:
    result = _cli("download", "digits", "--output-dir", tmp_path, "--no-progress",
                  env=_env(digit_server))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Saved 30 images of digits" in result.stdout
    assert "(numpy, 32x32 (the images' own size))" in result.stdout
    images = np.load(tmp_path / "digits" / "images.npy")
    assert images.shape == (DIGITS, 32, 32, 3)  # not 224x224: 92 KB, not 4.5 MB
    with load_dataset(
        "digits", progress=False, api_key=digit_server.api_key, base_url=digit_server.url
    ) as ds:
        expected, _ = ds.to_arrays()
    np.testing.assert_array_equal(images, expected)
    grey = _cli("download", "digits", "--output-dir", tmp_path / "grey", "--color", "L",
                "--no-progress", env=_env(digit_server))  # fmt: skip
    assert grey.exit_code == 0, grey.output
    assert np.load(tmp_path / "grey" / "digits" / "images.npy").shape == (DIGITS, 32, 32, 1)


def test_numpy_of_mixed_sizes_proposes_an_image_size(server: ServerProcess, tmp_path: Path) -> None:
    env = {"PIXCRAWLER_API_KEY": server.api_key, "PIXCRAWLER_BASE_URL": server.url}
    result = _cli("download", "demo", "--output-dir", tmp_path, "--no-progress", env=env)
    assert result.exit_code == 1
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and "differ in size" in error[0] and "--image-size 32x32" in error[0]
    _no_python_words(result)
    assert not (tmp_path / "demo" / "images.npy").exists()
    # The proposed option works at once (no --force), from the chunks already fetched.
    fetched = _get(server, "/api/v1/jobs/demo/chunks/")
    again = _cli("download", "demo", "--output-dir", tmp_path, "--image-size", "32x32",
                 "--no-progress", env=env)  # fmt: skip
    assert again.exit_code == 0, again.output
    assert np.load(tmp_path / "demo" / "images.npy", mmap_mode="r").shape == (120, 32, 32, 3)
    assert _get(server, "/api/v1/jobs/demo/chunks/") == fetched  # nothing fetched twice


# ------------------------------------------------------------------------- --on-error


def test_on_error_raise_skip_and_warn(digit_server: ServerProcess, tmp_path: Path) -> None:
    env = _env(digit_server)
    with load_dataset(
        "digits", progress=False, api_key=digit_server.api_key, base_url=digit_server.url
    ) as ds:
        expected, _ = ds.to_arrays()  # the same images, none broken
    common = ("--no-progress", "--num-workers", "1")
    raised = _cli("download", "broken", "--output-dir", tmp_path / "r", *common, env=env)
    assert raised.exit_code == 1 and "--on-error skip" in raised.stderr, raised.output
    assert "broken.png" in raised.stderr
    _no_python_words(raised)
    for mode in ("skip", "warn"):
        out = tmp_path / mode
        result = _cli("download", "broken", "--output-dir", out, "--on-error", mode, *common,
                      env=env)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "Saved 29 images of broken" in result.stdout
        assert "1 left out: they could not be decoded" in result.stdout
        warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
        assert len(warned) == (1 if mode == "warn" else 0), result.stderr
        if warned:  # named by the file it was packed from, and its name in the chunk
            assert "'1/0001.png' (broken.png)" in warned[0]
        _no_python_words(result)
        images = np.load(out / "broken" / "images.npy")
        labels = json.loads((out / "broken" / "labels.json").read_text())["labels"]
        lines = (out / "broken" / "metadata.jsonl").read_text().splitlines()
        assert images.shape[0] == len(labels) == len(lines) == DIGITS - 1
        # The rows close ranks: every other sample, in order, in the rows that follow.
        assert [json.loads(x)["index"] for x in lines] == [i for i in range(DIGITS) if i != 10]
        np.testing.assert_array_equal(images, np.delete(expected, 10, axis=0))


# ------------------------------------------------------------- --shuffle, --max-samples


@pytest.mark.parametrize("seed", [0, 7])
def test_shuffle_is_the_order_load_dataset_gives(
    digit_server: ServerProcess, tmp_path: Path, seed: int
) -> None:
    result = _cli("download", "digits", "--output-dir", tmp_path, "--shuffle", "--seed",
                  str(seed), "--no-progress", env=_env(digit_server))  # fmt: skip
    assert result.exit_code == 0, result.output
    images = np.load(tmp_path / "digits" / "images.npy")
    lines = (tmp_path / "digits" / "metadata.jsonl").read_text().splitlines()
    keys = [json.loads(x)["key"] for x in lines]
    # An export's shuffle is the chunk-level one: epoch 0 with shuffle_window=1.
    with load_dataset("digits", shuffle=True, seed=seed, shuffle_window=1, progress=False,
                      api_key=digit_server.api_key, base_url=digit_server.url) as ds:  # fmt: skip
        order, parts = [], []
        for batch in ds.iter_engine_batches():
            order += batch.keys
            parts.append(np.array(batch.images))  # a copy: the slot goes back at once
        pixels = np.concatenate(parts)
    assert keys == order and sorted(keys) != keys
    np.testing.assert_array_equal(images, pixels)


def test_max_samples_with_and_without_shuffle(digit_server: ServerProcess, tmp_path: Path) -> None:
    env = _env(digit_server)
    plain = _cli("download", "digits", "--output-dir", tmp_path / "a", "--format", "parquet",
                 "--max-samples", "11", "--no-progress", env=env)  # fmt: skip
    assert plain.exit_code == 0, plain.output
    assert "Saved 11 images" in plain.stdout
    table = pq.read_table(tmp_path / "a" / "digits" / "data")
    assert table.column("index").to_pylist() == list(range(11))
    mixed = _cli("download", "digits", "--output-dir", tmp_path / "b", "--format", "parquet",
                 "--max-samples", "11", "--shuffle", "--seed", "3", "--no-progress",
                 env=env)  # fmt: skip
    assert mixed.exit_code == 0, mixed.output
    with load_dataset("digits", shuffle=True, seed=3, shuffle_window=1, progress=False,
                      api_key=digit_server.api_key, base_url=digit_server.url) as ds:  # fmt: skip
        order = [k for b in ds.iter_engine_batches() for k in b.keys][:11]
    shards = sorted((tmp_path / "b" / "digits" / "data").glob("*.parquet"))
    keys = [k for s in shards for k in pq.read_table(s).column("key").to_pylist()]
    assert keys == order


# ------------------------------------------------------------------------------ --force


def test_a_changed_option_needs_force(digit_server: ServerProcess, tmp_path: Path) -> None:
    env = _env(digit_server)
    first = _cli("download", "digits", "--output-dir", tmp_path, "--format", "images",
                 "--no-progress", env=env)  # fmt: skip
    assert first.exit_code == 0, first.output
    changed = ("download", "digits", "--output-dir", tmp_path, "--format", "images",
               "--image-size", "16x16", "--no-progress")  # fmt: skip
    refused = _cli(*changed, env=env)
    assert refused.exit_code == 1 and "--force" in refused.stderr, refused.output
    _no_python_words(refused)
    forced = _cli(*changed, "--force", env=env)
    assert forced.exit_code == 0, forced.output
    files = sorted((tmp_path / "digits").glob("*/*.png"))
    assert len(files) == DIGITS
    for file in files:
        with Image.open(file) as im:
            assert im.size == (16, 16)
    fresh = _cli(*changed[:3], tmp_path / "fresh", *changed[4:], env=env)
    assert fresh.exit_code == 0, fresh.output
    assert (tmp_path / "digits" / "metadata.csv").read_text() == (
        tmp_path / "fresh" / "digits" / "metadata.csv"
    ).read_text()


# ------------------------------------------------------------------------- bad usage


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--color", "keep"], "--color"),
        (["--format", "zip", "--shuffle"], "--shuffle"),
        (["--format", "zip", "--max-samples", "3"], "--max-samples"),
        (["--format", "zip", "--color", "L"], "--color"),
        (["--seed", "3"], "--shuffle"),
    ],
)
def test_options_that_cannot_apply_exit_2(tmp_path: Path, args: list[str], flag: str) -> None:
    result = _cli("download", "demo", "--output-dir", tmp_path, "--api-key", "k", *args)
    assert result.exit_code == 2 and flag in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- --ca-bundle


def test_ca_bundle_for_a_private_ca(digit_server: ServerProcess, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    env = {"PIXCRAWLER_API_KEY": digit_server.api_key}
    with proxied(digit_server.url, tls=context) as proxy:
        common = ("--base-url", proxy.url, "--output-dir", tmp_path, "--no-progress")
        refused = _cli("download", "digits", *common, env=env)
        assert refused.exit_code == 1 and "--ca-bundle" in refused.stderr, refused.output
        _no_python_words(refused)
        result = _cli("download", "digits", *common, "--ca-bundle", bundle, env=env)
        assert result.exit_code == 0, result.output
        listed = _cli("list", "--base-url", proxy.url, "--ca-bundle", bundle, env=env)
        assert listed.exit_code == 0 and "digits" in listed.stdout, listed.output
    assert np.load(tmp_path / "digits" / "images.npy").shape == (DIGITS, 32, 32, 3)
