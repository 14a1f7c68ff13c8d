"""Exports to disk (`export_job`) on the real engine, and the chunk cache: layouts and readers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from engine_helpers import expected_keys, job_source
from PIL import Image

from pixcrawler_engine import DecodePolicy, EngineConfig, PixCrawlerError, decode_chunk
from pixcrawler_engine.export._driver import export_job
from pixcrawler_engine.export._state import safe_name
from pixcrawler_engine.export._writers import encode_png
from pixcrawler_engine.runtime._batch import image_views, labels_of
from pixcrawler_engine.sources._base import JobSource
from pixcrawler_engine.sources._cache import ChunkCache
from pixcrawler_engine.sources._cached_source import CachedSource
from pixcrawler_engine.sources._jobapi import JobClient
from pixcrawler_engine.sources._pack import pack

POLICY = DecodePolicy(image_size=(32, 32))
CONFIG = EngineConfig(num_workers=2, batch_rows=8, max_workers=2)


def _chunks(store: Path, job_id: str = "demo") -> list[Path]:
    folder = store / "jobs" / job_id / "chunks"
    return sorted(folder.glob("*.zip"), key=lambda p: int(p.stem))


def _members(store: Path, job_id: str = "demo") -> dict[str, bytes]:
    """Every sample's stored bytes, by key."""
    out = {}
    for path in _chunks(store, job_id):
        with zipfile.ZipFile(path) as zf:
            for line in zf.read("manifest.jsonl").decode().splitlines():
                name = json.loads(line)["file"]
                out[name] = zf.read(name)
    return out


def _decoded(store: Path, policy: DecodePolicy, job_id: str = "demo") -> tuple[np.ndarray, list]:
    """What the engine decodes for the whole job, in dataset order (no processes)."""
    images, labels = [], []
    for i, path in enumerate(_chunks(store, job_id)):
        batch = decode_chunk(path.read_bytes(), policy, chunk=i)
        images.append(np.array(image_views(batch)))
        labels += labels_of(batch)
    return np.concatenate(images), labels


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """Job "hostile": labels that try to leave the export folder or collide once cleaned."""
    root = tmp_path_factory.mktemp("hostile")
    images = sorted(demo_source.glob("[0-9]/*.png"))
    labels = ["../../escape", "/etc", "a/b", "a_b", "..", "CON", "metadata.csv", " ", "ok"]
    listing = root / "list.jsonl"
    with listing.open("w") as f:
        for image, label in zip(images, labels, strict=False):
            f.write(json.dumps({"file": str(image), "label": label}) + "\n")
    pack(listing, root / "store", "hostile", chunk_size=4)
    return root / "store"


# ------------------------------------------------------------------------------ formats


def test_zip_export_is_the_verified_chunk_files(store: Path, tmp_path: Path) -> None:
    result = export_job(job_source(store), tmp_path / "demo", format="zip", config=CONFIG)
    job = json.loads((store / "jobs" / "demo" / "job.json").read_text())
    assert result.chunks_written == len(job["chunks"]) and not result.already_complete
    for chunk in job["chunks"]:
        data = (tmp_path / "demo" / "chunks" / f"{chunk['index']}.zip").read_bytes()
        assert hashlib.sha256(data).hexdigest() == chunk["sha256"]
    written = json.loads((tmp_path / "demo" / "job.json").read_text())
    assert written["version"] == job["version"]
    assert [c["url"] for c in written["chunks"]] == [
        f"chunks/{c['index']}.zip" for c in job["chunks"]
    ]
    # Only the state file stays of the work folder.
    assert sorted(p.name for p in (tmp_path / "demo" / ".pixcrawler").iterdir()) == [
        "lock",
        "state.json",
    ]


def test_parquet_pass_through_is_read_by_datasets_pandas_pyarrow_duckdb(
    store: Path, tmp_path: Path
) -> None:
    import datasets
    import duckdb
    import pandas as pd

    export_job(job_source(store), tmp_path / "demo", format="parquet", config=CONFIG)
    shards = sorted((tmp_path / "demo" / "data").glob("*.parquet"))
    assert [s.name for s in shards][:2] == [
        "train-00000-of-00008.parquet",
        "train-00001-of-00008.parquet",
    ]
    keys = expected_keys(store)
    members = _members(store)
    table = pq.read_table(tmp_path / "demo" / "data")
    assert table.column("key").to_pylist() == keys
    images = table.column("image").to_pylist()
    assert all(img["bytes"] == members[img["path"]] for img in images)  # the stored bytes
    assert pq.ParquetFile(shards[0]).metadata.num_row_groups == 2  # a row group per piece

    frame = pd.read_parquet(tmp_path / "demo" / "data")
    assert list(frame["key"]) == keys
    con = duckdb.connect()
    glob = str(tmp_path / "demo" / "data" / "*.parquet")
    assert con.execute(f"SELECT count(*) FROM read_parquet('{glob}')").fetchone() == (len(keys),)

    ds = datasets.load_dataset(
        "parquet", data_files=glob, split="train", cache_dir=str(tmp_path / "hf")
    )
    job = json.loads((store / "jobs" / "demo" / "job.json").read_text())
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"] == datasets.ClassLabel(names=job["labels"])
    row = ds[5]
    with zipfile.ZipFile(_chunks(store)[0]) as zf:
        manifest = [json.loads(x) for x in zf.read("manifest.jsonl").decode().splitlines()]
    assert job["labels"][row["label"]] == manifest[5]["label"]
    assert np.array_equal(
        np.array(row["image"]), np.array(Image.open(io.BytesIO(members[keys[5]])))
    )


def test_parquet_decoded_gives_datasets_the_engine_pixels(store: Path, tmp_path: Path) -> None:
    import datasets

    export_job(job_source(store), tmp_path / "demo", format="parquet", policy=POLICY, config=CONFIG)
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "demo" / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert isinstance(ds.features["image"], datasets.Image)
    pixels, _ = _decoded(store, POLICY)
    got = np.stack([np.array(img) for img in ds["image"]])
    assert got.dtype == np.uint8 and np.array_equal(got, pixels)


def test_numpy_export_layout(store: Path, tmp_path: Path) -> None:
    export_job(job_source(store), tmp_path / "demo", format="numpy", policy=POLICY, config=CONFIG)
    out = tmp_path / "demo"
    pixels, labels = _decoded(store, POLICY)
    images = np.load(out / "images.npy", mmap_mode="r")
    assert images.shape == (len(labels), 32, 32, 3) and np.array_equal(images, pixels)
    meta = json.loads((out / "labels.json").read_text())
    assert meta["labels"] == labels
    job = json.loads((store / "jobs" / "demo" / "job.json").read_text())
    assert meta["classes"] == job["labels"]
    assert np.load(out / "labels.npy").tolist() == [job["labels"].index(x) for x in labels]
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == expected_keys(store)
    assert [x["index"] for x in lines] == list(range(len(labels)))
    assert all(x["orig_width"] > 0 and "source" in x["metadata"] for x in lines)


def test_numpy_refuses_variable_sizes(store: Path, tmp_path: Path) -> None:
    for policy in (
        None,
        DecodePolicy(image_size=(32, 32), resize="fit"),
        DecodePolicy(color="keep"),
    ):
        with pytest.raises(ValueError, match="one shape for every image"):
            export_job(job_source(store), tmp_path / "x", format="numpy", policy=policy)
    assert not (tmp_path / "x" / "images.npy").exists()


def test_images_export_original_files_and_metadata_csv(store: Path, tmp_path: Path) -> None:
    export_job(job_source(store), tmp_path / "demo", format="images", config=CONFIG)
    out = tmp_path / "demo"
    members = _members(store)
    with (out / "metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == expected_keys(store)
    for row in rows:
        assert row["path"].split("/")[0] == row["label"]  # plain labels keep their name
        assert (out / row["path"]).read_bytes() == members[row["key"]]
    files = [p for p in out.rglob("*") if p.is_file() and ".pixcrawler" not in p.parts]
    assert len(files) == len(rows) + 1


def test_images_export_decoded_is_lossless_png(store: Path, tmp_path: Path) -> None:
    export_job(job_source(store), tmp_path / "demo", format="images", policy=POLICY, config=CONFIG)
    with (tmp_path / "demo" / "metadata.csv").open(newline="") as f:
        paths = [r["path"] for r in csv.DictReader(f)]
    pixels, _ = _decoded(store, POLICY)
    got = np.stack([np.array(Image.open(tmp_path / "demo" / p)) for p in paths])
    assert all(p.endswith(".png") for p in paths) and np.array_equal(got, pixels)


def test_hostile_labels_stay_inside_and_apart(hostile_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "hostile"
    export_job(job_source(hostile_store, "hostile"), out, format="images", config=CONFIG)
    with (out / "metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    folders = {r["label"]: r["path"].split("/")[0] for r in rows}
    assert len(set(folders.values())) == len(folders)  # "a/b" and "a_b" stay apart
    assert folders["ok"] == "ok"
    for folder in folders.values():
        assert "/" not in folder and not folder.startswith(".") and folder.lower() != "con"
    assert (out / "metadata.csv").is_file()  # not replaced by the "metadata.csv" label
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(out.resolve()) or path in (out, out.parent)


def test_parquet_labels_without_a_class_list(hostile_store: Path, tmp_path: Path) -> None:
    """A JSONL job whose labels are ints: the label column is int64, not ClassLabel."""
    root = tmp_path / "ints"
    listing = root / "list.jsonl"
    root.mkdir()
    with zipfile.ZipFile(_chunks(hostile_store, "hostile")[0]) as zf:
        first = [n for n in zf.namelist() if n.endswith(".png")]
        for name in first:
            (root / name).write_bytes(zf.read(name))
    listing.write_text(
        "".join(json.dumps({"file": n, "label": i}) + "\n" for i, n in enumerate(first))
    )
    pack(listing, root / "store", "ints", chunk_size=2)
    export_job(job_source(root / "store", "ints"), root / "out", format="parquet", config=CONFIG)
    schema = pq.read_schema(next((root / "out" / "data").glob("*.parquet")))
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"dtype": "int64", "_type": "Value"}
    assert pq.read_table(root / "out" / "data").column("label").to_pylist() == list(
        range(len(first))
    )


def test_safe_name() -> None:
    assert safe_name("cat") == "cat" and safe_name("golden retriever") == "golden retriever"
    for hostile in (
        "..",
        ".",
        "../x",
        "/etc/passwd",
        "a\x00b",
        "",
        "  ",
        "CON",
        "nul.txt",
        "é" * 300,
    ):
        name = safe_name(hostile)
        assert name and "/" not in name and "\x00" not in name and not name.startswith(".")
        assert len(name) <= 120 and name != hostile
    assert safe_name("a/b") != safe_name("a_b")
    assert safe_name("metadata.csv", reserved=frozenset({"metadata.csv"})) != "metadata.csv"


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_encode_png_is_lossless(channels: int) -> None:
    rng = np.random.default_rng(channels)
    image = rng.integers(0, 256, (17, 23, channels), dtype=np.uint8)
    decoded = np.array(Image.open(io.BytesIO(encode_png(image))))
    assert np.array_equal(decoded.reshape(image.shape), image)


# --------------------------------------------------------------------------- bookkeeping


def test_complete_export_is_not_redone_and_conflicts_are_refused(
    store: Path, tmp_path: Path
) -> None:
    target = tmp_path / "demo"
    export_job(job_source(store), target, format="zip", config=CONFIG)
    stamp = (target / "chunks" / "0.zip").stat().st_mtime_ns
    again = export_job(job_source(store), target, format="zip", config=CONFIG)
    assert again.already_complete and (target / "chunks" / "0.zip").stat().st_mtime_ns == stamp
    with pytest.raises(PixCrawlerError, match="format='zip', not format='parquet'"):
        export_job(job_source(store), target, format="parquet", config=CONFIG)
    with pytest.raises(PixCrawlerError, match="holds an export of job 'demo', not 'pending'"):
        client = JobClient(f"file://{store}", None)
        source = JobSource(client, client.get_job("pending", require_complete=False))
        export_job(source, target, format="zip", config=CONFIG)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PixCrawlerError, match="is not a PixCrawler export"):
        export_job(job_source(store), tmp_path / "other", format="zip", config=CONFIG)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_a_second_writer_is_refused(store: Path, tmp_path: Path) -> None:
    from pixcrawler_engine.export._state import Workspace

    held = Workspace(tmp_path / "demo")
    held.open({"job_id": "demo", "job_version": "x", "format": "zip", "decode": None})
    try:
        with pytest.raises(PixCrawlerError, match="another process is writing"):
            Workspace(tmp_path / "demo").open(
                {"job_id": "demo", "job_version": "x", "format": "zip", "decode": None}
            )
    finally:
        held.close()


# -------------------------------------------------------------------------------- cache


def _fake_download(payload: bytes, calls: list[int]):
    def download(dest: Path) -> Path:
        calls.append(1)
        time.sleep(0.05)  # long enough for a second thread to queue on the lock
        path = dest / "0.zip"
        path.write_bytes(payload)
        return path

    return download


def test_cache_downloads_once_and_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", limit_bytes=250, grace_s=0)
    blobs = {c: bytes([c]) * 100 for c in range(3)}
    shas = {c: hashlib.sha256(b).hexdigest() for c, b in blobs.items()}
    calls: list[int] = []
    threads = [
        threading.Thread(
            target=cache.fetch, args=("v1", shas[0], 100, _fake_download(blobs[0], calls))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1  # one download however many ask at once
    cache.fetch("v1", shas[1], 100, _fake_download(blobs[1], calls))
    old = time.time() - 100
    import os

    # The LRU clock is an entry's stamp (NOTE [stamps] in `sources._stamp`).
    os.utime(cache.path_for("v1", shas[1]).with_suffix(".ok"), (old, old))  # the least recent
    assert cache.get("v1", shas[0], 100) is not None  # a hit refreshes chunk 0
    path = cache.fetch("v1", shas[2], 100, _fake_download(blobs[2], calls))
    assert path.read_bytes() == blobs[2]
    assert cache.get("v1", shas[1], 100) is None  # evicted: least recently used
    assert cache.get("v1", shas[0], 100) is not None
    assert cache.size_bytes() <= 250


def test_cache_keeps_recently_used_entries(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", limit_bytes=0, grace_s=60)
    sha = hashlib.sha256(b"x" * 10).hexdigest()
    path = cache.fetch("v", sha, 10, _fake_download(b"x" * 10, []))
    cache.evict()
    assert path.exists()  # within the grace period: a run may be about to open it


def test_cached_source_over_http_fetches_each_chunk_once(server, tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache")
    client = JobClient(server.url, server.api_key)
    manifest = client.get_job("demo")
    first = export_job(
        JobSource(client, manifest), tmp_path / "a", format="zip", config=CONFIG, cache=cache
    )
    assert first.chunks_written == len(manifest.chunks)
    assert len(list((tmp_path / "cache" / "chunks").rglob("*.zip"))) == len(manifest.chunks)
    # A second export of the same job reads every chunk from the cache: no chunk request.
    offline = JobClient("http://127.0.0.1:9", server.api_key, retries=1)
    source = CachedSource(JobSource(offline, manifest), cache)
    paths = [source.fetch(c.index, tmp_path)[0] for c in manifest.chunks]
    assert all(p.is_relative_to(tmp_path / "cache") for p in paths)
    client.close()
    offline.close()
