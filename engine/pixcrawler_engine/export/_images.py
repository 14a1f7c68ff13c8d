"""The export-images job: a segmentation dataset (images + masks) to PNG folders, in bounded memory.

It writes what the ARTeFACT download tool wrote, for any source with masks (or without):

    images/           <name>.png  the image, its longer side at most `max_side` (never upscaled)
    annotations/      <name>.png  the mask, grayscale class ids (0-15, 255 background), at the
                                  image's size, nearest neighbour (values kept)
    annotations_rgb/  <name>.png  the mask in `PALETTE`'s colours (255 black)
    visualizations/   <name>.png  the first `visualizations` samples: image | mask | colours |
                                  overlay, side by side
    metadata.csv      one row a sample: index, key, paths, sizes, classes present, its label
                      (under the label column's own name), and every other scalar column of
                      the source (id, material, content, ...)
    statistics.json   counts: samples, failures (with reasons), class distribution (pixels and
                      images per class, named as `_segmentation.class_names` says), original
                      and exported sizes, and the values of every descriptive column

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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixcrawler_engine._config import DecodePolicy, EngineConfig, OnError
from pixcrawler_engine.export._segmentation import (
    ID_COLUMNS,
    PALETTE,
    Stats,
    class_names,
    visualization,
)
from pixcrawler_engine.sources._base import ChunkOpener, ChunkPlan, Source
from pixcrawler_engine.sources._record import Record

__all__ = ["ExportResult", "export_images"]


_FOLDERS = ("images", "annotations", "annotations_rgb", "visualizations")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IN_FLIGHT = 4  # samples queued for writing at most: each pins its batch's shared-memory slot


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

    def records(self, chunk: int, path: Path) -> Sequence[Record]:
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


def _names(index: int, meta: dict[str, Any], seen: set[str]) -> str:
    ident = next((meta[c] for c in ID_COLUMNS if isinstance(meta.get(c), (str, int))), None)
    name = f"{index:05d}"
    if ident is not None:
        safe = _UNSAFE.sub("_", str(ident)).strip("._")[:80]
        if safe:
            name = f"{name}_{safe}"
    seen.add(name)
    return name


@contextlib.contextmanager
def _sample_warnings(records: list[tuple[str, str]]) -> Iterator[None]:
    """Collects the engine's per-sample warnings (`on_error="warn"`) as (key, message)."""
    from pixcrawler_engine.runtime._stream import SampleWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SampleWarning)
        try:
            yield
        finally:
            for w in caught:
                if isinstance(w.message, SampleWarning):
                    records.append((w.message.key or "?", str(w.message)))
                else:  # not ours: let it go on as it would have
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _settings(
    max_side: int | None, num_workers: int | None, on_error: OnError, config: EngineConfig | None
) -> tuple[EngineConfig, DecodePolicy]:
    """The engine settings of an export: small batches in small slots, bad samples reported."""
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
    return config, DecodePolicy(
        image_size=size, resize="fit", color="RGB", on_error=engine_on_error
    )


def _sample_row(
    out: Path, name: str, image: np.ndarray, mask: np.ndarray | None, visualize: bool
) -> tuple[dict[str, Any], dict[str, Path]]:
    """A sample's metadata.csv row (in column order) and the files it is written to."""
    row: dict[str, Any] = {
        "index": 0,
        "key": "",
        "image": f"images/{name}.png",
        "annotation": "",
        "annotation_rgb": "",
        "visualization": "",
        "original_width": 0,
        "original_height": 0,
        "width": image.shape[1],
        "height": image.shape[0],
        "classes": "",
        "label": None,
    }
    files = {"image": out / row["image"]}
    if mask is not None:
        row["annotation"] = f"annotations/{name}.png"
        row["annotation_rgb"] = f"annotations_rgb/{name}.png"
        files["annotation"] = out / row["annotation"]
        files["annotation_rgb"] = out / row["annotation_rgb"]
        if visualize:
            row["visualization"] = f"visualizations/{name}.png"
            files["visualization"] = out / row["visualization"]
    return row, files


def _write_statistics(
    out: Path,
    stats: Stats,
    failures: list[tuple[str, str]],
    requested: int,
    max_side: int | None,
    seconds: float,
    names: Mapping[int, str],
) -> None:
    body = {
        "samples": stats.samples,
        "failed": len(failures),
        "failures": [{"key": k, "error": m} for k, m in failures],
        "requested": requested,
        "max_side": max_side,
        "seconds": round(seconds, 2),
        **stats.to_json(names),
    }
    _write_text(out / "statistics.json", json.dumps(body, indent=2) + "\n")


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
    mask_classes: str | os.PathLike[str] | Mapping[int, str] | None = None,
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
        mask_classes: what mask ids mean: a file (JSON list or `{"<id>": "<name>"}`, or one
            name a line) or a mapping; default: the dataset's own metadata, else ARTeFACT's
            names for ARTeFACT, else the ids themselves.

    Returns:
        what was written (`samples` may be 0: the caller decides whether that is a failure).
    """
    from tqdm import tqdm

    from pixcrawler_engine.runtime._stream import SampleWarning, Stream

    if max_side is not None and max_side <= 0:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    started = time.monotonic()
    names = class_names(source, mask_classes)  # a bad --mask-classes file fails first
    label_name = getattr(getattr(source, "columns", None), "label", None) or "label"
    out = Path(output)
    for folder in _FOLDERS:
        (out / folder).mkdir(parents=True, exist_ok=True)
    if max_samples is not None:
        source = _Head(source, max_samples)
    total = sum(p.num_records for p in source.plan())
    config, policy = _settings(max_side, num_workers, on_error, config)
    stats = Stats()
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
                images, masks, labels = batch.images, batch.masks, batch.labels
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
                    visualize = mask is not None and stats.samples < visualizations
                    row, files = _sample_row(out, name, image, mask, visualize)
                    row.update(index=indices[i], key=batch.keys[i], label=labels[i])
                    row.update(original_width=widths[i], original_height=heights[i])
                    if mask is not None:
                        row["classes"] = " ".join(map(str, stats.add_mask(mask)))
                    pending.append(pool.submit(_write_sample, image, mask, files))
                    while len(pending) > _IN_FLIGHT:
                        pending.pop(0).result()
                    stats.add_sample(meta, (widths[i], heights[i]), image.shape)
                    flat = {k: v for k, v in meta.items() if not isinstance(v, (dict, list))}
                    row[label_name] = row.pop("label")
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
    _write_statistics(out, stats, failures, total, max_side, seconds, names)
    if on_error == "warn":
        for key, message in failures:
            warnings.warn(SampleWarning(message, key), stacklevel=2)
    return ExportResult(out, stats.samples, len(failures), seconds)
