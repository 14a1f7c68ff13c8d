"""The training feed: epochs, the block shuffle's class mix, ranks, and exact resume.

Real jobs packed from scikit-learn's digits, real engine processes. The ten-class job holds
one class per chunk of 100, like many crawled datasets: the shuffle must mix chunks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pixcrawler import _demo_data, load_dataset
from pixcrawler_engine.runtime._epoch import Share, epoch_groups
from pixcrawler_engine.sources import _pack

FAST: dict[str, Any] = {"num_workers": 2, "progress": False, "image_size": 8}


@pytest.fixture(scope="module")
def classes_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ "classes": 10 digit classes x 100 images, one class per chunk of 100."""
    src = tmp_path_factory.mktemp("classes_src")
    _demo_data.build_digits(src, limit=100, classes=tuple(range(10)))
    root = tmp_path_factory.mktemp("classes_parent") / "store"
    _pack.pack(src, root, "classes", chunk_size=100, created_at="2024-01-01T00:00:00Z")
    return root


def _load(store: Path, **options: Any) -> Any:
    return load_dataset("classes", base_url=store.as_uri(), **{**FAST, **options})


def _keys(batches: Any) -> list[str]:
    return [key for batch in batches for key in batch.keys]


def test_chunks_hold_one_class_each(classes_store: Path) -> None:
    with _load(classes_store) as ds:
        labels = [b.labels for b in ds.iter_engine_batches()]
    flat = [x for part in labels for x in part]
    assert ds.num_chunks == 10 and len(flat) == 1000
    assert all(len(set(flat[i : i + 100])) == 1 for i in range(0, 1000, 100))


def test_each_pass_is_an_epoch_with_its_own_order(classes_store: Path) -> None:
    with _load(classes_store, shuffle=True, seed=3) as ds:
        first, second = _keys(ds.iter_engine_batches()), _keys(ds.iter_engine_batches())
        assert ds.epoch == 2
        ds.set_epoch(1)
        again = _keys(ds.iter_engine_batches())
    assert sorted(first) == sorted(second) and len(set(first)) == 1000  # permutations
    assert first != second
    assert again == second  # the order is a function of (seed, epoch)
    with _load(classes_store, shuffle=True, seed=3, num_workers=1) as ds:
        ds.set_epoch(1)
        assert _keys(ds.iter_engine_batches()) == second  # and not of num_workers


def test_shuffled_batches_mix_the_classes_of_many_chunks(classes_store: Path) -> None:
    """The target: a mean of at least 7 distinct classes per batch of 64 (uniform: ~10)."""
    with _load(classes_store, shuffle=True, seed=0) as ds:
        means = []
        for _ in range(2):
            labels = [y for _, y in ds.iter_batches(64)]
            means.append(np.mean([len(set(y)) for y in labels]))
        chunk_level = _load(classes_store, shuffle=True, seed=0, shuffle_window=1)
        with chunk_level:
            old = np.mean([len(set(y)) for _, y in chunk_level.iter_batches(64)])
    assert min(means) >= 7, means
    assert old < 2.5, old  # the chunk-level shuffle: one or two classes a batch


def test_a_window_of_chunks_bounds_the_mix() -> None:
    """The order alone (no processes): blocks of `window` chunks, each sample once."""
    counts = [100] * 20
    for window in (1, 4, 8):
        groups = epoch_groups(counts, chunk_ids=list(range(20)), shuffle=True, seed=1,
                              window=window, share=Share())  # fmt: skip
        assert all(window <= len(g.chunks) < 2 * window for g in groups)
        rows = [(g.chunks[p], r) for g in groups for lo, hi in g.ranges for p, r in g.rows(lo, hi)]
        assert sorted(rows) == [(c, r) for c in range(20) for r in range(100)]


def test_iter_batches_start_skips_without_decoding(classes_store: Path) -> None:
    with _load(classes_store, shuffle=True, seed=5) as ds:
        ds.set_epoch(4)
        full = [k for b in ds.iter_engine_batches() for k in b.keys]
        ds.set_epoch(4)
        rest = ds.iter_engine_batches(start=900)
        tail = _keys(rest)
    assert tail == full[900:]


def test_a_start_past_the_epoch_is_refused_and_the_epoch_stays(classes_store: Path) -> None:
    # It raised "the state was saved for a larger dataset", and the epoch moved on anyway.
    with _load(classes_store) as ds:
        for start in (1001, -1):
            with pytest.raises(ValueError, match=rf"start={start} is not a place in an epoch"):
                next(ds.iter_batches(start=start))
        assert ds.epoch == 0
        assert len(list(ds.iter_batches(100, start=1000))) == 0 and ds.epoch == 1


def test_copy_gives_writable_arrays(classes_store: Path) -> None:
    with _load(classes_store) as ds:
        images, _ = next(ds.iter_batches(16))
        assert not images.flags.writeable
        images, _ = next(ds.iter_batches(16, copy=True))
        images += 1  # in place
        image, _ = next(iter(_load(classes_store, copy=True)))
        assert image.flags.writeable and image.base is None
        torch.from_numpy(image).add_(1)  # no warning, no error


@pytest.mark.parametrize("start", [0, 10])
def test_iter_batches_copies_only_the_batches_that_span_two_chunks(
    classes_store: Path, start: int
) -> None:
    """A batch is a view of the engine's memory (read-only) unless it spans two chunks of 100.
    The engine's batches of 64 used to end at each chunk's end too, which shifted the later
    batches across two of them, each then copied."""
    with _load(classes_store, batch_rows=64, num_workers=1) as ds:  # no task cut in pieces
        copied = [images.flags.writeable for images, _ in ds.iter_batches(64, start=start)]
    steps = range(start, 1000, 64)
    assert copied == [lo // 100 != (min(lo + 64, 1000) - 1) // 100 for lo in steps]


# ---- ranks -----------------------------------------------------------------------------
def _rank_keys(ds: Any, rank: int, world: int, monkeypatch: pytest.MonkeyPatch,
               **options: Any) -> list[list[str]]:  # fmt: skip
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    feed = ds.to_torch(iterable=True, batch_size=64, metadata=True, **options)
    feed.set_epoch(2)
    batches = [[m["key"] for m in meta] for _, _, meta in DataLoader(feed, batch_size=None)]
    assert len(batches) == len(feed)
    return batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_take_turns_in_one_global_order(
    classes_store: Path, monkeypatch: pytest.MonkeyPatch, drop_last: bool
) -> None:
    with _load(classes_store, shuffle=True, seed=2) as ds:
        ds.set_epoch(2)
        order = _keys(ds.iter_engine_batches())
        ranks = [_rank_keys(ds, r, 3, monkeypatch, drop_last=drop_last) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # every rank, as many batches: no hang
    steps = [k for step in zip(*ranks, strict=True) for batch in step for k in batch]
    if drop_last:
        assert steps == order[: len(steps)] and len(steps) == 1000 // 192 * 192
    else:
        # 1000 = 5 turns of 3 x 64, then 40 left: 14 each, the last 2 from the epoch's start.
        assert steps == order + order[:2]
        assert [len(r[-1]) for r in ranks] == [14, 14, 14]


def _bad_store(tmp_path: Path, per_class: int, chunk: int, bad: list[int]) -> Path:
    """A "classes" job of 10 x `per_class` digits whose images at `bad` (in sorted order) are
    truncated: the header survives, the pixels do not."""
    src = tmp_path / "src"
    _demo_data.build_digits(src, limit=per_class, classes=tuple(range(10)))
    paths = sorted(src.rglob("*.png"))
    for i in bad:
        paths[i].write_bytes(paths[i].read_bytes()[:60])
    _pack.pack(src, tmp_path / "store", "classes", chunk_size=chunk, verify="header")
    return tmp_path / "store"


def _rank_batch_sizes(store: Path, world: int, batch_size: int, loader_workers: int,
                      monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:  # fmt: skip
    """Each rank's batch sizes over one epoch with on_error="skip"; each as many as len()."""
    counts = []
    with _load(store, on_error="skip") as ds:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            feed = ds.to_torch(iterable=True, batch_size=batch_size)
            loader = DataLoader(feed, batch_size=None, num_workers=loader_workers)
            counts.append([len(labels) for _, labels in loader])
            assert len(counts[-1]) == len(feed)
    return counts


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_skipped_sample_keeps_the_ranks_in_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader_workers: int
) -> None:
    store = _bad_store(tmp_path, 100, 100, [150])
    counts = _rank_batch_sizes(store, 3, 111, loader_workers, monkeypatch)
    # 1000 = 3 turns of 3 x 111, then 1 left: 1 each (2 padded). Sample 150 (rank 1's first
    # step) is bad: rank 1's first batch is short, and it still hands out 4 batches.
    assert counts == [[111, 111, 111, 1], [110, 111, 111, 1], [111, 111, 111, 1]]


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_a_step_of_bad_samples_still_hands_out_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader_workers: int
) -> None:
    store = _bad_store(tmp_path, 10, 10, [2, 3, 4, 5])  # rank 1's first step, rank 0's second
    counts = _rank_batch_sizes(store, 2, 2, loader_workers, monkeypatch)
    # A rank whose step had no good sample handed out no batch at all: one batch fewer than
    # the others, which then wait for it forever in their next collective.
    assert [len(c) for c in counts] == [25, 25]
    assert counts[0][:3] == [2, 0, 2] and counts[1][:3] == [0, 2, 2]


def test_per_sample_ranks_drop_only_what_they_cannot_share(
    classes_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without batch_size the ranks take turns of an engine batch (1,024 images of 8 x 8):
    # drop_last dropped the whole last turn, here all 1,000 images.
    keys = []
    with _load(classes_store) as ds:
        monkeypatch.setenv("WORLD_SIZE", "3")
        for rank in range(3):
            monkeypatch.setenv("RANK", str(rank))
            feed = ds.to_torch(iterable=True, drop_last=True, metadata=True)
            keys.append([meta["key"] for _, _, meta in feed])
            assert len(keys[-1]) == len(feed) == 333  # DistributedSampler's 1000 // 3
    assert len(set(keys[0]) | set(keys[1]) | set(keys[2])) == 999


def test_dataloader_workers_keep_the_rank_order(
    classes_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _load(classes_store, shuffle=True, seed=2) as ds:
        ranks = [_rank_keys(ds, r, 2, monkeypatch) for r in range(2)]
        monkeypatch.setenv("RANK", "1")
        feed = ds.to_torch(iterable=True, batch_size=64, metadata=True)
        feed.set_epoch(2)
        loader = DataLoader(feed, batch_size=None, num_workers=2)
        in_workers = [[m["key"] for m in meta] for _, _, meta in loader]
    assert in_workers == ranks[1]


def test_bad_rank_settings_are_named(classes_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _load(classes_store) as ds:
        feed = ds.to_torch(iterable=True, batch_size=8)
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ValueError, match=r"rank 2 is not in 0 \.\. world_size - 1 = 1"):
            next(iter(feed))
        monkeypatch.setenv("RANK", "one")
        with pytest.raises(ValueError, match="must be ints"):
            len(feed)


GLOO = """
import json, os, sys
import torch.distributed as dist
from torch.utils.data import DataLoader
from pixcrawler import load_dataset

dist.init_process_group("gloo")
ds = load_dataset("classes", base_url=sys.argv[1], num_workers=1, progress=False,
                  image_size=8, shuffle=True, seed=9)
feed = ds.to_torch(iterable=True, batch_size=50, metadata=True)
keys = []
for epoch in range(2):
    feed.set_epoch(epoch)
    for images, labels, meta in DataLoader(feed, batch_size=None):
        dist.all_reduce(images.float().sum())  # a collective every step: a short rank hangs
        keys.append([epoch, [m["key"] for m in meta]])
with open(sys.argv[2] + f".{dist.get_rank()}", "w") as f:
    json.dump(keys, f)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_share_each_epoch(classes_store: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(GLOO))
    out = tmp_path / "keys"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(script), classes_store.as_uri(), str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * 10  # 1000 / (2 x 50) steps, each epoch
    for epoch in range(2):
        mine = [[k for e, b in r if e == epoch for k in b] for r in ranks]
        assert not set(mine[0]) & set(mine[1])
        assert len(set(mine[0]) | set(mine[1])) == 1000
    first = [k for e, b in ranks[0] if e == 0 for k in b]
    second = [k for e, b in ranks[0] if e == 1 for k in b]
    assert sorted(first) != first and set(first) != set(second)  # shuffled, a new epoch


# ---- resume ----------------------------------------------------------------------------
RESUME = """
import json, os, sys
from torchdata.stateful_dataloader import StatefulDataLoader
from pixcrawler import load_dataset

url, state_in, state_out, stop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ds = load_dataset("classes", base_url=url, num_workers=2, progress=False, image_size=8,
                  shuffle=True, seed=4)
loader = StatefulDataLoader(ds.to_torch(iterable=True, batch_size=32, metadata=True),
                            batch_size=None, num_workers=int(os.environ.get("LOADER_WORKERS", 0)))
if state_in != "-":
    loader.load_state_dict(json.load(open(state_in)))
keys = []
for i, (images, labels, meta) in enumerate(loader):
    keys += [m["key"] for m in meta]
    if i + 1 == stop:
        json.dump(loader.state_dict(), open(state_out, "w"))
        break
print(json.dumps({"keys": keys}))
"""


def _resume_run(tmp_path: Path, store: Path, state_in: str, stop: int, **env: str) -> list[str]:
    script = tmp_path / "resume.py"
    script.write_text(textwrap.dedent(RESUME))
    cmd = [sys.executable, str(script), store.as_uri(), state_in, str(tmp_path / "state.json"),
           str(stop)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(done.stdout.splitlines()[-1])["keys"])


def test_statefuldataloader_resumes_the_epoch_in_a_new_process(
    classes_store: Path, tmp_path: Path
) -> None:
    with _load(classes_store, shuffle=True, seed=4) as ds:
        order = _keys(ds.iter_engine_batches())
    head = _resume_run(tmp_path, classes_store, "-", 28)  # 28 x 32 = 896 of 1000
    state = json.loads((tmp_path / "state.json").read_text())
    assert head == order[:896]
    rest = _resume_run(tmp_path, classes_store, str(tmp_path / "state.json"), -1)
    assert rest == order[896:]  # exactly the rest, nothing decoded twice
    assert json.dumps(state)  # plain JSON


def test_statefuldataloader_with_dataloader_workers_resumes_exactly(
    classes_store: Path, tmp_path: Path
) -> None:
    # Each worker decodes batches k, k + K, ...: its state said "consumed = its own count x
    # 32" (300 and 200 here), and the restored workers repeated 100 images and lost 600.
    with _load(classes_store, shuffle=True, seed=4) as ds:
        order = _keys(ds.iter_engine_batches())
    head = _resume_run(tmp_path, classes_store, "-", 9, LOADER_WORKERS="2")
    assert head == order[:288]
    rest = _resume_run(tmp_path, classes_store, str(tmp_path / "state.json"), -1,
                       LOADER_WORKERS="2")  # fmt: skip
    assert rest == order[288:]
    # A worker's place means nothing to another worker count (StatefulDataLoader checks it
    # too), nor to the main process.
    with _load(classes_store, shuffle=True, seed=4) as ds:
        feed = ds.to_torch(iterable=True, batch_size=32)
        place = {"id": 0, "of": 2, "units": 3, "rows": 0}
        feed.load_state_dict({**feed.state_dict(), "worker": place})
        with pytest.raises(ValueError, match="restore it with num_workers=2"):
            next(iter(feed))


def test_a_state_saved_at_an_epochs_end_resumes_at_the_next(classes_store: Path) -> None:
    # With drop_last, 1000 images give 15 batches of 64; the state at the last one said
    # "1000 - 40 consumed", so the restored pass was an empty rest of the same epoch.
    with _load(classes_store, shuffle=True, seed=4) as ds:
        feed = ds.to_torch(iterable=True, batch_size=64, drop_last=True)
        states = [feed.state_dict() for _ in feed]
        assert len(states) == 15 and states[-1]["epoch"] == 0
        assert states[-1]["consumed"] == 1000 and states[-2]["consumed"] == 14 * 64
        again = ds.to_torch(iterable=True, batch_size=64, drop_last=True)
        again.load_state_dict(states[-1])
        assert again.epoch == 1 and len(list(again)) == 15
        feed.set_epoch(5)  # forgets the pass before
        assert (feed.state_dict()["epoch"], feed.state_dict()["consumed"]) == (5, 0)


def test_a_skipped_image_before_the_checkpoint_is_not_repeated_after_it(tmp_path: Path) -> None:
    # Batches were refilled past a skipped image, so "consumed = batches x 4" fell one short
    # of the positions used: the image after the checkpoint came out twice.
    with _load(_bad_store(tmp_path, 10, 30, [2]), on_error="skip") as ds:
        good = [k for k in _keys(ds.iter_engine_batches())]
        feed = ds.to_torch(iterable=True, batch_size=4, metadata=True)
        head: list[str] = []
        for n, (_, _, meta) in enumerate(feed, 1):
            head += [m["key"] for m in meta]
            if n == 2:
                state = feed.state_dict()
                break
        again = ds.to_torch(iterable=True, batch_size=4, metadata=True)
        again.load_state_dict(state)
        rest = [m["key"] for _, _, meta in again for m in meta]
    assert state["consumed"] == 8 and len(head) == 7  # one step of 4 had a bad image
    assert head + rest == good


def test_a_state_saved_at_two_ranks_resumes_at_one(classes_store: Path, tmp_path: Path) -> None:
    with _load(classes_store, shuffle=True, seed=4) as ds:
        order = _keys(ds.iter_engine_batches())
    heads = []
    for rank in range(2):
        env = {"RANK": str(rank), "WORLD_SIZE": "2"}
        heads.append(_resume_run(tmp_path, classes_store, "-", 5, **env))
    state = json.loads((tmp_path / "state.json").read_text())  # rank 1's, the same position
    steps = [k for s in range(5) for h in heads for k in h[32 * s : 32 * s + 32]]
    assert steps == order[:320]  # 5 steps of 2 x 32
    assert state["dataset_state"]["consumed"] == 320
    rest = _resume_run(tmp_path, classes_store, str(tmp_path / "state.json"), -1)
    assert rest == order[320:]


def test_a_state_of_another_order_is_refused(classes_store: Path) -> None:
    with _load(classes_store, shuffle=True, seed=4) as ds:
        feed = ds.to_torch(iterable=True, batch_size=32)
        state = feed.state_dict()
    with (
        _load(classes_store, shuffle=True, seed=5) as other,
        pytest.raises(ValueError, match=r"seed=4 \(now 5\)"),
    ):
        other.to_torch(iterable=True, batch_size=32).load_state_dict(state)
    with pytest.raises(ValueError, match="not a state of this dataset"):
        feed.load_state_dict({"epoch": 1})
