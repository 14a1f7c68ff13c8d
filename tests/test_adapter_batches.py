"""Whole batches across the framework boundary: `to_torch(iterable=True, batch_size=B)` and
`to_tensorflow(batch_size=B)`, on real jobs through the real server and engine processes.

What is checked: the batches equal `iter_batches`' (pixels, labels, order); a batch inside one
engine batch shares the engine's shared memory (no copy) and one across engine batches is a
private copy; tensors stay valid after later batches; drop_last and short last batches;
labels as index tensors; metadata on request; pin_memory; DataLoader workers; variable-size
images; Keras `model.fit` for two epochs.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_helpers import expected_keys

from pixcrawler import load_dataset
from pixcrawler_engine.sources._pack import pack

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

FAST: dict[str, Any] = {"num_workers": 2, "progress": False}
NO_ACCELERATOR_PIN = pytest.mark.filterwarnings(
    "ignore:'pin_memory' argument is set as true but no accelerator:UserWarning"
)


@pytest.fixture
def demo(server: Any) -> Any:
    """The demo job (120 images in chunks of 16) at 16x16."""
    with load_dataset("demo", server.api_key, server.url, image_size=16, **FAST) as dataset:
        yield dataset


@pytest.fixture(scope="module")
def reference(server: Any) -> tuple[np.ndarray, list[Any]]:
    """Every image of the demo job at 16x16 and its label, from `iter_batches`."""
    dataset = load_dataset("demo", server.api_key, server.url, image_size=16, **FAST)
    images, labels = [], []
    for x, y in dataset.iter_batches(batch_size=7):
        images.append(np.array(x))
        labels += y
    return np.concatenate(images), labels


@pytest.fixture(scope="module")
def odd_jobs(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """A store with "ints" (int labels), "dicts" (dict labels), "mixed" (class names, then a
    dict) and "photos" (photos only: the first chunk's sizes differ)."""
    root = tmp_path_factory.mktemp("odd")
    digits = sorted(demo_source.glob("[0-9]/*.png"))[::3]
    photos = sorted(p for p in demo_source.rglob("*") if p.suffix in (".jpg", ".png"))
    photos = [p for p in photos if not p.parent.name.isdigit()][:20]
    jobs: dict[str, list[tuple[Path, Any]]] = {
        "ints": [(p, int(p.parent.name)) for p in digits],
        "dicts": [(p, {"digit": int(p.parent.name)}) for p in digits],
        "mixed": [(p, p.parent.name) for p in digits[:-1]] + [(digits[-1], {"odd": 1})],
        "photos": [(p, p.parent.name) for p in photos],
    }
    for job_id, items in jobs.items():
        listing = root / f"{job_id}.jsonl"
        lines = [json.dumps({"file": str(p), "label": label}) for p, label in items]
        listing.write_text("\n".join(lines) + "\n")
        pack(listing, root / "store", job_id, chunk_size=8)
    return root / "store"


def shm_mapped(address: int) -> bool:
    """Whether `address` lies in one of the engine's shared-memory segments mapped here."""
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/dev/shm/pxc_"):
                low, high = (int(v, 16) for v in fields[0].split("-"))
                if low <= address < high:
                    return True
    return False


def indices(dataset: Any, labels: list[Any]) -> list[int]:
    return [dataset.info.class_to_idx[v] for v in labels]


# ---- torch ------------------------------------------------------------------------------


def test_torch_batches_equal_iter_batches(demo: Any, reference: Any) -> None:
    ds = demo.to_torch(iterable=True, batch_size=32)
    loader = DataLoader(ds, batch_size=None)
    assert len(ds) == len(loader) == 4
    got = list(loader)
    assert [tuple(x.shape) for x, _ in got] == [(32, 16, 16, 3)] * 3 + [(24, 16, 16, 3)]
    assert all(x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in got)
    images = torch.cat([x for x, _ in got]).numpy()
    np.testing.assert_array_equal(images, reference[0])
    labels = torch.cat([y for _, y in got]).tolist()
    assert labels == indices(demo, reference[1])


@pytest.mark.parametrize(
    ("batch_size", "drop_last", "sizes"),
    [
        (50, False, [50, 50, 20]),
        (50, True, [50, 50]),
        (120, True, [120]),
        (200, False, [120]),
        (200, True, []),
    ],
)
def test_torch_batch_size_that_does_not_divide(
    demo: Any, reference: Any, batch_size: int, drop_last: bool, sizes: list[int]
) -> None:
    ds = demo.to_torch(iterable=True, batch_size=batch_size, drop_last=drop_last)
    got = list(DataLoader(ds, batch_size=None))
    assert [len(x) for x, _ in got] == sizes and len(ds) == len(sizes)
    if sizes:
        kept = torch.cat([x for x, _ in got]).numpy()
        np.testing.assert_array_equal(kept, reference[0][: sum(sizes)])


def test_torch_batches_share_the_slot_or_are_copied_once(demo: Any, reference: Any) -> None:
    # Chunks of 16: with batch_size=16 each batch is one engine batch, handed out in place,
    # but for the run's first and last, whose tasks are cut into a piece per worker (NOTE
    # [task sizes] in the engine's `_schedule`): those two are assembled.
    in_place = list(demo.to_torch(iterable=True, batch_size=16))
    assert [len(x) for x, _ in in_place] == [16] * 7 + [8]
    assert [shm_mapped(x.data_ptr()) for x, _ in in_place] == [False] + [True] * 6 + [False]
    # Every tensor was kept while later batches came (8 batches, more than the pool's
    # 6 slots): all still hold their own images.
    np.testing.assert_array_equal(torch.cat([x for x, _ in in_place]).numpy(), reference[0])
    del in_place
    # batch_size=24 crosses chunk boundaries: those batches are assembled in private memory.
    assembled = list(demo.to_torch(iterable=True, batch_size=24))
    crossing = [x for i, (x, _) in enumerate(assembled) if (i * 24) // 16 != (i * 24 + 23) // 16]
    assert crossing and not any(shm_mapped(x.data_ptr()) for x in crossing)
    np.testing.assert_array_equal(torch.cat([x for x, _ in assembled]).numpy(), reference[0])


def test_a_kept_batch_stays_valid_after_the_next_ones(demo: Any, reference: Any) -> None:
    it = iter(DataLoader(demo.to_torch(iterable=True, batch_size=16), batch_size=None))
    next(it)  # the first batch is assembled (NOTE [task sizes]); the second is in place
    kept, kept_labels = next(it)
    copy = kept.clone()
    assert shm_mapped(kept.data_ptr())
    rest = [x.clone() for x, _ in it]  # each of these is dropped at once: slots go back
    assert len(rest) == 6
    assert torch.equal(kept, copy) and kept_labels.tolist() == indices(demo, reference[1][16:32])
    np.testing.assert_array_equal(kept.numpy(), reference[0][16:32])
    kept.add_(1)  # its memory is the batch's own: writing into it is allowed
    assert torch.equal(kept, copy + 1)


def test_torch_transform_gets_each_batch(demo: Any, reference: Any) -> None:
    def to_float(images: Any) -> Any:
        assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8
        return images.permute(0, 3, 1, 2).float().div_(255)

    ds = demo.to_torch(to_float, iterable=True, batch_size=40)
    images = torch.cat([x for x, _ in DataLoader(ds, batch_size=None)])
    assert images.shape == (120, 3, 16, 16) and images.dtype == torch.float32
    expected = torch.from_numpy(reference[0]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(images, expected)


@NO_ACCELERATOR_PIN
def test_pin_memory_gives_the_same_batches(demo: Any, reference: Any) -> None:
    plain = demo.to_torch(iterable=True, batch_size=24)
    through_loader = list(DataLoader(plain, batch_size=None, pin_memory=True))
    pinned = demo.to_torch(iterable=True, batch_size=24, pin_memory=True)
    if torch.accelerator.is_available():
        direct = list(pinned)
        assert all(x.is_pinned() and y.is_pinned() for x, y in direct)
    else:
        with pytest.warns(UserWarning, match="no accelerator"):
            direct = list(pinned)
    for got in (through_loader, direct):
        assert [len(x) for x, _ in got] == [24] * 5
        np.testing.assert_array_equal(torch.cat([x for x, _ in got]).numpy(), reference[0])
        assert torch.cat([y for _, y in got]).tolist() == indices(demo, reference[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/device.sh)")
def test_pinned_batches_reach_the_gpu_intact(demo: Any, reference: Any) -> None:
    """Asynchronous copies out of our pinned batches, the slot views' and the assembled ones',
    arrive whole while the stream goes on (run on the lent GPU machine by bench/device.sh)."""
    moved = []
    for step in (24, 7):  # 24 divides no chunk of 16: assembled batches; 7 gives views too
        pinned = demo.to_torch(iterable=True, batch_size=step, pin_memory=True)
        moved.append(
            [(x.to("cuda", non_blocking=True), y.to("cuda", non_blocking=True)) for x, y in pinned]
        )
    torch.cuda.synchronize()
    for got in moved:
        np.testing.assert_array_equal(torch.cat([x for x, _ in got]).cpu().numpy(), reference[0])
        assert torch.cat([y for _, y in got]).tolist() == indices(demo, reference[1])


def test_torch_batches_in_dataloader_workers(demo: Any, reference: Any) -> None:
    ds = demo.to_torch(iterable=True, batch_size=32)
    got = list(DataLoader(ds, batch_size=None, num_workers=2))
    # Each worker batches its own chunks: 4 of 16 images (32 + 32) and 3 of 16 and one of 8
    # (32 + 24).
    assert sorted(len(x) for x, _ in got) == [24, 32, 32, 32]
    seen = Counter(
        (int(label), x.numpy().tobytes()) for xs, ys in got for x, label in zip(xs, ys, strict=True)
    )
    want = Counter(
        (label, x.tobytes())
        for x, label in zip(reference[0], indices(demo, reference[1]), strict=True)
    )
    assert seen == want


def test_label_kinds_in_torch_batches(odd_jobs: Path) -> None:
    url = odd_jobs.as_uri()
    ints = load_dataset("ints", base_url=url, image_size=8, **FAST)
    labels = torch.cat([y for _, y in ints.to_torch(iterable=True, batch_size=6)])
    expected = [v for _, ys in ints.iter_batches(99) for v in ys]
    assert labels.dtype == torch.int64 and labels.tolist() == expected
    assert sorted(set(expected)) == [0, 1, 2]  # the ints themselves, not indices of names
    dicts = load_dataset("dicts", base_url=url, image_size=8, **FAST)
    batches = list(dicts.to_torch(iterable=True, batch_size=6))
    assert isinstance(batches[0][1], list) and batches[0][1][0] == {"digit": 0}
    mixed = load_dataset("mixed", base_url=url, image_size=8, **FAST)
    with pytest.raises(ValueError, match=r"label \{'odd': 1\} is neither a class name"):
        list(mixed.to_torch(iterable=True, batch_size=6))


def test_metadata_on_request(demo: Any, store: Path) -> None:
    keys = expected_keys(store)
    batches = list(demo.to_torch(iterable=True, batch_size=50, metadata=True))
    assert all(len(item) == 3 for item in batches)
    assert [m["key"] for _, _, meta in batches for m in meta] == keys
    _, _, first = next(iter(demo.to_torch(iterable=True, metadata=True)))
    assert first["key"] == keys[0]
    assert demo.to_torch(metadata=True)[5][2]["key"] == keys[5]
    assert len(next(iter(demo.to_torch(iterable=True, batch_size=8)))) == 2  # off by default


def test_bad_batch_options_are_refused(demo: Any) -> None:
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            demo.to_torch(iterable=True, batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            demo.to_tensorflow(batch_size=bad)
    with pytest.raises(ValueError, match=r"iterable=True"):
        demo.to_torch(batch_size=32)
    with pytest.raises(ValueError, match=r"pin_memory apply to to_torch\(iterable=True"):
        demo.to_torch(pin_memory=True)


def test_variable_sizes_with_batch_size_name_image_size(server: Any) -> None:
    # The demo job without image_size: 32x32 digits, then photos of many sizes.
    demo = load_dataset("demo", server.api_key, server.url, **FAST)
    with pytest.raises(ValueError, match="image_size="):
        list(demo.to_torch(iterable=True, batch_size=16))


# ---- TensorFlow ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def test_tf_variable_sizes_with_batch_size_name_image_size(tf: Any, odd_jobs: Path) -> None:
    photos = load_dataset("photos", base_url=odd_jobs.as_uri(), **FAST)
    with pytest.raises(ValueError, match=r"batch_size=4\) needs images of one size.*image_size="):
        photos.to_tensorflow(batch_size=4)
    assert photos.to_tensorflow().element_spec[0].shape.as_list() == [None, None, 3]


def test_tf_batches_spec_cardinality_and_content(tf: Any, demo: Any, reference: Any) -> None:
    tf_ds = demo.to_tensorflow(batch_size=32)
    image_spec, label_spec = tf_ds.element_spec
    assert image_spec.shape.as_list() == [None, 16, 16, 3] and image_spec.dtype == tf.uint8
    assert label_spec.shape.as_list() == [None] and label_spec.dtype == tf.int64
    assert int(tf_ds.cardinality()) == 4
    got = list(tf_ds.prefetch(tf.data.AUTOTUNE))  # every element kept to the end
    assert [int(x.shape[0]) for x, _ in got] == [32, 32, 32, 24]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in got]), reference[0])
    labels = np.concatenate([y.numpy() for _, y in got]).tolist()
    assert labels == indices(demo, reference[1])
    dropped = demo.to_tensorflow(batch_size=32, drop_last=True)
    assert dropped.element_spec[0].shape.as_list() == [32, 16, 16, 3]
    assert int(dropped.cardinality()) == 3 and len(list(dropped)) == 3


def test_tf_unbatch_gives_the_single_images(tf: Any, demo: Any, reference: Any) -> None:
    singles = demo.to_tensorflow()
    assert int(singles.cardinality()) == 120
    assert singles.element_spec[0].shape.as_list() == [16, 16, 3]
    unbatched = demo.to_tensorflow(batch_size=50).unbatch()
    assert unbatched.element_spec[0].shape.as_list() == [16, 16, 3]
    for tf_ds in (singles, unbatched):
        pairs = list(tf_ds.as_numpy_iterator())
        np.testing.assert_array_equal(np.stack([x for x, _ in pairs]), reference[0])
        assert [int(y) for _, y in pairs] == indices(demo, reference[1])


def test_tf_metadata_and_label_kinds(
    tf: Any, demo: Any, reference: Any, store: Path, odd_jobs: Path
) -> None:
    _, labels, meta = next(iter(demo.to_tensorflow(batch_size=10, metadata=True)))
    assert labels.numpy().tolist() == indices(demo, reference[1][:10])
    assert meta.dtype == tf.string and meta.shape == (10,)
    assert [json.loads(m)["key"] for m in meta.numpy()] == expected_keys(store)[:10]
    dicts = load_dataset("dicts", base_url=odd_jobs.as_uri(), image_size=8, **FAST)
    _, labels = next(iter(dicts.to_tensorflow(batch_size=5)))
    assert labels.dtype == tf.string and json.loads(labels.numpy()[0]) == {"digit": 0}
    ints = load_dataset("ints", base_url=odd_jobs.as_uri(), image_size=8, **FAST)
    _, labels = next(iter(ints.to_tensorflow(batch_size=5)))
    assert labels.dtype == tf.int64 and labels.numpy().tolist() == [0] * 5


def test_keras_fit_two_epochs_on_engine_batches(
    tf: Any, demo: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    real = type(demo).iter_engine_batches

    def counting(self: Any, **kw: Any) -> Any:
        passes.append(1)
        return real(self, **kw)

    monkeypatch.setattr(type(demo), "iter_engine_batches", counting)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((16, 16, 3)),
            tf.keras.layers.Rescaling(1 / 255),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(len(demo.info.labels), activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class Steps(tf.keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[int] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.steps.append(0)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.steps[-1] += 1

    steps = Steps()
    feed = demo.to_tensorflow(batch_size=32).prefetch(tf.data.AUTOTUNE)
    history = model.fit(feed, epochs=2, verbose=0, shuffle=False, callbacks=[steps])
    # Each epoch is a whole engine pass of 4 batches (120 images, the last batch of 24).
    assert steps.steps == [4, 4] and len(passes) == 2
    assert history.history["loss"][1] < history.history["loss"][0]
