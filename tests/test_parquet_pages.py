"""The Parquet page reader: every layout `datasets` and pyarrow write, in bounded memory.

Shards written by `datasets` 2.x (the Hugging Face Hub's image datasets, ARTeFACT among them)
are SNAPPY-compressed with a dictionary page holding a whole row group's images; today's
`datasets` writes them uncompressed and PLAIN. Both, and the other codecs and page versions
pyarrow writes, must give back the exact bytes, with the supervisor's memory independent of
the values' size (measured as the VmHWM of a fresh process, which is deterministic).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixcrawler_engine import DecodeError
from pixcrawler_engine.sources.parquet._pages import Corrupt
from pixcrawler_engine.sources.parquet._rows import RowsOpener, read_index
from pixcrawler_engine.sources.parquet._snappy import SnappyStream, TooFarBack
from pixcrawler_engine.sources.parquet._source import ParquetSource


def _image_table(values: list[bytes | None]) -> pa.Table:
    """A `datasets`-style table: `image` as struct<bytes, path>, and an `id`."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("string")})
    rows = [
        {"image": None if v is None else {"bytes": v, "path": None}, "id": f"r{i}"}
        for i, v in enumerate(values)
    ]
    table = datasets.Dataset.from_list(rows, features=features).data.table
    return table.replace_schema_metadata(features.arrow_schema.metadata)


def _values(seed: int, n: int) -> list[bytes | None]:
    """Sizes from 0 bytes to 3 MB, half incompressible, half repetitive (masks), one null."""
    rng = np.random.default_rng(seed)
    out: list[bytes | None] = []
    for i in range(n):
        size = int(rng.choice([0, 5, 300, 70_000, 3_000_000]))
        if i % 2:
            out.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        else:
            out.append(bytes(rng.integers(0, 4, max(1, size // 64), dtype=np.uint8)) * 64)
    out[n // 2] = None
    return out


LAYOUTS: dict[str, dict[str, Any]] = {
    "datasets_2_snappy_dictionary": {},  # pyarrow's defaults
    "uncompressed_plain": {"compression": "none", "use_dictionary": False},
    "uncompressed_dictionary": {"compression": "none"},
    "snappy_plain_small_pages": {"use_dictionary": False, "data_page_size": 1000},
    "snappy_dictionary_fallback": {"dictionary_pagesize_limit": 1000, "write_batch_size": 1},
    "snappy_v2": {"data_page_version": "2.0"},
    "zstd": {"compression": "zstd"},
    "zstd_v2_plain": {"compression": "zstd", "data_page_version": "2.0", "use_dictionary": False},
    "gzip": {"compression": "gzip"},
    "brotli": {"compression": "brotli"},
    "lz4": {"compression": "lz4"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_gives_back_the_exact_bytes(tmp_path: Path, layout: str) -> None:
    values = _values(1, 14)
    values[3] = values[5]  # a repeated value: one dictionary entry for two rows
    path = tmp_path / f"{layout}.parquet"
    pq.write_table(_image_table(values), path, row_group_size=5, **LAYOUTS[layout])
    source = ParquetSource(path)
    got: list[bytes | None] = []
    for chunk in range(len(source.plan())):
        rows, _ = source.fetch(chunk, tmp_path)
        reader = RowsOpener().open(str(rows))
        try:
            for record in source.records(chunk, rows):
                try:
                    got.append(bytes(reader.read(record.ref)))
                except DecodeError as exc:
                    assert "holds no bytes" in str(exc)
                    got.append(None)
        finally:
            reader.close()
    assert got == values


MEASURE_FETCH = textwrap.dedent(
    """
    import json, sys, tempfile
    from pathlib import Path
    from pixcrawler_engine.sources.parquet._source import ParquetSource

    def peak_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    source = ParquetSource(sys.argv[1])
    workdir = Path(sys.argv[2])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = peak_mb()
    rows, _ = source.fetch(0, workdir)
    print(json.dumps({"grew_mb": peak_mb() - before, "rows_file": rows.stat().st_size,
                      "ref": source.records(0, rows)[0].ref[:2]}))
    """
)


@pytest.mark.parametrize("layout", ["datasets_2_snappy_dictionary", "uncompressed_plain", "zstd"])
def test_fetch_holds_a_few_mib_whatever_the_layout(tmp_path: Path, layout: str) -> None:
    """A 64 MB cell (+ 2 small ones) is fetched in ~1 MiB blocks; pyarrow held it ~3 times."""
    blob = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "big.parquet"
    pq.write_table(_image_table([b"small", blob, b"tiny"]), path, **LAYOUTS[layout])
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_FETCH, str(path), str(workdir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["grew_mb"] < 24, f"fetching a 64 MB cell grew the peak RSS by {measured}"
    if layout == "uncompressed_plain":  # read in place: nothing copied
        assert measured["rows_file"] < 4096
    else:
        assert measured["rows_file"] > 64 << 20
    (_, record, _) = read_index(next(workdir.glob("*.rows")), 0, 0)
    reader = RowsOpener().open(str(next(workdir.glob("*.rows"))))
    try:
        data = reader.read(record.ref)
        assert isinstance(data, memoryview)  # mapped, not copied onto the heap
        assert data == blob
    finally:
        del data
        reader.close()


def test_a_local_file_that_changes_after_the_fetch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    table = _image_table([b"a" * 100, b"b" * 200])
    pq.write_table(table, path, **LAYOUTS["uncompressed_plain"])
    source = ParquetSource(path)
    rows, _ = source.fetch(0, tmp_path)
    records = source.records(0, rows)
    reader = RowsOpener().open(str(rows))
    try:
        assert reader.read(records[0].ref) == b"a" * 100
        with open(path, "ab") as f:
            f.write(b"appended")
        with pytest.raises(DecodeError, match="changed since its row group was read"):
            reader.read(records[1].ref)
    finally:
        reader.close()


# ------------------------------------------------------------------------ Snappy


def _snappy(data: bytes) -> bytes:
    return pa.Codec("snappy").compress(data, asbytes=True)


def _read_all(stream: SnappyStream, piece: int) -> bytes:
    out = io.BytesIO()
    while block := stream.read(piece):
        out.write(block)
    return out.getvalue()


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_snappy_stream_matches_the_library(piece: int) -> None:
    rng = np.random.default_rng(piece)
    data = b"".join(
        [
            rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes(),  # long literals
            bytes(rng.integers(0, 3, 5000, dtype=np.uint8)) * 200,  # copies, overlapping too
            b"x" * 100_000,
            rng.integers(0, 256, 70_001, dtype=np.uint8).tobytes(),
        ]
    )
    packed = _snappy(data)
    got = _read_all(SnappyStream(io.BytesIO(packed), len(packed), len(data)), piece)
    assert got == data


def test_snappy_damage_is_corrupt_and_far_copies_are_refused() -> None:
    data = bytes(range(256)) * 4000
    packed = _snappy(data)
    with pytest.raises(Corrupt, match="header says"):
        SnappyStream(io.BytesIO(packed), len(packed), len(data) + 1)
    with pytest.raises(Corrupt, match="ends"):
        _read_all(SnappyStream(io.BytesIO(packed[:-10]), len(packed) - 10, len(data)), 4096)
    # A literal of 2 MiB, then a copy from 2 MiB back: valid Snappy, but past the history.
    literal = bytes(np.random.default_rng(0).integers(0, 256, 2 << 20, dtype=np.uint8))
    length = (2 << 20) + 4
    far = (
        _varint(length)
        + bytes([63 << 2])  # a literal whose length-1 follows in 4 bytes
        + (len(literal) - 1).to_bytes(4, "little")
        + literal
        + bytes([(3 << 2) | 3])  # a copy of 4 bytes, 4-byte offset
        + (2 << 20).to_bytes(4, "little")
    )
    with pytest.raises(TooFarBack):
        _read_all(SnappyStream(io.BytesIO(far), len(far), length), 1 << 20)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)
