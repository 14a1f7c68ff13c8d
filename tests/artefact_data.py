"""A test dataset shaped like ARTeFACT, written with the real `datasets` library.

ARTeFACT (Hugging Face Parquet shards) pairs photos of damaged artworks with damage masks:
columns `id`, `material`, `content`, `type`, and three `Image` features, `image` (the photo,
JPEG or PNG, up to ~133 megapixels), `annotation` (a grayscale PNG of class ids: damage classes
0-15, 255 where there is no damage) and `annotation_rgb` (the same mask in colour). The real
dataset cannot be downloaded here, so `build` writes one of the same shape from real photos
(scikit-image's bundled `data` images), with masks drawn as the damage in ARTeFACT looks:
blobs of material loss and staining, thin scratches and cracks, specks of dust.

    build(dest, huge=...)   the shards under dest/data/, as on the Hub; returns an `Artefact`
                            (`layout="hub"`, the default: SNAPPY and dictionary pages on every
                            column, as `datasets` 2.x wrote the published shards; `"datasets"`:
                            as today's `datasets` writes, image bytes uncompressed and PLAIN)
    huge_images()           the two huge photos (a 133 MP JPEG, a 100 MP PNG) and their masks,
                            made once and cached in the system temp folder (they take ~40 s)

Everything is deterministic: the same arguments give the same pixels.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from pixcrawler_engine.export._segmentation import PALETTE

__all__ = ["CONTENTS", "MATERIALS", "Artefact", "build", "huge_images", "mask_for"]

MATERIALS = ("Parchment", "Film emulsion", "Glass", "Paper", "Tesserae", "Canvas", "Textile")
CONTENTS = ("Artistic depiction", "Photographic depiction", "Line art", "Geometric patterns")
TYPES = ("Photograph", "Painting", "Manuscript", "Mosaic", "Textile")
BACKGROUND = 255
# The photos (all in scikit-image's wheel) and the format each is stored in.
_PHOTOS = (
    ("astronaut", "JPEG"),
    ("coffee", "PNG"),
    ("chelsea", "JPEG"),
    ("rocket", "JPEG"),
    ("camera", "PNG"),
    ("hubble_deep_field", "JPEG"),
    ("immunohistochemistry", "PNG"),
    ("retina", "JPEG"),
    ("coins", "JPEG"),
    ("moon", "PNG"),
    ("cat", "JPEG"),
    ("brick", "PNG"),
)
HUGE_JPEG_SIZE = (14000, 9500)  # 133 MP, the largest in ARTeFACT
HUGE_PNG_SIZE = (10000, 10000)  # 100 MP
_CACHE_VERSION = "v1"


@dataclass(frozen=True)
class Artefact:
    """What `build` wrote.

    Attributes:
        root: the dataset folder (the shards are `root/data/train-*.parquet`).
        shards: the Parquet files, in order.
        ids: the `id` of every row, in dataset order.
        sizes: (width, height) of every row's image.
        huge_ids: the ids of the huge images.
    """

    root: Path
    shards: tuple[Path, ...]
    ids: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    huge_ids: tuple[str, ...]

    @property
    def glob(self) -> str:
        return str(self.root / "data" / "*.parquet")


def mask_for(size: tuple[int, int], seed: int, *, scale: int = 1) -> np.ndarray:
    """A damage mask of `size` (width, height): class ids 0-15 on a background of 255.

    Drawn at 1/scale of the size and enlarged without interpolation (huge masks in seconds);
    every value stays a class id.
    """
    rng = np.random.default_rng(seed)
    w, h = max(1, size[0] // scale), max(1, size[1] // scale)
    im = Image.new("L", (w, h), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # material loss, staining: blobs
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.02, 0.15) * w, rng.uniform(0.02, 0.15) * h
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=int(rng.integers(0, 16)))
    for _ in range(int(rng.integers(1, 5))):  # scratches, cracks: thin polylines
        points = [(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(int(rng.integers(2, 6)))]
        draw.line(points, fill=int(rng.integers(0, 16)), width=max(1, w // 300))
    for _ in range(int(rng.integers(5, 30))):  # dust: specks
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), max(1.0, w / 400)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(0, 16)))
    if scale > 1:
        im = im.resize(size, Image.Resampling.NEAREST)
    return np.asarray(im)


def _png(array: np.ndarray, level: int = 6) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG", compress_level=level)
    return out.getvalue()


def _colour(mask: np.ndarray) -> np.ndarray:
    return PALETTE[mask]


def _photo(name: str, index: int) -> np.ndarray:
    """A real photo, cropped and flipped a little differently for each index."""
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    h, w = pixels.shape[:2]
    dy, dx = (index * 7) % max(1, h // 8), (index * 13) % max(1, w // 8)
    pixels = pixels[dy:, dx:]
    if index % 2:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels).save(out, "JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def huge_images(cache: Path | None = None) -> dict[str, Path]:
    """The huge photos and their masks, made once and kept in `cache`.

    Real photos enlarged (bilinear) with a fine grain added in the low bits, so that they
    compress like scans (the PNG is ~110 MB, as large as ARTeFACT's), not like smooth
    upscales. Files appear under their final names only once complete, so concurrent test
    runs share the cache safely.

    Returns:
        paths by name: `jpeg`, `jpeg_mask`, `png`, `png_mask` (masks are PNG).
    """
    cache = cache or Path(tempfile.gettempdir()) / f"pixcrawler-artefact-{_CACHE_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    paths = {
        "jpeg": cache / "huge.jpg",
        "jpeg_mask": cache / "huge_jpg_mask.png",
        "png": cache / "huge.png",
        "png_mask": cache / "huge_png_mask.png",
    }
    makers = (
        ("jpeg", "hubble_deep_field", HUGE_JPEG_SIZE, "JPEG", 1),
        ("png", "retina", HUGE_PNG_SIZE, "PNG", 2),
    )
    for name, photo, size, fmt, seed in makers:
        if not paths[name].exists():
            rng = np.random.default_rng(seed)
            pixels = np.asarray(
                Image.fromarray(_photo(photo, 0)).resize(size, Image.Resampling.BILINEAR)
            )
            pixels = pixels | rng.integers(0, 4, size=pixels.shape, dtype=np.uint8)
            out = io.BytesIO()
            if fmt == "JPEG":
                Image.fromarray(pixels).save(out, "JPEG", quality=90)
            else:
                Image.fromarray(pixels).save(out, "PNG", compress_level=1)
            del pixels
            _atomic_write(paths[name], out.getvalue())
        mask_path = paths[f"{name}_mask"]
        if not mask_path.exists():
            _atomic_write(mask_path, _png(mask_for(size, seed, scale=16), level=1))
    return paths


def _open_huge(data: bytes) -> np.ndarray:
    """Decodes one of our own huge images (Pillow's bomb warning does not apply to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)


def _size(data: bytes) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            return im.size


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _rows(
    n_small: int, huge: dict[str, Path], which: tuple[str, ...], at: int
) -> Iterator[dict[str, Any]]:
    """The rows in dataset order: small photos, with the huge ones from row `at` on."""
    order: list[Any] = list(range(n_small))
    order[at:at] = list(which)
    for i, item in enumerate(order):
        row: dict[str, Any] = {
            "id": f"af{i:05d}",
            "material": MATERIALS[i % len(MATERIALS)],
            "content": CONTENTS[i % len(CONTENTS)],
            "type": TYPES[i % len(TYPES)],
        }
        if isinstance(item, str):
            image = huge[item].read_bytes()
            mask_png = huge[f"{item}_mask"].read_bytes()
            mask = _open_huge(mask_png)
            rgb = _png(_colour(mask), level=1)
            del mask
        else:
            name, fmt = _PHOTOS[item % len(_PHOTOS)]
            pixels = _photo(name, item)
            image = _encode(pixels, fmt)
            mask = mask_for((pixels.shape[1], pixels.shape[0]), seed=1000 + i)
            mask_png, rgb = _png(mask), _png(_colour(mask))
        suffix = "png" if image.startswith(b"\x89PNG") else "jpg"
        row["image"] = {"bytes": image, "path": f"{row['id']}.{suffix}"}
        row["annotation"] = {"bytes": mask_png, "path": f"{row['id']}_mask.png"}
        row["annotation_rgb"] = {"bytes": rgb, "path": f"{row['id']}_rgb.png"}
        yield row


def _write_like_datasets_2(table: Any, path: Path, rows_per_group: int) -> None:
    """What `datasets` 2.x's `to_parquet` did: a `ParquetWriter` with pyarrow's defaults
    (SNAPPY, dictionary pages) and the features' schema, one row group per batch."""
    import pyarrow.parquet as pq

    arrow = table.data.table
    with pq.ParquetWriter(str(path), schema=table.features.arrow_schema) as writer:
        for start in range(0, len(table), rows_per_group):
            writer.write_table(arrow.slice(start, rows_per_group))


def build(
    dest: str | os.PathLike[str],
    *,
    n_small: int = 22,
    huge: tuple[str, ...] = (),
    shards: int = 2,
    rows_per_group: int = 4,
    layout: Literal["hub", "datasets"] = "hub",
) -> Artefact:
    """Writes the dataset as Parquet shards `dest/data/train-0000i-of-0000n.parquet`.

    Args:
        dest: the dataset folder to create.
        n_small: how many ordinary photos (a few hundred pixels a side).
        huge: which huge images to add (`"jpeg"`: 133 MP, `"png"`: 100 MP; see
            `huge_images`), together at the start of a row group in the middle.
        shards: how many Parquet files the row groups are split into (in order).
        rows_per_group: rows per Parquet row group (the source's chunk).
        layout: `"hub"` writes what `datasets` 2.x's `to_parquet` wrote (ARTeFACT's shards
            on the Hub): pyarrow's defaults, SNAPPY-compressed with dictionary pages on every
            column, image bytes included. `"datasets"` calls today's `to_parquet`, which
            stores `Image` bytes uncompressed and PLAIN-encoded.

    Returns:
        what was written.
    """
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "material": datasets.Value("string"),
            "content": datasets.Value("string"),
            "type": datasets.Value("string"),
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "annotation_rgb": datasets.Image(),
        }
    )
    root = Path(dest)
    (root / "data").mkdir(parents=True, exist_ok=True)
    big = huge_images() if huge else {}
    groups = -(-(n_small + len(huge)) // rows_per_group)
    rows = list(_rows(n_small, big, huge, at=rows_per_group * (groups // 2)))
    # Shards hold whole row groups, so that the huge images share one.
    cuts = [rows_per_group * int(g) for g in np.linspace(0, groups, shards + 1).round()]
    paths = []
    datasets.disable_progress_bars()
    for s in range(shards):
        part = rows[cuts[s] : cuts[s + 1]]
        table = datasets.Dataset.from_list(part, features=features)
        path = root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet"
        if layout == "datasets":
            table.to_parquet(str(path), batch_size=rows_per_group)
        else:
            _write_like_datasets_2(table, path, rows_per_group)
        paths.append(path)
    sizes = [_size(row["image"]["bytes"]) for row in rows]
    huge_ids = tuple(r["id"] for r, (w, h) in zip(rows, sizes, strict=True) if w * h > 50_000_000)
    return Artefact(
        root=root,
        shards=tuple(paths),
        ids=tuple(r["id"] for r in rows),
        sizes=tuple(sizes),
        huge_ids=huge_ids,
    )
