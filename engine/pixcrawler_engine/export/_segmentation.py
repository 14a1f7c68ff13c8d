"""What an image export writes beside the images: class names, palette, overlays, statistics.

`class_names` says what the mask ids mean: a `--mask-classes` file, else the dataset's own
metadata (`sources.parquet._classes`), else ARTeFACT's taxonomy when the dataset is ARTeFACT
(by its columns), else the plain ids. `PALETTE` colours class ids (255, the background,
black); `visualization` draws the 4-panel preview; `Stats` gathers the counts written to
statistics.json.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixcrawler_engine.sources.parquet._classes import parse_class_names
from pixcrawler_engine.sources.parquet._paths import ID_COLUMNS

__all__ = [
    "ARTEFACT_CLASSES",
    "BACKGROUND",
    "ID_COLUMNS",
    "PALETTE",
    "Stats",
    "class_names",
    "is_artefact",
    "visualization",
]


# ARTeFACT's taxonomy: 0 clean, 1-15 the damage types, 255 unannotated background. Only an
# ARTeFACT dataset gets these names (see `class_names`).
ARTEFACT_CLASSES = {
    0: "Clean",
    1: "Material loss",
    2: "Peel",
    3: "Dust",
    4: "Scratch",
    5: "Hair",
    6: "Dirt",
    7: "Fold",
    8: "Writing",
    9: "Cracks",
    10: "Staining",
    11: "Stamp",
    12: "Sticker",
    13: "Puncture",
    14: "Burn marks",
    15: "Lightleak",
    255: "Background",
}


# 16 well-separated colours for the classes, grey for ids without a class, black for 255.
_COLOURS = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
)  # fmt: skip


PALETTE = np.full((256, 3), 128, dtype=np.uint8)
PALETTE[: len(_COLOURS)] = _COLOURS
PALETTE[255] = 0


BACKGROUND = 255


# ARTeFACT's columns besides its images: a dataset with all of them is ARTeFACT.
_ARTEFACT_COLUMNS = frozenset({"id", "material", "content", "type"})


# Columns that name a sample rather than describe it: never counted in statistics.json.
_NOT_DESCRIPTIVE = frozenset({*ID_COLUMNS, "key", "path", "file", "filename", "url", "_error"})


_MAX_DISTINCT = 1000


VIS_HEIGHT = 512


def is_artefact(columns: Any) -> bool:
    """Whether a Parquet source's columns (`parquet._schema.Columns`) are ARTeFACT's."""
    return (
        columns is not None
        and columns.mask == "annotation"
        and set(columns.metadata) >= _ARTEFACT_COLUMNS
    )


def class_names(
    source: Any, given: str | os.PathLike[str] | Mapping[int, str] | None
) -> dict[int, str]:
    """What the mask ids of `source` mean (see the module doc); {} for plain ids.

    Raises:
        ValueError: a `given` file that cannot be read as class names.
        OSError: a `given` file that cannot be read.
    """
    if isinstance(given, Mapping):
        return {int(k): str(v) for k, v in given.items()}
    if given is not None:
        return parse_class_names(Path(given).read_text(encoding="utf-8"), where=str(given))
    ask = getattr(source, "mask_class_names", None)
    found = ask() if callable(ask) else None
    if found:
        return found
    if is_artefact(getattr(source, "columns", None)):
        return dict(ARTEFACT_CLASSES)
    return {}


def visualization(image: np.ndarray, mask: np.ndarray, *, alpha: float = 0.5) -> np.ndarray:
    """The 4-panel picture: image | mask (grey) | mask (colours) | colours over the image.

    Background pixels (255) keep the image in the overlay; a 4-pixel white gap parts panels.
    Panels are at most `VIS_HEIGHT` pixels high (a preview, not a second copy of the data).
    """
    if mask.shape[0] > VIS_HEIGHT:
        from PIL import Image

        size = (max(1, round(mask.shape[1] * VIS_HEIGHT / mask.shape[0])), VIS_HEIGHT)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    h = mask.shape[0]
    colours = PALETTE[mask]
    grey = np.repeat(mask[:, :, None], 3, axis=2)
    damaged = (mask != BACKGROUND)[:, :, None]
    # Integer arithmetic: a float32 copy of a 1024 px image would be 12 MB per panel.
    a = round(alpha * 256)
    blend = ((image.astype(np.uint16) * (256 - a) + colours.astype(np.uint16) * a) >> 8).astype(
        np.uint8
    )
    overlay = np.where(damaged, blend, image)
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, grey, gap, colours, gap, overlay], axis=1)


@dataclass
class Stats:
    """Running counts for statistics.json, all O(classes + distinct values) in memory."""

    pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    images: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    sizes: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, Counter[str]] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    unique: dict[str, bool] = field(default_factory=dict)
    samples: int = 0
    masks: int = 0

    def add_sample(
        self, meta: dict[str, Any], original: tuple[int, int], shape: tuple[int, ...]
    ) -> None:
        """Counts one exported sample: its sizes before and after, and its metadata."""
        width, height = original
        self.samples += 1
        self.add_size("original_width", width)
        self.add_size("original_height", height)
        self.add_size("original_megapixels", round(width * height / 1e6, 2))
        self.add_size("width", shape[1])
        self.add_size("height", shape[0])
        self.add_metadata(meta)

    def add_size(self, name: str, value: float) -> None:
        self.sizes.setdefault(name, []).append(value)

    def add_metadata(self, meta: dict[str, Any]) -> None:
        for name, value in meta.items():
            if name in _NOT_DESCRIPTIVE or isinstance(value, (dict, list)) or value is None:
                continue
            counter = self.values.setdefault(name, Counter())
            if len(counter) < _MAX_DISTINCT or str(value) in counter:
                counter[str(value)] += 1

    def add_mask(self, mask: np.ndarray) -> list[int]:
        counts = np.bincount(mask.ravel(), minlength=256)
        self.pixels += counts
        present = np.flatnonzero(counts)
        self.images[present] += 1
        self.masks += 1
        return [int(c) for c in present]

    def to_json(self, names: Mapping[int, str] | None = None) -> dict[str, Any]:
        """The statistics; `names` says what class ids mean (plain ids when it does not)."""
        total = int(self.pixels.sum())
        names = names or {}
        classes = {
            str(c): {
                "name": names.get(c, str(c)),
                "pixels": int(self.pixels[c]),
                "fraction": round(int(self.pixels[c]) / total, 6) if total else 0.0,
                "images": int(self.images[c]),
            }
            for c in range(256)
            if self.pixels[c]
        }

        def summary(values: list[float]) -> dict[str, float]:
            a = np.asarray(values, dtype=np.float64)
            return {"min": float(a.min()), "max": float(a.max()), "mean": round(float(a.mean()), 2)}

        descriptive = {
            name: dict(counter.most_common())
            for name, counter in self.values.items()
            # A column whose every value differs names samples, it does not describe them.
            if not (
                self.samples > 1 and len(counter) == self.samples and max(counter.values()) == 1
            )
        }
        return {
            "samples_with_masks": self.masks,
            "class_distribution": classes,
            "sizes": {name: summary(v) for name, v in self.sizes.items() if v},
            "metadata_counts": descriptive,
        }
