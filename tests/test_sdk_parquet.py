"""`load_dataset` on Hugging Face-style Parquet shards (through the engine's `ParquetSource`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from pixcrawler import load_dataset  # noqa: E402
from pixcrawler._parquet_ref import is_parquet_address  # noqa: E402

NAMES = ["cat", "coffee", "space", "other"]
# (scikit-image photo, class) in row order; 7 rows in row groups of 3: chunks of 3, 3, 1.
PHOTOS = [
    ("chelsea", "cat"),
    ("coffee", "coffee"),
    ("astronaut", "space"),
    ("camera", "other"),
    ("rocket", "space"),
    ("cat", "cat"),
    ("coins", "other"),
]
ROWS_PER_GROUP = 3


def _png(name: str) -> bytes:
    image = Image.fromarray(getattr(skimage_data, name)())
    image.thumbnail((80, 80))  # small: the test is about plumbing, not pixels
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder with `data/train-00000-of-00001.parquet`, as on the Hub."""
    root = tmp_path_factory.mktemp("hf") / "data"
    root.mkdir()
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=NAMES),
        }
    )
    rows = [
        {"id": f"row-{i}", "image": {"bytes": _png(photo), "path": None}, "label": NAMES.index(c)}
        for i, (photo, c) in enumerate(PHOTOS)
    ]
    datasets.disable_progress_bars()
    table = datasets.Dataset.from_list(rows, features=features)
    table.to_parquet(str(root / "train-00000-of-00001.parquet"), batch_size=ROWS_PER_GROUP)
    return root


def test_addresses_are_told_from_job_ids(shards: Path) -> None:
    file = shards / "train-00000-of-00001.parquet"
    for address in (file, str(file), str(shards), f"{shards}/*.parquet", file.as_uri(),
                    "https://hf.co/d/resolve/main/data/train.parquet"):  # fmt: skip
        assert is_parquet_address(address), address
    for job_id in ("job_123", "job-abc.v2", "https://example.com/jobs/1", ""):
        assert not is_parquet_address(job_id), job_id


def test_info_of_every_address_form(shards: Path) -> None:
    file = shards / "train-00000-of-00001.parquet"
    for address in (str(file), file, str(shards), str(shards / "*.parquet"), file.as_uri()):
        ds = load_dataset(address, image_size=(32, 32), progress=False)
        info = ds.info
        assert len(ds) == info.num_images == len(PHOTOS)
        assert info.job_id == str(address)
        assert info.status == "completed"
        assert info.num_chunks == 3 and info.chunk_size == ROWS_PER_GROUP
        assert info.labels == tuple(NAMES)
        assert info.classes == NAMES and info.class_to_idx == {n: i for i, n in enumerate(NAMES)}
        assert info.size_bytes > 0 and info.version
        assert "Images: 7" in info.summary()


def test_passes_follow_the_parquet_rows(shards: Path) -> None:
    expected = [c for _, c in PHOTOS]
    with load_dataset(str(shards), image_size=(32, 32), progress=False, num_workers=1) as ds:
        seen = list(ds)
        assert [label for _, label in seen] == expected
        assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image, _ in seen)

        batches = list(ds.iter_batches(batch_size=4))
        assert [b.shape for b, _ in batches] == [(4, 32, 32, 3), (3, 32, 32, 3)]
        assert [label for _, labels in batches for label in labels] == expected

        x, y = ds.to_arrays()
        assert x.shape == (7, 32, 32, 3) and list(y) == expected
        np.testing.assert_array_equal(x, np.stack([image for image, _ in seen]))
        # Pixels are those of each row's own photo (grey photos become equal channels).
        camera = expected.index("other")
        assert (x[camera, ..., 0] == x[camera, ..., 1]).all()
        assert not (x[0, ..., 0] == x[0, ..., 2]).all()

        df = ds.to_dataframe()
        assert [json.loads(m)["id"] if isinstance(m, str) else m["id"] for m in df["metadata"]] == [
            f"row-{i}" for i in range(7)
        ]
        assert list(df["key"]) == [f"train-00000-of-00001.parquet:{i}" for i in range(7)]


def test_torch_on_parquet(shards: Path) -> None:
    pytest.importorskip("torch")
    ds = load_dataset(str(shards), image_size=(32, 32), progress=False, num_workers=1)
    stream = ds.to_torch(iterable=True)
    items = list(stream)
    assert [int(label) for _, label in items] == [NAMES.index(c) for _, c in PHOTOS]
    assert tuple(items[0][0].shape) == (3, 32, 32)

    mapped = ds.to_torch()
    assert len(mapped) == 7
    image, label = mapped[4]
    assert tuple(image.shape) == (3, 32, 32) and label == NAMES.index("space")
    np.testing.assert_allclose(image.numpy(), items[4][0].numpy())


def test_path_without_parquet_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not parquet")
    with pytest.raises(FileNotFoundError, match="no Parquet file"):
        load_dataset(str(tmp_path), progress=False)
    with pytest.raises(FileNotFoundError, match="no Parquet file"):
        load_dataset(str(tmp_path / "missing-*.parquet"), progress=False)


def test_tensorflow_on_parquet(shards: Path) -> None:
    pytest.importorskip("tensorflow")
    # No image_size: the shape is probed from the first row group (through LocalChunks).
    ds = load_dataset(str(shards), progress=False, num_workers=1)
    items = list(ds.to_tensorflow().as_numpy_iterator())
    assert [int(label) for _, label in items] == [NAMES.index(c) for _, c in PHOTOS]
    assert all(image.ndim == 3 and image.shape[2] == 3 for image, _ in items)
