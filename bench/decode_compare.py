"""Per-core JPEG decode + resize throughput: the usual Pillow path against the faster ones.

Run as `python -m bench.decode_compare [--out results.json]`. Every candidate turns the same
640x480-class real photos (sklearn's and skimage's sample images, JPEG) into 224x224 RGB
uint8 arrays, in one process pinned to one core, interleaved round by round so that machine
noise hits all of them alike; the table shows the median images/s of the rounds, the ratio to
the usual `Image.open().convert("RGB").resize()`, and the error against a reference (a full
decode + Pillow's LANCZOS resize), so that a fast path that is wrong shows: the mean PSNR and
the worst image's (a geometry off by a fraction of a pixel costs 5-10 dB on sharp photos).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, features

SIZE = (224, 224)  # (width, height), square so the order does not matter
BILINEAR = Image.Resampling.BILINEAR

Candidate = Callable[[bytes], np.ndarray]


def sample_photos() -> dict[str, bytes]:
    """640x480-class real photos as JPEG bytes: shipped JPEG files as they are, PNGs encoded."""
    import skimage.data
    import sklearn.datasets

    photos: dict[str, bytes] = {}
    folder = Path(sklearn.datasets.__file__).parent / "images"
    for name in ("china.jpg", "flower.jpg"):  # 640x427 camera JPEGs
        photos[name] = (folder / name).read_bytes()
    photos["rocket.jpg"] = (Path(skimage.data.__file__).parent / "rocket.jpg").read_bytes()
    for name, size in (("coffee", None), ("astronaut", (640, 480)), ("hubble", (640, 557))):
        pixels = (
            skimage.data.hubble_deep_field() if name == "hubble" else getattr(skimage.data, name)()
        )
        im = Image.fromarray(pixels)
        if size is not None:
            im = im.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        photos[f"{name}.jpg"] = buf.getvalue()
    return photos


def bench_photos(n: int) -> dict[str, bytes]:
    """The first `n` JPEGs of the engine benchmark's photo set (`bench._util`), cached."""
    import tempfile
    import zipfile

    from bench._util import build_bench_store

    root = Path(tempfile.gettempdir()) / "pixcrawler-bench-decode"
    store, job = build_bench_store(root, n_photos=n * 5 // 4 + 100, limit=n)
    photos: dict[str, bytes] = {}
    for path in sorted((store / "jobs" / job / "chunks").glob("*.zip"), key=lambda p: int(p.stem)):
        with zipfile.ZipFile(path) as zf:
            for line in zf.read("manifest.jsonl").decode().splitlines():
                name = json.loads(line)["file"]
                photos[name] = zf.read(name)
    return photos


def pillow_usual(data: bytes) -> np.ndarray:
    """(1) What most loaders do: full decode, convert, resize (Pillow's default BICUBIC)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(SIZE))


def pillow_draft(data: bytes) -> np.ndarray:
    """(2) Pillow `draft` (DCT scale 1/2, 1/4 or 1/8) + BILINEAR resize."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", SIZE)
    return np.asarray(im.convert("RGB").resize(SIZE, BILINEAR))


def simplejpeg_pillow(data: bytes) -> np.ndarray:
    """(3) simplejpeg at the smallest n/8 scale covering 224x224 + Pillow BILINEAR resize."""
    pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=SIZE[0], min_height=SIZE[1])
    return np.asarray(Image.fromarray(pixels).resize(SIZE, BILINEAR))


def simplejpeg_fast_pillow(data: bytes) -> np.ndarray:
    """(4a) As (3) with libjpeg's fast integer DCT and fast chroma upsampling."""
    pixels = simplejpeg.decode_jpeg(
        data, "RGB", fastdct=True, fastupsample=True, min_width=SIZE[0], min_height=SIZE[1]
    )
    return np.asarray(Image.fromarray(pixels).resize(SIZE, BILINEAR))


def simplejpeg_rgbx_pillow(data: bytes) -> np.ndarray:
    """(4b) As (3), decoded as RGBX so Pillow maps the buffer instead of copying it."""
    pixels = simplejpeg.decode_jpeg(data, "RGBX", min_width=SIZE[0], min_height=SIZE[1])
    h, w = pixels.shape[:2]
    im = Image.frombuffer("RGBX", (w, h), pixels, "raw", "RGBX", 0, 1)
    return np.asarray(im.resize(SIZE, BILINEAR))[:, :, :3]


def simplejpeg_torch() -> Candidate | None:
    """(4c) simplejpeg + torch's antialiased bilinear (uint8 SIMD kernel), one thread.

    Not an engine option (workers must not import torch), shown as the OpenCV-class bound.
    """
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    interpolate = torch.nn.functional.interpolate

    def run(data: bytes) -> np.ndarray:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=SIZE[0], min_height=SIZE[1])
        t = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
        t = t.contiguous(memory_format=torch.channels_last)
        r = interpolate(t, size=SIZE[::-1], mode="bilinear", antialias=True, align_corners=False)
        return r[0].permute(1, 2, 0).numpy()

    run.__doc__ = simplejpeg_torch.__doc__
    return run


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)
    return cv2


def simplejpeg_cv2_resize() -> Candidate | None:
    """(4d) simplejpeg + cv2.resize INTER_LINEAR of the whole decoded image (inexact box)."""
    cv2 = _cv2()
    if cv2 is None:
        return None

    def run(data: bytes) -> np.ndarray:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=SIZE[0], min_height=SIZE[1])
        return np.asarray(cv2.resize(pixels, SIZE, interpolation=cv2.INTER_LINEAR))

    run.__doc__ = simplejpeg_cv2_resize.__doc__
    return run


def pixcrawler_decode(fast: bool) -> Candidate:
    """(5) `decode_image`, all checks: the general path (OpenCV off) or the fast one (default)."""
    from pixcrawler_engine._config import DecodePolicy
    from pixcrawler_engine.decode import _fast
    from pixcrawler_engine.decode._image import decode_image

    policy = DecodePolicy(image_size=(SIZE[1], SIZE[0]))
    opencv = _fast.opencv

    def run(data: bytes) -> np.ndarray:
        _fast.opencv = opencv if fast else _no_opencv  # type: ignore[assignment]
        try:
            return decode_image(data, policy)
        finally:
            _fast.opencv = opencv

    run.__doc__ = (
        "(5b) decode_image, the fast path: simplejpeg n/8 + OpenCV linear resize, exact box"
        if fast
        else "(5a) decode_image, the general path: simplejpeg n/8 + Pillow BILINEAR"
    )
    return run


def _no_opencv() -> None:
    return None


def reference(data: bytes) -> np.ndarray:
    """Full-size decode + Pillow's LANCZOS resize: what the others approximate."""
    return np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)
    )


def candidates() -> dict[str, Candidate]:
    found: dict[str, Candidate | None] = {
        "pillow_convert_resize": pillow_usual,
        "pillow_draft_resize": pillow_draft,
        "simplejpeg_pillow_resize": simplejpeg_pillow,
        "simplejpeg_fastdct_pillow_resize": simplejpeg_fast_pillow,
        "simplejpeg_rgbx_pillow_resize": simplejpeg_rgbx_pillow,
        "simplejpeg_torch_resize": simplejpeg_torch(),
        "simplejpeg_cv2_resize": simplejpeg_cv2_resize(),
        "decode_image_general": pixcrawler_decode(fast=False),
        "decode_image_fast": pixcrawler_decode(fast=True),
    }
    return {name: fn for name, fn in found.items() if fn is not None}


def error_vs_reference(fn: Candidate, photos: dict[str, bytes]) -> dict[str, float]:
    """Mean and max absolute error (0-255 levels), and PSNR against `reference`: over all the
    pixels, and the worst image's."""
    diffs = []
    for data in photos.values():
        got = fn(data).astype(np.float64)
        diffs.append(got - reference(data).astype(np.float64))
    flat = np.concatenate([d.ravel() for d in diffs])
    return {
        "mae": float(np.mean(np.abs(flat))),
        "max_abs": float(np.max(np.abs(flat))),
        "psnr_db": _psnr(flat),
        "worst_psnr_db": min(_psnr(d) for d in diffs),
    }


def _psnr(diff: np.ndarray) -> float:
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


def measure(
    fns: dict[str, Candidate], photos: dict[str, bytes], repeats: int, seconds: float
) -> dict[str, list[float]]:
    """images/s of each candidate per round; rounds interleave the candidates."""
    images = list(photos.values())
    loops: dict[str, int] = {}
    for name, fn in fns.items():  # warm up, and size each round to about `seconds`
        start = time.perf_counter()
        for data in images:
            fn(data)
        per_pass = time.perf_counter() - start
        loops[name] = max(1, round(seconds / per_pass))
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                for data in images:
                    fn(data)
            rates[name].append(loops[name] * len(images) / (time.perf_counter() - start))
    return rates


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "pillow": Image.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "simplejpeg": getattr(simplejpeg, "__version__", "unknown"),
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (the median is shown)")
    parser.add_argument(
        "--bench-photos", type=int, default=300, help="photos of the benchmark set to add"
    )
    parser.add_argument("--seconds", type=float, default=0.4, help="length of one round")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):  # one core: the numbers are per core
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    photos = sample_photos()
    if args.bench_photos:
        photos.update(bench_photos(args.bench_photos))
    fns = candidates()
    rates = measure(fns, photos, args.repeats, args.seconds)
    base = statistics.median(rates["pillow_convert_resize"])
    rows = {}
    for name, fn in fns.items():
        median = statistics.median(rates[name])
        rows[name] = {
            "images_per_s": median,
            "ratio": median / base,
            "rounds": rates[name],
            **error_vs_reference(fn, photos),
            "what": (fn.__doc__ or name).strip().splitlines()[0],
        }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "task": f"JPEG bytes -> {SIZE[0]}x{SIZE[1]}x3 uint8, one core, {len(photos)} photos",
        "photos": len(photos),
        "repeats": args.repeats,
        "results": rows,
    }
    print(f"{result['task']}; {result['machine']['cpu']}; {result['date']}")
    print(f"{'candidate':34} {'img/s':>8} {'ratio':>6} {'MAE':>6} {'PSNR':>6} {'worst':>6}")
    for name, row in rows.items():
        print(
            f"{name:34} {row['images_per_s']:8.0f} {row['ratio']:5.2f}x {row['mae']:6.2f} "
            f"{row['psnr_db']:6.1f} {row['worst_psnr_db']:6.1f}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
