"""Builders of hostile inputs for the fault tests, and a meter of what the engine's processes use.

Every image starts as a real photo or scan (scikit-image's chelsea and camera, scikit-learn's
digits), encoded in memory, then damaged or wrapped on purpose:

    images     truncated and corrupted JPEG/PNG, empty files, HTML and JSON under image names,
               decompression-bomb headers (JPEG, PNG, GIF, BMP), CMYK, 16-bit, palette with
               transparency, EXIF orientations (`stored_for_orientation` gives the stored
               pixels whose upright view is a known array)
    zips       `RawZip` writes archives byte by byte, so that they can lie: declared sizes
               that are not the real ones, encrypted or unsupported members, names that climb
               out of a folder, members that overlap (a Fifield-style zip bomb)
    stores     `write_job` writes `<store>/jobs/<id>/` with a job.json whose sizes and sha256
               match the chunk files (so only the content is hostile), or that lies on purpose

`TreeMonitor` samples a process tree in a thread: RSS (summed, and each process's peak from
`VmHWM`), open file descriptors, and the `/dev/shm` pages of the tree's segments. `tally`
counts injected faults and inputs when `PIXCRAWLER_FAULT_TALLY` names a file (for the README).
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import io
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from engine_helpers import segments_of
from PIL import Image

__all__ = [
    "BZIP2",
    "DEFLATED",
    "STORED",
    "Bad",
    "Good",
    "Member",
    "RawZip",
    "Sample",
    "TreeMonitor",
    "chunk_zip",
    "digits",
    "encode",
    "exif",
    "grey",
    "image_catalogue",
    "jpeg_segments",
    "jpeg_with_size",
    "manifest_text",
    "member",
    "photo",
    "png",
    "png16",
    "png_chunk",
    "stored_for_orientation",
    "tally",
    "write_job",
    "zeros_member",
]

STORED, DEFLATED, BZIP2 = 0, 8, 12
_SHM = Path("/dev/shm")

# --------------------------------------------------------------------------- real images


@functools.cache
def photo() -> np.ndarray:
    """scikit-image's chelsea, 72x48 RGB: small, not square, every orientation differs."""
    from skimage import data

    im = Image.fromarray(data.chelsea()).resize((72, 48), Image.Resampling.LANCZOS)
    return np.asarray(im)


@functools.cache
def grey() -> np.ndarray:
    """scikit-image's camera, 48x40 grayscale."""
    from skimage import data

    return np.asarray(Image.fromarray(data.camera()).resize((48, 40), Image.Resampling.LANCZOS))


@functools.cache
def digits() -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits as uint8 (N, 32, 32) (0-16 scaled, x4 nearest)."""
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    return images.repeat(4, axis=1).repeat(4, axis=2)


def encode(pixels: np.ndarray | Image.Image, fmt: str, **params: Any) -> bytes:
    """The bytes of an image saved by Pillow in `fmt`."""
    im = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def exif(orientation: int) -> bytes:
    """An EXIF block holding only the Orientation tag."""
    block = Image.Exif()
    block[0x0112] = orientation
    return block.tobytes()


def stored_for_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels to store so that a viewer honouring EXIF `orientation` shows `upright`.

    Written from the EXIF definitions (where row 0 and column 0 of the stored image go),
    independently of Pillow's `exif_transpose`.
    """
    t = (1, 0, *range(2, upright.ndim))  # swap rows and columns, keep channels
    stored = {
        1: upright,
        2: upright[:, ::-1],  # mirrored left-right
        3: upright[::-1, ::-1],  # rotated 180
        4: upright[::-1, :],  # mirrored top-bottom
        5: upright.transpose(t),  # mirrored along the main diagonal
        6: np.rot90(upright, 1),  # shown after a 90 degree clockwise turn
        7: upright[::-1, ::-1].transpose(t),  # mirrored along the other diagonal
        8: np.rot90(upright, -1),  # shown after a 90 degree counter-clockwise turn
    }[orientation]
    return np.ascontiguousarray(stored)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG marker segment before the first scan's data."""
    segments = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segments.append((marker, pos, pos + 2 + length))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        pos += 2 + length
    return segments


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF) claims another size; the scan data is unchanged."""
    out = bytearray(data)
    for marker, start, _ in jpeg_segments(data):
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", out, start + 5, height, width)
            return bytes(out)
    raise ValueError("no SOF segment")


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, depth: int, colour: int, rows: bytes, *, level: int = 6) -> bytes:
    """A PNG written by hand: IHDR as given (it may lie), `rows` (filter bytes included) in IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            png_chunk(b"IHDR", ihdr),
            png_chunk(b"IDAT", zlib.compress(rows, level)),
            png_chunk(b"IEND", b""),
        )
    )


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG (grey (H, W) or RGB (H, W, 3)) of uint16 samples; Pillow cannot write RGB16."""
    colour = 0 if pixels.ndim == 2 else 2
    h, w = pixels.shape[:2]
    body = pixels.astype(">u2").reshape(h, -1).view(np.uint8)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), body], axis=1)
    return png(w, h, 16, colour, rows.tobytes())


# --------------------------------------------------------------------------- a catalogue


@dataclass(frozen=True)
class Good:
    """An unusual but valid image and the RGB pixels it must decode to (no resize).

    `tolerance` is the largest mean absolute error allowed: 0 for lossless formats, a few
    levels for JPEG (a wrong orientation or colour conversion costs about 30).
    """

    name: str
    data: bytes
    pixels: np.ndarray
    tolerance: float = 0.0


@dataclass(frozen=True)
class Bad:
    """A sample no decoder can turn into pixels; `reason` is a regex its error must match."""

    name: str
    data: bytes
    reason: str


TRUNCATED = r"corrupt or truncated"
BUDGET = r"over the budget"
JPEG_TOLERANCE = 4.0


def _rgb(grey_pixels: np.ndarray) -> np.ndarray:
    return np.repeat(grey_pixels[:, :, None], 3, axis=2)


def _without(data: bytes, marker: int) -> bytes:
    for m, start, end in jpeg_segments(data):
        if m == marker:
            return data[:start] + data[end:]
    raise ValueError(f"no marker {marker:#x}")


def _scan_start(data: bytes) -> int:
    return next(end for m, _, end in jpeg_segments(data) if m == 0xDA)


def _png_with_junk_idat(data: bytes) -> bytes:
    """The PNG with its IDAT payload replaced by junk (and a CRC that matches the junk)."""
    out = bytearray(data)
    at = data.index(b"IDAT")
    (n,) = struct.unpack_from(">I", data, at - 4)
    junk = bytes((7 * k + 3) % 251 for k in range(n))
    out[at + 4 : at + 4 + n] = junk
    struct.pack_into(">I", out, at + 4 + n, zlib.crc32(b"IDAT" + junk))
    return bytes(out)


def _patched(data: bytes, fmt: str, offset: int, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def image_catalogue() -> tuple[list[Good], list[Bad]]:
    """Unusual valid images with their expected pixels, and damaged or hostile ones."""
    ph, gr = photo(), grey()
    jpeg, pngb = encode(ph, "JPEG", quality=95), encode(ph, "PNG")
    pal = Image.fromarray(ph).quantize(16)
    index = np.asarray(pal)
    colours = np.array(pal.getpalette() or [], np.uint8)[: 3 * 16].reshape(-1, 3)
    common = int(np.bincount(index.ravel()).argmax())
    alpha = ((np.arange(ph.shape[1]) * 3) % 256).astype(np.uint8)[None, :]
    good = [
        Good("photo.jpg", jpeg, ph, JPEG_TOLERANCE),
        Good("progressive.jpg", encode(ph, "JPEG", quality=95, progressive=True), ph, 4.0),
        Good("grey.jpg", encode(gr, "JPEG", quality=95), _rgb(gr), JPEG_TOLERANCE),
        Good("cmyk.jpg", encode(Image.fromarray(ph).convert("CMYK"), "JPEG", quality=95), ph, 4.0),
        Good("trailing-junk.jpg", jpeg + b"\x00junk" * 50, ph, JPEG_TOLERANCE),
        Good("png-named.jpg", pngb, ph),
        Good("photo.png", pngb, ph),
        Good("grey16.png", png16(gr.astype(np.uint16) * 257), _rgb(gr)),
        Good("rgb16.png", png16(ph.astype(np.uint16) * 257), ph),
        Good("palette-transparent.png", encode(pal, "PNG", transparency=common), colours[index]),
        Good("palette-transparent.gif", encode(pal, "GIF", transparency=common), colours[index]),
        Good(
            "grey-alpha.png",
            encode(
                Image.fromarray(np.dstack([gr, np.broadcast_to(alpha[:, :48], gr.shape)]), "LA"),
                "PNG",
            ),
            _rgb(gr),
        ),
        Good(
            "rgba.png",
            encode(
                Image.fromarray(np.dstack([ph, np.broadcast_to(alpha, ph.shape[:2])]), "RGBA"),
                "PNG",
            ),
            ph,
        ),
        Good(
            "bilevel.png",
            encode(Image.fromarray(gr > 128), "PNG"),
            _rgb(np.where(gr > 128, 255, 0).astype(np.uint8)),
        ),
        Good("photo.bmp", encode(ph, "BMP"), ph),
        Good("photo.tif", encode(ph, "TIFF"), ph),
        Good("photo.webp", encode(ph, "WEBP", lossless=True), ph),
    ]
    for o in range(1, 9):
        stored = stored_for_orientation(ph, o)
        good.append(
            Good(f"exif-{o}.jpg", encode(stored, "JPEG", quality=95, exif=exif(o)), ph, 4.0)
        )
        good.append(Good(f"exif-{o}.png", encode(stored, "PNG", exif=exif(o)), ph))
    gif = encode(pal, "GIF")
    bad = [
        Bad("empty.jpg", b"", r"empty \(0 bytes\)"),
        Bad("empty.png", b"", r"empty \(0 bytes\)"),
        Bad("login-page.jpg", b"<!DOCTYPE html><html><body>Sign in</body></html>", r"HTML"),
        Bad("rate-limited.png", b'{"error": "rate limited"}', r"JSON"),
        Bad("notes.jpg", b"these are not the pixels you are looking for", r"not a supported image"),
        Bad("half.jpg", jpeg[: len(jpeg) // 2], TRUNCATED),
        Bad("ninety-percent.jpg", jpeg[: len(jpeg) * 9 // 10], TRUNCATED),
        Bad("no-eoi.jpg", jpeg[:-2], TRUNCATED),
        Bad("headers-only.jpg", jpeg[: _scan_start(jpeg)], TRUNCATED),
        Bad("no-frame.jpg", _without(jpeg, 0xC0), TRUNCATED),
        Bad("zero-width.jpg", jpeg_with_size(jpeg, 0, 48), TRUNCATED),
        Bad("half.png", pngb[: len(pngb) // 2], TRUNCATED),
        Bad("ihdr-only.png", pngb[:33], TRUNCATED),
        Bad("bad-ihdr-crc.png", _patched(pngb, ">I", 29, 0), TRUNCATED),
        Bad("junk-idat.png", _png_with_junk_idat(pngb), TRUNCATED),
        Bad("bomb.jpg", jpeg_with_size(jpeg, 65000, 65000), BUDGET),
        Bad("bomb.png", png(100_000, 100_000, 8, 2, bytes(3 * 100_000 + 1)), BUDGET),
        Bad("bomb.gif", _patched(gif, "<HH", 6, 65535, 65535), BUDGET),
        Bad("bomb.bmp", _patched(encode(ph, "BMP"), "<ii", 18, 50_000, 50_000), BUDGET),
    ]
    return good, bad


# --------------------------------------------------------------------------- zips by hand


@dataclass(frozen=True)
class Member:
    """One zip entry as written: `payload` is stored as is (compressed already, if at all).

    Attributes:
        name: the name in the central directory (and, unless `local_name`, the local header).
        payload: the bytes that follow the local header.
        method: 0 stored, 8 deflate, 12 bzip2, or anything else (unsupported on purpose).
        size: the declared uncompressed size (it may lie).
        crc: the declared CRC-32.
        flags: general purpose flags (bit 0: encrypted).
        local_name: a different name for the local header (a mismatch zipfile refuses).
    """

    name: str
    payload: bytes
    method: int = STORED
    size: int = 0
    crc: int = 0
    flags: int = 0
    local_name: str | None = None


def member(
    name: str,
    data: bytes,
    *,
    method: int = STORED,
    size: int | None = None,
    crc: int | None = None,
    flags: int = 0,
) -> Member:
    """A member holding `data`, compressed with `method`; `size`/`crc` override the truth."""
    if method == DEFLATED:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        payload = c.compress(data) + c.flush()
    elif method == BZIP2:
        payload = bz2.compress(data, 9)
    else:
        payload = data
    return Member(
        name,
        payload,
        method,
        len(data) if size is None else size,
        zlib.crc32(data) if crc is None else crc,
        flags,
    )


@functools.cache
def _zeros_payload(n: int, method: int) -> bytes:
    block = bytes(1 << 20)
    if method == DEFLATED:
        dc = zlib.compressobj(9, zlib.DEFLATED, -15)
        parts = [dc.compress(block[: min(len(block), n - i)]) for i in range(0, n, len(block))]
        return b"".join([*parts, dc.flush()])
    if method == BZIP2:
        bc = bz2.BZ2Compressor(9)
        parts = [bc.compress(block[: min(len(block), n - i)]) for i in range(0, n, len(block))]
        return b"".join([*parts, bc.flush()])
    raise ValueError(f"method {method}")


def zeros_member(name: str, n: int, *, method: int, declared: int | None = None) -> Member:
    """`n` zero bytes compressed with `method` (streamed: never `n` bytes in memory at once).

    With `declared`, the headers claim that many bytes instead of `n` (and the CRC of that
    many zeros), so the member looks small and harmless until it is inflated.
    """
    size = n if declared is None else declared
    return Member(name, _zeros_payload(n, method), method, size, _zeros_crc(size))


def _zeros_crc(n: int) -> int:
    crc, block = 0, bytes(1 << 20)
    for i in range(0, n, len(block)):
        crc = zlib.crc32(block[: min(len(block), n - i)], crc)
    return crc


_EPOCH = (0, 33)  # DOS time and date of 1980-01-01 00:00


class RawZip:
    """A zip archive written byte by byte: whatever the headers say is what they say."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._central: list[bytes] = []

    def _local(
        self, name: bytes, method: int, crc: int, csize: int, size: int, flags: int
    ) -> bytes:
        return (
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                20,
                flags,
                method,
                *_EPOCH,
                crc,
                csize,
                size,
                len(name),
                0,
            )
            + name
        )

    def _entry(
        self, name: bytes, offset: int, method: int, crc: int, csize: int, size: int, flags: int
    ) -> None:
        fixed = (0x02014B50, 20, 20, flags, method, *_EPOCH, crc, csize, size, len(name))
        tail = (0, 0, 0, 0, 0, offset)  # extra, comment, disk, internal, external, offset
        self._central.append(struct.pack("<IHHHHHHIIIHHHHHII", *fixed, *tail) + name)

    def add(self, m: Member) -> RawZip:
        offset = len(self._data)
        local = (m.local_name or m.name).encode()
        self._data += self._local(local, m.method, m.crc, len(m.payload), m.size, m.flags)
        self._data += m.payload
        self._entry(m.name.encode(), offset, m.method, m.crc, len(m.payload), m.size, m.flags)
        return self

    def add_overlapping(self, names: Sequence[str], kernel_bytes: int) -> RawZip:
        """Members that share one deflate kernel of `kernel_bytes` zeros (D. Fifield's bomb).

        Member i's compressed data starts with a stored deflate block that quotes member
        i+1's local header, then runs on into member i+1's data: every member is a valid
        deflate stream that ends in the same kernel, so N members inflate to about N times
        `kernel_bytes` from one kernel. Each one's sizes and CRC are the true ones.
        """
        kernel = _zeros_payload(kernel_bytes, DEFLATED)
        encoded = [n.encode() for n in names]
        # Work backwards: a local header holds its member's sizes and CRC, which cover the
        # later headers it quotes.
        headers: list[bytes] = [b""] * len(names)
        csize, size, tail = len(kernel), kernel_bytes, b""  # tail: bytes before the zeros
        crcs: list[int] = [0] * len(names)
        sizes: list[tuple[int, int]] = [(0, 0)] * len(names)
        for i in range(len(names) - 1, -1, -1):
            if i < len(names) - 1:
                quoted = headers[i + 1]
                csize += 5 + len(quoted)
                size += len(quoted)
                tail = quoted + tail
            crc = zlib.crc32(tail)
            block = bytes(1 << 20)
            for j in range(0, kernel_bytes, len(block)):
                crc = zlib.crc32(block[: min(len(block), kernel_bytes - j)], crc)
            crcs[i], sizes[i] = crc, (csize, size)
            headers[i] = self._local(encoded[i], DEFLATED, crc, csize, size, 0)
        for i, name in enumerate(encoded):
            self._entry(name, len(self._data), DEFLATED, crcs[i], *sizes[i], 0)
            self._data += headers[i]
            if i < len(names) - 1:
                n = len(headers[i + 1])
                self._data += struct.pack("<BHH", 0, n, n ^ 0xFFFF)  # stored, not final
        self._data += kernel
        return self

    def bytes(self) -> bytes:
        central = b"".join(self._central)
        n = len(self._central)
        end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), len(self._data), 0)
        return bytes(self._data) + central + end


def manifest_text(entries: Iterable[tuple[str, Any]]) -> bytes:
    return "".join(json.dumps({"file": f, "label": lb}) + "\n" for f, lb in entries).encode()


def chunk_zip(
    samples: Sequence[tuple[str, bytes]],
    *,
    label: Any = "x",
    members: Sequence[Member] = (),
    listed: Sequence[str] = (),
    manifest: bytes | None = None,
) -> bytes:
    """A chunk zip: manifest.jsonl, then `samples` (stored), then `members` as given.

    The manifest lists the samples and `listed` (names of `members`, or of nothing), in that
    order, unless `manifest` replaces it.
    """
    names = [name for name, _ in samples] + list(listed)
    z = RawZip()
    if manifest is None:
        manifest = manifest_text((name, label) for name in names)
    z.add(member("manifest.jsonl", manifest))
    for name, data in samples:
        z.add(member(name, data))
    for m in members:
        z.add(m)
    return z.bytes()


def write_job(
    store: Path,
    job_id: str,
    chunks: Sequence[bytes],
    *,
    counts: Sequence[int] | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Writes `<store>/jobs/<job_id>/` with the chunk files and a job.json that matches them.

    Args:
        counts: num_images per chunk; default, the lines of each chunk's manifest.jsonl.
        edit: a function called with the job.json dict before it is written (to make it lie).

    Returns:
        the job folder.
    """
    folder = store / "jobs" / job_id
    (folder / "chunks").mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for i, data in enumerate(chunks):
        (folder / "chunks" / f"{i}.zip").write_bytes(data)
        entries.append(
            {
                "index": i,
                "url": f"chunks/{i}.zip",
                "num_images": counts[i] if counts is not None else _manifest_lines(data),
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    job: dict[str, Any] = {
        "job_id": job_id,
        "status": "completed",
        "progress": 100,
        "created_at": "2024-01-01T00:00:00Z",
        "num_images": sum(c["num_images"] for c in entries),
        "chunk_size": max((c["num_images"] for c in entries), default=0),
        "size_bytes": sum(c["size_bytes"] for c in entries),
        "labels": ["x"],
        "version": hashlib.sha256(b"".join(c["sha256"].encode() for c in entries)).hexdigest()[:16],
        "chunks": entries,
    }
    if edit is not None:
        edit(job)
    (folder / "job.json").write_text(json.dumps(job, indent=1), encoding="utf-8")
    return folder


def _manifest_lines(data: bytes) -> int:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            text = zf.read("manifest.jsonl").decode("utf-8", "replace")
    except (KeyError, zipfile.BadZipFile, OSError, ValueError):
        return 0
    return sum(1 for line in text.splitlines() if line.strip())


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Sample:
    """One look at a process tree."""

    t: float
    rss: int  # summed over the tree
    fds: int  # summed over the tree
    shm: int  # bytes of /dev/shm pages held by segments that the tree's processes own
    pids: frozenset[int]
    complete: bool  # every process and segment could be read (none vanished meanwhile)


def _peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class TreeMonitor:
    """Samples the process trees under `roots` every `interval` seconds, in a thread.

    Use as a context manager; the last sample is taken on exit. `include_self` adds this
    process's fds and RSS to every sample (the consumer of a run is this process).
    """

    roots: Sequence[int]
    interval: float = 0.025
    include_self: bool = False
    samples: list[Sample] = field(default_factory=list)
    peaks: dict[int, int] = field(default_factory=dict)
    cmdlines: dict[int, list[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeMonitor:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def processes(self) -> tuple[list[psutil.Process], bool]:
        """The processes of the trees, and whether the listing is complete."""
        procs, complete = [], True
        for root in self.roots:
            try:
                proc = psutil.Process(root)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                complete = False
        return procs, complete

    def sample(self) -> Sample:
        rss = fds = 0
        pids = set()
        procs, complete = self.processes()
        if self.include_self:
            procs.append(psutil.Process())
        for proc in procs:
            try:
                with proc.oneshot():
                    rss_now, fds_now = proc.memory_info().rss, proc.num_fds()
                    if proc.pid not in self.cmdlines:
                        self.cmdlines[proc.pid] = proc.cmdline()
            except psutil.Error:
                complete = False
                continue
            rss += rss_now
            fds += fds_now
            pids.add(proc.pid)
            if proc.pid != os.getpid():
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), _peak_rss(proc.pid))
        shm = 0
        for name in segments_of(pids):
            try:
                shm += (_SHM / name).stat().st_blocks * 512
            except FileNotFoundError:
                complete = False  # unlinked meanwhile
        s = Sample(time.monotonic(), rss, fds, shm, frozenset(pids), complete)
        self.samples.append(s)
        return s

    @property
    def peak_sum(self) -> int:
        """The sum of every process's peak RSS (an upper bound of the tree's peak)."""
        return sum(self.peaks.values())

    def describe(self) -> str:
        """Each process's command line and peak RSS, for assertion messages."""
        lines = []
        for pid, peak in sorted(self.peaks.items(), key=lambda kv: -kv[1]):
            cmd = " ".join(self.cmdlines.get(pid, []))[:100]
            lines.append(f"  pid {pid}: peak {peak / 2**20:.0f} MiB  {cmd}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- counting


def tally(**counts: int) -> None:
    """Adds counts (faults=, inputs=, ...) to the JSON file named by PIXCRAWLER_FAULT_TALLY."""
    path = os.environ.get("PIXCRAWLER_FAULT_TALLY")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(counts) + "\n")
