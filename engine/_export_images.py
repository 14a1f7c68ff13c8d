"""The export-images job: a segmentation dataset (images + masks) to PNG folders, in bounded memory.

It writes what the ARTeFACT download tool wrote, for any source with masks (or without):

    images/           <name>.png  the image, its longer side at most `max_side` (never upscaled)
    annotations/      <name>.png  the mask, grayscale class ids (0-15, 255 background), at the
                                  image's size, nearest neighbour (values kept)
    annotations_rgb/  <name>.png  the mask in `PALETTE`'s colours (255 black)
    visualizations/   <name>.png  the first `visualizations` samples: image | mask | colours |
                                  overlay, side by side
    metadata.csv      one row a sample: index, key, paths, sizes, classes present, and the
                      source's descriptive columns (id, material, content, ...)
    statistics.json   counts: samples, failures (with reasons), class distribution (pixels and
                      images per class), original and exported sizes, and the values of every
                      descriptive column (material, content, type, ...)

`<name>` is `<index>_<id>` (the dataset position, and the `id` column made safe) or
`<index>`. Every file is written under a temporary name and renamed once complete, so an
interrupted export leaves no half-written file under a final name.

Decoding runs in the engine's workers (`Stream`): a JPEG is decoded at a reduced DCT scale, so
a 133-megapixel photo never exists at full size; PNGs are decoded once at full size, one per
worker. This process only encodes PNGs (in a small thread pool: zlib releases the GIL).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixcrawler.engine._config import DecodePolicy, EngineConfig, OnError
from pixcrawler.engine._protocol import Record
from pixcrawler.engine._sources import ChunkOpener, ChunkPlan, Source

__all__ = ["CLASS_NAMES", "PALETTE", "ExportResult", "export_images"]

# ARTeFACT's taxonomy: 0 clean, 1-15 the damage types, 255 unannotated background. Other
# datasets' ids get "class <id>".
CLASS_NAMES = {
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

_FOLDERS = ("images", "annotations", "annotations_rgb", "visualizations")
_ID_COLUMNS = ("id", "image_id", "sample_id", "uid")
# Columns that name a sample rather than describe it: never counted in statistics.json.
_NOT_DESCRIPTIVE = frozenset({*_ID_COLUMNS, "key", "path", "file", "filename", "url", "_error"})
_MAX_DISTINCT = 1000
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IN_FLIGHT = 4  # samples queued for writing at most: each pins its batch's shared-memory slot
VIS_HEIGHT = 512


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        output: the export folder.
        samples: samples written.
        failed: samples that could not be decoded (listed in statistics.json).
        seconds: the export's duration.
    """

    output: Path
    samples: int
    failed: int
    seconds: float


class _Head:
    """The first `n` records of a source (the `--max-samples` cut), chunks after it left out."""

    def __init__(self, source: Source, n: int) -> None:
        self.source = source
        self._plans: list[ChunkPlan] = []
        for plan in source.plan():
            if plan.first_index >= n:
                break
            keep = min(plan.num_records, n - plan.first_index)
            self._plans.append(ChunkPlan(plan.index, keep, plan.size_bytes, plan.first_index))
        self._keep = {p.index: p.num_records for p in self._plans}

    def plan(self) -> list[ChunkPlan]:
        return list(self._plans)

    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        return self.source.fetch(chunk, workdir)

    def records(self, chunk: int, path: Path) -> list[Record]:
        return self.source.records(chunk, path)[: self._keep[chunk]]

    def opener(self) -> ChunkOpener:
        return self.source.opener()

    def close(self) -> None:
        self.source.close()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = _tmp(path)
    try:
        Image.fromarray(pixels).save(tmp, "PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_sample(image: np.ndarray, mask: np.ndarray | None, files: dict[str, Path]) -> None:
    """Writes one sample's PNGs (in a pool thread: the colour arrays exist one sample at a time)."""
    _save_png(image, files["image"])
    if mask is None:
        return
    _save_png(mask, files["annotation"])
    _save_png(PALETTE[mask], files["annotation_rgb"])
    if "visualization" in files:
        _save_png(visualization(image, mask), files["visualization"])


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
class _Stats:
    """Running counts for statistics.json, all O(classes + distinct values) in memory."""

    pixels: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    images: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    sizes: dict[str, list[int]] = field(default_factory=dict)
    values: dict[str, Counter[str]] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)
    unique: dict[str, bool] = field(default_factory=dict)
    samples: int = 0
    masks: int = 0

    def add_size(self, name: str, value: int) -> None:
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

    def to_json(self) -> dict[str, Any]:
        total = int(self.pixels.sum())
        classes = {
            str(c): {
                "name": CLASS_NAMES.get(c, f"class {c}"),
                "pixels": int(self.pixels[c]),
                "fraction": round(int(self.pixels[c]) / total, 6) if total else 0.0,
                "images": int(self.images[c]),
            }
            for c in range(256)
            if self.pixels[c]
        }

        def summary(values: list[int]) -> dict[str, float]:
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


def _names(index: int, meta: dict[str, Any], seen: set[str]) -> str:
    ident = next((meta[c] for c in _ID_COLUMNS if isinstance(meta.get(c), (str, int))), None)
    name = f"{index:05d}"
    if ident is not None:
        safe = _UNSAFE.sub("_", str(ident)).strip("._")[:80]
        if safe:
            name = f"{name}_{safe}"
    seen.add(name)
    return name


_SAMPLE = re.compile(r"sample (['\"])(.*?)\1: ")


@contextlib.contextmanager
def _sample_warnings(records: list[tuple[str, str]]) -> Iterator[None]:
    """Collects the engine's per-sample warnings (`on_error="warn"`) as (key, message)."""
    from pixcrawler.engine._stream import SampleWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SampleWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, SampleWarning):
                    message = str(w.message)
                    match = _SAMPLE.search(message)
                    records.append((match.group(2) if match else "?", message))
                else:  # not ours: let it go on as it would have
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def export_images(
    source: Source,
    output: str | os.PathLike[str],
    *,
    max_side: int | None = 1024,
    max_samples: int | None = None,
    num_workers: int | None = None,
    on_error: OnError = "warn",
    visualizations: int = 10,
    progress: bool = True,
    config: EngineConfig | None = None,
) -> ExportResult:
    """Exports a source's images (and masks) as PNG folders with metadata and statistics.

    Args:
        source: any engine source (a `ParquetSource` with a mask column gives annotations).
        output: the export folder (created; files of the same names are replaced).
        max_side: the longest side of exported images, None for their own size.
        max_samples: export only the first samples of the dataset; None for all.
        num_workers: decode processes; None for one per CPU core.
        on_error: a sample that cannot be decoded `raise`s, or is left out (`skip`, `warn`;
            both list it in statistics.json, `warn` also prints it).
        visualizations: how many samples get a 4-panel picture.
        progress: show a progress bar.
        config: engine knobs; the default keeps memory small (few, small batches).

    Returns:
        what was written.
    """
    from tqdm import tqdm

    from pixcrawler.engine._stream import Stream

    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    started = time.monotonic()
    out = Path(output)
    for folder in _FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    if max_samples is not None:
        source = _Head(source, max_samples)
    total = sum(p.num_records for p in source.plan())
    workers = num_workers or os.cpu_count() or 1
    # Small batches in small slots (every touched slot page counts in two processes' RSS):
    # two samples of at most max_side^2 x (3 + 1 mask) bytes each.
    per_sample = 256 << 20 if max_side is None else max_side * max_side * 4 + (64 << 10)
    config = config or EngineConfig(
        num_workers=workers,
        batch_rows=2,
        slot_bytes=2 * per_sample + (1 << 20),
        num_slots=workers + 2,
    )
    size = None if max_side is None else (max_side, max_side)
    # Bad samples always come back as warnings, so that statistics.json can list them.
    engine_on_error: OnError = "raise" if on_error == "raise" else "warn"
    policy = DecodePolicy(image_size=size, resize="fit", color="RGB", on_error=engine_on_error)
    stats = _Stats()
    failures: list[tuple[str, str]] = []
    seen: set[str] = set()
    csv_path = out / "metadata.csv"
    csv_tmp = _tmp(csv_path)
    pending: list[Future[None]] = []
    bar = tqdm(total=total, unit="img", desc="export-images", disable=not progress)
    try:
        with (
            open(csv_tmp, "w", newline="", encoding="utf-8") as csv_file,
            ThreadPoolExecutor(2, thread_name_prefix="pxc-png") as pool,
            Stream(source, config=config, policy=policy) as stream,
            _sample_warnings(failures),
        ):
            writer: csv.DictWriter[str] | None = None
            for batch in stream:
                images, masks = batch.images, batch.masks
                rb = batch.record_batch
                indices = rb.column("index").to_pylist()
                widths, heights = (
                    rb.column("orig_width").to_pylist(),
                    rb.column("orig_height").to_pylist(),
                )
                for i, meta in enumerate(batch.metadata):
                    name = _names(indices[i], meta, seen)
                    image = images[i]
                    mask = None if masks is None else masks[i]
                    row: dict[str, Any] = {
                        "index": indices[i],
                        "key": batch.keys[i],
                        "image": f"images/{name}.png",
                        "annotation": "",
                        "annotation_rgb": "",
                        "visualization": "",
                        "original_width": widths[i],
                        "original_height": heights[i],
                        "width": image.shape[1],
                        "height": image.shape[0],
                        "classes": "",
                    }
                    files = {"image": out / row["image"]}
                    if mask is not None:
                        row["annotation"] = f"annotations/{name}.png"
                        row["annotation_rgb"] = f"annotations_rgb/{name}.png"
                        row["classes"] = " ".join(map(str, stats.add_mask(mask)))
                        files["annotation"] = out / row["annotation"]
                        files["annotation_rgb"] = out / row["annotation_rgb"]
                        if stats.samples < visualizations:
                            row["visualization"] = f"visualizations/{name}.png"
                            files["visualization"] = out / row["visualization"]
                    pending.append(pool.submit(_write_sample, image, mask, files))
                    while len(pending) > _IN_FLIGHT:
                        pending.pop(0).result()
                    stats.samples += 1
                    stats.add_size("original_width", widths[i])
                    stats.add_size("original_height", heights[i])
                    stats.add_size("original_megapixels", round(widths[i] * heights[i] / 1e6, 2))
                    stats.add_size("width", image.shape[1])
                    stats.add_size("height", image.shape[0])
                    stats.add_metadata(meta)
                    flat = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
                    if writer is None:
                        fieldnames = list(row) + [k for k in flat if k not in row]
                        writer = csv.DictWriter(csv_file, fieldnames, extrasaction="ignore")
                        writer.writeheader()
                    writer.writerow({**flat, **row})
                    bar.update(1)
                del images, masks, batch
            for future in pending:
                future.result()
            if failures:
                bar.update(len(failures))
        os.replace(csv_tmp, csv_path)
    finally:
        bar.close()
        csv_tmp.unlink(missing_ok=True)
    seconds = time.monotonic() - started
    body = {
        "samples": stats.samples,
        "failed": len(failures),
        "failures": [{"key": k, "error": m} for k, m in failures],
        "requested": total,
        "max_side": max_side,
        "seconds": round(seconds, 2),
        **stats.to_json(),
    }
    _write_text(out / "statistics.json", json.dumps(body, indent=2) + "\n")
    if on_error == "warn":
        from pixcrawler.engine._stream import SampleWarning

        for _key, message in failures:
            warnings.warn(message, SampleWarning, stacklevel=2)
    return ExportResult(out, stats.samples, len(failures), seconds)
