"""The Parquet source: Hugging Face-style Parquet shards as chunks (one chunk per row group).

An address is a local file, folder (every `*.parquet` below it) or glob, a `file://` URL, or
an `http(s)://` URL (or a list of any of these). Remote files are never downloaded whole:
the footer is read with Range requests, then each row group's column chunks
(`_parquet_http`).

Which columns hold what is inferred from the schema (`_parquet_schema`), unless given.

`fetch` makes one row group local as a rows file (`_parquet_rows`): its image and mask bytes
are streamed out of the Parquet column chunk value by value (`_parquet_pages`), so a row group
of several 100 MB images costs a few MiB of memory, not the row group. Rows that cannot be
read (a null cell, a damaged column chunk) become per-sample errors that follow `on_error`;
a file that is not Parquet, or has no image column, is refused when the source is made.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import pyarrow as pa
import pyarrow.parquet as pq

from pixcrawler_engine._errors import DecompressionError, DownloadError
from pixcrawler_engine.sources._base import ChunkOpener, ChunkPlan
from pixcrawler_engine.sources._http import RetryPolicy, http_client
from pixcrawler_engine.sources._record import Record
from pixcrawler_engine.sources.parquet._http import HttpFile
from pixcrawler_engine.sources.parquet._pages import Corrupt, Unsupported, can_stream, stream_values
from pixcrawler_engine.sources.parquet._rows import RowsOpener, RowsWriter, read_index
from pixcrawler_engine.sources.parquet._schema import ColumnChoice, infer_columns, resolve

__all__ = ["ParquetSource"]

_BUFFER = 1 << 20


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
        try:
            self._meta = [self._read_footer(i) for i in range(len(self._files))]
        finally:
            self.close()  # the footers are read; the supervisor opens its own connections
            self._cancel = threading.Event()
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

    def describe(self) -> dict[str, Any]:
        """What a dataset summary shows: samples, chunks, rows per chunk, bytes, labels."""
        return {
            "num_images": len(self),
            "num_chunks": len(self._plans),
            "chunk_size": max((p.num_records for p in self._plans), default=0),
            "size_bytes": sum(p.size_bytes for p in self._plans),
            "labels": self.labels,
            "files": self.files,
            "columns": dataclasses.asdict(self.columns),
        }

    def __getstate__(self) -> dict[str, Any]:
        # The connection pool and the event stay behind; the supervisor makes its own.
        state = dict(self.__dict__)
        state["_client"] = None
        state["_cancel"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cancel = threading.Event()

    def split_token(self) -> tuple[ParquetSource, str | None]:
        """A copy without the token, and the token: for runtimes that ship them apart."""
        clone = copy.copy(self)
        clone._token = None
        return clone, self._token

    def with_token(self, token: str | None) -> ParquetSource:
        """A copy that sends `token` to the files' origin (None: no token)."""
        clone = copy.copy(self)
        clone._token = token
        return clone

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
            # A raw stream reading in order: all that its readers use of a binary file.
            return cast(BinaryIO, self._http(f).stream(start, length))
        handle = open(file.location, "rb")  # noqa: SIM115 - the caller's `with` closes it
        handle.seek(start)
        return handle
