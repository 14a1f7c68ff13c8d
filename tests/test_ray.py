"""`Dataset.to_ray()` on a real local Ray instance (2 CPUs): rows, order, errors, the API key.

Every source is read (a `file://` store, the real server's job API with a key, Parquet shards);
the rows are compared with the engine's own pass over the same dataset: the same keys in the
same order (with Ray's `preserve_order`), the same pixels, the same shuffle permutation. The
instance is started once for the module, with a private temp folder, and must leave no process
behind. Multi-node runs and a worker killed mid-read are in `test_ray_cluster.py`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from artefact_data import build as build_artefact
from engine_helpers import corrupt_one_sample, expected_keys
from faults._proxy import Fault, proxied
from ray_helpers import (
    ObjectStoreWatch,
    engine_rows,
    local_ray,
    ray_processes,
    ray_rows,
    require_ray,
)

from pixcrawler import load_dataset
from pixcrawler_engine.export._driver import export_job
from pixcrawler_engine.runtime._stream import SampleWarning
from pixcrawler_engine.sources._base import JobSource
from pixcrawler_engine.sources._jobapi import JobClient

ray = require_ray()

pytestmark = pytest.mark.timeout(120)

SIZE = (32, 32)
SLOW = os.environ.get("PIXCRAWLER_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def ray_local() -> Iterator[str]:
    """A local Ray instance of 2 CPUs; rows keep their order; nothing is left at the end."""
    with local_ray(num_cpus=2) as tmp:
        yield tmp


def _store_dataset(store: Path, **options: Any) -> Any:
    return load_dataset("demo", base_url=store.as_uri(), progress=False, **options)


def test_ray_workers_import_this_tree(ray_local: str) -> None:
    import pixcrawler
    import pixcrawler_engine

    @ray.remote
    def where() -> tuple[str, str]:
        import pixcrawler
        import pixcrawler_engine

        return pixcrawler.__file__, pixcrawler_engine.__file__

    assert ray.get(where.remote()) == (pixcrawler.__file__, pixcrawler_engine.__file__)


def test_file_store_rows_are_the_engine_rows(ray_local: str, store: Path) -> None:
    dataset = _store_dataset(store, image_size=SIZE)
    ds = dataset.to_ray()
    schema = ds.schema().base_schema
    assert isinstance(schema.field("image").type, pa.FixedShapeTensorType)
    assert schema.field("image").type.shape == [*SIZE, 3]
    assert schema.field("label").type == pa.int64()
    assert schema.names == [
        "image", "label", "key", "chunk", "index", "orig_width", "orig_height", "metadata",
    ]  # fmt: skip
    got, want = ray_rows(ds), engine_rows(dataset)
    assert got.keys == want.keys == expected_keys(store)  # every key once, in dataset order
    assert got.indices == list(range(len(got.keys)))
    assert got.labels == want.labels
    np.testing.assert_array_equal(got.pixels(), want.pixels())
    assert ds.count() == dataset.num_images
    # The block Ray keeps holds the tensor type as it is.
    block = ray.get(ds.limit(3).to_arrow_refs()[0])
    assert isinstance(block.schema.field("image").type, pa.FixedShapeTensorType)


def test_shuffle_is_the_engine_permutation(ray_local: str, store: Path) -> None:
    # Ray's read tasks are chunks: its shuffle is the engine's with shuffle_window=1.
    dataset = _store_dataset(store, image_size=SIZE, shuffle=True, seed=7, shuffle_window=1)
    got, want = ray_rows(dataset.to_ray()), engine_rows(dataset)
    assert got.keys == want.keys
    assert got.keys != expected_keys(store) and sorted(got.keys) == sorted(expected_keys(store))
    np.testing.assert_array_equal(got.pixels(), want.pixels())
    other = ray_rows(_store_dataset(store, image_size=SIZE, shuffle=True, seed=8).to_ray())
    assert other.keys != got.keys


def test_torch_batches_of_image_and_label(ray_local: str, store: Path) -> None:
    import torch

    ds = _store_dataset(store, image_size=SIZE).to_ray().select_columns(["image", "label"])
    batch = next(iter(ds.iter_torch_batches(batch_size=16)))
    assert batch["image"].shape == (16, *SIZE, 3) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64


def test_ray_writes_the_tensor_column_to_parquet_as_it_is(
    ray_local: str, store: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    dataset = _store_dataset(store, image_size=SIZE)
    dataset.to_ray().write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")
    assert isinstance(table.schema.field("image").type, pa.FixedShapeTensorType)
    assert sorted(table.column("key").to_pylist()) == sorted(expected_keys(store))


@pytest.mark.skipif(not SLOW, reason="set PIXCRAWLER_SLOW_TESTS=1 (a TorchTrainer run, ~30 s)")
def test_readme_ray_train_recipe(ray_local: str, store: Path, tmp_path: Path) -> None:
    """The README's ray.train recipe, on one training worker: two epochs see every row."""
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    dataset = _store_dataset(store, image_size=SIZE)
    out = tmp_path / "seen.txt"

    def train_loop(config: dict[str, Any]) -> None:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE[0] * SIZE[1] * 3, 15))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        shard = ray.train.get_dataset_shard("train")
        seen = 0
        for _epoch in range(config["epochs"]):
            for batch in shard.iter_torch_batches(batch_size=64):
                x = batch["image"].permute(0, 3, 1, 2).float() / 255
                loss = torch.nn.functional.cross_entropy(model(x), batch["label"])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seen += len(batch["label"])
        out.write_text(str(seen))

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"epochs": 2},
        datasets={"train": dataset.to_ray().select_columns(["image", "label"])},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
    )
    trainer.fit()
    assert out.read_text() == str(2 * dataset.num_images)


def test_job_api_with_a_key_that_never_shows(ray_local: str, server: Any) -> None:
    assert "PIXCRAWLER_API_KEY" not in os.environ  # the key comes from the argument only
    dataset = load_dataset(
        "demo", api_key=server.api_key, base_url=server.url, image_size=SIZE, progress=False
    )
    ds = dataset.to_ray()
    got, want = ray_rows(ds), engine_rows(dataset)
    assert got.keys == want.keys
    np.testing.assert_array_equal(got.pixels(), want.pixels())
    key = server.api_key.encode()
    from pixcrawler.ray import PixCrawlerDatasource

    source = PixCrawlerDatasource(dataset.ref, dataset.policy)
    tasks = source.get_read_tasks(1)
    for text in (repr(source), repr(ds), str(ds.stats()), repr(tasks[0]), repr(dataset.ref)):
        assert server.api_key not in text
    for proc in ray_processes():  # the raylet, the object store, every worker
        for name in ("cmdline", "environ"):
            try:
                assert key not in Path(f"/proc/{proc.pid}/{name}").read_bytes(), proc
            except (FileNotFoundError, ProcessLookupError):
                pass  # exited meanwhile
    logs = [p for p in Path(ray_local).rglob("*") if p.is_file() and "logs" in p.parts]
    assert logs and not [p for p in logs if key in p.read_bytes()]


def test_downloads_keep_the_clients_retries(ray_local: str, server: Any) -> None:
    """Two 503s on one chunk: the read task's client retries, no Ray retry is involved."""
    with proxied(server.url, Fault("status", match="/chunks/2", status=503, times=2)) as proxy:
        dataset = load_dataset(
            "demo", api_key=server.api_key, base_url=proxy.url, image_size=SIZE, progress=False
        )
        got = ray_rows(dataset.to_ray())
        statuses = [s.status for s in proxy.seen("/chunks/2")]
    assert statuses == [503, 503, 200]
    assert len(got.keys) == 120 and len(set(got.keys)) == 120


def test_parquet_shards(ray_local: str, store: Path, tmp_path: Path) -> None:
    client = JobClient(store.as_uri(), None)
    export_job(JobSource(client, client.get_job("demo")), tmp_path / "demo", format="parquet")
    dataset = load_dataset(tmp_path / "demo" / "data", image_size=SIZE, progress=False)
    got, want = ray_rows(dataset.to_ray()), engine_rows(dataset)
    assert got.keys == want.keys and len(got.keys) == 120
    assert got.labels == want.labels  # ClassLabel indices
    np.testing.assert_array_equal(got.pixels(), want.pixels())


def test_artefact_shards_decode_in_the_task_within_the_object_store(
    ray_local: str, tmp_path: Path
) -> None:
    """ARTeFACT-shaped shards with a 133 MP JPEG and its mask, to 1024 px inside the tasks."""
    data = build_artefact(tmp_path / "artefact", n_small=10, huge=("jpeg",), rows_per_group=4)
    dataset = load_dataset(data.glob, image_size=(1024, 1024), progress=False)
    ds = dataset.to_ray()
    keys = []
    with ObjectStoreWatch() as store:
        for batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
            assert batch["image"].shape[1:] == (1024, 1024, 3)
            assert batch["mask"].shape[1:] == (1024, 1024)
            keys += [str(k) for k in batch["key"]]
    assert len(keys) == len(data.ids) == len(set(keys))
    assert store.samples > 2 and 0 < store.peak <= store.capacity <= 256 << 20
    assert store.spilled == 0 and store.fallback == 0  # nothing had to leave the store


@pytest.fixture(scope="module")
def bad_store(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """A copy of the demo job whose chunk 0 holds one truncated image (`broken.png`)."""
    root = tmp_path_factory.mktemp("ray-bad") / "store"
    shutil.copytree(store / "jobs" / "demo", root / "jobs" / "demo")
    corrupt_one_sample(root, "demo")
    return root


def test_on_error_skip_and_warn_leave_the_sample_out(ray_local: str, bad_store: Path) -> None:
    for on_error in ("skip", "warn"):
        dataset = _store_dataset(bad_store, image_size=SIZE, on_error=on_error)
        ds = dataset.to_ray()
        got = ray_rows(ds)
        assert len(got.keys) == 119 and "broken.png" not in got.keys
        with pytest.warns(SampleWarning) if on_error == "warn" else contextlib.nullcontext():
            assert got.keys == engine_rows(dataset).keys
        assert ds.count() == 119  # not the manifest's 120: rows are not promised up front
    logs = Path(ray_local).rglob("worker-*.err")
    assert any(b"SampleWarning" in p.read_bytes() and b"broken.png" in p.read_bytes() for p in logs)


def test_a_bad_sample_raises_naming_chunk_and_sample(ray_local: str, bad_store: Path) -> None:
    ds = _store_dataset(bad_store, image_size=SIZE).to_ray()
    start = time.monotonic()
    with pytest.raises(Exception, match=r"chunk 0, sample .*broken\.png") as info:
        ray_rows(ds)
    assert "DecodeError" in str(info.value) and time.monotonic() - start < 60


def test_a_chunk_that_fails_names_it(ray_local: str, store: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    shutil.copytree(store / "jobs" / "demo", root / "jobs" / "demo")
    path = root / "jobs" / "demo" / "chunks" / "3.zip"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ds = _store_dataset(root, image_size=SIZE).to_ray()
    with pytest.raises(Exception, match=r"DownloadError: chunk 3: .* does not match its manifest"):
        ray_rows(ds)


def test_variable_sizes_need_a_choice(ray_local: str, store: Path) -> None:
    dataset = _store_dataset(store)  # no image_size: every image keeps its own
    with pytest.raises(ValueError, match=r"image_size=\(H, W\).*to_ray\(decode=False\)"):
        dataset.to_ray()
    with pytest.raises(ValueError, match="one shape"):
        _store_dataset(store, image_size=SIZE, resize="fit").to_ray()
    ds = dataset.to_ray(decode=False)  # the files as stored
    assert ds.schema().base_schema.field("image").type == pa.binary()
    stored: dict[str, bytes] = {}
    for path in sorted((store / "jobs" / "demo" / "chunks").glob("*.zip")):
        with zipfile.ZipFile(path) as zf:
            stored.update({n: zf.read(n) for n in zf.namelist() if n != "manifest.jsonl"})
    rows = list(ds.iter_rows())
    assert [r["key"] for r in rows] == expected_keys(store)
    assert all(r["image"] == stored[r["key"]] for r in rows)
    assert all(r["orig_width"] > 0 and r["orig_height"] > 0 for r in rows)


def test_to_ray_without_ray_names_the_extra(store: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
        "from pixcrawler import load_dataset\n"
        f"ds = load_dataset('demo', base_url={store.as_uri()!r}, image_size=8, progress=False)\n"
        "try:\n    ds.to_ray()\nexcept ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'pixcrawler-sdk[ray]'" in out.stdout
