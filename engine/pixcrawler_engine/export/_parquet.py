"""The `parquet` export format: Hugging Face-style shards; `datasets` reads an `Image` feature.

Layout, under `<output-dir>/<job_id>/`:

    data/train-<position:05d>-of-<chunks:05d>.parquet    one shard per non-empty chunk

Each shard is written by `pyarrow.parquet.ParquetWriter`, one row group per piece as it
arrives, so memory holds one piece, never the dataset. Columns:

    image        struct<bytes: binary, path: string>, the struct `datasets.Image` stores:
                 the original file bytes and key (no decoding), or, with an image size, a
                 lossless PNG of exactly the pixels the engine decoded (path null)
    label        int64 class index (`ClassLabel` of the job's labels) when the job lists its
                 classes, else int64 / string / JSON text, fixed by the first sample written
    key, index, chunk, orig_width, orig_height, metadata (JSON text of the other fields)

The schema carries the `huggingface` metadata that `datasets` itself writes, so
`datasets.load_dataset("parquet", data_files=...)` gives `Image()` and `ClassLabel(names=...)`
features; pandas, pyarrow and DuckDB read the files as plain Parquet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pixcrawler_engine._errors import PixCrawlerError
from pixcrawler_engine.export._writers import FormatWriter, Piece

__all__ = ["ParquetWriter", "parquet_schema"]

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_LABEL_TYPES = {"class": pa.int64(), "int": pa.int64(), "str": pa.string(), "json": pa.string()}
_OTHER = [
    ("key", pa.string(), "string"),
    ("index", pa.int64(), "int64"),
    ("chunk", pa.int32(), "int32"),
    ("orig_width", pa.int32(), "int32"),
    ("orig_height", pa.int32(), "int32"),
    ("metadata", pa.string(), "string"),
]


def parquet_schema(label_kind: str, classes: Sequence[str]) -> pa.Schema:
    """The shard schema, with the `huggingface` features metadata `datasets` reads back.

    Args:
        label_kind: `class` (index into `classes`), `int`, `str` or `json`.
        classes: the class names, for `class`.
    """
    if label_kind == "class":
        label_feature: dict[str, Any] = {"names": list(classes), "_type": "ClassLabel"}
    else:
        dtype = "int64" if label_kind == "int" else "string"
        label_feature = {"dtype": dtype, "_type": "Value"}
    features: dict[str, Any] = {"image": {"_type": "Image"}, "label": label_feature}
    fields = [pa.field("image", _IMAGE), pa.field("label", _LABEL_TYPES[label_kind])]
    for name, arrow_type, dtype in _OTHER:
        fields.append(pa.field(name, arrow_type))
        features[name] = {"dtype": dtype, "_type": "Value"}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=meta)


class ParquetWriter(FormatWriter):
    """`parquet`: one shard per chunk, a row group per piece."""

    kind = "parquet"

    def __init__(self, ws: Any, manifest: Any, **kw: Any) -> None:
        super().__init__(ws, manifest, **kw)
        self.decoded = self.policy is not None
        self.classes = [str(c) for c in manifest.labels if isinstance(c, str)]
        if self.classes and len(self.classes) == len(manifest.labels):
            ws.state.setdefault("label_kind", "class")
        self.to_index = {name: i for i, name in enumerate(self.classes)}
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def begin_chunk(self, chunk: int) -> None:
        super().begin_chunk(chunk)
        self.writer = None
        self.rows = 0

    def write(self, piece: Piece) -> None:
        assert self.tmp is not None
        if piece.encoded is not None:
            blobs = piece.encoded
            paths = piece.columns.column("key")
        else:
            assert piece.pixels is not None
            blobs = self.encode_all(piece.pixels)
            paths = pa.nulls(len(piece), pa.string())
        image = pa.StructArray.from_arrays(
            [pa.array(blobs, pa.binary()), paths], fields=list(_IMAGE)
        )
        labels = self._labels(piece)
        schema = self._schema()
        arrays = [image, labels] + [
            piece.columns.column(name).cast(arrow_type) for name, arrow_type, _ in _OTHER
        ]
        table = pa.Table.from_arrays(arrays, schema=schema)
        if self.writer is None:
            self.writer = pq.ParquetWriter(
                self.tmp,
                schema,
                compression={"image.bytes": "NONE", **dict.fromkeys(_COMPRESSED, "SNAPPY")},
                # Image bytes are compressed already, unique, and too large for useful
                # statistics or a dictionary: both would only cost time and space.
                use_dictionary=["key"],
                write_statistics=["label", "index", "chunk", "orig_width", "orig_height"],
            )
        self.writer.write_table(table, row_group_size=max(1, len(piece)))
        self.rows += len(piece)

    def commit_chunk(self) -> None:
        assert self.tmp is not None
        if self.writer is None:  # a chunk without samples: an empty marker, no shard
            self.tmp.write_bytes(b"")
            self.rename_part("empty")
        else:
            self.writer.close()
            self.writer = None
            self.rename_part()

    def abort_chunk(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except (OSError, pa.ArrowException):
                pass  # the part is dropped anyway
            self.writer = None
        super().abort_chunk()

    def finalize(self) -> None:
        data = self.ws.target / "data"
        data.mkdir(exist_ok=True)
        order = self.chunk_order()
        total = len(order)
        for position, chunk in enumerate(order):
            src = self.ws.part(chunk, self.kind)
            if src.exists():  # a shard already moved, or an empty chunk, has no part here
                os.replace(src, data / f"train-{position:05d}-of-{total:05d}.parquet")

    def close(self) -> None:
        self.abort_chunk()
        super().close()

    # ---------------------------------------------------------------------------- labels

    def _schema(self) -> pa.Schema:
        return parquet_schema(self.ws.state["label_kind"], self.classes)

    def _labels(self, piece: Piece) -> pa.Array:
        values = [json.loads(s) for s in piece.columns.column("label").to_pylist()]
        kind = self.ws.state.get("label_kind")
        if kind is None:
            # Fixed by the first samples written, and kept in the state so that a resumed
            # export writes the same schema.
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                kind = "int"
            elif all(isinstance(v, str) for v in values):
                kind = "str"
            else:
                kind = "json"
            self.ws.state["label_kind"] = kind
            self.ws.save()
        keys = piece.columns.column("key").to_pylist()
        if kind == "json":
            return pa.array([json.dumps(v) for v in values], pa.string())
        out: list[Any] = []
        for value, key in zip(values, keys, strict=True):
            if kind == "class" and isinstance(value, str) and value in self.to_index:
                out.append(self.to_index[value])
            elif (kind == "int" and isinstance(value, int) and not isinstance(value, bool)) or (
                kind == "str" and isinstance(value, str)
            ):
                out.append(value)
            else:
                what = "one of the job's labels" if kind == "class" else f"a {kind} like the others"
                raise PixCrawlerError(
                    f"chunk {piece.chunk}, sample {key!r}: label {value!r} is not {what}, so it "
                    "has no place in the Parquet label column; export this job as images or "
                    "numpy (labels.json keeps every label as it is)"
                )
        return pa.array(out, _LABEL_TYPES[kind])


_COMPRESSED = [
    "image.path",
    "label",
    "key",
    "index",
    "chunk",
    "orig_width",
    "orig_height",
    "metadata",
]
