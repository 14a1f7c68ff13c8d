"""The `numpy`, `images` and `zip` export formats: their parts, and their final layout.

Layouts, under `<output-dir>/<job_id>/`:

    numpy    images.npy      uint8 (N, H, W, C), written in place through a memory map, so
                             an export larger than RAM works; rows in dataset order
             labels.npy      int64 (N,): the class index of a str label (`labels.json`
                             `classes`), the label itself for int labels, else -1
             labels.json     {"classes": [...], "labels": [every label as the manifest says]}
             metadata.jsonl  one line a sample: index, key, label, chunk, orig_width,
                             orig_height, metadata (the manifest's other fields)
    images   <label>/<index>.<ext>   the original file (no decoding), or a PNG of the decoded
                                     pixels when an image size is given; label folders are
                                     `safe_name`s: never a path outside the export
             metadata.csv            path, label, index, key, chunk, orig_width, orig_height,
                                     metadata
    zip      chunks/<index>.zip      the chunk files as the job serves them, sha256-verified
             job.json                the job manifest, chunk urls relative to it

A writer owns what it writes in the export folder; `Workspace` owns `.pixcrawler/`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine.decode._formats import FORMAT_EXTENSIONS
from pixcrawler_engine.export._state import Workspace, safe_name
from pixcrawler_engine.export._writers import FormatWriter, Piece, label_text
from pixcrawler_engine.sources._record import Record

__all__ = ["ImagesWriter", "NumpyWriter", "ZipWriter"]

# Files the export writes beside the label folders of the `images` format.
_RESERVED = frozenset({"metadata.csv", "labels.json", "job.json"})
_EXT_OK = frozenset({*FORMAT_EXTENSIONS.values(), ".jpeg", ".tiff", ".pgm", ".pbm", ".pnm"})
_CSV_HEADER = ["path", "label", "index", "key", "chunk", "orig_width", "orig_height", "metadata"]


class NumpyWriter(FormatWriter):
    """`numpy`: images.npy (memory-mapped), labels.npy, labels.json, metadata.jsonl."""

    kind = "jsonl"
    decoded = True

    def __init__(self, ws: Workspace, manifest: Any, **kw: Any) -> None:
        super().__init__(ws, manifest, **kw)
        self.check(self.policy)
        assert self.policy is not None and self.policy.fixed_shape is not None, (
            "the driver gives numpy an image size (see export._size)"
        )
        self.shape = self.policy.fixed_shape
        self.images: np.memmap | None = None
        self.lines: list[str] = []

    @property
    def total(self) -> int:
        """Rows of images.npy: every selected sample (fewer once bad ones are dropped)."""
        if self.order is not None:
            return int(self.order.total)
        return sum(c.num_images for c in self.manifest.chunks)

    @classmethod
    def check(cls, policy: DecodePolicy | None) -> None:
        if (
            policy is None
            or policy.color == "keep"
            or (policy.image_size is not None and policy.fixed_shape is None)
        ):
            raise ValueError(
                "the numpy format needs one shape for every image: decode to color='RGB' or "
                "'L', and resize with stretch, crop or pad, not fit"
            )

    def begin(self) -> None:
        path = self.ws.meta / "images.npy"
        if not path.exists():
            tmp = path.with_name(".images.npy.tmp")
            # A sparse file: creating it costs nothing, whatever N is.
            mm = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(self.total, *self.shape)
            )
            del mm
            os.replace(tmp, path)
        images = np.lib.format.open_memmap(path, mode="r+")
        if images.shape != (self.total, *self.shape) or images.dtype != np.uint8:
            raise ValueError(
                f"{path} has shape {images.shape}, expected {(self.total, *self.shape)}"
            )
        self.images = images

    def begin_chunk(self, chunk: int) -> None:
        super().begin_chunk(chunk)
        self.lines = []

    def write(self, piece: Piece) -> None:
        assert self.images is not None and isinstance(piece.pixels, np.ndarray)
        rows = self._rows(piece.chunk, piece.columns.column("index").to_numpy())
        first = int(rows[0])
        if np.array_equal(rows, np.arange(first, first + len(rows))):
            self.images[first : first + len(rows)] = piece.pixels
        else:
            self.images[rows] = piece.pixels
        self.lines.extend(json.dumps(row) + "\n" for row in piece.rows())

    def _rows(self, chunk: int, indices: np.ndarray) -> np.ndarray:
        """The rows of images.npy that samples of `chunk` (by dataset index) go to."""
        return indices if self.order is None else self.order.rows(chunk, indices)

    def commit_chunk(self) -> None:
        assert self.tmp is not None
        # The pixels are in the page cache of a shared mapping: they outlive this process
        # even if it is killed now, so the part may be committed without an msync.
        self.tmp.write_text("".join(self.lines), encoding="utf-8")
        self.rename_part()

    def finalize(self) -> None:
        target = self.ws.target
        classes = [label for label in self.manifest.labels if isinstance(label, str)]
        labels: list[Any] = []
        rows: list[int] = []  # the row of images.npy each line's image is in
        with open(_tmp_name(target / "metadata.jsonl"), "w", encoding="utf-8") as out:
            for part in self._committed():
                with open(part, encoding="utf-8") as f:
                    for line in f:
                        sample = json.loads(line)
                        labels.append(sample["label"])
                        index = np.array([sample["index"]])
                        rows.append(int(self._rows(sample["chunk"], index)[0]))
                        out.write(line)
        os.replace(out.name, target / "metadata.jsonl")
        extra = sorted({lb for lb in labels if isinstance(lb, str)} - set(classes))
        classes += extra
        to_index = {name: i for i, name in enumerate(classes)}
        only_ints = not classes
        ids = np.array(
            [
                to_index[lb] if isinstance(lb, str)
                else lb if only_ints and isinstance(lb, int) and not isinstance(lb, bool)
                else -1
                for lb in labels
            ],
            dtype=np.int64,
        )  # fmt: skip
        tmp = _tmp_name(target / "labels.npy")
        with open(tmp, "wb") as npy:
            np.save(npy, ids)
        os.replace(tmp, target / "labels.npy")
        Workspace.write_text(
            target / "labels.json", json.dumps({"classes": classes, "labels": labels}) + "\n"
        )
        if self.images is not None:
            self.images.flush()
            self.images = None
        src = self.ws.meta / "images.npy"
        if not src.exists():  # already moved if an earlier run was cut short here
            return
        if len(rows) < self.total:  # samples were left out (on_error skip/warn): close ranks
            _compact(src, rows, target / "images.npy")
            src.unlink()
        else:
            os.replace(src, target / "images.npy")


class ImagesWriter(FormatWriter):
    """`images`: one file per image under one folder per label, and metadata.csv."""

    kind = "dir"

    def __init__(self, ws: Workspace, manifest: Any, **kw: Any) -> None:
        super().__init__(ws, manifest, **kw)
        self.decoded = self.policy is not None
        self.digits = max(6, len(str(max(0, manifest.num_images - 1))))
        self.rows: list[list[Any]] = []
        self.folders: set[str] = set()

    def begin_chunk(self, chunk: int) -> None:
        super().begin_chunk(chunk)
        assert self.tmp is not None
        self.tmp.mkdir()
        self.rows, self.folders = [], set()

    def write(self, piece: Piece) -> None:
        assert self.tmp is not None
        if piece.encoded is not None:
            blobs, suffixes = piece.encoded, None
        else:
            assert piece.pixels is not None
            blobs, suffixes = self.encode_all(piece.pixels), ".png"
        for row, blob in zip(piece.rows(), blobs, strict=True):
            folder = safe_name(label_text(row["label"]), reserved=_RESERVED)
            suffix = suffixes or _suffix(row["key"])
            rel = f"{folder}/{row['index']:0{self.digits}d}{suffix}"
            if folder not in self.folders:
                (self.tmp / folder).mkdir(exist_ok=True)
                self.folders.add(folder)
            (self.tmp / rel).write_bytes(blob)
            self.rows.append(
                [rel, label_text(row["label"]), row["index"], row["key"], row["chunk"],
                 row["orig_width"], row["orig_height"], json.dumps(row["metadata"])]
            )  # fmt: skip

    def commit_chunk(self) -> None:
        assert self.tmp is not None
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(self.rows)
        (self.tmp / "metadata.csv").write_text(buf.getvalue(), encoding="utf-8")
        self.rename_part()

    def finalize(self) -> None:
        target = self.ws.target
        with open(_tmp_name(target / "metadata.csv"), "w", encoding="utf-8", newline="") as out:
            csv.writer(out, lineterminator="\n").writerow(_CSV_HEADER)
            for part in self._committed():
                for folder in sorted(p for p in part.iterdir() if p.is_dir()):
                    dest = target / folder.name
                    dest.mkdir(exist_ok=True)
                    for file in folder.iterdir():
                        os.replace(file, dest / file.name)
                with open(part / "metadata.csv", encoding="utf-8") as f:
                    shutil.copyfileobj(f, out)
        os.replace(out.name, target / "metadata.csv")


class ZipWriter(FormatWriter):
    """`zip`: the chunk files themselves (verified by their sha256 when fetched) and job.json."""

    kind = "zip"
    needs_records = False

    def chunk_file(
        self, chunk: int, path: Path, records: Sequence[Record] | None, *, owned: bool, rows: int
    ) -> int:
        self.begin_chunk(chunk)
        assert self.tmp is not None
        try:
            if owned:
                os.replace(path, self.tmp)  # our own download: a rename, not a copy
            else:
                shutil.copyfile(path, self.tmp)
            self.rename_part()
        except BaseException:
            self.abort_chunk()
            raise
        return next(c.num_images for c in self.manifest.chunks if c.index == chunk)

    def finalize(self) -> None:
        target = self.ws.target
        (target / "chunks").mkdir(exist_ok=True)
        chunks = []
        for info in self.manifest.chunks:
            dest = target / "chunks" / f"{info.index}.zip"
            src = self.ws.part(info.index, self.kind)
            if src.exists():
                os.replace(src, dest)
            chunks.append(
                {
                    "index": info.index,
                    "url": f"chunks/{info.index}.zip",
                    "num_images": info.num_images,
                    "size_bytes": info.size_bytes,
                    "sha256": info.sha256,
                }
            )
        m = self.manifest
        job = {
            "job_id": m.job_id,
            "status": m.status,
            "progress": m.progress,
            "created_at": m.created_at,
            "num_images": m.num_images,
            "chunk_size": m.chunk_size,
            "size_bytes": m.size_bytes,
            "labels": list(m.labels),
            "version": m.version,
            "chunks": chunks,
        }
        Workspace.write_text(target / "job.json", json.dumps(job, indent=1) + "\n")


def _compact(src: Path, rows: list[int], dest: Path) -> None:
    """Writes `dest` holding the rows of `src` listed in `rows`, in that order.

    `src` is only read, so this step is idempotent: a run killed here does it again.
    """
    images = np.lib.format.open_memmap(src, mode="r")
    tmp = _tmp_name(dest)
    shape = (len(rows), *images.shape[1:])
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    block = max(1, (64 << 20) // max(1, int(np.prod(images.shape[1:]))))
    for start in range(0, len(rows), block):
        out[start : start + block] = images[rows[start : start + block]]
    out.flush()
    del out, images
    os.replace(tmp, dest)


def _suffix(key: str) -> str:
    """The extension of a sample's file, from its (untrusted) key: a known image one or `.bin`."""
    suffix = os.path.splitext(key)[1].lower()
    return suffix if suffix in _EXT_OK else ".bin"


def _tmp_name(path: Path) -> str:
    return os.fspath(path.with_name(f".{path.name}.tmp"))
