"""A labelled grid of samples, a row per class: `Dataset.preview` and `pixcrawler preview`.

Each row holds up to `n` samples of one class of one dataset, labelled with the class (and,
when several datasets share the grid, the dataset each row comes from); segmentation masks are
overlaid in the export palette's colours where the dataset has masks (id 255, background, is
left clear). Samples are decoded by the engine straight at tile size (JPEGs at a reduced DCT
scale, never at full size), bad samples are skipped, and a pass stops as soon as every class
it knows of has its `n` samples. The PNG is written under a temporary name and renamed; it
carries the row labels in an iTXt chunk, `pixcrawler:rows` (a JSON list), for tools.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# A `Dataset` (its `info`, `policy`, `config` and `run`); not imported: `Dataset.preview`
# imports this module.
Dataset = Any

__all__ = ["draw_preview"]

_GAP = 4
_LABEL_WIDTH = 180
_TITLE = 24
_MAX_UNKNOWN_CLASSES = 64  # rows for a dataset that does not list its classes
_ALPHA = 0.45


def draw_preview(
    datasets: Sequence[tuple[str, Dataset]],
    path: str | os.PathLike[str],
    *,
    n: int = 8,
    tile: int = 96,
) -> Path:
    """Draws the grid of `datasets` (name, dataset) into the PNG at `path`.

    Args:
        datasets: the datasets, each with the name its rows are labelled with.
        path: the PNG to write (its folder is created).
        n: samples per class (per row).
        tile: the side of one tile, in pixels; images keep their aspect ratio inside it.

    Returns:
        `path`.

    Raises:
        ValueError: `n` or `tile` is not positive, or no dataset has a sample to show.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive number of samples per class, got {n!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16:
        raise ValueError(f"tile must be at least 16 pixels, got {tile!r}")
    rows: list[tuple[str, list[Image.Image]]] = []
    for name, dataset in datasets:
        for label, tiles in _samples(dataset, n, tile):
            rows.append((f"{name} · {label}" if len(datasets) > 1 else label, tiles))
    if not rows:
        raise ValueError("nothing to preview: the datasets hold no sample that decodes")
    title = ", ".join(name for name, _ in datasets) + f": up to {n} samples per class"
    labels = [label for label, _ in rows]
    return _save(_grid(rows, title, n, tile), Path(path), labels)


def _samples(dataset: Dataset, n: int, tile: int) -> list[tuple[str, list[Image.Image]]]:
    """Up to `n` tiles of every class of one dataset, in the dataset's class order."""
    from pixcrawler_engine.export._writers import label_text

    known = [label_text(c) for c in dataset.info.labels]
    shown: dict[str, list[Image.Image]] = {c: [] for c in known}
    limit = len(known) or _MAX_UNKNOWN_CLASSES
    policy = dataclasses.replace(
        dataset.policy, image_size=(tile, tile), resize="fit", color="RGB", on_error="skip"
    )
    batches = dataset.run(None, dataset.config, policy=policy, desc="preview")
    with contextlib.closing(batches):  # a break stops the pass, and its processes, at once
        for batch in batches:
            if _add(batch, shown, n, limit, tile):
                break
    return [(label, tiles) for label, tiles in shown.items() if tiles]


def _add(batch: Any, shown: dict[str, list[Image.Image]], n: int, limit: int, tile: int) -> bool:
    """Adds a batch's samples to the classes that want more; True once every class is full."""
    from PIL import Image

    from pixcrawler_engine.export._writers import label_text

    images, masks = batch.images, batch.masks
    for i, label in enumerate(batch.labels):
        key = label_text(label)
        if key not in shown and len(shown) >= limit:
            continue
        tiles = shown.setdefault(key, [])
        if len(tiles) < n:
            mask = None if masks is None else masks[i]
            tiles.append(_enlarged(Image.fromarray(_overlay(np.array(images[i]), mask)), tile))
    return len(shown) >= limit and all(len(t) >= n for t in shown.values())


def _enlarged(im: Image.Image, tile: int) -> Image.Image:
    """A small image (a 32-pixel digit) scaled up by a whole factor to fill its tile."""
    from PIL import Image

    factor = tile // max(im.width, im.height)
    if factor < 2:
        return im
    return im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)


def _overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The image with its mask's classes tinted in the palette's colours (255 left clear)."""
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if mask is None:
        return image
    from pixcrawler_engine.export._segmentation import BACKGROUND, PALETTE

    tinted = (image * (1 - _ALPHA) + PALETTE[mask] * _ALPHA).astype(np.uint8)
    return np.where((mask != BACKGROUND)[:, :, None], tinted, image)


def _grid(rows: list[tuple[str, list[Image.Image]]], title: str, n: int, tile: int) -> Any:
    from PIL import Image, ImageDraw, ImageFont

    width = _LABEL_WIDTH + n * (tile + _GAP) + _GAP
    height = _TITLE + len(rows) * (tile + _GAP) + _GAP
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((_GAP, 6), title, fill="black", font=font)
    for r, (label, tiles) in enumerate(rows):
        top = _TITLE + r * (tile + _GAP)
        draw.text((_GAP, top + tile // 2 - 6), _fit(draw, label, font), fill="black", font=font)
        for c, im in enumerate(tiles):
            left = _LABEL_WIDTH + c * (tile + _GAP)
            grid.paste(im, (left + (tile - im.width) // 2, top + (tile - im.height) // 2))
    return grid


def _fit(draw: Any, text: str, font: Any) -> str:
    """`text`, cut with an ellipsis to fit the label column."""
    if draw.textlength(text, font=font) <= _LABEL_WIDTH - 2 * _GAP:
        return text
    while text and draw.textlength(text + "…", font=font) > _LABEL_WIDTH - 2 * _GAP:
        text = text[:-1]
    return text + "…"


def _save(grid: Any, path: Path, rows: list[str]) -> Path:
    """Writes the grid atomically; its row labels go in a `pixcrawler:rows` text chunk too."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt("pixcrawler:rows", json.dumps(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        grid.save(tmp, "PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
