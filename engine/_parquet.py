"""The Parquet source: Hugging Face-style Parquet shards as chunks (one chunk per row group).

An address is a local file, folder (every `*.parquet` below it) or glob, a `file://` URL, or
an `http(s)://` URL (or a list of any of these). Remote files are never downloaded whole:
the footer is read with Range requests, then each row group's column chunks
(`_parquet_http`).

Which columns hold what is read from the schema and its `huggingface` metadata, unless given:

    image     an `Image` feature (`struct<bytes: binary, path: string>`) or a binary column;
              one named `image`/`img` first
    mask      another image column named like a mask (`mask`, `annotation`, `segmentation`,
              not `rgb`/`color`): class ids, decoded without interpolation
    label     a `ClassLabel` feature (its names become the labels), else `label`/`labels`
    metadata  every other column that is not image bytes (material, content, ...), as JSON

`fetch` makes one row group local as a rows file (`_parquet_rows`): its image and mask bytes
are streamed out of the Parquet column chunk value by value (`_parquet_pages`), so a row group
of several 100 MB images costs a few MiB of memory, not the row group. Rows that cannot be
read (a null cell, a damaged column chunk) become per-sample errors that follow `on_error`;
a file that is not Parquet, or has no image column, is refused when the source is made.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.parquet as pq

from pixcrawler.engine._download import RetryPolicy, http_client, redact_url
from pixcrawler.engine._errors import DecompressionError, DownloadError
from pixcrawler.engine._parquet_http import HttpFile
from pixcrawler.engine._parquet_pages import Corrupt, Unsupported, can_stream, stream_values
from pixcrawler.engine._parquet_rows import RowsOpener, RowsWriter, read_index
from pixcrawler.engine._protocol import Record
from pixcrawler.engine._sources import ChunkOpener, ChunkPlan

__all__ = ["Columns", "ParquetSource", "infer_columns", "resolve"]

_BUFFER = 1 << 20
_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "photo", "picture")
_MASK_WORDS = ("mask", "annotation", "segmentation", "seg")
_NOT_MASK_WORDS = ("rgb", "color", "colour", "vis", "overlay", "preview")
_LABEL_NAMES = ("label", "labels", "class", "category")
ColumnChoice = str | Literal[False] | None


@dataclass(frozen=True)
class _File:
    location: str  # a local path or a URL
    name: str  # unique among the source's files: the start of every key
    remote: bool


@dataclass(frozen=True)
class Columns:
    """The roles of a Parquet schema's columns.

    Attributes:
        image: the image column; `image_struct` says whether it is `struct<bytes, path>`.
        mask: the mask column, or None.
        label: the label column, or None; `label_names` are a ClassLabel's names.
        metadata: the columns passed on as each sample's metadata.
    """

    image: str
    image_struct: bool
    mask: str | None = None
    mask_struct: bool = False
    label: str | None = None
    label_names: tuple[str, ...] | None = None
    metadata: tuple[str, ...] = ()


def resolve(address: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[_File]:
    """The Parquet files an address names, in order (globs and folders sorted by path).

    Raises:
        FileNotFoundError: a local path or glob that matches no file.
        ValueError: a glob in an HTTP URL (list the URLs instead).
    """
    items = [address] if isinstance(address, (str, os.PathLike)) else list(address)
    if not items:
        raise ValueError("no Parquet address given")
    files: list[tuple[str, bool]] = []
    for item in items:
        text = os.fspath(item)
        if text.startswith(("http://", "https://")):
            if glob.has_magic(urlsplit(text).path):
                raise ValueError(
                    f"{redact_url(text)}: globs work on local paths only; list the URLs"
                )
            files.append((text, True))
            continue
        if text.startswith("file://"):
            text = url2pathname(urlsplit(text).path)
        path = os.path.expanduser(text)
        if glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).rglob("*.parquet") if p.is_file())
        elif os.path.isfile(path):
            found = [path]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"no Parquet file at {text!r}")
        files.extend((os.path.abspath(p), False) for p in found)
    return _named(files)


def _named(files: list[tuple[str, bool]]) -> list[_File]:
    """Names files by the shortest path tail that tells them apart (the keys' prefix)."""
    parts = [
        unquote(urlsplit(loc).path).strip("/").split("/") if remote else Path(loc).parts
        for loc, remote in files
    ]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    if len(set(names)) != len(names):
        raise ValueError("the same Parquet file is listed twice")
    return [_File(loc, name, remote) for (loc, remote), name in zip(files, names, strict=True)]


def _hf_features(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_struct(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t) or t.get_field_index("bytes") < 0:
        return False
    return _is_binary(t.field("bytes").type)


def infer_columns(
    schema: pa.Schema,
    *,
    image_column: str | None = None,
    mask_column: ColumnChoice = None,
    label_column: ColumnChoice = None,
) -> Columns:
    """Picks the image, mask, label and metadata columns of a schema (see the module doc).

    Args:
        schema: the Arrow schema of the Parquet files (with its `huggingface` metadata).
        image_column: the image column; None infers it.
        mask_column: the mask column; None infers one if any, False means none.
        label_column: the label column; None infers one if any, False means none.

    Raises:
        ValueError: no image column, or a named column that is missing or of the wrong type.
    """
    features = _hf_features(schema)
    names = schema.names
    candidates = [f.name for f in schema if _is_image_struct(f.type) or _is_binary(f.type)]
    listing = ", ".join(f"{f.name} ({f.type})" for f in schema)

    def pick(name: str, what: str) -> str:
        if name not in names:
            raise ValueError(f"no column {name!r} for the {what}; the columns are: {listing}")
        if name not in candidates:
            raise ValueError(
                f"column {name!r} is {schema.field(name).type}, not image bytes "
                "(struct<bytes: binary, path: string> or binary)"
            )
        return name

    def mask_like(name: str) -> bool:
        low = name.lower()
        return any(w in low for w in _MASK_WORDS) and not any(w in low for w in _NOT_MASK_WORDS)

    if image_column is not None:
        image = pick(image_column, "images")
    else:
        hf = [n for n in candidates if features.get(n, {}).get("_type") == "Image"]
        ordered = hf + [n for n in candidates if n not in hf]
        named = [n for n in ordered if n.lower() in _IMAGE_NAMES]
        plain = [n for n in ordered if not mask_like(n)]
        if not ordered:
            raise ValueError(
                "this Parquet data has no image column (a struct<bytes: binary, path: string> "
                f"or binary column); its columns are: {listing}"
            )
        image = (named or plain or ordered)[0]
    mask: str | None = None
    if isinstance(mask_column, str):
        mask = pick(mask_column, "masks")
        if mask == image:
            raise ValueError(f"column {mask!r} cannot be both the image and the mask")
    elif mask_column is None:
        mask = next((n for n in candidates if n != image and mask_like(n)), None)
    label: str | None = None
    label_names: tuple[str, ...] | None = None
    if isinstance(label_column, str):
        if label_column not in names:
            raise ValueError(
                f"no column {label_column!r} for the labels; the columns are: {listing}"
            )
        if label_column in candidates:
            raise ValueError(f"column {label_column!r} holds bytes, not labels")
        label = label_column
    elif label_column is None:
        class_labels = [
            n
            for n in names
            if features.get(n, {}).get("_type") == "ClassLabel" and n not in candidates
        ]
        plain_labels = [n for n in names if n.lower() in _LABEL_NAMES and n not in candidates]
        label = (class_labels or plain_labels or [None])[0]
    if label is not None and features.get(label, {}).get("_type") == "ClassLabel":
        raw = features[label].get("names")
        label_names = tuple(str(n) for n in raw) if isinstance(raw, list) else None
    taken = {image, mask, label}
    metadata = tuple(n for n in names if n not in taken and n not in candidates)
    return Columns(
        image=image,
        image_struct=_is_image_struct(schema.field(image).type),
        mask=mask,
        mask_struct=mask is not None and _is_image_struct(schema.field(mask).type),
        label=label,
        label_names=label_names,
        metadata=metadata,
    )


class ParquetSource:
    """Hugging Face-style Parquet shards as a source: one chunk per row group.

    Example:
        >>> source = ParquetSource("data/train-*.parquet")
        >>> with Stream(source, config=EngineConfig(), policy=DecodePolicy()) as stream:
        ...     for batch in stream:
        ...         use(batch.images, batch.masks)

    Args:
        address: a path, folder, glob, `file://` or `http(s)://` URL, or a list of them.
        image_column: the image column (inferred if None).
        mask_column: the mask column (inferred if None; False for none).
        label_column: the label column (inferred if None; False for none).
        token: a bearer token sent to the files' origin (a private Hugging Face dataset).
        timeout: seconds an HTTP request may go without progress.
        retries: attempts per HTTP request, the first included.
        backoff: base of the exponential backoff between attempts, in seconds.
        verify_ssl: verify TLS certificates (or a CA bundle's path).

    Raises:
        FileNotFoundError: nothing at a local address.
        DecompressionError: a file is not Parquet, or its columns differ from the first's.
        DownloadError: a remote footer could not be read.
        ValueError: no image column, or a named column is missing or not image bytes.
    """

    def __init__(
        self,
        address: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        image_column: str | None = None,
        mask_column: ColumnChoice = None,
        label_column: ColumnChoice = None,
        token: str | None = None,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.5,
        verify_ssl: bool | str = True,
    ) -> None:
        self._files = resolve(address)
        self._token = token
        self._timeout = timeout
        self._verify = verify_ssl
        self._retry = RetryPolicy(attempts=retries, backoff=backoff)
        self._client: Any = None
        self._cancel = threading.Event()
        self._remote: dict[int, tuple[int, str | None]] = {}  # file -> (size, etag)
        self._meta = [self._read_footer(i) for i in range(len(self._files))]
        schema = self._meta[0].schema.to_arrow_schema()
        self.columns = infer_columns(
            schema, image_column=image_column, mask_column=mask_column, label_column=label_column
        )
        self._leaves = self._check_schemas(schema)
        self._chunks: list[tuple[int, int, int]] = []  # (file, row group, first row in file)
        self._plans: list[ChunkPlan] = []
        total = 0
        for f, meta in enumerate(self._meta):
            row = 0
            for rg in range(meta.num_row_groups):
                group = meta.row_group(rg)
                size = sum(group.column(j).total_compressed_size for j in self._leaves[f])
                self._plans.append(ChunkPlan(len(self._plans), group.num_rows, size, total))
                self._chunks.append((f, rg, row))
                row += group.num_rows
                total += group.num_rows

    # ---- what the source is ----------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """The class names, in index order, when the label column is a ClassLabel."""
        return list(self.columns.label_names or ())

    @property
    def files(self) -> list[str]:
        """The files read, by the name keys start with."""
        return [f.name for f in self._files]

    def __len__(self) -> int:
        return sum(p.num_records for p in self._plans)

    def __getstate__(self) -> dict[str, Any]:
        # The connection pool and the event stay behind; the supervisor makes its own.
        state = dict(self.__dict__)
        state["_client"] = None
        state["_cancel"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cancel = threading.Event()

    # ---- Source ---------------------------------------------------------------------------
    def plan(self) -> list[ChunkPlan]:
        return list(self._plans)

    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        """Streams row group `chunk` into a rows file in `workdir` (owned by the run)."""
        f, rg, first_row = self._chunks[chunk]
        file = self._files[f]
        n = self._meta[f].row_group(rg).num_rows
        writer = RowsWriter(Path(workdir) / f"pq-{chunk}.rows")
        try:
            keys = [f"{file.name}:{first_row + i}" for i in range(n)]
            labels, metadata = self._small_columns(f, rg, n)
            c = self.columns
            images = self._binary_column(f, rg, c.image, c.image_struct, writer)
            masks: list[Any] = [None] * n
            if c.mask is not None:
                masks = self._binary_column(f, rg, c.mask, c.mask_struct, writer)
            rows = [list(r) for r in zip(keys, labels, metadata, images, masks, strict=True)]
            return writer.finish(rows), True
        except DownloadError as exc:
            writer.abort()
            raise DownloadError(f"chunk {chunk} (row group {rg} of {file.name}): {exc}",
                                chunk_id=chunk) from exc  # fmt: skip
        except BaseException:
            writer.abort()
            raise

    def records(self, chunk: int, path: Path) -> list[Record]:
        return read_index(Path(path), chunk, self._plans[chunk].first_index)

    def opener(self) -> ChunkOpener:
        return RowsOpener()

    def close(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        if self._client is not None:
            self._client.close()
            self._client = None

    # ---- reading --------------------------------------------------------------------------
    def _http(self, f: int) -> HttpFile:
        if self._client is None:
            self._client = http_client(
                self._files[f].location, self._token, timeout=self._timeout, verify=self._verify
            )
        size, etag = self._remote.get(f, (-1, None))
        return HttpFile(self._client, self._files[f].location, self._retry, self._cancel,
                        size, etag)  # fmt: skip

    @contextlib.contextmanager
    def _random_access(self, f: int) -> Iterator[Any]:
        file = self._files[f]
        if file.remote:
            yield self._http(f).random_access()
        else:
            with open(file.location, "rb") as handle:
                yield handle

    def _read_footer(self, f: int) -> pq.FileMetaData:
        file = self._files[f]
        if file.remote:
            http = self._http(f).open()
            self._remote[f] = (http.size, http.etag)
        try:
            with self._random_access(f) as handle:
                return pq.read_metadata(handle)
        except (pa.ArrowException, OSError) as exc:
            if isinstance(exc, DownloadError):
                raise
            raise DecompressionError(
                f"{file.name} is not a readable Parquet file: {exc}", chunk_id=file.name
            ) from exc

    def _check_schemas(self, first: pa.Schema) -> list[list[int]]:
        """The leaf column indices each file's chunks read; refuses files that differ."""
        c = self.columns
        wanted = [c.image, c.mask, c.label, *c.metadata]
        leaves = []
        for file, meta in zip(self._files, self._meta, strict=True):
            schema = meta.schema.to_arrow_schema()
            for name in filter(None, wanted):
                if name not in schema.names or schema.field(name).type != first.field(name).type:
                    raise DecompressionError(
                        f"{file.name} does not have column {name!r} as {first.field(name).type}, "
                        f"unlike {self._files[0].name}; pass files of one dataset",
                        chunk_id=file.name,
                    )
            tops = {n for n in wanted if n}
            paths = [meta.schema.column(j).path for j in range(meta.num_columns)]
            leaves.append([j for j, p in enumerate(paths) if p.split(".")[0] in tops])
        return leaves

    def _small_columns(self, f: int, rg: int, n: int) -> tuple[list[Any], list[str]]:
        """The labels and metadata JSON of a row group's rows (a few bytes each)."""
        c = self.columns
        wanted = [x for x in (c.label, *c.metadata) if x]
        if not wanted:
            return [None] * n, ["{}"] * n
        try:
            with self._random_access(f) as handle:
                reader = pq.ParquetFile(handle, metadata=self._meta[f], pre_buffer=True)
                table = reader.read_row_group(rg, columns=wanted, use_threads=False)
        except DownloadError:
            raise
        except (pa.ArrowException, OSError) as exc:
            # The images may still be fine: the rows go on without labels or metadata.
            note = json.dumps({"_error": f"labels and metadata unreadable: {exc}"})
            return [None] * n, [note] * n
        labels: list[Any] = [None] * n
        if c.label is not None:
            names = c.label_names
            raw = table.column(c.label).to_pylist()
            if names:  # a ClassLabel: its name (-1, "no label", and strays become None)
                raw = [names[v] if isinstance(v, int) and 0 <= v < len(names) else None
                       for v in raw]  # fmt: skip
            labels = raw
            labels = json.loads(json.dumps(labels, default=str))
        columns = {name: table.column(name).to_pylist() for name in c.metadata}
        metadata = [
            json.dumps({name: values[i] for name, values in columns.items()}, default=str)
            for i in range(n)
        ]
        return labels, metadata

    def _binary_column(
        self, f: int, rg: int, name: str, is_struct: bool, writer: RowsWriter
    ) -> list[Any]:
        """Streams a row group's values of one image column into `writer`; one ref per row."""
        meta = self._meta[f]
        leaf = f"{name}.bytes" if is_struct else name
        j = next(j for j in range(meta.num_columns) if meta.schema.column(j).path == leaf)
        column = meta.row_group(rg).column(j)
        n = meta.row_group(rg).num_rows
        null = f"its {name!r} cell holds no bytes (null, or only a path to an outside file)"
        refs: list[Any] = []
        start = column.data_page_offset
        if column.has_dictionary_page and column.dictionary_page_offset is not None:
            start = min(start, column.dictionary_page_offset)
        length = column.total_compressed_size
        schema_col = meta.schema.column(j)
        if can_stream(column.compression, tuple(column.encodings), schema_col.max_repetition_level):

            def on_value(size: int) -> Any:
                ref, sink = writer.start_value(size)
                refs.append(ref)
                return sink

            try:
                with self._stream(f, start, length) as stream:
                    stream_values(
                        stream,
                        length,
                        num_rows=n,
                        max_def=schema_col.max_definition_level,
                        on_value=on_value,
                        on_null=lambda: refs.append(null),
                    )
                return refs
            except Unsupported:
                pass  # pyarrow reads the rest below
            except Corrupt as exc:
                return refs + [self._damage(f, rg, name, len(refs), exc)] * (n - len(refs))
        return self._binary_by_pyarrow(f, rg, name, is_struct, writer, refs, null)

    def _binary_by_pyarrow(
        self,
        f: int,
        rg: int,
        name: str,
        is_struct: bool,
        writer: RowsWriter,
        refs: list[Any],
        null: str,
    ) -> list[Any]:
        """The fallback (compressed or dictionary pages): pyarrow holds one page at a time."""
        n = self._meta[f].row_group(rg).num_rows
        done = len(refs)
        row = 0
        try:
            with self._random_access(f) as handle:
                reader = pq.ParquetFile(
                    handle, metadata=self._meta[f], buffer_size=_BUFFER, pre_buffer=False
                )
                batches = reader.iter_batches(
                    batch_size=1, row_groups=[rg], columns=[name], use_threads=False
                )
                for batch in batches:
                    column = batch.column(0)
                    values = column.field("bytes") if is_struct else column
                    for k in range(len(column)):
                        if row >= done:
                            valid = column[k].is_valid and values[k].is_valid
                            refs.append(writer.add_bytes(values[k].as_buffer()) if valid else null)
                        row += 1
        except DownloadError:
            raise
        except (pa.ArrowException, OSError) as exc:
            return refs + [self._damage(f, rg, name, len(refs), exc)] * (n - len(refs))
        if len(refs) != n:
            return refs + [self._damage(f, rg, name, len(refs), "too few values")] * (n - len(refs))
        return refs

    def _damage(self, f: int, rg: int, name: str, row: int, exc: object) -> str:
        return (
            f"row group {rg} of {self._files[f].name} is damaged in column {name!r} from its "
            f"row {row} on ({exc}); re-download the file"
        )

    def _stream(self, f: int, start: int, length: int) -> BinaryIO:
        file = self._files[f]
        if file.remote:
            return self._http(f).stream(start, length)
        handle = open(file.location, "rb")  # noqa: SIM115 - the caller's `with` closes it
        handle.seek(start)
        return handle
