"""Chunk zips read without `zipfile` (`sources._zipdir`), and every case left to it.

The supervisor reads a chunk's manifest, and a worker the chunk's members, by their own walk of
the zip's directory.

The fast path must give exactly what `zipfile` gives, on chunks `pixcrawler pack` wrote from
real images; on any zip that is not plain (a compressed or encrypted manifest, two of them, a
prefix, a comment, a bad CRC) it must step aside, so that `read_zip_manifest` behaves
as before: the same records, or the same error.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from pixcrawler_engine import DecodeError, DecompressionError
from pixcrawler_engine.sources._base import MAX_MANIFEST_BYTES, ZipOpener, read_zip_manifest
from pixcrawler_engine.sources._zipdir import stored_member, stored_members


def _chunks(store: Path) -> list[Path]:
    return sorted((store / "jobs" / "demo" / "chunks").glob("*.zip"))


def test_packed_chunks_read_fast_exactly_as_zipfile_reads_them(store: Path) -> None:
    chunks = _chunks(store)
    assert len(chunks) >= 8
    for path in chunks:
        with zipfile.ZipFile(path) as zf:
            expected = zf.read("manifest.jsonl")
        assert stored_member(path, "manifest.jsonl", MAX_MANIFEST_BYTES) == expected
        assert read_zip_manifest(path, 3, 100) == read_zip_manifest(zipfile.ZipFile(path), 3, 100)


def _rezip(
    path: Path, out: Path, *, deflate: bool = False, comment: bytes = b"", twice: bool = False
) -> Path:
    """The same members written again by `zipfile` with other settings."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", method) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        if twice:
            dst.writestr("manifest.jsonl", b'{"file": "other.png"}\n')
        dst.comment = comment
    return out


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
@pytest.mark.parametrize(
    "case",
    ["deflated", "comment", "prefix", "twice", "zip64", "bad crc", "too big"],
)
def test_any_zip_that_is_not_plain_is_left_to_zipfile(
    store: Path, tmp_path: Path, case: str
) -> None:
    path = _chunks(store)[0]
    out = tmp_path / "odd.zip"
    limit = MAX_MANIFEST_BYTES
    if case == "deflated":
        _rezip(path, out, deflate=True)
    elif case == "comment":
        _rezip(path, out, comment=b"made elsewhere")
    elif case == "prefix":  # a self-extractor's stub before the archive
        out.write_bytes(b"#!/bin/sh\nexit 0\n" + path.read_bytes())
    elif case == "twice":
        _rezip(path, out, twice=True)
    elif case == "zip64":
        buf = io.BytesIO()
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w") as dst:
            for info in src.infolist():
                with dst.open(info.filename, "w", force_zip64=True) as member:
                    member.write(src.read(info))
        out.write_bytes(buf.getvalue())
    elif case == "bad crc":
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("manifest.jsonl")
        data[info.header_offset + 30 + len("manifest.jsonl")] ^= 0x01  # its first byte
        out.write_bytes(bytes(data))
    else:
        out.write_bytes(path.read_bytes())
        limit = 10
    got = stored_member(out, "manifest.jsonl", limit)
    if case == "zip64":  # zip64 local headers, a plain directory: read, and read right
        with zipfile.ZipFile(out) as zf:
            assert got == zf.read("manifest.jsonl")
    else:
        assert got is None
    if case == "bad crc":
        with pytest.raises(DecompressionError, match="cannot be read as a zip"):
            read_zip_manifest(out, 0, 0)
        return
    with zipfile.ZipFile(out) as zf:
        assert read_zip_manifest(out, 0, 0) == read_zip_manifest(zf, 0, 0)


# ---------------------------------------------------------------- members, in the workers


def _read_all(path: Path) -> dict[str, bytes]:
    reader = ZipOpener().open(str(path))
    try:
        with zipfile.ZipFile(path) as zf:
            return {name: bytes(reader.read(name)) for name in zf.namelist()}
    finally:
        reader.close()


def test_a_worker_reads_every_member_of_a_packed_chunk_as_zipfile_does(store: Path) -> None:
    for path in _chunks(store):
        with zipfile.ZipFile(path) as zf, path.open("rb") as f:
            members = stored_members(f.fileno())
            assert members is not None
            assert members == {
                i.orig_filename.encode(): (
                    i.orig_filename.encode(),
                    i.header_offset,
                    i.file_size,
                    i.CRC,
                )
                for i in zf.infolist()
            }
            assert _read_all(path) == {name: zf.read(name) for name in zf.namelist()}


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
@pytest.mark.parametrize("case", ["deflated", "comment", "prefix", "twice"])
def test_a_chunk_that_is_not_plain_is_read_by_zipfile(
    store: Path, tmp_path: Path, case: str
) -> None:
    path, out = _chunks(store)[0], tmp_path / "odd.zip"
    if case == "prefix":
        out.write_bytes(b"#!/bin/sh\nexit 0\n" + path.read_bytes())
    else:
        _rezip(path, out, deflate=case == "deflated", comment=b"x" * (case == "comment"),
               twice=case == "twice")  # fmt: skip
    with out.open("rb") as f:
        assert stored_members(f.fileno()) is None
    with zipfile.ZipFile(out) as zf:
        expected = {name: zf.read(name) for name in zf.namelist()}  # the last of a twice
    assert _read_all(out) == expected


def _renamed(path: Path, out: Path, old: bytes, new: bytes) -> None:
    """A copy of the chunk with member `old` renamed `new` (same length) in both of its
    headers, and no UTF-8 flag (0x800) in any header."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        infos, entry = zf.infolist(), zf.start_dir
    for info in infos:
        raw = info.orig_filename.encode()
        for header, name_at in ((info.header_offset, 30), (entry, 46)):
            flags_at = header + (6 if name_at == 30 else 8)
            data[flags_at + 1] &= ~0x08
            if raw == old:
                data[header + name_at : header + name_at + len(old)] = new
        entry += 46 + len(raw) + len(info.extra) + len(info.comment)
    out.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["cp437 name", "nul in a name"])
def test_a_member_name_the_fast_walk_does_not_know_is_left_to_zipfile(
    store: Path, tmp_path: Path, case: str
) -> None:
    """The walk keys members by their bytes and looks refs up as UTF-8: a name zipfile reads
    as cp437 (no UTF-8 flag, a byte over 127) is missed there and read by zipfile; a name
    with a NUL (which zipfile cuts short) makes the walk give the whole chunk to zipfile."""
    path, out = _chunks(store)[0], tmp_path / "renamed.zip"
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n != "manifest.jsonl")
    odd = name.encode()[:-5] + (b"\x82" if case == "cp437 name" else b"\x00") + b".png"
    _renamed(path, out, name.encode(), odd)
    with out.open("rb") as f:
        members = stored_members(f.fileno())
    if case == "cp437 name":
        assert members is not None and odd in members
    else:
        assert members is None
    with zipfile.ZipFile(out) as zf:
        expected = {n: zf.read(n) for n in zf.namelist()}
    assert (odd.decode("cp437") if case == "cp437 name" else odd[: odd.index(0)].decode()) in (
        expected
    )
    assert _read_all(out) == expected


def test_a_damaged_member_is_named_and_the_others_still_read(store: Path, tmp_path: Path) -> None:
    path, out = _chunks(store)[0], tmp_path / "damaged.zip"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n != "manifest.jsonl"]
        info = zf.getinfo(names[1])
        expected = zf.read(names[2])
    data[info.header_offset + 30 + len(info.orig_filename.encode()) + 40] ^= 0xFF
    out.write_bytes(bytes(data))
    reader = ZipOpener().open(str(out))
    try:
        with pytest.raises(DecodeError, match="Bad CRC-32"):
            reader.read(names[1])
        with pytest.raises(DecodeError, match="no such file"):
            reader.read("not/in/the/chunk.png")
        with pytest.raises(DecodeError, match="no such file"):  # a lone surrogate: valid JSON
            reader.read("\ud800.png")
        assert bytes(reader.read(names[2])) == expected
    finally:
        reader.close()


def test_tasks_carry_manifest_lines_that_workers_build_into_the_same_records(
    store: Path,
) -> None:
    """NOTE [manifest lines]: the supervisor checks a manifest but never builds its records;
    a task carries its lines, and what the worker builds from them is what the chunk lists."""
    from pixcrawler_engine.runtime._epoch import Share, epoch_groups
    from pixcrawler_engine.runtime._schedule import Chunk, build_task
    from pixcrawler_engine.sources._listing import ManifestRecords, RecordLines

    paths = _chunks(store)[:3]
    manifests = [read_zip_manifest(path, i, 1000 * i) for i, path in enumerate(paths)]
    built = [list(read_zip_manifest(path, i, 1000 * i)) for i, path in enumerate(paths)]
    assert all(isinstance(m, ManifestRecords) for m in manifests)
    chunks = [
        Chunk(i, 0, records=m, path=path)
        for i, (m, path) in enumerate(zip(manifests, paths, strict=True))
    ]
    counts = [len(m) for m in manifests]
    for shuffle in (False, True):
        groups = epoch_groups(counts, chunk_ids=[0, 1, 2], shuffle=shuffle, seed=5, window=3,
                              share=Share())  # fmt: skip
        group = groups[0]
        members = [chunks[i] for i in group.chunks]
        end = min(40, group.size)  # 16 images a chunk: all three in the shuffled block
        task = build_task(1, 0, group, members, group.chunks, 2, end, slot=0)
        assert isinstance(task.records, RecordLines)
        expected = [built[group.chunks[part]][at] for part, at in group.rows(2, end)]
        assert task.records.build() == expected
        if shuffle:  # the block draws on several chunks
            assert task.parts is not None and len(set(task.parts)) > 1
    assert all(m._built is None for m in manifests)  # the "supervisor" built none
    assert manifests[0][3] == built[0][3]  # reading one record builds them, the same


def test_a_manifest_that_reads_differently_in_parts_is_refused_where_it_is_built() -> None:
    """Lines that parse as one value each only together (two objects on the first line, one
    object split over the next two) pass the check; a worker's part of them is an error."""
    from pixcrawler_engine.sources._listing import build_records, check_lines

    text = '{"file": "a"}, {"file": "b"}\n{"x": "}\n{", "file": "z"}\n'
    lines = check_lines(text, 4)
    assert len(lines) == 3
    with pytest.raises(DecompressionError, match=r"chunk 4: .*reads differently"):
        build_records(lines[1:2], [1], 4)
