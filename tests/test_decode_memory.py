"""Decoding in bounded memory: huge masks, grey images cropped to RGB, memory given back.

Peaks are the VmHWM of a fresh process (reset with /proc/self/clear_refs around the one call
measured), which does not depend on timing; memory given back is the anonymous RSS of real
engine workers once they are idle.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pixcrawler_engine import DecodePolicy, EngineConfig, ParquetSource, Stream
from pixcrawler_engine._config import ColorMode, ResizeMode
from pixcrawler_engine.decode._image import decode_image
from pixcrawler_engine.decode._mask import decode_mask
from pixcrawler_engine.runtime._entry import WORKER_ENV

needs_vips = pytest.mark.skipif(
    importlib.util.find_spec("pyvips") is None, reason="the vips extra is not installed"
)

PEAK = textwrap.dedent(
    """
    import json, sys
    from pixcrawler_engine._config import DecodePolicy
    from pixcrawler_engine.decode import _image
    from pixcrawler_engine.decode._image import decode_image
    from pixcrawler_engine.decode._mask import decode_mask

    def peak_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

    what, path, libvips = sys.argv[1], sys.argv[2], sys.argv[3] == "vips"
    if not libvips:
        _image.VIPS_MIN_PIXELS = 1 << 62  # Pillow's path, as without the vips extra
    with open(path, "rb") as f:
        data = f.read()
    policy = DecodePolicy(image_size=(224, 224), resize="crop", color="RGB",
                          max_pixels=200_000_000)
    def run():
        if what == "mask":
            return decode_mask(data, (1024, 1024), max_pixels=200_000_000)
        return decode_image(data, policy)
    run()  # libraries loaded, allocator warm
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = peak_mb()
    out = run()
    print(json.dumps({"grew_mb": peak_mb() - before, "shape": out.shape,
                      "mean": float(out.mean())}))
    """
)


def _peak(what: str, path: Path, libvips: bool) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PEAK, what, str(path), "vips" if libvips else "pillow"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured: dict[str, object] = json.loads(result.stdout)
    return measured


def _grey(size: tuple[int, int], path: Path) -> Path:
    """A grey PNG of flat areas (compresses to little, decodes to width x height bytes)."""
    im = Image.new("L", size, 200)
    draw = ImageDraw.Draw(im)
    step = size[0] // 10
    for i in range(0, size[0], step):
        draw.rectangle((i, i, i + step // 2, i + step // 3), fill=(i * 7) % 256)
    im.save(path, compress_level=1)
    return path


@pytest.fixture(scope="module")
def grey_100mp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _grey((10_000, 10_000), tmp_path_factory.mktemp("grey") / "grey.png")


@pytest.mark.parametrize(
    "libvips", [pytest.param(True, marks=needs_vips), False], ids=["libvips", "pillow"]
)
def test_a_grey_image_cropped_to_rgb_is_never_rgb_at_full_size(
    grey_100mp: Path, libvips: bool
) -> None:
    """100 MP of grey cropped to 224x224 RGB: it was made RGB first (300 MB, +480 MB peak)."""
    measured = _peak("image", grey_100mp, libvips)
    assert measured["shape"] == [224, 224, 3]
    limit = 60 if libvips else 150  # Pillow decodes the grey pixels whole: 100 MB
    assert float(str(measured["grew_mb"])) < limit, measured


@pytest.mark.parametrize("resize", ["crop", "stretch", "pad", "fit"])
def test_grey_made_colour_after_the_resize_has_the_same_pixels(resize: ResizeMode) -> None:
    """Resizing one grey channel then copying it into three is what resizing RGB gives."""
    grey = (_mask_pixels((640, 480), 3).astype(np.uint16) * 13 % 256).astype(np.uint8)
    policy = DecodePolicy(image_size=(100, 120), resize=resize, color="RGB")
    got = decode_image(_png(grey), policy)
    expected = decode_image(_png(np.repeat(grey[:, :, None], 3, axis=2)), policy)
    np.testing.assert_array_equal(got, expected)


def _mask_pixels(size: tuple[int, int], seed: int) -> np.ndarray:
    from artefact_data import mask_for

    return mask_for(size, seed, scale=8)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


@needs_vips
@pytest.mark.parametrize("size", [(1024, 695), (333, 1000), (4000, 5000), (1, 1)])
def test_a_huge_mask_shrunk_by_libvips_equals_pillows_nearest(size: tuple[int, int]) -> None:
    pixels = _mask_pixels((5000, 4000), 11)  # 20 MP: over the libvips threshold
    data = _png(pixels)
    expected = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.Resampling.NEAREST))
    got = decode_mask(data, size, max_pixels=100_000_000)
    assert got.shape == size and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


@needs_vips
def test_a_133_mp_mask_decodes_in_a_few_mb(tmp_path: Path) -> None:
    """ARTeFACT's largest mask to 1024 px: it was decoded whole (+133 MB)."""
    path = tmp_path / "mask.png"
    path.write_bytes(_png(_mask_pixels((14_000, 9_500), 5)))
    measured = _peak("mask", path, libvips=True)
    assert measured["shape"] == [1024, 1024]
    assert float(str(measured["grew_mb"])) < 40, measured


# ------------------------------------------------------------------ memory given back


TRIM = textwrap.dedent(
    """
    import json
    from PIL import Image
    from pixcrawler_engine.runtime._memory import MemoryKeeper, anon_rss
    keeper = MemoryKeeper()
    small = [Image.new("RGB", (64, 64)).resize((32, 32)) for _ in range(10)]
    quiet = keeper.after_task()  # small work: nothing to give back
    big = Image.new("RGB", (8000, 8000), (1, 2, 3)).resize((100, 100))  # 192 MB, freed
    held = anon_rss()
    trimmed = keeper.after_task()
    print(json.dumps({"quiet": quiet, "trimmed": trimmed, "held_mb": held >> 20,
                      "after_mb": anon_rss() >> 20}))
    """
)


def test_the_keeper_gives_a_large_samples_memory_back() -> None:
    env = {**os.environ, **WORKER_ENV}  # a worker's allocator: glibc does not trim
    result = subprocess.run(
        [sys.executable, "-c", TRIM], capture_output=True, text=True, timeout=60, check=False,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert not measured["quiet"] and measured["trimmed"]
    assert measured["held_mb"] - measured["after_mb"] > 100, measured


def _rgba_png(size: tuple[int, int]) -> bytes:
    """An RGBA PNG (decoded by Pillow under color="keep": 4 bytes a pixel on the heap)."""
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    pixels = np.empty((size[1], size[0], 4), np.uint8)
    pixels[...] = x[None, :, None]
    return _png(pixels)


def test_a_worker_gives_a_large_samples_memory_back(tmp_path: Path) -> None:
    """A 40 MP RGBA image (160 MB decoded by Pillow) then small ones: the worker gives the
    memory back once the large sample is done, though workers keep glibc from trimming."""
    small = _png(np.full((40, 60, 4), 9, np.uint8))
    cells = [_rgba_png((8000, 5000))] + [small] * 19
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"image": cells}), path, row_group_size=2)
    policy = DecodePolicy(image_size=(64, 64), color="keep", max_pixels=100_000_000)
    config = EngineConfig(num_workers=1, batch_rows=2, slot_bytes=8 << 20, num_slots=2)
    me = psutil.Process()
    with Stream(ParquetSource(path), config=config, policy=policy) as stream:
        batches = iter(stream)
        first = next(batches)  # the large sample; held, the engine soon waits for a slot
        assert len(first.keys) == 2
        deadline = time.monotonic() + 10
        while True:
            held = max(_anon_mb(p) for p in me.children(recursive=True))
            if held < 120 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        del first
        assert sum(len(batch.keys) for batch in batches) == 18
    assert held < 120, f"an engine process holds {held} MB of anonymous memory"


def _anon_mb(process: psutil.Process) -> int:
    try:
        with open(f"/proc/{process.pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) >> 10
    except OSError:
        pass
    return 0


@needs_vips
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize("color", ["RGB", "L"])
def test_a_huge_crop_through_libvips_matches_pillows(
    monkeypatch: pytest.MonkeyPatch, fmt: str, color: ColorMode
) -> None:
    """Over 16 MP a crop is cut and box-reduced by libvips, then finished by Pillow: the
    pixels agree with Pillow's own crop (which pre-reduces by the same box filter)."""
    from skimage import data

    from pixcrawler_engine.decode import _image

    big = Image.fromarray(data.astronaut()).resize((5200, 3900), Image.Resampling.BILINEAR)
    encoded = io.BytesIO()
    big.save(encoded, fmt, **({"compress_level": 1} if fmt == "PNG" else {}))
    policy = DecodePolicy(image_size=(200, 250), resize="crop", color=color)
    got = decode_image(encoded.getvalue(), policy)
    monkeypatch.setattr(_image, "VIPS_MIN_PIXELS", 1 << 62)
    expected = decode_image(encoded.getvalue(), policy)
    assert got.shape == expected.shape == (200, 250, 3 if color == "RGB" else 1)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 1.0
