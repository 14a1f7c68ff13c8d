"""The local job store: packing folders and JSONL lists, reading jobs back, and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pixcrawler_engine._errors import NotFoundError
from pixcrawler_engine.sources import _pack, _store


def _image(path: Path, fmt: str = "PNG", size: tuple[int, int] = (12, 8), shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "P" if fmt == "GIF" else "RGB"
    Image.new(mode, size, shade if mode == "P" else (shade, 40, 80)).save(path, format=fmt)
    return path


def _members(zip_path: Path) -> tuple[list[zipfile.ZipInfo], list[dict]]:
    with zipfile.ZipFile(zip_path) as zf:
        manifest = [json.loads(line) for line in zf.read("manifest.jsonl").splitlines()]
        return zf.infolist(), manifest


def _store_is_empty(root: Path) -> bool:
    jobs = root / "jobs"
    return not jobs.exists() or not any(jobs.iterdir())


def _small_source(root: Path) -> Path:
    for label in ("dog", "cat"):
        for i in range(3):
            _image(root / label / f"{i}.png", shade=i)
    return root


# ----------------------------------------------------------------------------- packing


def test_packed_job_manifest(store: Path, demo_source: Path) -> None:
    job = _store.read_job(store, "demo")
    assert set(job) == {
        "job_id", "status", "progress", "created_at", "num_images", "chunk_size",
        "size_bytes", "labels", "version", "chunks",
    }  # fmt: skip
    files = [p for p in demo_source.rglob("*") if p.is_file() and p.parent != demo_source]
    assert job["num_images"] == len(files) == 120
    assert job["status"] == "completed" and job["progress"] == 100
    assert job["chunk_size"] == 16 and len(job["chunks"]) == 8
    assert job["labels"] == sorted(p.name for p in demo_source.iterdir() if p.is_dir())
    assert [c["index"] for c in job["chunks"]] == list(range(8))
    assert [c["num_images"] for c in job["chunks"]] == [16] * 7 + [8]
    for chunk in job["chunks"]:
        path = store / "jobs" / "demo" / chunk["url"]
        assert chunk["url"] == f"chunks/{chunk['index']}.zip"
        assert path == _store.chunk_path(store, "demo", chunk["index"])
        assert chunk["size_bytes"] == path.stat().st_size
        assert chunk["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert job["size_bytes"] == sum(c["size_bytes"] for c in job["chunks"])


def test_chunks_hold_the_original_bytes_in_dataset_order(store: Path, demo_source: Path) -> None:
    classes = sorted(p.name for p in demo_source.iterdir() if p.is_dir())
    expected = [
        (c, p) for c in classes for p in sorted((demo_source / c).iterdir(), key=lambda p: p.name)
    ]
    seen = []
    for chunk in _store.read_job(store, "demo")["chunks"]:
        path = _store.chunk_path(store, "demo", chunk["index"])
        infos, manifest = _members(path)
        assert infos[0].filename == "manifest.jsonl"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert [i.filename for i in infos[1:]] == [m["file"] for m in manifest]
        with zipfile.ZipFile(path) as zf:
            for entry in manifest:
                seen.append(entry)
                label, original = expected[len(seen) - 1]
                assert entry["label"] == label
                assert entry["source"] == f"{label}/{original.name}"
                assert zf.read(entry["file"]) == original.read_bytes()
    assert [m["file"] for m in seen] == [
        f"{i:06d}{Path(p).suffix}" for i, (_, p) in enumerate(expected)
    ]


def test_packing_is_deterministic(tmp_path: Path, demo_source: Path) -> None:
    a = _pack.pack(demo_source, tmp_path / "a", "x", chunk_size=50, created_at="2024-01-01")
    b = _pack.pack(demo_source, tmp_path / "b", "x", chunk_size=50)
    ja, jb = _store.read_job(tmp_path / "a", "x"), _store.read_job(tmp_path / "b", "x")
    assert ja["version"] == jb["version"] and ja["chunks"] == jb["chunks"]
    for chunk in ja["chunks"]:
        assert (a / chunk["url"]).read_bytes() == (b / chunk["url"]).read_bytes()


def test_repack_replaces_the_job(tmp_path: Path) -> None:
    src = _small_source(tmp_path / "src")
    root = tmp_path / "store"
    _pack.pack(src, root, "job", chunk_size=1)
    assert len(_store.read_job(root, "job")["chunks"]) == 6
    _pack.pack(src, root, "job", chunk_size=4, status="processing", progress=10)
    job = _store.read_job(root, "job")
    assert len(job["chunks"]) == 2 and job["status"] == "processing" and job["progress"] == 10
    assert sorted(p.name for p in (root / "jobs").iterdir()) == ["job"]  # no temp leftovers
    assert sorted(p.name for p in (root / "jobs" / "job" / "chunks").iterdir()) == [
        "0.zip",
        "1.zip",
    ]


def test_every_supported_format(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for fmt in _store.IMAGE_FORMATS:
        # The file's own extension is misleading on purpose: the header decides.
        _image(src / "mixed" / f"{fmt.lower()}.img", fmt=fmt)
    _pack.pack(src, tmp_path / "store", "formats")
    _, manifest = _members(_store.chunk_path(tmp_path / "store", "formats", 0))
    exts = [Path(m["file"]).suffix for m in manifest]
    order = sorted(f"{fmt.lower()}.img" for fmt in _store.IMAGE_FORMATS)
    assert exts == [_store.IMAGE_FORMATS[name.split(".")[0].upper()] for name in order]


def test_huge_header_is_packed_without_a_bomb_warning(tmp_path: Path) -> None:
    # A PNG whose header claims 40000 x 40000 pixels: the decoder's pixel budget refuses it
    # later; packing only needs the header and must not trip Pillow's bomb check.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    png = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    path = tmp_path / "src" / "bomb" / "big.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _pack.pack(tmp_path / "src", tmp_path / "store", "bomb")
    assert _store.read_job(tmp_path / "store", "bomb")["num_images"] == 1


def test_dotfiles_are_ignored(tmp_path: Path) -> None:
    src = _small_source(tmp_path / "src")
    (src / ".DS_Store").write_bytes(b"junk")
    (src / "cat" / ".hidden.png").write_bytes(b"junk")
    (src / ".cache").mkdir()
    (src / ".cache" / "x.txt").write_text("junk")
    _pack.pack(src, tmp_path / "store", "job")
    assert _store.read_job(tmp_path / "store", "job")["num_images"] == 6


def test_pack_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "imgs" / "b.png", shade=1)
    _image(data / "imgs" / "a.jpg", fmt="JPEG", shade=2)
    _image(data / "c.webp", fmt="WEBP", shade=3)
    lines = [
        {"file": "imgs/b.png", "label": 3, "split": "train"},
        "",
        {"file": "imgs/a.jpg", "label": "cat"},
        {"file": "c.webp", "label": {"box": [1, 2, 3, 4]}, "score": 0.5},
    ]
    listing = data / "list.jsonl"
    listing.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    _pack.pack(listing, tmp_path / "store", "j", chunk_size=2)
    job = _store.read_job(tmp_path / "store", "j")
    assert job["num_images"] == 3 and job["labels"] == ["cat"]
    manifest = []
    for chunk in job["chunks"]:
        manifest += _members(_store.chunk_path(tmp_path / "store", "j", chunk["index"]))[1]
    assert manifest == [
        {"file": "000000.png", "label": 3, "split": "train", "source": "imgs/b.png"},
        {"file": "000001.jpg", "label": "cat", "source": "imgs/a.jpg"},
        {"file": "000002.webp", "label": {"box": [1, 2, 3, 4]}, "score": 0.5, "source": "c.webp"},
    ]


# ----------------------------------------------------------------------------- bad input


def _bad_folder(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A source folder with one kind of problem, and the name the error must mention."""
    src = _small_source(tmp_path / "src")
    if kind == "not an image":
        (src / "cat" / "notes.jpg").write_text("this is not a JPEG")
        return src, "cat/notes.jpg"
    if kind == "truncated header":
        data = (src / "cat" / "0.png").read_bytes()
        (src / "cat" / "cut.png").write_bytes(data[:20])
        return src, "cat/cut.png"
    if kind == "dangling symlink":
        (src / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
        return src, "dog/gone.png"
    if kind == "empty class":
        (src / "bird").mkdir()
        return src, "bird"
    if kind == "stray file":
        _image(src / "loose.png")
        return src, "loose.png"
    if kind == "empty folder":
        empty = tmp_path / "empty"
        empty.mkdir()
        return empty, "empty"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "not an image",
        "truncated header",
        "dangling symlink",
        "empty class",
        "stray file",
        "empty folder",
    ],
)
def test_bad_folder_is_refused_and_nothing_is_written(tmp_path: Path, kind: str) -> None:
    src, name = _bad_folder(tmp_path, kind)
    root = tmp_path / "store"
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as info:
        _pack.pack(src, root, "job")
    assert _store_is_empty(root), list((root / "jobs").iterdir())
    assert len(str(info.value)) < 400


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    src = _small_source(tmp_path / "src")
    (src / "cat" / "1.png").chmod(0)
    with pytest.raises(ValueError, match=r"cat/1\.png.*permission"):
        _pack.pack(src, tmp_path / "store", "job")
    assert _store_is_empty(tmp_path / "store")


def test_unreadable_file_is_refused_even_as_root(tmp_path: Path) -> None:
    # A directory where a file is expected cannot be read by anyone, root included.
    data = tmp_path / "data"
    (data / "pic.png").mkdir(parents=True)
    (data / "list.jsonl").write_text(json.dumps({"file": "pic.png", "label": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"pic\.png \(line 1 .*cannot read"):
        _pack.pack(data / "list.jsonl", tmp_path / "store", "job")
    assert _store_is_empty(tmp_path / "store")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"file": "missing.png", "label": "x"}, r"missing\.png \(line 2 .*not found"),
        ('{"file": "a.png", "label": ', r"list\.jsonl:2: not valid JSON"),
        ({"label": "x"}, r"list\.jsonl:2: each line must be an object"),
        (["a.png"], r"list\.jsonl:2: each line must be an object"),
        ({"file": "a.png"}, r"list\.jsonl:2: no 'label'"),
        ({"file": "a.png", "label": True}, r"list\.jsonl:2: 'label' must be"),
        ({"file": "a.png", "label": 1.5}, r"list\.jsonl:2: 'label' must be"),
        ({"file": "a.png", "label": "x", "source": "s"}, r"list\.jsonl:2: 'source' is reserved"),
    ],
)
def test_bad_jsonl_is_refused(tmp_path: Path, line: object, message: str) -> None:
    data = tmp_path / "data"
    _image(data / "a.png")
    text = line if isinstance(line, str) else json.dumps(line)
    (data / "list.jsonl").write_text(json.dumps({"file": "a.png", "label": "x"}) + "\n" + text)
    root = tmp_path / "store"
    with pytest.raises(ValueError, match=message):
        _pack.pack(data / "list.jsonl", root, "job")
    assert _store_is_empty(root)


def test_empty_jsonl_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "list.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        _pack.pack(tmp_path / "list.jsonl", tmp_path / "store", "job")
    with pytest.raises(ValueError, match="does not exist"):
        _pack.pack(tmp_path / "nope", tmp_path / "store", "job")
    assert _store_is_empty(tmp_path / "store")


def test_failed_repack_keeps_the_old_job(tmp_path: Path) -> None:
    src = _small_source(tmp_path / "src")
    root = tmp_path / "store"
    _pack.pack(src, root, "job")
    before = _store.read_job(root, "job")
    (src / "cat" / "bad.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match=r"cat/bad\.png"):
        _pack.pack(src, root, "job")
    assert _store.read_job(root, "job") == before
    assert [p.name for p in (root / "jobs").iterdir()] == ["job"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"job_id": "../escape"}, "invalid job id"),
        ({"job_id": "/abs"}, "invalid job id"),
        ({"job_id": ".hidden"}, "invalid job id"),
        ({"job_id": ""}, "invalid job id"),
        ({"job_id": "a" * 129}, "invalid job id"),
        ({"job_id": "a/b"}, "invalid job id"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"status": "done"}, "status"),
        ({"progress": 101}, "progress"),
        ({"progress": -1}, "progress"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    src = _small_source(tmp_path / "src")
    args = {"job_id": "job", **kwargs}
    with pytest.raises(ValueError, match=message):
        _pack.pack(src, tmp_path / "store", args.pop("job_id"), **args)
    assert _store_is_empty(tmp_path / "store")


# ----------------------------------------------------------------------------- read helpers


def test_read_helpers(store: Path) -> None:
    jobs = {j["job_id"]: j for j in _store.list_jobs(store)}
    assert set(jobs) == {"demo", "pending"}
    assert "chunks" not in jobs["demo"] and jobs["demo"]["num_chunks"] == 8
    assert jobs["pending"]["status"] == "processing" and jobs["pending"]["progress"] == 42
    assert _store.job_dir(store, "demo") == store / "jobs" / "demo"
    with pytest.raises(NotFoundError, match="nope"):
        _store.read_job(store, "nope")
    with pytest.raises(NotFoundError):
        _store.read_job(store, "../../etc")
    with pytest.raises(ValueError, match="invalid job id"):
        _store.job_dir(store, "../demo")
    for index in (8, -1, 10**6):
        with pytest.raises(NotFoundError):
            _store.chunk_path(store, "demo", index)
    with pytest.raises(NotFoundError):
        _store.chunk_path(store, "nope", 0)


def test_list_jobs_skips_work_in_progress(tmp_path: Path) -> None:
    assert _store.list_jobs(tmp_path / "nothing") == []
    src = _small_source(tmp_path / "src")
    _pack.pack(src, tmp_path / "store", "job")
    (tmp_path / "store" / "jobs" / ".tmp-job-abc").mkdir()  # left by a killed pack
    (tmp_path / "store" / "jobs" / "notes.txt").write_text("x")
    assert [j["job_id"] for j in _store.list_jobs(tmp_path / "store")] == ["job"]


def test_zip_members_are_stored_with_a_fixed_timestamp(store: Path) -> None:
    infos, _ = _members(_store.chunk_path(store, "demo", 0))
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
    raw = _store.chunk_path(store, "demo", 0).read_bytes()
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert zf.testzip() is None
