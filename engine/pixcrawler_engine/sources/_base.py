"""Sources: a dataset address becomes an ordered list of chunks, and a chunk becomes records.

A source has two halves. The supervisor half (`Source`) plans the chunks, fetches one to a local
file and lists its records; it may hold credentials. The worker half (`ChunkOpener`, from
`Source.opener()`) only opens a local chunk file and reads one record's encoded bytes; it holds no
secret, because it is sent to every worker process.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from zlib import error as zlib_error

from pixcrawler_engine._errors import DecodeError, DecompressionError
from pixcrawler_engine.sources._listing import ManifestRecords, check_lines
from pixcrawler_engine.sources._record import Record
from pixcrawler_engine.sources._zipdir import Stored, read_stored, stored_member, stored_members

__all__ = [
    "ChunkOpener",
    "ChunkPlan",
    "ChunkReader",
    "JobSource",
    "Source",
    "SourceWrapper",
    "SubsetSource",
    "ZipOpener",
]

# Caps on untrusted archives: a member larger than this, or compressed more than this ratio,
# is refused before it is read.
MAX_MEMBER_BYTES = 1 << 30
MAX_COMPRESSION_RATIO = 200
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class ChunkPlan:
    index: int
    num_records: int
    size_bytes: int
    first_index: int  # the dataset position of the chunk's first record


class ChunkReader(Protocol):
    def read(self, ref: Any) -> bytes | memoryview: ...
    def close(self) -> None: ...


class ChunkOpener(Protocol):
    def open(self, path: str) -> ChunkReader: ...


class Source(Protocol):
    """The supervisor's view of a dataset."""

    def plan(self) -> list[ChunkPlan]: ...
    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        """Makes chunk `chunk` a local file; returns its path and whether the run owns it."""
        ...

    def records(self, chunk: int, path: Path) -> Sequence[Record]: ...
    def opener(self) -> ChunkOpener: ...
    def close(self) -> None: ...


class _ZipReader:
    """A chunk zip opened by a worker: by its own directory walk when every member is plainly
    stored (what `pack` writes; see `_zipdir.stored_members`), else by `zipfile`."""

    def __init__(self, path: str | IO[bytes]) -> None:
        self._path = path
        self._zip: zipfile.ZipFile | None = None
        self._fd: int | None = None
        self._members: dict[bytes, Stored] | None = None
        if isinstance(path, str):
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._members = stored_members(self._fd)
            except OSError as exc:
                if self._fd is not None:
                    os.close(self._fd)
                raise DecompressionError(f"{path} is not a readable zip: {exc}") from exc
        if self._members is None:
            if self._fd is not None:  # zipfile's own file serves both
                os.close(self._fd)
                self._fd = None
            zf = self._open_zip()
            if isinstance(path, str) and zf.fp is not None:
                self._fd = zf.fp.fileno()

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self._path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DecompressionError(f"{self._path} is not a readable zip: {exc}") from exc
        return self._zip

    def read(self, ref: Any) -> bytes | memoryview:
        if self._members is not None and self._fd is not None:
            # surrogatepass: a lone surrogate (valid JSON) matches no name, and zipfile says so.
            name = ref.encode("utf-8", "surrogatepass") if isinstance(ref, str) else None
            where = self._members.get(name) if name is not None else None
            if where is not None and where[2] <= MAX_MEMBER_BYTES:  # its size
                view = read_stored(self._fd, *where)
                if view is not None:
                    return view
            # Missing, over the cap, or a local header or CRC that disagrees: zipfile says.
        zf = self._open_zip()
        try:
            info = zf.getinfo(ref)
        except KeyError as exc:
            raise DecodeError(f"the manifest lists {ref!r} but the chunk has no such file") from exc
        _check_member(info)
        stored = self._read_stored(info)
        if stored is not None:
            return stored
        try:
            with zf.open(info) as member:
                # The header's size may lie (a zip bomb): never read past what it declares.
                data = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib_error) as exc:
            raise DecodeError(f"{ref!r} cannot be extracted from the chunk: {exc}") from exc
        except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
            raise DecodeError(
                f"{ref!r} cannot be extracted from the chunk ({exc}); chunks must hold plain "
                "stored or deflated files"
            ) from exc
        if len(data) != info.file_size:
            raise DecodeError(
                f"{ref!r} extracts to {'more' if len(data) > info.file_size else 'fewer'} bytes "
                f"than its zip header says ({info.file_size}); the chunk is malformed or hostile"
            )
        return data

    def _read_stored(self, info: zipfile.ZipInfo) -> memoryview | None:
        """A stored member read in one `pread`, as zipfile would read it (what `pack`
        writes; ~25 us less per member than `ZipFile.open`). None: anything unusual (another
        method, a header that disagrees, a bad CRC), which zipfile then reads or explains."""
        if (
            self._fd is None
            or info.compress_type != zipfile.ZIP_STORED
            or info.flag_bits & 0x1  # encrypted
            or info.compress_size != info.file_size
        ):
            return None
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        return read_stored(self._fd, name, info.header_offset, info.file_size, info.CRC)

    def close(self) -> None:
        if self._members is not None and self._fd is not None:
            os.close(self._fd)  # its own file (zipfile closes its file itself)
        self._fd = None
        if self._zip is not None:
            self._zip.close()


@dataclass(frozen=True)
class ZipOpener:
    """Opens chunk zips in workers."""

    def open(self, path: str | IO[bytes]) -> ChunkReader:
        return _ZipReader(path)


def _check_member(info: zipfile.ZipInfo) -> None:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # zipfile bounds only deflate's output per read; bzip2 and lzma members could expand
        # without limit in one call, whatever their header claims.
        raise DecodeError(
            f"{info.filename!r} uses zip compression method {info.compress_type}; chunks must "
            "hold stored or deflated files (`pixcrawler pack` stores them)"
        )
    if info.file_size > MAX_MEMBER_BYTES:
        raise DecodeError(
            f"{info.filename!r} would extract to {info.file_size} bytes, over the cap of "
            f"{MAX_MEMBER_BYTES}; the chunk is malformed or hostile"
        )
    if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        raise DecodeError(
            f"{info.filename!r} is compressed {info.file_size / info.compress_size:.0f}:1, "
            f"over the cap of {MAX_COMPRESSION_RATIO}:1 (a zip bomb?)"
        )


def read_zip_manifest(
    path: Path | zipfile.ZipFile, chunk: int, first_index: int
) -> ManifestRecords:
    """Reads and checks `manifest.jsonl` of a chunk zip (a path or an open ZipFile); its
    records are built when first read (NOTE [manifest lines] in `_listing`).

    Raises:
        DecompressionError: the zip or its manifest is unreadable, a line is not an object
            with a string `file`, or a file is listed twice. A listed file missing from the
            zip is left to the worker, which reports it as one bad sample.
    """
    name = path.filename if isinstance(path, zipfile.ZipFile) else path.name
    raw = None if isinstance(path, zipfile.ZipFile) else _fast_manifest(path)
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecompressionError(
                f"chunk {chunk} ({name}) cannot be read as a zip: {exc}", chunk_id=chunk
            ) from exc
        return ManifestRecords(check_lines(text, chunk), chunk, first_index)
    try:
        zf = path if isinstance(path, zipfile.ZipFile) else zipfile.ZipFile(path)
        with zf:
            info = zf.getinfo("manifest.jsonl")
            if info.file_size > MAX_MANIFEST_BYTES:
                raise DecompressionError(
                    f"chunk {chunk}: manifest.jsonl is {info.file_size} bytes, over the cap",
                    chunk_id=chunk,
                )
            try:
                _check_member(info)
            except DecodeError as exc:
                raise DecompressionError(f"chunk {chunk}: {exc}", chunk_id=chunk) from exc
            with zf.open(info) as member:
                raw = member.read(info.file_size + 1)
            if len(raw) != info.file_size:
                raise DecompressionError(
                    f"chunk {chunk}: manifest.jsonl does not extract to the size its zip header "
                    "says; the chunk is malformed or hostile",
                    chunk_id=chunk,
                )
            text = raw.decode("utf-8")
    except KeyError as exc:
        raise DecompressionError(
            f"chunk {chunk} has no manifest.jsonl; re-pack it with `pixcrawler pack`",
            chunk_id=chunk,
        ) from exc
    except (
        OSError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        EOFError,
        RuntimeError,
        NotImplementedError,
        zlib_error,
    ) as exc:
        raise DecompressionError(
            f"chunk {chunk} ({name}) cannot be read as a zip: {exc}", chunk_id=chunk
        ) from exc
    return ManifestRecords(check_lines(text, chunk), chunk, first_index)


def _fast_manifest(path: Path) -> bytes | None:
    try:
        return stored_member(path, "manifest.jsonl", MAX_MANIFEST_BYTES)
    except OSError:
        return None  # zipfile then says what is wrong


class JobSource:
    """A PixCrawler job behind the job API (`http(s)://`) or in a local store (`file://`)."""

    def __init__(self, client: Any, manifest: Any) -> None:
        self._client = client
        self.manifest = manifest
        offsets = 0
        self._plans = []
        for c in manifest.chunks:
            self._plans.append(ChunkPlan(c.index, c.num_images, c.size_bytes, offsets))
            offsets += c.num_images
        self._by_index = {c.index: c for c in manifest.chunks}

    def plan(self) -> list[ChunkPlan]:
        return list(self._plans)

    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        path = Path(self._client.fetch_chunk(self._by_index[chunk], workdir))
        return path, path.resolve().is_relative_to(workdir.resolve())

    def records(self, chunk: int, path: Path) -> ManifestRecords:
        plan = next(p for p in self._plans if p.index == chunk)
        records = read_zip_manifest(path, chunk, plan.first_index)
        if len(records) != plan.num_records:
            raise DecompressionError(
                f"chunk {chunk}: manifest.jsonl lists {len(records)} samples but the job says "
                f"{plan.num_records}; the chunk does not belong to this job version",
                chunk_id=chunk,
            )
        return records

    def opener(self) -> ChunkOpener:
        return ZipOpener()

    def close(self) -> None:
        self._client.close()


class SourceWrapper:
    """A source that passes every call to `self.source`; subclasses change what they need."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def plan(self) -> list[ChunkPlan]:
        return self.source.plan()

    def fetch(self, chunk: int, workdir: Path) -> tuple[Path, bool]:
        return self.source.fetch(chunk, workdir)

    def records(self, chunk: int, path: Path) -> Sequence[Record]:
        return self.source.records(chunk, path)

    def opener(self) -> ChunkOpener:
        return self.source.opener()

    def close(self) -> None:
        self.source.close()


class SubsetSource(SourceWrapper):
    """Only some chunks of another source, in the given order (shards, resumed exports)."""

    def __init__(self, source: Source, chunks: list[int]) -> None:
        super().__init__(source)
        wanted = set(chunks)
        by_index = {p.index: p for p in source.plan()}
        missing = wanted - by_index.keys()
        if missing:
            raise ValueError(f"no such chunks in the source: {sorted(missing)}")
        self._plans = [by_index[i] for i in chunks]

    def plan(self) -> list[ChunkPlan]:
        return list(self._plans)
