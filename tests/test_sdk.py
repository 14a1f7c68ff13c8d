"""The SDK facade against the real server: load_dataset, Dataset passes and conversions, bad input.

Jobs come from the shared `store` fixture ("demo": 60 digits of 32x32 and 60 photos of many
sizes, chunks of 16; "pending": processing, 42%), served by the real `server` subprocess.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import socket
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from engine_helpers import corrupt_one_sample, expected_keys, reference_pixels, wait_gone

import pixcrawler
from pixcrawler import DatasetInfo, load_dataset
from pixcrawler_engine import DecodePolicy, SampleWarning
from pixcrawler_engine._errors import (
    AuthenticationError,
    DecodeError,
    JobNotCompleteError,
    NetworkError,
    NotFoundError,
)
from pixcrawler_engine.sources._jobapi import JobClient

FAST: dict[str, Any] = {"num_workers": 2, "progress": False}


def expected_labels(store: Path, job_id: str = "demo") -> list[Any]:
    """Every label of a packed job in dataset order, read straight from the chunk zips."""
    labels = []
    chunks = sorted((store / "jobs" / job_id / "chunks").glob("*.zip"), key=lambda p: int(p.stem))
    for path in chunks:
        with zipfile.ZipFile(path) as zf:
            labels += [json.loads(x)["label"] for x in zf.read("manifest.jsonl").splitlines()]
    return labels


def engine_children() -> set[int]:
    """Pids of this process's descendants (the server fixture's among them)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def demo(server: Any) -> Any:
    """The demo job over HTTP, resized to 16x16 (a fixed shape)."""
    with load_dataset(
        "demo", api_key=server.api_key, base_url=server.url, image_size=16, **FAST
    ) as dataset:
        yield dataset


@pytest.fixture
def no_chunk_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if this process fetches a chunk."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a chunk was fetched before iteration")

    monkeypatch.setattr(JobClient, "fetch_chunk", refuse)


# ---- loading ------------------------------------------------------------------------------


def test_load_reads_the_manifest_only(server: Any, store: Path, no_chunk_fetch: None) -> None:
    job = json.loads((store / "jobs" / "demo" / "job.json").read_text())
    dataset = load_dataset("demo", api_key=server.api_key, base_url=server.url, progress=False)
    info = dataset.info
    assert isinstance(info, DatasetInfo)
    assert (info.job_id, info.status, info.version) == ("demo", "completed", job["version"])
    assert info.num_images == len(dataset) == dataset.num_images == 120
    assert info.num_chunks == dataset.num_chunks == len(job["chunks"]) == 8
    assert info.chunk_size == dataset.chunk_size == 16
    assert info.size_bytes == job["size_bytes"] and info.created_at == job["created_at"]
    assert list(info.labels) == job["labels"]
    assert info.class_to_idx == {name: i for i, name in enumerate(job["labels"])}
    assert info.classes == job["labels"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_images = 3  # type: ignore[misc]  # a deliberate write: it must raise
    assert "Images: 120" in info.summary() and "(15 classes)" in info.summary()
    assert "demo" in repr(dataset)
    dataset.to_torch()  # lazy too: nothing is fetched until an item is asked for
    dataset.close()


def test_key_and_base_url_come_from_the_environment(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXCRAWLER_API_KEY", server.api_key)
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", server.url)
    assert load_dataset("demo").num_images == 120
    # An explicit argument wins over the environment.
    with pytest.raises(AuthenticationError):
        load_dataset("demo", api_key="pxc-wrong-key")
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", "ftp://nowhere")
    assert load_dataset("demo", base_url=server.url).num_images == 120


def test_file_store_needs_no_key(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    dataset = load_dataset("demo", base_url=store.as_uri(), image_size=(8, 12), **FAST)
    images, labels = next(dataset.iter_batches(batch_size=4))
    assert images.shape == (4, 8, 12, 3) and labels == expected_labels(store)[:4]


# ---- passes over the data -----------------------------------------------------------------


def test_iteration_yields_every_image_in_order(server: Any, store: Path) -> None:
    dataset = load_dataset("demo", api_key=server.api_key, base_url=server.url, **FAST)
    labels, shapes = [], set()
    for image, label in dataset:
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
        assert image.shape[2] == 3
        shapes.add(image.shape)
        labels.append(label)
    assert labels == expected_labels(store)
    assert (32, 32, 3) in shapes and len(shapes) > 2  # each image kept its own size


def test_iter_batches_rebatches_with_exact_pixels(demo: Any, store: Path) -> None:
    # Batches of 50 over engine batches of 16 (one chunk each): joined across chunks.
    batches = list(demo.iter_batches(batch_size=50))
    assert [len(labels) for _, labels in batches] == [50, 50, 20]
    images = np.concatenate([b for b, _ in batches])
    assert images.shape == (120, 16, 16, 3) and images.dtype == np.uint8
    assert [label for _, labels in batches for label in labels] == expected_labels(store)
    # Spot-check pixels across chunk boundaries against a direct decode.
    keys = expected_keys(store)
    policy = DecodePolicy(image_size=(16, 16))
    for i in (0, 15, 16, 49, 50, 119):
        np.testing.assert_array_equal(images[i], reference_pixels(store, keys[i], policy))
    # A batch inside one engine batch is a view (no copy); one across two is joined.
    small = [(len(x), x.flags.owndata) for x, _ in demo.iter_batches(batch_size=7, drop_last=True)]
    assert [n for n, _ in small] == [7] * 17  # the 120th image is dropped
    assert small[0][1] is False and small[2][1] is True  # rows 0-6; rows 14-20 span chunks


def test_iter_batches_of_variable_sizes_says_to_pass_image_size(server: Any) -> None:
    dataset = load_dataset("demo", api_key=server.api_key, base_url=server.url, **FAST)
    with pytest.raises(ValueError, match=r"image_size="):
        for _ in dataset.iter_batches(batch_size=32):
            pass
    with pytest.raises(ValueError, match="batch_size"):
        next(dataset.iter_batches(batch_size=0))


def test_to_arrays(demo: Any, store: Path) -> None:
    X, y = demo.to_arrays()
    assert X.shape == (120, 16, 16, 3) and X.dtype == np.uint8 and X.flags.writeable
    assert y.shape == (120,) and y.tolist() == expected_labels(store)


def test_to_arrays_refuses_before_allocating(demo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_stream(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pass started although the limit was known to be exceeded")

    monkeypatch.setattr(pixcrawler._dataset, "Stream", no_stream)
    with pytest.raises(MemoryError, match=r"max_bytes=") as info:
        demo.to_arrays(max_bytes=120 * 16 * 16 * 3 - 1)
    assert "iter_batches" in str(info.value)
    with pytest.raises(MemoryError):
        demo.to_dataframe(max_bytes=1000)


def test_to_arrays_of_variable_sizes_says_to_pass_image_size(store: Path) -> None:
    dataset = load_dataset("demo", base_url=store.as_uri(), **FAST)
    with pytest.raises(ValueError, match=r"image_size="):
        dataset.to_arrays()


def test_to_dataframe(server: Any, store: Path) -> None:
    dataset = load_dataset("demo", api_key=server.api_key, base_url=server.url, **FAST)
    df = dataset.to_dataframe()
    assert list(df.columns[:3]) == ["image", "label", "metadata"]
    assert len(df) == 120 and df["label"].tolist() == expected_labels(store)
    assert df["image"][0].shape == (32, 32, 3) and df["image"][0].flags.writeable
    assert all(isinstance(m, dict) and "source" in m for m in df["metadata"])
    assert (df["height"] == [im.shape[0] for im in df["image"]]).all()
    assert df["label"].value_counts()["0"] == 20
    assert "mean" in df.describe().index  # the spec's df.describe() has numbers to describe


def test_shuffle_is_seeded_and_keeps_every_image(server: Any, store: Path) -> None:
    def labels(seed: int) -> list[Any]:
        dataset = load_dataset(
            "demo", server.api_key, server.url, image_size=4, shuffle=True, seed=seed, **FAST
        )
        return [label for _, batch in dataset.iter_batches(batch_size=60) for label in batch]

    first, again, other = labels(1), labels(1), labels(2)
    assert first == again and first != other
    assert Counter(first) == Counter(expected_labels(store)) and first != expected_labels(store)


def test_break_and_close_stop_the_engine(demo: Any) -> None:
    before = engine_children()
    with demo:
        for _image, _label in demo:
            children = engine_children() - before
            break
    assert children, "the pass runs in engine processes"
    gc.collect()
    assert wait_gone(list(children), timeout=10) == []
    with pytest.raises(ValueError, match="closed"):
        next(iter(demo))


def test_close_stops_a_running_pass(demo: Any) -> None:
    before = engine_children()
    batches = demo.iter_batches(batch_size=4)
    next(batches)
    children = engine_children() - before
    demo.close()
    assert wait_gone(list(children), timeout=10) == []
    with pytest.raises(RuntimeError):
        for _ in batches:
            pass


def test_progress_bar_has_a_known_total(
    server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    totals: list[int | None] = []
    import tqdm.auto

    real = tqdm.auto.tqdm

    def spy(*args: Any, **kwargs: Any) -> Any:
        totals.append(kwargs.get("total"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    loud = load_dataset("demo", server.api_key, server.url, image_size=4, num_workers=1)
    loud.to_arrays()
    assert totals == [120] and "to_arrays" in capsys.readouterr().err
    quiet = load_dataset(
        "demo", server.api_key, server.url, image_size=4, num_workers=1, progress=False
    )
    quiet.to_arrays()
    assert totals == [120] and capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def bad_store(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """A copy of the demo job whose first chunk holds one truncated image."""
    root = tmp_path_factory.mktemp("sdk-bad") / "store"
    shutil.copytree(store / "jobs" / "demo", root / "jobs" / "demo")
    corrupt_one_sample(root, "demo")
    return root


def test_on_error_policies(bad_store: Path) -> None:
    url = bad_store.as_uri()
    with pytest.raises(DecodeError, match="broken"):
        load_dataset("demo", base_url=url, image_size=8, **FAST).to_arrays()
    X, y = load_dataset("demo", base_url=url, image_size=8, on_error="skip", **FAST).to_arrays()
    assert X.shape == (119, 8, 8, 3) and len(y) == 119
    warned = load_dataset("demo", base_url=url, image_size=8, on_error="warn", **FAST)
    with pytest.warns(SampleWarning, match="broken"):
        assert len(warned.to_arrays()[1]) == 119


def test_cache_dir_keeps_chunks_for_the_next_run(
    server_factory: Any, tmp_path: Path, store: Path
) -> None:
    srv = server_factory()
    cache = tmp_path / "cache"
    dataset = load_dataset("demo", srv.api_key, srv.url, image_size=4, cache_dir=cache, **FAST)
    first = dataset.to_arrays()
    assert len(list(cache.rglob("*.zip"))) == 8
    srv.stop()  # the second pass must not need the server
    second = dataset.to_arrays()
    np.testing.assert_array_equal(first[0], second[0])
    assert not any(srv.api_key.encode() in p.read_bytes() for p in cache.rglob("*") if p.is_file())


# ---- bad input ----------------------------------------------------------------------------


def test_wrong_key(server: Any) -> None:
    with pytest.raises(AuthenticationError, match="API key") as info:
        load_dataset("demo", api_key="pxc-wrong-key", base_url=server.url)
    assert "pxc-wrong-key" not in str(info.value)
    with pytest.raises(AuthenticationError, match="no access"):
        load_dataset("demo", api_key=server.limited_key, base_url=server.url)


def test_missing_key_says_where_to_put_it(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="PIXCRAWLER_API_KEY"):
        load_dataset("demo", base_url=server.url)


def test_unknown_job(server: Any) -> None:
    with pytest.raises(NotFoundError, match="no-such-job"):
        load_dataset("no-such-job", api_key=server.api_key, base_url=server.url)


def test_job_still_processing(server: Any) -> None:
    with pytest.raises(JobNotCompleteError, match="wait") as info:
        load_dataset("pending", api_key=server.api_key, base_url=server.url)
    assert info.value.progress == 42 and info.value.status == "processing"


def test_server_down_fails_fast() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(NetworkError, match="server runs"):
        load_dataset("demo", api_key="pxc-key", base_url=f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 15


@pytest.mark.parametrize("url", ["ftp://example.com", "s3://bucket/store", "example.com"])
def test_unsupported_scheme(url: str) -> None:
    with pytest.raises(ValueError, match=r"https://.*file:///"):
        load_dataset("demo", api_key="pxc-key", base_url=url)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"image_size": (0, 4)}, "image_size"),
        ({"image_size": "big"}, "image_size"),
        ({"resize": "zoom"}, "resize"),
        ({"color": "CMYK"}, "color"),
        ({"on_error": "ignore"}, "on_error"),
        ({"max_workers": 0}, "max_workers"),
        ({"batch_rows": -1}, "batch_rows"),
    ],
)
def test_bad_options_say_what_works(store: Path, option: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("demo", base_url=store.as_uri(), **option)
