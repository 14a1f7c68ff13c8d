"""`on_error` in the framework adapters, on a real job with real corrupt images.

The job is the demo job with two samples truncated: index 3 (a PNG digit, chunk 0) and
index 119 (the last one, a JPEG photo of chunk 7). Map-style `to_torch()` replaces a bad
index by the next good one (wrapping past the end); the iterable torch dataset and
`to_tensorflow()` leave bad images out, as `Dataset` iteration does.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_helpers import corrupt_one_sample

from pixcrawler import load_dataset
from pixcrawler_engine._config import OnError
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.runtime._stream import SampleWarning

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

FAST: dict[str, Any] = {"num_workers": 2, "progress": False, "image_size": 8}
BAD = (3, 119)
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


@pytest.fixture(scope="module")
def bad_url(tmp_path_factory: pytest.TempPathFactory, store: Path) -> str:
    root = tmp_path_factory.mktemp("bad_store")
    shutil.copytree(store / "jobs" / "demo", root / "jobs" / "demo")
    corrupt_one_sample(root, "demo", chunk=0, row=3)
    corrupt_one_sample(root, "demo", chunk=7, row=7)
    return root.as_uri()


@pytest.fixture(scope="module")
def good_url(store: Path) -> str:
    return store.as_uri()


def load(url: str, on_error: OnError) -> Any:
    return load_dataset("demo", base_url=url, on_error=on_error, **FAST)


def checksum(image: Any) -> int:
    """The sum of the 0-255 pixel values of a float [0, 1] image tensor."""
    return int(torch.round(torch.as_tensor(image).float() * 255).to(torch.int64).sum())


@pytest.fixture(scope="module")
def reference(good_url: str) -> list[tuple[int, int]]:
    """(pixel checksum, label) of every index of the undamaged job."""
    ds = load(good_url, "raise").to_torch()
    return [(checksum(x), int(y)) for x, y in (ds[i] for i in range(len(ds)))]


# ---- map-style --------------------------------------------------------------------------------


def test_map_style_raise_names_the_sample(bad_url: str) -> None:
    ds = load(bad_url, "raise").to_torch()
    ds[2]
    for index in BAD:
        with pytest.raises(DecodeError, match=f"index {index}") as info:
            ds[index]
        assert info.value.key is not None and "broken" in str(info.value)


def test_map_style_skip_gives_the_next_good_index(
    bad_url: str, reference: list[tuple[int, int]]
) -> None:
    ds = load(bad_url, "skip").to_torch()
    assert len(ds) == 120
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skip says nothing
        got = [(checksum(x), int(y)) for x, y in (ds[i] for i in range(len(ds)))]
    expected = list(reference)
    expected[3] = reference[4]
    expected[119] = reference[0]  # past the end: wraps to the first image
    assert got == expected
    with_keys = load(bad_url, "skip").to_torch(metadata=True)
    assert with_keys[3][2]["key"] == with_keys[4][2]["key"]  # the replacement's own key


@MANY_WORKERS
def test_map_style_skip_under_a_shuffled_dataloader(
    bad_url: str, reference: list[tuple[int, int]]
) -> None:
    ds = load(bad_url, "skip").to_torch()
    loader = DataLoader(
        ds, batch_size=16, shuffle=True, num_workers=4, generator=torch.Generator().manual_seed(1)
    )
    got = sorted((checksum(x), int(y)) for xs, ys in loader for x, y in zip(xs, ys, strict=True))
    expected = [r for i, r in enumerate(reference) if i not in BAD] + [reference[4], reference[0]]
    assert got == sorted(expected)  # the same replacements in every worker


def test_map_style_warn_names_both_indices(bad_url: str, reference: list[tuple[int, int]]) -> None:
    ds = load(bad_url, "warn").to_torch()
    with pytest.warns(SampleWarning, match="index 3 gives the image of index 4") as said:
        image, label = ds[3]
    assert len(said) == 1 and "broken" in str(said[0].message)
    assert (checksum(image), int(label)) == reference[4]
    with pytest.warns(SampleWarning, match="index 119 gives the image of index 0"):
        ds[119]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[4]  # a good index says nothing


def test_map_style_job_with_no_good_image_raises(tmp_path: Path, store: Path) -> None:
    from pixcrawler_engine.sources._pack import pack

    one = tmp_path / "src" / "0"
    one.mkdir(parents=True)
    _a_digit(store, one)
    pack(tmp_path / "src", tmp_path / "store", "one", chunk_size=4)
    corrupt_one_sample(tmp_path / "store", "one", chunk=0, row=0)
    ds = load_dataset(
        "one", base_url=(tmp_path / "store").as_uri(), on_error="skip", **FAST
    ).to_torch()
    with pytest.raises(DecodeError, match="none of the 1 images"):
        ds[0]
    with pytest.raises(IndexError):
        ds[1]  # out of range stays an IndexError, whatever on_error says


def _a_digit(store: Path, folder: Path) -> None:
    """Copies one real digit PNG out of the demo job's first chunk into `folder`."""
    import zipfile

    with zipfile.ZipFile(store / "jobs" / "demo" / "chunks" / "0.zip") as zf:
        name = next(n for n in zf.namelist() if n.endswith(".png"))
        (folder / Path(name).name).write_bytes(zf.read(name))


# ---- iterable torch and TensorFlow: bad images are left out ----------------------------------


def good_checksums(reference: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(r for i, r in enumerate(reference) if i not in BAD)


def items(loader: Iterator[Any]) -> list[tuple[int, int]]:
    return sorted((checksum(x), int(y)) for x, y in loader)


def test_iterable_skip_in_the_engine_and_in_dataloader_workers(
    bad_url: str, reference: list[tuple[int, int]]
) -> None:
    ds = load(bad_url, "skip").to_torch(iterable=True)
    assert items(iter(ds)) == good_checksums(reference)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert items(iter(loader)) == good_checksums(reference)


def test_iterable_warn_and_raise(bad_url: str, reference: list[tuple[int, int]]) -> None:
    warned = load(bad_url, "warn").to_torch(iterable=True)
    with pytest.warns(SampleWarning, match="broken") as said:
        got = items(iter(warned))
    assert got == good_checksums(reference)
    assert len([w for w in said if issubclass(w.category, SampleWarning)]) == 2
    raised = load(bad_url, "raise").to_torch(iterable=True)
    with pytest.raises(DecodeError, match="broken"):
        list(raised)
    in_worker = DataLoader(raised, batch_size=None, num_workers=1)
    with pytest.raises(DecodeError, match="broken"):
        list(in_worker)


@pytest.fixture(scope="module")
def tf() -> Any:
    return pytest.importorskip("tensorflow")


def test_tensorflow_skip_warn_and_raise(
    tf: Any, bad_url: str, reference: list[tuple[int, int]]
) -> None:
    def tf_items(ds: Any) -> list[tuple[int, int]]:
        return sorted((int(x.numpy().astype("int64").sum()), int(y)) for x, y in ds)

    skipped = load(bad_url, "skip").to_tensorflow()
    assert tf_items(skipped) == good_checksums(reference)
    batched = load(bad_url, "skip").to_tensorflow(batch_size=16)
    assert sum(int(y.shape[0]) for _, y in batched) == 118
    with pytest.warns(SampleWarning, match="broken"):
        assert len(tf_items(load(bad_url, "warn").to_tensorflow())) == 118
    with pytest.raises(tf.errors.OpError, match="broken"):
        list(load(bad_url, "raise").to_tensorflow())
