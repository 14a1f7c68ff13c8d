"""ParquetSource on ARTeFACT-shaped shards: columns, pixels and masks, HTTP Range reads, bad input.

Shards are written by the real `datasets` library (`artefact_data`); remote files are served by
a real HTTP server on loopback (uvicorn + starlette's StaticFiles, which answers Range), behind
the fault-injecting proxy where a test needs faults. Pixels are checked against pyarrow +
Pillow reading the same files, not against our own reader.
"""

from __future__ import annotations

import io
import pickle
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from artefact_data import Artefact, build, mask_for
from faults._proxy import Fault, proxied
from PIL import Image

from pixcrawler_engine import (
    DecodeError,
    DecodePolicy,
    DecompressionError,
    DownloadError,
    EngineConfig,
    Stream,
)
from pixcrawler_engine.sources.parquet._rows import read_index
from pixcrawler_engine.sources.parquet._schema import infer_columns, resolve
from pixcrawler_engine.sources.parquet._source import ParquetSource

CONFIG = EngineConfig(num_workers=2, batch_rows=3, slot_bytes=16 << 20, num_slots=4)


class Timings(TypedDict, total=False):
    """ParquetSource's HTTP timeout and retry settings, as the tests pass them."""

    timeout: float
    retries: int
    backoff: float


FAST: Timings = {"retries": 3, "backoff": 0.01, "timeout": 10.0}


@pytest.fixture(scope="module", params=["hub", "datasets"])
def artefact(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Artefact:
    """14 real photos with damage masks, in 2 shards of row groups of 4 rows: as on the Hub
    (SNAPPY, a dictionary page per column chunk), and as today's `datasets` writes them
    (uncompressed, PLAIN)."""
    return build(
        tmp_path_factory.mktemp("artefact"), n_small=14, rows_per_group=4, layout=request.param
    )


@pytest.fixture(scope="module")
def http_root(artefact: Artefact) -> Iterator[str]:
    """The dataset folder served over HTTP (Range, ETag) on a free loopback port."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    app = Starlette(routes=[Mount("/", StaticFiles(directory=artefact.root))])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        started.wait(0.02)
    assert server.started, "the static file server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def reference(path: Path) -> list[dict[str, Any]]:
    """Every row of a shard as pyarrow + Pillow see it: pixels, mask, metadata."""
    rows = []
    for row in pq.read_table(path).to_pylist():
        with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
            pixels = np.asarray(im.convert("RGB"))
        with Image.open(io.BytesIO(row["annotation"]["bytes"])) as im:
            mask = np.asarray(im)
        meta = {k: row[k] for k in ("id", "material", "content", "type")}
        rows.append({"pixels": pixels, "mask": mask, "meta": meta})
    return rows


def collect(source: ParquetSource, policy: DecodePolicy, **kw: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"images": [], "masks": [], "keys": [], "meta": [], "index": []}
    with Stream(source, config=CONFIG.replace(**kw), policy=policy) as stream:
        for batch in stream:
            out["images"] += [np.array(a) for a in batch.images]
            masks = batch.masks
            out["masks"] += [] if masks is None else [np.array(m) for m in masks]
            out["keys"] += batch.keys
            out["meta"] += batch.metadata
            out["index"] += batch.record_batch.column("index").to_pylist()
        out["stats"] = [stream.stats]
    return out


# ------------------------------------------------------------------ addresses and columns


def test_columns_are_inferred_from_the_hugging_face_schema(artefact: Artefact) -> None:
    source = ParquetSource(artefact.glob)
    c = source.columns
    assert (c.image, c.image_struct, c.mask, c.label) == ("image", True, "annotation", None)
    # annotation_rgb is image bytes too, but neither the image nor a mask (a colour picture).
    assert c.metadata == ("id", "material", "content", "type")
    assert len(source) == 14 and source.files == [p.name for p in artefact.shards]
    assert [p.num_records for p in source.plan()] == [4, 4, 4, 2]
    assert [p.first_index for p in source.plan()] == [0, 4, 8, 12]


def test_addresses_path_folder_glob_and_file_url_name_the_same_files(artefact: Artefact) -> None:
    forms: list[str | Path] = [
        artefact.glob,
        artefact.root,
        artefact.root / "data",
        artefact.root.as_uri() + "/data",
    ]
    names = [[f.name for f in resolve(form)] for form in forms]
    assert all(n == names[0] for n in names) and len(names[0]) == 2
    assert [f.name for f in resolve(list(artefact.shards))] == names[0]
    with pytest.raises(FileNotFoundError, match="no Parquet file"):
        resolve(artefact.root / "nothing-*.parquet")
    with pytest.raises(ValueError, match="globs work on local paths only"):
        resolve("https://example.org/data/*.parquet")


def test_same_file_names_in_two_folders_get_distinct_keys(artefact: Artefact, tmp_path) -> None:
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        shutil.copy(artefact.shards[1], tmp_path / split / "0000.parquet")
    assert [f.name for f in resolve(tmp_path)] == ["test/0000.parquet", "train/0000.parquet"]


def test_explicit_columns_and_clear_refusals(artefact: Artefact) -> None:
    schema = pq.read_schema(artefact.shards[0])
    c = infer_columns(schema, image_column="annotation_rgb", mask_column=False)
    assert (c.image, c.mask) == ("annotation_rgb", None)
    assert "image" not in c.metadata and "annotation" not in c.metadata
    with pytest.raises(ValueError, match=r"no column 'photo' for the images; the columns are: id"):
        infer_columns(schema, image_column="photo")
    with pytest.raises(ValueError, match="'material' is string, not image bytes"):
        infer_columns(schema, mask_column="material")
    with pytest.raises(ValueError, match="holds bytes, not labels"):
        infer_columns(schema, label_column="annotation")


def test_class_label_names_become_the_labels(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["crack", "stain", "dust"])}
    )
    png = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 20, 30)).save(png, "PNG")
    rows = [{"img": {"bytes": png.getvalue(), "path": None}, "label": i % 3} for i in range(5)]
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "x.parquet"))
    source = ParquetSource(tmp_path / "x.parquet")
    assert (source.columns.image, source.columns.label) == ("img", "label")
    assert source.labels == ["crack", "stain", "dust"]
    records = read_index(source.fetch(0, tmp_path)[0], 0, 0)
    assert [r.label for r in records] == ["crack", "stain", "dust", "crack", "stain"]
    assert records[0].mask_ref is None


def test_a_file_without_an_image_column_is_refused(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"id": ["a", "b"], "material": ["Paper", "Glass"]}), tmp_path / "t.parquet"
    )
    with pytest.raises(ValueError, match=r"no image column .* its columns are: id \(string\)"):
        ParquetSource(tmp_path / "t.parquet")


def test_a_file_that_is_not_parquet_is_refused(artefact: Artefact, tmp_path: Path) -> None:
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all" * 100)
    with pytest.raises(DecompressionError, match=r"junk\.parquet is not a readable Parquet file"):
        ParquetSource(tmp_path / "junk.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(artefact.shards[0].read_bytes()[:-100])
    with pytest.raises(DecompressionError, match=r"cut\.parquet is not a readable Parquet file"):
        ParquetSource(cut)


def test_the_source_pickles_without_its_connection_pool(artefact: Artefact) -> None:
    source = ParquetSource(artefact.glob)
    copy = pickle.loads(pickle.dumps(source))
    assert copy.plan() == source.plan() and copy.columns == source.columns
    assert pickle.loads(pickle.dumps(source.opener())) == source.opener()


# ---------------------------------------------------------------- pixels, masks and order


def test_pixels_masks_and_metadata_match_pyarrow_and_pillow(artefact: Artefact) -> None:
    expected = [row for shard in artefact.shards for row in reference(shard)]
    got = collect(ParquetSource(artefact.glob), DecodePolicy(image_size=None))
    assert got["index"] == list(range(len(expected)))
    assert got["keys"][:2] == [f"{artefact.shards[0].name}:0", f"{artefact.shards[0].name}:1"]
    assert got["keys"][-1] == f"{artefact.shards[1].name}:5"
    for image, mask, meta, ref in zip(
        got["images"], got["masks"], got["meta"], expected, strict=True
    ):
        assert image.shape == ref["pixels"].shape
        # JPEG decoders may differ by a level or two; PNGs are exact.
        assert np.abs(image.astype(int) - ref["pixels"]).mean() < 1.0
        np.testing.assert_array_equal(mask, ref["mask"])
        assert meta == ref["meta"]
    values = np.unique(np.concatenate([m.ravel() for m in got["masks"]]))
    assert set(values) <= set(range(16)) | {255} and 255 in values and len(values) > 10


def test_masks_follow_their_image_through_a_resize_without_new_values(artefact: Artefact) -> None:
    expected = reference(artefact.shards[0])
    got = collect(
        ParquetSource(artefact.shards[0]), DecodePolicy(image_size=(96, 96), resize="fit")
    )
    for image, mask, ref in zip(got["images"], got["masks"], expected, strict=True):
        h, w = image.shape[:2]
        assert mask.shape == (h, w) and max(h, w) == 96
        nearest = Image.fromarray(ref["mask"]).resize((w, h), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(mask, np.asarray(nearest))
        assert set(np.unique(mask)) <= set(np.unique(ref["mask"]))


def test_other_page_layouts_decode_the_same(artefact: Artefact, tmp_path: Path) -> None:
    """Files rewritten by pyarrow (snappy and dictionary, v2 pages) decode to the same pixels
    (every layout's bytes: `test_parquet_pages`)."""
    table = pq.read_table(artefact.shards[0])
    pq.write_table(table, tmp_path / "snappy.parquet", compression="snappy", row_group_size=3)
    pq.write_table(
        table, tmp_path / "v2.parquet", data_page_version="2.0", use_dictionary=False,
        compression="none", row_group_size=5,
    )  # fmt: skip
    plain = collect(ParquetSource(artefact.shards[0]), DecodePolicy(image_size=(64, 64)))
    for name in ("snappy.parquet", "v2.parquet"):
        other = collect(ParquetSource(tmp_path / name), DecodePolicy(image_size=(64, 64)))
        np.testing.assert_array_equal(np.stack(other["images"]), np.stack(plain["images"]))
        np.testing.assert_array_equal(np.stack(other["masks"]), np.stack(plain["masks"]))
        assert other["meta"] == plain["meta"]


# ------------------------------------------------------------------------ bad input


def _rows_with(tmp_path: Path, bad: dict[int, dict[str, Any]]) -> Path:
    """A shard of 6 good photos in which rows `bad` get other cells."""
    import datasets

    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "annotation": datasets.Image()}
    )
    rows = []
    for i in range(6):
        pixels = np.asarray(Image.new("RGB", (40 + i, 30), (20 * i, 90, 160)))
        image, mask = io.BytesIO(), io.BytesIO()
        Image.fromarray(pixels).save(image, "PNG")
        Image.fromarray(mask_for((40 + i, 30), i)).save(mask, "PNG")
        row = {"id": f"r{i}", "image": {"bytes": image.getvalue(), "path": None},
               "annotation": {"bytes": mask.getvalue(), "path": None}}  # fmt: skip
        rows.append({**row, **bad.get(i, {})})
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path), batch_size=3)
    return path


def test_bad_cells_are_per_sample_errors_and_the_rest_is_delivered(tmp_path: Path) -> None:
    wrong_size = io.BytesIO()
    Image.fromarray(mask_for((7, 7), 0)).save(wrong_size, "PNG")
    path = _rows_with(
        tmp_path,
        {
            1: {"image": {"bytes": b"\xff\xd8 this is no JPEG", "path": None}},
            2: {"annotation": {"bytes": wrong_size.getvalue(), "path": None}},
            4: {"image": None},
        },
    )
    got = collect(ParquetSource(path), DecodePolicy(on_error="skip"))
    assert [m["id"] for m in got["meta"]] == ["r0", "r3", "r5"]
    assert got["stats"][0]["skipped"] == 3
    # Named by the row's id first (what its owner knows), then its place in the file.
    with pytest.raises(DecodeError, match=r"sample 'r1' \(bad\.parquet:1\)"):
        collect(ParquetSource(path), DecodePolicy(on_error="raise"))
    (tmp_path / "mask").mkdir()
    mismatch = _rows_with(tmp_path / "mask", {2: {"annotation": {"bytes": wrong_size.getvalue()}}})
    with pytest.raises(
        DecodeError, match=r"\(bad\.parquet:2\): its mask is 7x7 but the image is 42x30"
    ):
        collect(ParquetSource(mismatch), DecodePolicy(on_error="raise"))


def test_a_null_image_cell_names_its_column(tmp_path: Path) -> None:
    path = _rows_with(tmp_path, {0: {"image": None}})
    with pytest.raises(DecodeError, match=r"bad\.parquet:0.*'image' cell holds no bytes"):
        collect(ParquetSource(path), DecodePolicy())


def test_a_damaged_row_group_fails_its_rows_only(artefact: Artefact, tmp_path: Path) -> None:
    damaged = tmp_path / artefact.shards[0].name
    shutil.copy(artefact.shards[0], damaged)
    meta = pq.read_metadata(damaged)
    leaf = next(j for j in range(meta.num_columns) if meta.schema.column(j).path == "image.bytes")
    offset = meta.row_group(1).column(leaf).data_page_offset
    with open(damaged, "r+b") as f:  # the page header of row group 1's images
        f.seek(offset)
        f.write(b"\xff" * 24)
    got = collect(ParquetSource(damaged), DecodePolicy(image_size=(32, 32), on_error="skip"))
    assert got["index"] == [0, 1, 2, 3]  # row group 0; row group 1's four rows are skipped
    assert got["stats"][0]["skipped"] == 4
    with pytest.raises(DecodeError, match=r"row group 1 of .* is damaged in column 'image'"):
        collect(ParquetSource(damaged), DecodePolicy(image_size=(32, 32)))


# ------------------------------------------------------------------------------ HTTP


def test_http_reads_row_groups_with_range_requests(artefact: Artefact, http_root: str) -> None:
    local = collect(ParquetSource(artefact.glob), DecodePolicy(image_size=(48, 48)))
    with proxied(http_root) as proxy:
        urls = [f"{proxy.url}/data/{p.name}" for p in artefact.shards]
        source = ParquetSource(urls, **FAST)
        assert source.files == [p.name for p in artefact.shards]
        remote = collect(source, DecodePolicy(image_size=(48, 48)))
        seen = proxy.seen("/data/")
    np.testing.assert_array_equal(np.stack(remote["images"]), np.stack(local["images"]))
    np.testing.assert_array_equal(np.stack(remote["masks"]), np.stack(local["masks"]))
    assert remote["meta"] == local["meta"] and remote["keys"] == local["keys"]
    assert seen and all("range" in {k.lower() for k in s.headers} for s in seen)
    assert all(s.status == 206 for s in seen)
    # Only the columns used travel: annotation_rgb's bytes are never requested.
    unused = []
    for shard in artefact.shards:
        meta = pq.read_metadata(shard)
        j = next(
            j
            for j in range(meta.num_columns)
            if meta.schema.column(j).path == "annotation_rgb.bytes"
        )
        for rg in range(meta.num_row_groups):
            col = meta.row_group(rg).column(j)
            start = min(col.data_page_offset, col.dictionary_page_offset or col.data_page_offset)
            unused.append((shard.name, start, start + col.total_compressed_size))
    sizes = {p.name: p.stat().st_size for p in artefact.shards}
    for s in seen:
        if s.path.rsplit("/", 1)[-1] in sizes and s.headers.get("range", "").endswith(
            f"-{sizes[s.path.rsplit('/', 1)[-1]] - 1}"
        ):
            continue  # the footer read: pyarrow asks for the last 64 KiB at once
        first, last = map(
            int, s.headers.get("Range", s.headers.get("range", "")).split("=")[1].split("-")
        )
        for name, start, end in unused:
            assert not (s.path.endswith(name) and first < end and last >= start), (
                s.path,
                first,
                last,
            )


def test_http_faults_are_retried_and_resumed(artefact: Artefact, http_root: str) -> None:
    expected = collect(ParquetSource(artefact.shards[1]), DecodePolicy(image_size=(32, 32)))
    faults = [
        Fault("status", match="/data/", status=503, times=2),
        Fault("reset", match="/data/", after_bytes=5000, times=2),
    ]
    with proxied(http_root, *faults) as proxy:
        source = ParquetSource(f"{proxy.url}/data/{artefact.shards[1].name}", **FAST)
        got = collect(source, DecodePolicy(image_size=(32, 32)))
        assert sum(1 for s in proxy.seen("/data/") if s.fault) == 4
    np.testing.assert_array_equal(np.stack(got["images"]), np.stack(expected["images"]))


def test_http_errors_are_download_errors(artefact: Artefact, http_root: str) -> None:
    with pytest.raises(DownloadError, match=r"/data/missing.parquet .*not found \(404\)"):
        ParquetSource(f"{http_root}/data/missing.parquet", **FAST)
    with proxied(http_root) as proxy:
        url = f"{proxy.url}/data/{artefact.shards[0].name}"
        source = ParquetSource(url, **FAST)
        proxy.add(Fault("status", match="/data/", status=500, times=99))
        with pytest.raises(DownloadError, match=r"chunk \d \(row group \d of .*after 3 attempts"):
            collect(source, DecodePolicy(image_size=(32, 32)))
    ignore = Fault("ignore_range", match="/data/", times=99)
    with proxied(http_root, ignore) as proxy, pytest.raises(DownloadError, match="ignores Range"):
        ParquetSource(f"{proxy.url}/data/{artefact.shards[0].name}", **FAST)
