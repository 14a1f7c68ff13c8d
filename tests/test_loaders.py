"""The PyTorch and TensorFlow adapters on real jobs: map-style and iterable torch datasets,
DataLoader workers (fork and spawn), sharding, the API key in pickles, and tf.data pipelines.
"""

from __future__ import annotations

import gc
import json
import pickle
import zipfile
from collections import Counter
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_helpers import expected_keys, reference_pixels

from pixcrawler import load_dataset
from pixcrawler_engine import DecodePolicy
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.sources._jobapi import JobClient
from pixcrawler_engine.sources._pack import pack

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, IterableDataset, random_split  # noqa: E402

FAST: dict[str, Any] = {"num_workers": 2, "progress": False}
# A DataLoader started with more workers than this machine's 2 cores warns; that is torch
# telling the user about their own setting, not a problem of the dataset.
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def job_labels(store: Path, job_id: str) -> list[Any]:
    labels = []
    chunks = sorted((store / "jobs" / job_id / "chunks").glob("*.zip"), key=lambda p: int(p.stem))
    for path in chunks:
        with zipfile.ZipFile(path) as zf:
            labels += [json.loads(x)["label"] for x in zf.read("manifest.jsonl").splitlines()]
    return labels


@pytest.fixture(scope="module")
def label_store(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """Jobs of 30 digits whose labels are ints ("ints") or dicts ("dicts")."""
    root = tmp_path_factory.mktemp("labels")
    digits = sorted(demo_source.glob("[0-9]/*.png"))[::2]
    for job_id, label_of in (
        ("ints", lambda p: int(p.parent.name)),
        ("dicts", lambda p: {"digit": int(p.parent.name), "file": p.name}),
    ):
        listing = root / f"{job_id}.jsonl"
        lines = [json.dumps({"file": str(p), "label": label_of(p)}) for p in digits]
        listing.write_text("\n".join(lines) + "\n")
        pack(listing, root / "store", job_id, chunk_size=8)
    return root / "store"


@pytest.fixture
def demo(server: Any) -> Any:
    with load_dataset("demo", server.api_key, server.url, image_size=16, **FAST) as dataset:
        yield dataset


def fingerprints(pairs: Any) -> Counter[tuple[Any, int]]:
    """(label, pixel checksum) of each item: equal multisets mean the same items, once each."""
    out: Counter[tuple[Any, int]] = Counter()
    for images, labels in pairs:
        for image, label in zip(images, labels, strict=True):
            out[(int(label), int((image * 255).round().sum()))] += 1
    return out


# ---- map-style ------------------------------------------------------------------------------


def test_map_style_items_are_like_image_folder(demo: Any, store: Path) -> None:
    ds = demo.to_torch()
    assert isinstance(ds, torch.utils.data.Dataset) and not isinstance(ds, IterableDataset)
    assert len(ds) == 120
    assert ds.classes == list(demo.info.labels) and ds.class_to_idx == demo.info.class_to_idx
    labels = job_labels(store, "demo")
    for i in (0, 17, 119, -1):
        image, label = ds[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 16, 16)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert label == ds.class_to_idx[labels[i]]
        key = expected_keys(store)[i]
        pixels = reference_pixels(store, key, DecodePolicy(image_size=(16, 16)))
        np.testing.assert_allclose(image.permute(1, 2, 0).numpy() * 255, pixels, atol=1e-3)
    with pytest.raises(IndexError):
        ds[120]


def test_transform_gets_a_writable_hwc_uint8_array(demo: Any) -> None:
    seen: list[np.ndarray] = []

    def transform(image: np.ndarray) -> Any:
        seen.append(image)
        return torch.from_numpy(image)  # warns (an error here) for a read-only array

    image, _ = demo.to_torch(transform=transform)[3]
    assert seen[0].shape == (16, 16, 3) and seen[0].dtype == np.uint8
    assert seen[0].flags.writeable and image.shape == (16, 16, 3)


def test_labels_that_are_not_class_names_pass_through(label_store: Path) -> None:
    url = label_store.as_uri()
    ints = load_dataset("ints", base_url=url, image_size=8, **FAST).to_torch()
    assert ints.class_to_idx == {} and [ints[i][1] for i in range(3)] == [0, 0, 0]
    dicts = load_dataset("dicts", base_url=url, image_size=8, **FAST).to_torch()
    assert dicts[0][1]["digit"] == 0 and "file" in dicts[0][1]


def test_each_chunk_is_fetched_once_per_process(demo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[int] = Counter()
    real = JobClient.fetch_chunk

    def counting(self: JobClient, chunk: Any, dest: Path, **kw: Any) -> Path:
        calls[chunk.index] += 1
        return real(self, chunk, dest, **kw)

    monkeypatch.setattr(JobClient, "fetch_chunk", counting)
    ds = demo.to_torch()
    order = np.random.default_rng(0).permutation(len(ds))  # random access, across chunks
    got = [ds[int(i)][1] for i in order]
    assert len(got) == 120 and calls == Counter(range(8))


def test_map_style_shares_the_disk_cache(server: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dataset = load_dataset(
        "demo", server.api_key, server.url, image_size=8, cache_dir=cache, **FAST
    )
    ds = dataset.to_torch()
    first = ds[0][0]
    assert len(list(cache.rglob("*.zip"))) == 1  # only the chunk asked for
    ds[119]
    assert len(list(cache.rglob("*.zip"))) == 2
    # Another process (here: a fresh dataset object) finds the chunk in the cache.
    again = dataset.to_torch()
    assert torch.equal(again[0][0], first) and len(list(cache.rglob("*.zip"))) == 2
    key = server.api_key.encode()
    assert not any(key in p.read_bytes() for p in cache.rglob("*") if p.is_file())


@MANY_WORKERS
def test_dataloader_shuffled_workers_and_random_split(demo: Any) -> None:
    ds = demo.to_torch()
    loader = DataLoader(ds, batch_size=16, shuffle=True, num_workers=4)
    everything = fingerprints((x, y) for x, y in loader)
    assert sum(everything.values()) == 120
    assert everything == fingerprints((ds[i][0][None], [ds[i][1]]) for i in range(len(ds)))
    train, val = random_split(ds, [96, 24], generator=torch.Generator().manual_seed(0))
    assert len(train) == 96 and len(val) == 24
    images, labels = next(iter(DataLoader(val, batch_size=8)))
    assert images.shape == (8, 3, 16, 16) and labels.dtype == torch.int64


def test_spawned_workers_get_the_key_through_the_pipe_only(demo: Any, server: Any) -> None:
    ds = demo.to_torch()
    key = server.api_key.encode()
    assert key not in pickle.dumps(ds)  # a pickle saved to a file holds no key
    assert key in bytes(ForkingPickler.dumps(ds))  # a worker's pipe does
    loader = DataLoader(ds, batch_size=60, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(y) for _, y in loader) == 120


def test_corrupt_image_raises_in_map_style(tmp_path: Path, store: Path) -> None:
    import shutil

    from engine_helpers import corrupt_one_sample

    shutil.copytree(store / "jobs" / "demo", tmp_path / "jobs" / "demo")
    broken = corrupt_one_sample(tmp_path, "demo", row=3)
    ds = load_dataset("demo", base_url=tmp_path.as_uri(), image_size=8, **FAST).to_torch()
    ds[2]
    with pytest.raises(DecodeError, match=broken) as info:
        ds[3]
    assert info.value.key == broken and info.value.chunk_id == 0


# ---- iterable -----------------------------------------------------------------------------


def test_iterable_shards_over_workers_without_duplicates(demo: Any) -> None:
    ds = demo.to_torch(iterable=True)
    assert isinstance(ds, IterableDataset) and len(ds) == 120  # type: ignore[arg-type]
    reference = fingerprints((x[None], [y]) for x, y in demo.to_torch())
    in_workers = fingerprints(DataLoader(ds, batch_size=10, num_workers=2))
    assert in_workers == reference
    in_engine = fingerprints(DataLoader(ds, batch_size=10, num_workers=0))
    assert in_engine == reference


def test_iterable_shards_over_distributed_ranks(demo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = demo.to_torch(iterable=True, metadata=True)
    monkeypatch.setenv("WORLD_SIZE", "3")
    shards = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        keys = [meta["key"] for _, _, meta in DataLoader(ds, batch_size=None)]
        assert len(keys) == len(ds)
        shards.append(keys)
    # 120 images, less than one turn of 3 x 64 (batch_rows): the last turn, 40 each.
    assert [len(s) for s in shards] == [40] * 3
    assert len({k for s in shards for k in s}) == 120
    # Rank 1 of 3, read by two DataLoader workers: exactly its share's images.
    monkeypatch.setenv("RANK", "1")
    got = sum(len(y) for _, y in DataLoader(demo.to_torch(iterable=True), batch_size=4,
                                             num_workers=2))  # fmt: skip
    assert got == 40


def test_iterable_shuffle_changes_with_the_epoch(server: Any) -> None:
    dataset = load_dataset(
        "demo", server.api_key, server.url, image_size=4, shuffle=True, seed=5, **FAST
    )
    ds = dataset.to_torch(iterable=True)

    def epoch(n: int) -> list[int]:
        ds.set_epoch(n)
        return [int(v) for _, ys in DataLoader(ds, batch_size=120, num_workers=1) for v in ys]

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert first == again and first != other and sorted(first) == sorted(other)


# ---- TensorFlow -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def test_tf_element_spec_and_pipeline(tf: Any, demo: Any, store: Path) -> None:
    tf_ds = demo.to_tensorflow()
    image_spec, label_spec = tf_ds.element_spec
    assert image_spec.shape == (16, 16, 3) and image_spec.dtype == tf.uint8
    assert label_spec.shape == () and label_spec.dtype == tf.int64
    labels = [demo.info.class_to_idx[v] for v in job_labels(store, "demo")]
    got = [int(y) for _, y in tf_ds.as_numpy_iterator()]
    assert got == labels
    pipeline = (
        tf_ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)).skip(100).take(15).batch(8)
    )
    shapes = [tuple(x.shape) for x, _ in pipeline.prefetch(tf.data.AUTOTUNE)]
    assert shapes == [(8, 16, 16, 3), (7, 16, 16, 3)]


def test_tf_variable_sizes(tf: Any, server: Any, label_store: Path) -> None:
    # All 32x32: the headers of the first chunk say so, and the spec is static.
    ints = load_dataset("ints", base_url=label_store.as_uri(), **FAST).to_tensorflow()
    assert ints.element_spec[0].shape == (32, 32, 3) and ints.element_spec[1].dtype == tf.int64
    dicts = load_dataset("dicts", base_url=label_store.as_uri(), **FAST).to_tensorflow()
    label = next(iter(dicts))[1].numpy()
    assert dicts.element_spec[1].dtype == tf.string and json.loads(label)["digit"] == 0
    # The demo job's first chunk is digits only, then photos of other sizes: a clear error.
    demo = load_dataset("demo", server.api_key, server.url, **FAST).to_tensorflow()
    assert demo.element_spec[0].shape == (32, 32, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_size="):
        for _ in demo:
            pass
    gc.collect()


def test_tf_model_fit_trains(tf: Any, demo: Any) -> None:
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Rescaling(1 / 255),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(len(demo.info.labels), activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(demo.to_tensorflow().batch(32), epochs=2, verbose=0, shuffle=False)
    assert history.history["loss"][1] < history.history["loss"][0]
