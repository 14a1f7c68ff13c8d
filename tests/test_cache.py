"""The default chunk cache of `load_dataset`: one download per machine, counted at the server.

Every test has an empty cache of its own (`fresh_cache` in conftest, through
`$PIXCRAWLER_CACHE`); the bytes and requests are counted by a proxy in front of the real server.
Bad input: a cache folder that cannot be written (read-only, not a folder, full), a truncated
or altered entry, a limit below one chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from faults._proxy import Fault, proxied

from pixcrawler import load_dataset
from pixcrawler._info import format_bytes
from pixcrawler.cli import main
from pixcrawler_engine.sources._cache import CacheWarning, ChunkCache, default_cache_dir
from pixcrawler_engine.sources._jobapi import JobClient

FAST: dict[str, Any] = {"num_workers": 2, "progress": False, "image_size": 8}
CHUNKS = "/chunks/"
# A DataLoader with more workers than this machine's 2 cores warns about its own setting.
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def job_bytes(store: Path, job_id: str = "demo") -> int:
    return sum(p.stat().st_size for p in (store / "jobs" / job_id / "chunks").glob("*.zip"))


def expected(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """The job's arrays read straight from the store (no HTTP, no cache)."""
    with load_dataset("demo", base_url=store.as_uri(), **FAST) as ds:
        return ds.to_arrays()


def cached_files(root: Path) -> list[Path]:
    return sorted((root / "chunks").rglob("*.zip"))


def can_unshare() -> bool:
    """Whether this machine lets an unprivileged user and mount namespace mount a tmpfs."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


NAMESPACES = pytest.mark.skipif(
    not can_unshare(), reason="needs `unshare -rm` (user namespaces) to mount a small tmpfs"
)


# ---- where the cache is --------------------------------------------------------------------


def test_default_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PIXCRAWLER_CACHE", "PIXCRAWLER_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_cache_dir() == Path("/home/someone/.cache/pixcrawler")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_cache_dir() == Path("/xdg/pixcrawler")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # not absolute: ignored, as the spec says
    assert default_cache_dir() == Path("/home/someone/.cache/pixcrawler")
    monkeypatch.setenv("PIXCRAWLER_CACHE_DIR", "/old-name")
    assert default_cache_dir() == Path("/old-name")
    monkeypatch.setenv("PIXCRAWLER_CACHE", "~/moved")
    assert default_cache_dir() == Path("/home/someone/moved")


def test_tests_never_touch_the_users_cache(fresh_cache: Path) -> None:
    assert default_cache_dir() == fresh_cache
    assert Path.home() / ".cache" not in fresh_cache.parents


# ---- one download per machine --------------------------------------------------------------


def test_second_epoch_moves_no_bytes(server: Any, store: Path, fresh_cache: Path) -> None:
    with proxied(server.url) as proxy:
        ds = load_dataset("demo", server.api_key, proxy.url, **FAST)
        first = ds.to_arrays()
        assert proxy.body_bytes(CHUNKS) == job_bytes(store)
        assert len(proxy.seen(CHUNKS)) == 8
        requests = len(proxy.seen())
        second = ds.to_arrays()
        third = [(x.copy(), y) for x, y in ds]
        assert len(proxy.seen()) == requests  # not one request more, so not one byte
        assert proxy.body_bytes(CHUNKS) == job_bytes(store)
        # A new dataset object (another run) finds the chunks too; only its manifest moves.
        again = load_dataset("demo", server.api_key, proxy.url, **FAST).to_arrays()
        assert len(proxy.seen(CHUNKS)) == 8
    np.testing.assert_array_equal(first[0], expected(store)[0])
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[0], np.stack([x for x, _ in third]))
    assert len(cached_files(fresh_cache)) == 8
    assert not any(server.api_key.encode() in p.read_bytes() for p in fresh_cache.rglob("*.*"))


def test_every_adapter_reads_the_cache(server: Any, store: Path) -> None:
    pytest.importorskip("torch")
    tf = pytest.importorskip("tensorflow")
    from torch.utils.data import DataLoader

    with proxied(server.url) as proxy:
        ds = load_dataset("demo", server.api_key, proxy.url, **FAST)
        iterable = ds.to_torch(iterable=True, batch_size=16)
        for workers in (0, 2, 0, 2):  # in the engine, in DataLoader workers, twice each
            loader = DataLoader(iterable, batch_size=None, num_workers=workers)
            assert sum(len(y) for _, y in loader) == 120
        tf_ds = ds.to_tensorflow(batch_size=16)
        for _ in range(2):
            assert sum(int(tf.shape(y)[0]) for _, y in tf_ds) == 120
        assert len(proxy.seen(CHUNKS)) == 8 and proxy.body_bytes(CHUNKS) == job_bytes(store)


def test_cache_dir_false_downloads_every_pass(server: Any, store: Path, fresh_cache: Path) -> None:
    with proxied(server.url) as proxy:
        ds = load_dataset("demo", server.api_key, proxy.url, cache_dir=False, **FAST)
        ds.to_arrays()
        ds.to_arrays()
        assert proxy.body_bytes(CHUNKS) == 2 * job_bytes(store)
    assert not fresh_cache.exists()


def test_a_path_moves_the_cache(server: Any, tmp_path: Path, fresh_cache: Path) -> None:
    ds = load_dataset("demo", server.api_key, server.url, cache_dir=tmp_path / "here", **FAST)
    ds.to_arrays()
    assert len(cached_files(tmp_path / "here")) == 8 and not fresh_cache.exists()


def test_a_local_store_is_read_in_place_and_hashed_once_per_file(
    store: Path, tmp_path: Path, fresh_cache: Path
) -> None:
    """A `file://` store's chunks are never copied into the cache, which keeps a stamp of each
    store file seen to match its sha256 (NOTE [stamps]): a later process trusts a file as
    stamped, and hashes one that changed since (even to the same size) again."""
    import zipfile

    from pixcrawler_engine import DownloadError
    from pixcrawler_engine.sources._stamp import write_stamp

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    images, _ = expected(copy)
    job = json.loads((copy / "jobs" / "demo" / "job.json").read_text())
    stamps = ChunkCache(fresh_cache).store_stamps
    assert not cached_files(fresh_cache)  # nothing copied
    assert sorted(p.name for p in stamps.iterdir()) == sorted(
        f"{c['sha256']}.ok" for c in job["chunks"]
    )

    # One byte of the first image of chunk 0 flipped: the same size, another file.
    path = copy / "jobs" / "demo" / "chunks" / "0.zip"
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename != "manifest.jsonl")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="does not match its manifest"):
        expected(copy)  # hashed again: its stamp is of the file before

    # A stamp of the file as it is now (as if it had matched): trusted, not hashed, so the
    # damage reaches the decoder, where the bad sample is skipped.
    write_stamp(path, path.stat(), stamps / f"{job['chunks'][0]['sha256']}.ok")
    with load_dataset("demo", base_url=copy.as_uri(), on_error="skip", **FAST) as ds:
        assert len(ds.to_arrays()[0]) == len(images) - 1
    uncached = load_dataset("demo", base_url=copy.as_uri(), cache_dir=False, **FAST)
    with uncached, pytest.raises(DownloadError, match="does not match its manifest"):
        uncached.to_arrays()  # no cache, no stamps: hashed


@MANY_WORKERS
def test_map_style_with_four_dataloader_workers_fetches_each_chunk_once(
    server: Any, store: Path
) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    with proxied(server.url) as proxy:
        ds = load_dataset("demo", server.api_key, proxy.url, **FAST).to_torch()
        for epoch in range(2):
            loader = DataLoader(
                ds,
                batch_size=8,
                shuffle=True,
                num_workers=4,
                generator=torch.Generator().manual_seed(epoch),
            )
            assert sum(len(y) for _, y in loader) == 120
        # 4 workers x 2 epochs, each opening every chunk: still one GET per chunk.
        assert len(proxy.seen(CHUNKS)) == 8
        assert proxy.body_bytes(CHUNKS) == job_bytes(store)


def test_map_style_fetches_again_what_was_evicted_meanwhile(server: Any, fresh_cache: Path) -> None:
    pytest.importorskip("torch")
    with proxied(server.url) as proxy:
        ds = load_dataset("demo", server.api_key, proxy.url, **FAST).to_torch()
        first = ds[0][0]
        ChunkCache(fresh_cache).clear()  # another process evicts (or `pixcrawler cache clear`)
        ds._chunk_cache().close()  # the process's open archives go (as when it opens others)
        assert len(proxy.seen(CHUNKS)) == 1
        again = ds[0][0]
        assert len(proxy.seen(CHUNKS)) == 2  # fetched again, not a FileNotFoundError
    assert bool((again == first).all())


RACER = textwrap.dedent(
    """
    import hashlib, sys
    from pixcrawler import load_dataset

    ds = load_dataset("demo", sys.argv[2], sys.argv[1], num_workers=1, progress=False,
                      image_size=8)
    print("ready", flush=True)
    assert sys.stdin.readline() == "go\\n"
    images, labels = ds.to_arrays()
    print(hashlib.sha256(images.tobytes()).hexdigest(), flush=True)
    """
)


def test_two_processes_racing_on_one_empty_cache_download_each_chunk_once(
    server: Any, store: Path, fresh_cache: Path
) -> None:
    # The first GET of chunk 0 stalls half-way for 5 s, then ends short: whichever process
    # got it resumes with Range, while the other reaches chunk 0 and must wait for it.
    with proxied(server.url, Fault("stall", match="/chunks/0", after_bytes=2000)) as proxy:
        env = {**os.environ, "PIXCRAWLER_CACHE": str(fresh_cache)}
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, proxy.url, server.api_key],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        try:
            for racer in racers:  # both hold their manifest, neither has fetched a chunk
                assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
            for racer in racers:
                assert racer.stdin is not None
                racer.stdin.write("go\n")
                racer.stdin.flush()
            outs = [racer.communicate(timeout=120) for racer in racers]
        finally:
            for racer in racers:
                if racer.poll() is None:
                    racer.kill()
                    racer.wait(timeout=10)
        for racer, (_out, err) in zip(racers, outs, strict=True):
            assert racer.returncode == 0, err
        zero = proxy.seen("/chunks/0")
        assert [s.fault for s in zero] == ["stall", None] and "range" in zero[1].headers
        assert zero[0].client_port != 0 and len(proxy.seen(CHUNKS)) == 8 + 1
        assert proxy.body_bytes(CHUNKS) == job_bytes(store)  # no byte twice
    digest = hashlib.sha256(expected(store)[0].tobytes()).hexdigest()
    assert [out.strip() for out, _ in outs] == [digest, digest]
    assert len(cached_files(fresh_cache)) == 8


def test_lru_eviction_keeps_the_cache_under_its_limit(
    server: Any, store: Path, tmp_path: Path
) -> None:
    with JobClient(server.url, server.api_key) as client:
        manifest = client.get_job("demo")
        chunks = manifest.chunks[:3]
        limit = chunks[0].size_bytes + chunks[1].size_bytes + chunks[2].size_bytes - 1
        cache = ChunkCache(tmp_path / "c", limit_bytes=limit, grace_s=0)

        def fetch(i: int) -> Path:
            c = manifest.chunks[i]
            return cache.fetch(
                manifest.version,
                c.sha256,
                c.size_bytes,
                lambda dest: client.fetch_chunk(c, dest),
            )

        first, second = fetch(0), fetch(1)
        # The LRU clock is each entry's stamp (NOTE [stamps] in `sources._cache`).
        os.utime(second.with_suffix(".ok"), (1, 1))  # chunk 1 least recently used...
        os.utime(first.with_suffix(".ok"), (2, 2))
        fetch(2)  # ...so it goes when chunk 2 comes in over the limit
        assert first.exists() and not second.exists() and cache.size_bytes() <= limit


def test_a_stamped_hit_is_not_hashed_and_any_change_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOTE [stamps]: a hit whose file is as verified skips sha256; a rewrite (even of the
    same bytes) or an alteration is hashed again, and the altered one is a miss."""
    from pixcrawler_engine.sources import _cache

    hashed: list[Path] = []
    real = _cache.file_matches

    def counted(path: Path, size: int, sha: str) -> bool:
        hashed.append(path)
        return real(path, size, sha)

    monkeypatch.setattr(_cache, "file_matches", counted)  # the real hash, counted
    data = b"chunk bytes " * 1000
    sha = hashlib.sha256(data).hexdigest()

    def download(dest: Path) -> Path:
        (dest / "0.zip").write_bytes(data)
        return dest / "0.zip"

    cache = ChunkCache(tmp_path / "c")
    entry = cache.fetch("v1", sha, len(data), download)
    assert entry.with_suffix(".ok").exists() and hashed == []
    assert cache.get("v1", sha, len(data)) == entry and cache.get("v1", sha, len(data)) == entry
    assert hashed == []
    entry.write_bytes(data)  # the same bytes written again: a new identity, hashed once
    assert cache.get("v1", sha, len(data)) == entry and hashed == [entry]
    assert cache.get("v1", sha, len(data)) == entry and hashed == [entry]
    entry.write_bytes(data.replace(b"chunk", b"CHUNK"))  # same size, other bytes
    assert cache.get("v1", sha, len(data)) is None and len(hashed) == 2
    assert cache.fetch("v1", sha, len(data), download) == entry
    assert entry.read_bytes() == data
    assert cache.clear() == len(data) and not (cache.root / "chunks" / "v1").exists()


def test_clear_leaves_a_download_in_progress_alone(tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "c")
    sha = "ab" * 32
    partial = cache.root / "partial" / "v1" / sha
    partial.mkdir(parents=True)
    (partial / "0.zip.part").write_bytes(b"x" * 100)
    done = cache.root / "chunks" / "v1" / f"{'cd' * 32}.zip"
    done.parent.mkdir(parents=True)
    done.write_bytes(b"y" * 50)
    with cache._lock("v1", sha):  # another process is downloading that chunk
        assert cache.clear() == 50
        assert (partial / "0.zip.part").exists() and not done.exists()
    assert cache.clear() == 100 and cache.entries() == []
    assert not (cache.root / "chunks" / "v1").exists()


# ---- bad input -----------------------------------------------------------------------------


def test_a_truncated_or_altered_entry_is_fetched_again(
    server: Any, store: Path, fresh_cache: Path
) -> None:
    torch = pytest.importorskip("torch")
    with proxied(server.url) as proxy:
        ds = load_dataset("demo", server.api_key, proxy.url, **FAST)
        first = ds.to_arrays()
        files = cached_files(fresh_cache)
        truncated, altered = files[2], files[5]
        sizes = {p: p.stat().st_size for p in files}
        with open(truncated, "r+b") as f:
            f.truncate(sizes[truncated] // 2)
        data = bytearray(altered.read_bytes())
        data[len(data) // 2] ^= 0xFF  # the same size: only the sha256 can tell
        altered.write_bytes(bytes(data))
        again = ds.to_arrays()
        # Exactly the two bad entries are fetched again, whole.
        assert len(proxy.seen(CHUNKS)) == 8 + 2
        assert proxy.body_bytes(CHUNKS) == job_bytes(store) + sizes[truncated] + sizes[altered]
        # The map-style dataset checks what it opens too.
        truncated.write_bytes(b"PK not a chunk")
        chunk = {c.sha256: c.index for c in ds.ref.manifest.chunks}[truncated.stem]
        image, _ = ds.to_torch()[sum(c.num_images for c in ds.ref.manifest.chunks[:chunk])]
        assert len(proxy.seen(CHUNKS)) == 8 + 3
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[0], expected(store)[0])
    assert isinstance(image, torch.Tensor) and tuple(image.shape) == (3, 8, 8)
    for path in cached_files(fresh_cache):  # every entry is whole again
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem


def test_a_limit_below_one_chunk_is_refused_at_load(server: Any, store: Path) -> None:
    largest = max(p.stat().st_size for p in (store / "jobs" / "demo" / "chunks").glob("*.zip"))
    with pytest.raises(ValueError, match="smaller than chunk") as info:
        load_dataset("demo", server.api_key, server.url, cache_limit=largest - 1, **FAST)
    assert "cache_limit" in str(info.value) and "cache_dir=False" in str(info.value)
    with pytest.raises(ValueError, match="cache_limit must be"):
        load_dataset("demo", server.api_key, server.url, cache_limit=-1, **FAST)
    for bad in ("", 3):
        with pytest.raises(ValueError, match=r"cache_dir must be a folder, True .* or False"):
            load_dataset("demo", server.api_key, server.url, cache_dir=bad, **FAST)  # type: ignore[arg-type]
    # The largest chunk fits: accepted. Without a cache, the limit is moot.
    load_dataset("demo", server.api_key, server.url, cache_limit=largest, **FAST).close()
    load_dataset("demo", server.api_key, server.url, cache_limit=1, cache_dir=False, **FAST)


def test_a_cache_folder_that_cannot_be_made_warns_once_and_runs_uncached(
    server: Any, store: Path, tmp_path: Path
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.warns(CacheWarning, match="cannot be written") as said:
        ds = load_dataset("demo", server.api_key, server.url, cache_dir=not_a_folder / "c", **FAST)
    assert len(said) == 1 and "cache_dir=False" in str(said[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no more warnings while it runs
        images, _ = ds.to_arrays()
    np.testing.assert_array_equal(images, expected(store)[0])


def test_cli_cache_info_and_clear(server: Any, fresh_cache: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(main, ["cache", "info"])
    assert empty.exit_code == 0, empty.output
    assert str(fresh_cache) in empty.output and "Empty." in empty.output
    ds = load_dataset("demo", server.api_key, server.url, **FAST)
    ds.to_arrays()
    version = ds.ref.manifest.version
    size = sum(c.size_bytes for c in ds.ref.manifest.chunks)
    shown = runner.invoke(main, ["cache", "info", "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["root"] == str(fresh_cache) and data["bytes"] == size
    assert data["limit_bytes"] == 10 * 2**30
    assert data["versions"] == [{"version": version, "job_id": "demo", "chunks": 8, "bytes": size}]
    text = runner.invoke(main, ["cache", "info"])
    assert f"demo    {version}  8" in text.output and "(limit 10.7 GB" in text.output
    missing = runner.invoke(main, ["cache", "clear", "--version", "nope"])
    assert missing.exit_code == 1 and "pixcrawler cache info" in missing.output
    assert len(cached_files(fresh_cache)) == 8  # nothing removed by a wrong version
    cleared = runner.invoke(main, ["cache", "clear", "--job", "demo"])
    assert cleared.exit_code == 0 and f"Removed {format_bytes(size)} from" in cleared.output
    assert cached_files(fresh_cache) == []
    ds.to_arrays()  # fetched again
    assert runner.invoke(main, ["cache", "clear"]).exit_code == 0
    assert cached_files(fresh_cache) == []
    other = runner.invoke(main, ["cache", "info", "--cache-dir", str(fresh_cache.parent / "x")])
    assert other.exit_code == 0 and "Empty." in other.output


# ---- a read-only or full disk (a real one: a mount in a user namespace) ------------------------

IN_NAMESPACE = textwrap.dedent(
    """
    import hashlib, sys, warnings
    from pixcrawler import load_dataset

    url, key, cache = sys.argv[1:4]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = load_dataset("demo", key, url, cache_dir=cache, num_workers=1, progress=False,
                          image_size=8)
        images, _ = ds.to_arrays()
        item = ds.to_torch()[119] if sys.argv[4] == "torch" else None
    print(hashlib.sha256(images.tobytes()).hexdigest())
    for w in said:
        print("WARNING", w.category.__name__, str(w.message).replace("\\n", " "))
    """
)


def run_in_namespace(mount: str, server: Any, tmp_path: Path, torch: bool) -> tuple[str, str]:
    """Runs IN_NAMESPACE with its cache on a fresh mount (`mount` sets it up at $C)."""
    cache = tmp_path / "mnt"
    cache.mkdir()
    script = tmp_path / "run.py"
    script.write_text(IN_NAMESPACE)
    args = f'"{sys.executable}" "{script}" "{server.url}" "{server.api_key}" "$C"'
    shell = f'C="{cache}"; {mount} && exec {args} {"torch" if torch else "-"}'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


@NAMESPACES
def test_a_read_only_cache_folder_warns_and_runs_uncached(
    server: Any, store: Path, tmp_path: Path
) -> None:
    out, _ = run_in_namespace('mount --bind "$C" "$C" && mount -o remount,ro,bind "$C"',
                              server, tmp_path, torch=False)  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == hashlib.sha256(expected(store)[0].tobytes()).hexdigest()
    warned = [line for line in lines if line.startswith("WARNING")]
    assert len(warned) == 1 and "CacheWarning" in warned[0] and "Read-only" in warned[0]


@NAMESPACES
def test_a_full_cache_disk_falls_back_to_uncached_downloads(
    server: Any, store: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    smallest = min(p.stat().st_size for p in (store / "jobs" / "demo" / "chunks").glob("*.zip"))
    assert smallest > 4096  # one page: room for the load-time probe, for no chunk
    out, err = run_in_namespace('mount -t tmpfs -o size=4096 tmpfs "$C"',
                                server, tmp_path, torch=True)  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == hashlib.sha256(expected(store)[0].tobytes()).hexdigest()
    # The engine's supervisor logs the fallback (once per download thread at most)...
    logged = [line for line in err.splitlines() if "cannot be written" in line]
    assert 1 <= len(logged) <= 4 and all("No space left on device" in x for x in logged), err
    # ...and the map-style dataset warns once.
    warned = [line for line in lines if line.startswith("WARNING")]
    assert len(warned) == 1 and "CacheWarning" in warned[0], out
    assert "No space left on device" in warned[0]
