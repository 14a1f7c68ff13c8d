"""The engine on real processes and real shared memory: order, zero copy, leases, shuffle."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_helpers import (
    POLICY,
    corrupt_one_sample,
    expected_keys,
    job_source,
    reference_pixels,
    run_keys,
    small_config,
    wait_gone,
)

from pixcrawler_engine import DecodePolicy, SampleWarning, Stream, decode_chunk
from pixcrawler_engine.sources._pack import pack


@pytest.fixture(scope="module")
def bad_store(tmp_path_factory: pytest.TempPathFactory, demo_source: Path) -> Path:
    """A store whose job "bad" has one truncated image in its first chunk."""
    store = tmp_path_factory.mktemp("bad-store")
    pack(demo_source, store, "bad", chunk_size=16)
    corrupt_one_sample(store, "bad")
    return store


def test_dataset_order_exactly_once_with_right_pixels(store: Path) -> None:
    keys = []
    with Stream(job_source(store), config=small_config(), policy=POLICY) as stream:
        for batch in stream:
            images = batch.images
            assert isinstance(images, np.ndarray)
            assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
            # Spot-check pixels against an in-process decode of the same bytes.
            np.testing.assert_array_equal(images[0], reference_pixels(store, batch.keys[0], POLICY))
            keys.extend(batch.keys)
        assert stream.stats["samples"] == len(keys)
    assert keys == expected_keys(store)


def test_the_run_has_stopped_when_its_last_batch_is_handed_out(store: Path) -> None:
    """NOTE [last batch]: the stream stops the run before it hands out the last batch, so
    that the caller's next `next()` (TensorFlow's generator end, a DataLoader's) returns at
    once; it used to stop it there, tens of ms later. The last batch's views stay valid."""
    total = len(expected_keys(store))
    seen = 0
    with Stream(job_source(store), config=small_config(), policy=POLICY) as stream:
        for batch in stream:
            seen += len(batch)
            if seen < total:
                continue
            assert wait_gone([stream.pid, *stream.worker_pids], 0.0) == []
            assert stream.stats["samples"] == total
            images = batch.images
            assert isinstance(images, np.ndarray)
            np.testing.assert_array_equal(
                images[-1], reference_pixels(store, batch.keys[-1], POLICY)
            )
    assert seen == total


def test_batches_are_views_of_shared_memory(store: Path) -> None:
    with Stream(job_source(store), config=small_config(), policy=POLICY) as stream:
        it = iter(stream)
        batch = next(it)
        images = batch.images
        segments = [np.frombuffer(s.buf, np.uint8) for s in stream._state.slots]
        assert any(np.shares_memory(images, seg) for seg in segments)
        del segments
        it.close()


def test_variable_size_output_keeps_each_shape(store: Path) -> None:
    policy = DecodePolicy(image_size=None)
    with Stream(job_source(store), config=small_config(), policy=policy) as stream:
        shapes: set[tuple[int, ...]] = set()
        n = 0
        for batch in stream:
            images = batch.images
            assert isinstance(images, list)
            shapes.update(img.shape for img in images)
            n += len(images)
    assert n == len(expected_keys(store))
    assert len(shapes) > 1  # the demo job mixes sizes


def test_shuffle_is_seeded_and_independent_of_worker_count(store: Path) -> None:
    def order(workers: int, seed: int) -> list[str]:
        config = small_config(num_workers=workers, shuffle=True, seed=seed)
        return run_keys(Stream(job_source(store), config=config, policy=POLICY))

    one, two = order(1, 7), order(2, 7)
    assert one == two
    assert sorted(one) == sorted(expected_keys(store))
    assert one != expected_keys(store)
    assert order(2, 8) != one


def test_views_kept_by_the_caller_pin_slots_and_the_pool_grows(store: Path) -> None:
    config = small_config(num_slots=2, batch_rows=4)
    kept = []
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        for batch in stream:
            kept.append(batch.images)  # never released: the engine must not reuse them
        assert stream.stats["slots_added"] > 0
    first = kept[0].copy()
    gc.collect()
    np.testing.assert_array_equal(kept[0], first)  # still intact after the run ended
    assert sum(len(k) for k in kept) == len(expected_keys(store))


def test_decode_chunk_is_a_plain_function(store: Path) -> None:
    chunk = store / "jobs" / "demo" / "chunks" / "0.zip"
    batch = decode_chunk(chunk.read_bytes(), POLICY)
    assert batch.num_rows == len(expected_keys(store)[: batch.num_rows])
    assert batch.schema.field("image").type.shape == [32, 32, 3]


def test_bad_samples_follow_on_error(bad_store: Path) -> None:
    total = len(expected_keys(bad_store, "bad"))
    skip = DecodePolicy(image_size=(32, 32), on_error="skip")
    with Stream(job_source(bad_store, "bad"), config=small_config(), policy=skip) as stream:
        keys = run_keys(stream)
        assert stream.stats["skipped"] == 1
    assert len(keys) == total - 1

    warn = DecodePolicy(image_size=(32, 32), on_error="warn")
    with pytest.warns(SampleWarning, match="broken"):
        keys = run_keys(Stream(job_source(bad_store, "bad"), config=small_config(), policy=warn))
    assert len(keys) == total - 1

    with pytest.raises(Exception, match="broken") as info:
        run_keys(Stream(job_source(bad_store, "bad"), config=small_config(), policy=POLICY))
    assert "chunk" in str(info.value)


def test_break_stops_every_process(store: Path) -> None:
    stream = Stream(job_source(store), config=small_config(batch_rows=2), policy=POLICY)
    for _ in stream:
        break
    pids = [stream.pid, *stream.worker_pids]
    assert wait_gone(pids, 5.0) == []


def test_garbage_collection_stops_every_process(store: Path) -> None:
    stream = Stream(job_source(store), config=small_config(batch_rows=2), policy=POLICY)
    it = iter(stream)
    next(it)
    pids = [stream.pid, *stream.worker_pids]
    del it, stream
    gc.collect()
    assert wait_gone(pids, 5.0) == []


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _mask_for(image: np.ndarray) -> np.ndarray:
    """A mask of classes 0-15 and 255, following the photo's brightness (not noise)."""
    gray = image.mean(axis=2)
    mask = (gray // 16).astype(np.uint8)
    mask[gray > 240] = 255
    return mask


def test_masks_follow_their_image_without_interpolation() -> None:
    from skimage import data

    from pixcrawler_engine import Record, decode_records
    from pixcrawler_engine.runtime._batch import image_views, mask_views

    photo = data.astronaut()[:300, :200]
    mask = _mask_for(photo)
    blobs = {"img": _png(photo), "mask": _png(mask)}
    record = Record(key="a", ref="img", label=1, index=0, mask_ref="mask")
    for policy in (DecodePolicy(image_size=(75, 50)), DecodePolicy(image_size=None)):
        batch, covered, errors = decode_records([record], blobs.__getitem__, policy, chunk=0)
        assert covered == 1 and not errors
        images, masks = image_views(batch), mask_views(batch)
        assert masks is not None
        assert masks[0].shape == images[0].shape[:2]
        assert set(np.unique(masks[0])) <= set(np.unique(mask))  # no interpolated values
    assert masks is not None  # checked in the loop; narrows the type after it
    np.testing.assert_array_equal(masks[0], mask)  # full size: identical


def test_a_mask_of_another_size_is_a_per_sample_error() -> None:
    from skimage import data

    from pixcrawler_engine import Record, decode_records

    photo = data.astronaut()[:300, :200]
    blobs = {"img": _png(photo), "mask": _png(_mask_for(photo)[:100])}
    record = Record(key="a", ref="img", label=1, index=0, mask_ref="mask")
    policy = DecodePolicy(image_size=(64, 64), on_error="skip")
    batch, covered, errors = decode_records([record], blobs.__getitem__, policy, chunk=0)
    assert batch.num_rows == 0 and covered == 1
    assert "must match its image" in errors[0][1]


def test_small_images_travel_in_bigger_batches(tmp_path: Path) -> None:
    """NOTE [batch rows]: by default an engine batch of 32x32 images holds 341 of them (1 MiB
    of pixels) where one of photos holds 64; `batch_rows` given is used as it is."""
    from pixcrawler import _demo_data, load_dataset
    from pixcrawler_engine import EngineConfig

    auto = EngineConfig()
    assert auto.rows_for((32, 32, 3)) == 341
    assert auto.rows_for((224, 224, 3)) == auto.rows_for(None) == 64
    assert auto.rows_for((8, 8, 1)) == 1024
    assert EngineConfig(batch_rows=5).rows_for((32, 32, 3)) == 5

    src = _demo_data.build_digits(tmp_path / "src", limit=40)  # 400 images
    pack(src, tmp_path / "store", "digits", chunk_size=400)
    url = f"file://{tmp_path / 'store'}"
    for rows, sizes in ((None, [341, 59]), (100, [100] * 4)):
        # One worker: with more, the run's first and last tasks are cut in pieces as well.
        with load_dataset("digits", base_url=url, image_size=32, num_workers=1, progress=False,
                          batch_rows=rows) as ds:  # fmt: skip
            assert [len(b) for b in ds.iter_engine_batches()] == sizes


def test_a_delivered_chunk_moves_the_download_window_before_the_supervisor_waits(
    tmp_path: Path, demo_source: Path
) -> None:
    """The download window follows the chunk being delivered; the supervisor must move it on
    (start the next downloads) before it waits. It used to wait first, for its wait's whole
    timeout of one second, whenever every chunk in the window had been delivered: 400 chunks
    of one image took 8.4 s instead of 0.9. `stats["stalls"]` counts such waits."""
    digits = sorted(demo_source.glob("[0-9]/*.png"))[:24]
    listing = tmp_path / "one.jsonl"
    lines = [f'{{"file": "{p}", "label": "{p.parent.name}"}}' for p in digits]
    listing.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"
    pack(listing, store, "one", chunk_size=1)
    config = small_config(prefetch_chunks=2)
    with Stream(job_source(store, "one"), config=config, policy=POLICY) as stream:
        keys = [key for batch in stream for key in batch.keys]
        assert stream.stats["stalls"] == 0
    assert keys == expected_keys(store, "one")


def test_far_more_workers_than_cores_and_batches_larger_than_a_chunk(store: Path) -> None:
    """Issue #17's odd settings: 64 workers on a 2-core machine deliver every sample once and
    in order, and all of them are gone after the run; `batch_rows` above a chunk's size gives
    one batch per chunk (a task never spans chunks unless they are shuffled together)."""
    with Stream(job_source(store), config=small_config(num_workers=64, batch_rows=2),
                policy=POLICY) as stream:  # fmt: skip
        keys = [key for batch in stream for key in batch.keys]
        pids = list(stream.worker_pids)
    assert keys == expected_keys(store)
    assert len(pids) > 2 and wait_gone(pids, 10.0) == []
    config = small_config(batch_rows=1000, num_workers=1)  # one: no task cut in pieces
    with Stream(job_source(store), config=config, policy=POLICY) as stream:
        sizes = [len(batch) for batch in stream]
    assert sizes == [16] * 7 + [8]  # 120 images in chunks of 16


def test_the_runs_first_and_last_tasks_are_cut_into_a_piece_per_worker(store: Path) -> None:
    """NOTE [task sizes]: the first batch comes when each worker has decoded its share of it,
    and the last tasks are shared, so no worker decodes a whole task alone at either end.
    The order and every sample stay as they were; only the engine's batches are smaller."""
    from pixcrawler_engine.runtime._schedule import task_spans

    assert task_spans([(0, 200)], 64, workers=2, first=True, last=True) == [
        (0, 32), (32, 64), (64, 128), (128, 160), (160, 192), (192, 196), (196, 200)
    ]  # fmt: skip
    assert task_spans([(0, 200)], 64, workers=1, first=True, last=True) == [
        (0, 64), (64, 128), (128, 192), (192, 200)
    ]  # fmt: skip
    # A task that is both the first and among the last is cut once.
    assert task_spans([(0, 64)], 64, workers=3, first=True, last=True) == [
        (0, 21),
        (21, 42),
        (42, 64),
    ]
    assert task_spans([(0, 2)], 64, workers=4, first=True) == [(0, 1), (1, 2)]
    # Steps stay apart: no task spans two ranges.
    assert task_spans([(0, 10), (20, 30)], 64, workers=2, last=True) == [
        (0, 5),
        (5, 10),
        (20, 25),
        (25, 30),
    ]
    # On real workers: 120 images in chunks of 16, tasks of 16.
    with Stream(job_source(store), config=small_config(batch_rows=16), policy=POLICY) as stream:
        batches = [(len(batch), batch.keys) for batch in stream]
    assert [n for n, _ in batches] == [8, 8] + [16] * 6 + [4, 4]
    assert [key for _, keys in batches for key in keys] == expected_keys(store)


def test_a_source_found_only_on_the_callers_sys_path(store: Path, tmp_path: Path) -> None:
    # A user's source whose module only the caller's sys.path finds (a src/ folder, a script
    # run from elsewhere): the zygote loaded the workers' arguments before that path, so its
    # workers never started ("the worker zygote died 4 times").
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "myop.py").write_text(
        "from pixcrawler_engine.sources._base import SourceWrapper, ZipOpener\n"
        "class MyOpener:\n"
        "    def open(self, path):\n"
        "        return ZipOpener().open(path)\n"
        "class MySource(SourceWrapper):\n"
        "    def opener(self):\n"
        "        return MyOpener()\n"
    )
    script = (
        "import sys\n"
        f"sys.path[:0] = [{str(tmp_path / 'userpkg')!r}, {str(Path(__file__).parent)!r}]\n"
        "from pathlib import Path\n"
        "from engine_helpers import POLICY, job_source, small_config\n"
        "from myop import MySource\n"
        "from pixcrawler_engine import Stream\n"
        f"source = MySource(job_source(Path({str(store)!r})))\n"
        "with Stream(source, config=small_config(), policy=POLICY) as stream:\n"
        "    print(sum(len(batch) for batch in stream))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd="/")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == len(expected_keys(store))
