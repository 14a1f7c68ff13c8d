"""Hostile inputs through the real engine: a per-sample error or a clean refusal, bounded memory.

Every input is a real image (scikit-image, scikit-learn) damaged or wrapped on purpose by
`bad_data`, in a store written by hand whose job.json matches the chunk files (so only the
content is hostile) unless the test makes it lie. Each run is a real `Stream` (supervisor,
fork server, decode workers, shared memory) over `JobSource`, or `pixcrawler download` as a
subprocess for the cases about paths. A run passes when:

- a bad sample is a per-sample `DecodeError` naming its chunk and key, and with
  `on_error="skip"`/`"warn"` every other sample arrives exactly once, in order, with the
  right pixels;
- a bad chunk or job.json is refused with a `PixCrawlerError` that says what is wrong and
  which chunk, after the chunks before it were delivered exactly once;
- the summed peak RSS of the engine's processes stays under `RSS_CAP`, and nothing is
  written outside the output folder.

`decode_chunk`, the plain function other runtimes call without the engine's processes, is
held to the same rules for hostile zip members (in a child process, to read its peak RSS).
Mutated images (hypothesis, derandomized) must come out of the engine exactly as
`decode_image` decodes them in this process, or be skipped where it raises DecodeError.

RSS_CAP: the engine's processes here are the supervisor (~75 MiB), two resource trackers
(~30 MiB), the fork server (~115 MiB) and one or two workers (~120 MiB each, most of it pages
shared with the fork server but counted again). Their summed peaks measure 350-500 MiB on
these runs; 1 GiB leaves room for any image of this file, but not for a bomb of 512 MiB.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_helpers import job_source
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixcrawler_engine import (
    DecodeError,
    DecodePolicy,
    DecompressionError,
    DownloadError,
    EngineConfig,
    PixCrawlerError,
    SampleWarning,
    Stream,
)
from pixcrawler_engine._config import OnError
from pixcrawler_engine.decode._image import decode_image

from .bad_data import (
    BZIP2,
    DEFLATED,
    STORED,
    Bad,
    Good,
    Member,
    RawZip,
    TreeMonitor,
    chunk_zip,
    digits,
    encode,
    grey,
    image_catalogue,
    manifest_text,
    member,
    photo,
    tally,
    write_job,
    zeros_member,
)

RSS_CAP = 1 << 30
BOMB = 512 << 20  # what the lying members really inflate to
CONFIG = EngineConfig(num_workers=1, batch_rows=4, max_workers=2, num_slots=3)
SKIP = DecodePolicy(image_size=(32, 32), on_error="skip")
WARN = DecodePolicy(image_size=(32, 32), on_error="warn")


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What one engine run delivered, said and raised."""

    keys: list[str] = field(default_factory=list)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: Exception | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    monitor: TreeMonitor | None = None


def check_memory(monitor: TreeMonitor) -> None:
    """The summed peak RSS of the monitored processes is under RSS_CAP."""
    peak = monitor.peak_sum
    assert peak < RSS_CAP, (
        f"the engine's processes peaked at {peak / 2**20:.0f} MiB together, over the cap of "
        f"{RSS_CAP / 2**20:.0f} MiB:\n{monitor.describe()}"
    )


def run_engine(
    store: Path,
    job_id: str,
    policy: DecodePolicy,
    config: EngineConfig = CONFIG,
    *,
    keep_pixels: bool = False,
) -> Outcome:
    """Runs the engine over a job, catching what it raises; checks the memory cap."""
    out = Outcome()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            source = job_source(store, job_id)
        except PixCrawlerError as exc:  # job.json refused before any process starts
            out.error = exc
            return out
        with Stream(source, config=config, policy=policy) as stream:
            with TreeMonitor([stream.pid]) as out.monitor:
                try:
                    for batch in stream:
                        out.keys.extend(batch.keys)
                        if keep_pixels:
                            for key, image in zip(batch.keys, batch.images, strict=True):
                                out.images[key] = np.array(image)
                except Exception as exc:  # judged by the test: a refusal, or a bug
                    out.error = exc
            out.stats = stream.stats
    others = [w for w in caught if not issubclass(w.category, SampleWarning)]
    assert not others, [str(w.message) for w in others]
    out.warnings = [str(w.message) for w in caught if issubclass(w.category, SampleWarning)]
    check_memory(out.monitor)
    return out


def digit_png(i: int) -> bytes:
    return encode(digits()[i % len(digits())], "PNG")


def good_chunk(prefix: str, n: int = 3) -> tuple[bytes, list[str]]:
    names = [f"{prefix}-{i}.png" for i in range(n)]
    return chunk_zip([(name, digit_png(i)) for i, name in enumerate(names)]), names


# --------------------------------------------------------------------------- images

Catalogue = tuple[Path, list[Good], list[Bad]]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    """Job "catalogue": the unusual and the damaged images of `bad_data`, mixed, chunks of 8."""
    good, bad = image_catalogue()
    samples: list[Good | Bad] = [*good, *bad]
    random.Random(7).shuffle(samples)
    chunks = [
        chunk_zip([(s.name, s.data) for s in samples[i : i + 8]]) for i in range(0, len(samples), 8)
    ]
    store = tmp_path_factory.mktemp("catalogue")
    write_job(store, "catalogue", chunks)
    order = [s.name for s in samples]
    good.sort(key=lambda s: order.index(s.name))
    bad.sort(key=lambda s: order.index(s.name))
    return store, good, bad


CATALOGUE_CONFIG = CONFIG.replace(num_workers=2, slot_bytes=4 << 20, num_slots=4)


@pytest.mark.parametrize("on_error", ["skip", "warn"])
def test_image_catalogue(catalogue: Catalogue, on_error: OnError) -> None:
    """CMYK, 16-bit, palettes, EXIF orientations decode right; the damaged ones are skipped."""
    store, good, bad = catalogue
    policy = DecodePolicy(on_error=on_error)
    tally(bad=len(bad), unusual=len(good), samples=len(good))
    out = run_engine(store, "catalogue", policy, CATALOGUE_CONFIG, keep_pixels=True)
    assert out.error is None
    assert out.keys == [g.name for g in good]  # every valid image once, in dataset order
    assert out.stats["skipped"] == len(bad) and out.stats["worker_restarts"] == 0
    wrong = []
    for g in good:
        got = out.images[g.name]
        if got.shape != g.pixels.shape:
            wrong.append(f"{g.name}: shape {got.shape}, expected {g.pixels.shape}")
            continue
        error = float(np.abs(got.astype(int) - g.pixels.astype(int)).mean())
        if error > g.tolerance:
            wrong.append(f"{g.name}: mean error {error:.2f} > {g.tolerance}")
    if on_error == "skip":
        assert out.warnings == []
    else:
        assert len(out.warnings) == len(bad)
        for b, message in zip(bad, out.warnings, strict=True):
            if f"sample {b.name!r}" not in message or not re.search(b.reason, message):
                wrong.append(f"{b.name}: expected /{b.reason}/, got: {message}")
    assert not wrong, "\n".join(wrong)


def test_bomb_headers_are_refused_by_the_pixel_budget(
    catalogue: Catalogue,
) -> None:
    """With an output size every bomb passes the slot check, so the budget must stop it."""
    store, good, bad = catalogue
    tally(bad=4)
    out = run_engine(store, "catalogue", WARN, CATALOGUE_CONFIG)
    bombs = [b for b in bad if b.name.startswith("bomb.")]
    assert out.error is None and out.keys == [g.name for g in good]
    said = {b.name: m for b, m in zip(bad, out.warnings, strict=True)}
    for b in bombs:
        assert re.search(r"\d+x\d+ = [\d,]+ pixels, over the budget", said[b.name]), said[b.name]


def test_the_first_bad_image_stops_the_run_by_default(
    catalogue: Catalogue,
) -> None:
    store, good, bad = catalogue
    out = run_engine(store, "catalogue", DecodePolicy(), CATALOGUE_CONFIG)
    assert isinstance(out.error, DecodeError)
    first = bad[0]
    assert out.error.key == first.name and re.search(first.reason, str(out.error))
    assert f"chunk {out.error.chunk_id}" in str(out.error)
    # What came before was delivered once, in order: a prefix of the valid images.
    assert out.keys == [g.name for g in good][: len(out.keys)]


# --------------------------------------------------------------------------- fuzzing


FUZZ_POLICY = DecodePolicy(image_size=(24, 24), max_pixels=4_000_000, on_error="skip")


def _bases() -> list[tuple[str, bytes]]:
    ph, gr = photo(), grey()
    return [
        (".jpg", encode(ph, "JPEG", quality=90)),
        (".jpg", encode(ph, "JPEG", quality=90, progressive=True, exif=b"")),
        (".jpg", encode(gr, "JPEG", quality=80)),
        (".png", encode(ph, "PNG")),
        (".png", encode(gr, "PNG")),
        (".gif", encode(ph, "GIF")),
    ]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A real image with one damage: a cut, flipped bytes, junk, zeros, or a splice."""
    bases = _bases()
    ext, data = draw(st.sampled_from(bases))
    n = len(data)
    # Half the positions fall in the first 700 bytes, where the headers are parsed.
    pos = draw(st.one_of(st.integers(0, min(n, 700) - 1), st.integers(0, n - 1)))
    kind = draw(st.sampled_from(["cut", "flip", "junk", "zeros", "splice"]))
    if kind == "cut":
        return ext, data[:pos]
    if kind == "flip":
        out = bytearray(data)
        for p in [pos, *draw(st.lists(st.integers(0, n - 1), max_size=3))]:
            out[p] = draw(st.integers(0, 255))
        return ext, bytes(out)
    if kind in ("junk", "zeros"):
        k = draw(st.integers(1, 64))
        blob = draw(st.binary(min_size=k, max_size=k)) if kind == "junk" else bytes(k)
        return ext, data[:pos] + blob + data[pos + k :]
    _, other = draw(st.sampled_from(bases))
    return ext, data[:pos] + other[draw(st.integers(0, len(other) - 1)) :]


def _reference(data: bytes) -> np.ndarray | None:
    """decode_image in this process: the pixels, or None for a DecodeError (nothing else)."""
    try:
        return decode_image(data, FUZZ_POLICY)
    except DecodeError:
        return None


@settings(
    max_examples=5,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
@given(samples=st.lists(mutated(), min_size=12, max_size=24))
def test_mutated_images_decode_as_in_process_or_are_skipped(
    samples: list[tuple[str, bytes]],
) -> None:
    """Whatever the damage, the engine agrees with `decode_image` sample by sample.

    A sample decodable in this process arrives with the same pixels; one that raises
    DecodeError here is skipped there; no worker dies and nothing else is lost.
    """
    named = [(f"{i:03d}{ext}", data) for i, (ext, data) in enumerate(samples)]
    expected = {name: _reference(data) for name, data in named}
    tally(mutated=len(named))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        write_job(store, "fuzz", [chunk_zip(named[i : i + 6]) for i in range(0, len(named), 6)])
        out = run_engine(store, "fuzz", FUZZ_POLICY, keep_pixels=True)
    assert out.error is None
    assert out.keys == [name for name, _ in named if expected[name] is not None]
    assert out.stats["skipped"] == sum(v is None for v in expected.values())
    assert out.stats["worker_restarts"] == 0
    for key in out.keys:
        np.testing.assert_array_equal(out.images[key], expected[key], err_msg=key)


# --------------------------------------------------------------------------- zip members


def _jpeg() -> bytes:
    return encode(photo(), "JPEG", quality=90)


def _png() -> bytes:
    return encode(grey(), "PNG")


@dataclass(frozen=True)
class ZipCase:
    """Hostile members between two valid samples ("before.jpg", "after.png") of chunk 0.

    Attributes:
        members: written after "before.jpg", in this order.
        listed: the names the manifest lists between "before.jpg" and "after.png".
        bad: the listed names that must be skipped, each with an error matching `reason`.
        overlap: names of members sharing one 16 MiB deflate kernel (see `RawZip`).
    """

    members: Callable[[], list[Member]]
    listed: tuple[str, ...]
    bad: tuple[str, ...]
    reason: str = ""
    overlap: tuple[str, ...] = ()


BOMB_NAMES = tuple(f"overlap-{i}.png" for i in range(8))
ZIP_CASES = {
    # Declares 1,000 bytes (ratio 1:650) but inflates to 512 MiB: the caps read the header.
    "lying-deflate-size": ZipCase(
        lambda: [zeros_member("lie.png", BOMB, method=DEFLATED, declared=1000)],
        ("lie.png",),
        ("lie.png",),
    ),
    "lying-bzip2-size": ZipCase(
        lambda: [zeros_member("lie.png", BOMB, method=BZIP2, declared=1000)],
        ("lie.png",),
        ("lie.png",),
    ),
    "huge-ratio": ZipCase(
        lambda: [zeros_member("ratio.png", 64 << 20, method=DEFLATED)],
        ("ratio.png",),
        ("ratio.png",),
        r"compressed \d+:1",
    ),
    "declared-over-the-size-cap": ZipCase(
        lambda: [Member("big.png", b"tiny", STORED, size=3 << 30)],
        ("big.png",),
        ("big.png",),
        r"over the cap",
    ),
    "overlapping-entries": ZipCase(
        lambda: [], BOMB_NAMES, BOMB_NAMES, r"compressed \d+:1", overlap=BOMB_NAMES
    ),
    "encrypted": ZipCase(
        lambda: [member("secret.jpg", _jpeg(), flags=0x1)], ("secret.jpg",), ("secret.jpg",)
    ),
    "unsupported-method": ZipCase(
        lambda: [member("implode.jpg", _jpeg(), method=6), member("aes.jpg", _jpeg(), method=99)],
        ("implode.jpg", "aes.jpg"),
        ("implode.jpg", "aes.jpg"),
    ),
    "bad-crc": ZipCase(
        lambda: [member("crc.jpg", _jpeg(), crc=0xDEADBEEF)], ("crc.jpg",), ("crc.jpg",), r"CRC"
    ),
    "local-name-differs": ZipCase(
        lambda: [Member("shown.jpg", _jpeg(), size=len(_jpeg()), local_name="../hidden.jpg")],
        ("shown.jpg",),
        ("shown.jpg",),
        r"cannot be extracted",
    ),
    "listed-but-missing": ZipCase(lambda: [], ("ghost.jpg",), ("ghost.jpg",), r"no such file"),
    "unlisted-extras": ZipCase(
        lambda: [member("extra.jpg", _jpeg()), member("../../extra.jpg", _jpeg())], (), ()
    ),
    "duplicate-member-names": ZipCase(
        lambda: [member("dup.jpg", _jpeg()), member("dup.jpg", _png())], ("dup.jpg",), ()
    ),
    "zip-slip-names": ZipCase(
        lambda: [
            member("../../etc/x.jpg", _jpeg()),
            member("/etc/passwd.png", _png()),
            member("..\\..\\windows.jpg", _jpeg()),
            member("a/../../../up.png", _png()),
        ],
        ("../../etc/x.jpg", "/etc/passwd.png", "..\\..\\windows.jpg", "a/../../../up.png"),
        (),
    ),
}


def zip_case_chunk(c: ZipCase) -> tuple[bytes, list[str], set[str]]:
    """Chunk 0 of a ZipCase, the manifest's order, and the names of the hostile members."""
    order = ["before.jpg", *c.listed, "after.png"]
    z = RawZip().add(member("manifest.jsonl", manifest_text((name, "x") for name in order)))
    z.add(member("before.jpg", _jpeg()))
    members = c.members()
    for m in members:
        z.add(m)
    if c.overlap:
        z.add_overlapping(c.overlap, 16 << 20)
    z.add(member("after.png", _png()))
    return z.bytes(), order, {*c.listed, *(m.name for m in members), *c.overlap}


@pytest.mark.parametrize("case", list(ZIP_CASES), ids=list(ZIP_CASES))
def test_hostile_zip_members_are_per_sample_errors(tmp_path: Path, case: str) -> None:
    c = ZIP_CASES[case]
    chunk, order, hostile = zip_case_chunk(c)
    second, second_keys = good_chunk("next")
    write_job(tmp_path, "zip", [chunk, second])
    tally(bad=len(hostile), samples=len(order) - len(c.bad) + len(second_keys))
    out = run_engine(tmp_path, "zip", WARN)
    assert out.error is None, f"the run stopped: {out.error!r}"
    assert out.keys == [n for n in order if n not in c.bad] + second_keys
    assert out.stats["skipped"] == len(c.bad)
    assert len(out.warnings) == len(c.bad)
    for name, message in zip(c.bad, out.warnings, strict=True):
        assert f"chunk 0, sample {name!r}" in message, message
        assert re.search(c.reason, message), message


DECODE_CHUNK = """
import json, sys
from pixcrawler_engine import DecodePolicy, decode_chunk

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

data = open(sys.argv[1], "rb").read()
from pixcrawler_engine.runtime._worker import warm_up
warm_up()  # the decoders' lazy imports (OpenCV's ~40 MB) are not the chunk's cost,
import pyarrow  # nor pyarrow's (25-50 MB): decode_chunk's RecordBatch needs it, a worker not
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
before = status("VmRSS:")
try:
    batch = decode_chunk(data, DecodePolicy(image_size=(32, 32), on_error="skip"))
    keys, error = batch.column("key").to_pylist(), None
except Exception as exc:
    keys, error = [], f"{type(exc).__name__}: {exc}"
print(json.dumps({"keys": keys, "error": error, "grown": status("VmHWM:") - before}))
"""
PLAIN_CAP = 32 << 20  # decoding two small images grows it by ~0


@pytest.mark.parametrize(
    "case",
    ["lying-deflate-size", "lying-bzip2-size", "huge-ratio", "encrypted", "unsupported-method"],
)
def test_decode_chunk_applies_the_same_caps(tmp_path: Path, case: str) -> None:
    """`decode_chunk`, the plain function other runtimes call (DESIGN §3), is as careful as the
    workers: hostile members are skipped samples, in bounded memory (a child process here, so
    that its peak RSS can be read)."""
    c = ZIP_CASES[case]
    chunk, order, hostile = zip_case_chunk(c)
    (tmp_path / "chunk.zip").write_bytes(chunk)
    tally(bad=len(hostile), samples=len(order) - len(c.bad))
    proc = subprocess.run(
        [sys.executable, "-c", DECODE_CHUNK, str(tmp_path / "chunk.zip")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["error"] is None, result["error"]
    assert result["keys"] == [n for n in order if n not in c.bad]
    assert result["grown"] < PLAIN_CAP, f"decode_chunk grew by {result['grown'] / 2**20:.0f} MiB"


def test_the_overlapping_bomb_is_a_valid_zip() -> None:
    """The bomb is real: zipfile reads every member, each inflating the shared kernel."""
    data = RawZip().add_overlapping(BOMB_NAMES[:3], 1 << 20).bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        sizes = [len(zf.read(name)) for name in BOMB_NAMES[:3]]
        assert sizes == [zf.getinfo(name).file_size for name in BOMB_NAMES[:3]]
    assert min(sizes) >= 1 << 20 and len(data) < 4096


# --------------------------------------------------------------------------- chunks, job.json


Edit = Callable[[dict[str, Any], Path], None]


@dataclass(frozen=True)
class ChunkCase:
    """Chunk 1 of a job (chunk 0 is valid) is hostile, or job.json lies about it.

    Attributes:
        chunk: chunk 1's bytes; None keeps a valid chunk (for the job.json lies).
        error: the exception type of the refusal.
        reason: a regex its message matches.
        edit: changes job.json (given the store's folder) before it is written.
        at_load: the refusal comes when job.json is read, before any chunk is delivered.
    """

    chunk: Callable[[], bytes] | None
    error: type[PixCrawlerError]
    reason: str
    edit: Edit | None = None
    at_load: bool = False


def _manifest(*lines: bytes) -> Callable[[], bytes]:
    return lambda: chunk_zip([("a.png", digit_png(0))], manifest=b"\n".join(lines) + b"\n")


def _chunk1(**changes: Any) -> Edit:
    def edit(job: dict[str, Any], _store: Path) -> None:
        job["chunks"][1].update(changes)

    return edit


def _outside(url: Callable[[Path], str]) -> Edit:
    """Points chunk 1 at a copy of itself outside the store (sha256 and size still match)."""

    def edit(job: dict[str, Any], store: Path) -> None:
        src = store / "jobs" / "chunky" / "chunks" / "1.zip"
        (store.parent / "outside.zip").write_bytes(src.read_bytes())
        job["chunks"][1]["url"] = url(store.parent / "outside.zip")

    return edit


NOT_AN_OBJECT = r'must be an object with a string "file"'
CHUNK_CASES = {
    "duplicate-entries": ChunkCase(
        _manifest(b'{"file": "a.png"}', b'{"file": "a.png"}'), DecompressionError, "twice"
    ),
    "entry-is-a-list": ChunkCase(_manifest(b'["a.png"]'), DecompressionError, NOT_AN_OBJECT),
    "file-is-a-number": ChunkCase(_manifest(b'{"file": 7}'), DecompressionError, NOT_AN_OBJECT),
    "file-is-missing": ChunkCase(_manifest(b'{"label": "x"}'), DecompressionError, NOT_AN_OBJECT),
    "line-is-not-json": ChunkCase(_manifest(b"{file: a.png}"), DecompressionError, "not JSON"),
    "manifest-not-utf8": ChunkCase(
        _manifest(b'{"file": "a.png", "label": "\xff\xfe"}'), DecompressionError, "utf-8"
    ),
    # These say they hold one image: a chunk the job calls empty is never fetched.
    "no-manifest": ChunkCase(
        lambda: RawZip().add(member("a.png", digit_png(0))).bytes(),
        DecompressionError,
        "no manifest.jsonl",
        _chunk1(num_images=1),
    ),
    "manifest-declared-too-big": ChunkCase(
        lambda: RawZip().add(Member("manifest.jsonl", b"{}", size=100 << 20)).bytes(),
        DecompressionError,
        "over the cap",
        _chunk1(num_images=1),
    ),
    # Declares 1,000 bytes but inflates to 512 MiB, in the supervisor that reads it.
    "manifest-lying-deflate-size": ChunkCase(
        lambda: (
            RawZip()
            .add(zeros_member("manifest.jsonl", BOMB, method=DEFLATED, declared=1000))
            .bytes()
        ),
        DecompressionError,
        "chunk 1",
    ),
    "chunk-is-html": ChunkCase(
        lambda: b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>",
        DecompressionError,
        "cannot be read as a zip",
        _chunk1(num_images=1),
    ),
    "chunk-cut-short": ChunkCase(
        lambda: good_chunk("cut")[0][:300],
        DecompressionError,
        "cannot be read as a zip",
        _chunk1(num_images=1),
    ),
    "job-says-more-images": ChunkCase(
        None, DecompressionError, "lists 3 samples but the job says 5", _chunk1(num_images=5)
    ),
    "job-says-fewer-images": ChunkCase(
        None, DecompressionError, "lists 3 samples but the job says 1", _chunk1(num_images=1)
    ),
    "job-lies-about-sha256": ChunkCase(
        None, DownloadError, "does not match its manifest", _chunk1(sha256="0" * 64)
    ),
    "job-lies-about-size": ChunkCase(
        None, DownloadError, "does not match its manifest", _chunk1(size_bytes=10)
    ),
    "url-climbs-out-of-the-store": ChunkCase(
        None, DownloadError, "outside the store", _outside(lambda _: "../../../outside.zip")
    ),
    "url-absolute-outside-the-store": ChunkCase(
        None, DownloadError, "outside the store", _outside(lambda p: p.as_uri())
    ),
    "url-leaves-for-http": ChunkCase(
        None,
        PixCrawlerError,
        r"must be file",
        _chunk1(url="http://127.0.0.1:9/chunks/1.zip"),
        at_load=True,
    ),
    "num-images-is-a-string": ChunkCase(
        None, PixCrawlerError, r"'num_images' must be a number", _chunk1(num_images="3"), True
    ),
    "two-chunks-one-index": ChunkCase(
        None, PixCrawlerError, "same index", _chunk1(index=0), at_load=True
    ),
    "sha256-not-hex": ChunkCase(
        None, PixCrawlerError, "64 hex digits", _chunk1(sha256="../../etc/passwd"), True
    ),
}


@pytest.mark.parametrize("case", list(CHUNK_CASES), ids=list(CHUNK_CASES))
def test_hostile_chunks_and_job_json_are_refused_cleanly(tmp_path: Path, case: str) -> None:
    c = CHUNK_CASES[case]
    first, first_keys = good_chunk("first")
    second = c.chunk() if c.chunk is not None else good_chunk("second")[0]
    store = tmp_path / "store"
    edit = c.edit
    write_job(
        store, "chunky", [first, second], edit=(lambda job: edit(job, store)) if edit else None
    )
    tally(bad=1, samples=0 if c.at_load else len(first_keys))
    out = run_engine(store, "chunky", SKIP)
    assert isinstance(out.error, c.error), f"expected {c.error.__name__}, got {out.error!r}"
    message = str(out.error)
    assert re.search(c.reason, message), message
    if c.at_load:
        assert out.monitor is None  # refused before any process started
        return
    assert "chunk 1" in message, message
    assert out.keys == first_keys  # the chunk before it, exactly once


def test_a_job_total_that_lies_does_not_change_what_is_delivered(tmp_path: Path) -> None:
    """job.json's num_images is informational: the engine plans from the chunks."""
    first, first_keys = good_chunk("first")
    second, second_keys = good_chunk("second")

    def lie(job: dict[str, Any]) -> None:
        job["num_images"] = 10**12

    write_job(tmp_path, "total", [first, second], edit=lie)
    tally(bad=1, samples=6)
    out = run_engine(tmp_path, "total", SKIP)
    assert out.error is None and out.keys == first_keys + second_keys


# --------------------------------------------------------------------------- paths, via the CLI


SLIP_NAMES = (
    "../../escaped-relative.jpg",
    "../../../../../../../../tmp/escaped-deep.png",
    "..\\..\\escaped-backslash.jpg",
    "a/../../../escaped-mixed.png",
    "./../escaped-dot.jpg",
)


def _tree(root: Path, skip: tuple[Path, ...]) -> dict[str, int]:
    """Every file under `root` (outside `skip`) with its size."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(s) for s in skip):
            found[str(path.relative_to(root))] = path.stat().st_size
    return found


@pytest.mark.parametrize("image_size", [None, "16x16"], ids=["original-files", "decoded"])
def test_zip_slip_member_names_never_leave_the_output_folder(
    tmp_path: Path, image_size: str | None
) -> None:
    """`pixcrawler download --format images`: hostile member names and labels stay keys."""
    absolute = tmp_path / "escaped-absolute.jpg"
    names = [*SLIP_NAMES, str(absolute), "plain.png"]
    labels = ["../../label-escape", str(tmp_path / "label-absolute"), "..", "metadata.csv"]
    samples = [(name, _jpeg() if name.endswith(".jpg") else _png()) for name in names]
    entries = [(name, labels[i % len(labels)]) for i, name in enumerate(names)]
    zip_bytes = chunk_zip(samples, manifest=manifest_text(entries))
    store = tmp_path / "store"
    write_job(store, "slip", [zip_bytes])
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    before = _tree(tmp_path, (out, tmp))
    cmd = [sys.executable, "-m", "pixcrawler", "download", "slip", "--base-url", store.as_uri()]
    cmd += ["--format", "images", "--output-dir", str(out), "--no-progress", "--num-workers", "1"]
    if image_size:
        cmd += ["--image-size", image_size]
    env = {k: v for k, v in os.environ.items() if k != "PIXCRAWLER_API_KEY"}
    env["TMPDIR"] = str(tmp)  # whatever goes to temporary files stays in view
    tally(bad=len(names) - 1 + len(labels), samples=len(names))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with TreeMonitor([proc.pid]) as monitor:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:  # timed out: its engine follows it out (it watches us)
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, stderr.decode()
    check_memory(monitor)
    assert _tree(tmp_path, (out, tmp)) == before  # nothing new beside the output folder
    for path in [*tmp_path.rglob("escaped-*"), *Path("/tmp").glob("escaped-deep*")]:
        pytest.fail(f"{path} was written outside the export")
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to((out / "slip").resolve()), path
    exported = [p for p in (out / "slip").rglob("*") if p.is_file()]
    images = [p for p in exported if p.suffix in (".jpg", ".png") and ".pixcrawler" not in p.parts]
    assert len(images) == len(names), sorted(map(str, exported))
    assert f"Saved {len(names)} images".encode() in stdout
