"""libvips for huge images: PNG/TIFF shrunk while they decode, masks reduced by nearest neighbour.

Pillow decodes a PNG or TIFF whole before it can resize it (+454 MB for a 100 MP PNG asked
for at 1024 px); libvips decodes rows at a time and shrinks as it goes (`thumbnail`: +60 MB;
`reduce_region` cuts a crop's box out and box-averages it for Pillow to finish).
A segmentation mask must keep its class ids: `shrink_mask` reduces it with nearest-neighbour
sampling, `reduceh` then `reducev`, which pick exactly the pixels Pillow's NEAREST resize picks
(centre sampling), so both paths give identical masks: +11 MB for a 133 MP mask, against the
full 133 MB decode (and 10x faster).

The encoded bytes are read through `source`: a memoryview of a memory-mapped file (what the
Parquet rows reader hands out for large values) is streamed to libvips, and the pages already
read are dropped from this process as it goes (`MADV_DONTNEED`; the file stays in the page
cache), so a 113 MB PNG does not sit in the worker's RSS while it decodes. Anything else is
read from memory as it is.

Both return None when libvips is not installed (it is the `vips` extra) or declines (an
unusual layout, damage: Pillow then decides what is corrupt).
"""

from __future__ import annotations

import functools
import mmap
from typing import Any

import numpy as np

__all__ = ["VIPS_MIN_PIXELS", "reduce_region", "shrink_mask", "source", "thumbnail"]

VIPS_MIN_PIXELS = 16_000_000
_RELEASE_EVERY = 8 << 20
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@functools.cache
def _pyvips() -> Any:
    """The pyvips module, set up for a decode worker; None when it cannot load."""
    try:
        import pyvips
    except (ImportError, OSError):
        return None
    # One decode per process at a time, on one core (workers are the parallelism), and no
    # operation cache: each image is decoded once, and a cached result would keep it alive.
    pyvips.cache_set_max(0)
    pyvips.concurrency_set(1)
    return pyvips


def _mapping(view: memoryview) -> tuple[mmap.mmap, int] | None:
    """The memory map a view lies in and the view's offset in it, if it is one."""
    owner = view.obj
    if not isinstance(owner, mmap.mmap) or owner.closed:
        return None
    base = np.frombuffer(owner, np.uint8).ctypes.data
    return owner, np.frombuffer(view, np.uint8).ctypes.data - base


def source(view: memoryview) -> Any:
    """A libvips source reading `view`; a mapped file's pages are released once read."""
    pyvips = _pyvips()
    mapped = _mapping(view)
    if mapped is None:
        return pyvips.Source.new_from_memory(view)
    mapping, delta = mapped
    state = {"pos": 0, "released": 0}

    def read(size: int) -> memoryview:
        pos = state["pos"]
        chunk = view[pos : pos + size]
        state["pos"] = pos + len(chunk)
        if state["pos"] - state["released"] >= _RELEASE_EVERY:
            start = (delta + state["released"]) // mmap.PAGESIZE * mmap.PAGESIZE
            end = (delta + state["pos"]) // mmap.PAGESIZE * mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
            state["released"] = end - delta
        return chunk

    def seek(offset: int, whence: int) -> int:
        base = (0, state["pos"], len(view))[whence]
        state["pos"] = min(max(0, base + offset), len(view))
        state["released"] = min(state["released"], state["pos"])
        return state["pos"]

    custom = pyvips.SourceCustom()
    custom.on_read(read)
    custom.on_seek(seek)
    return custom


def thumbnail(view: memoryview, size: tuple[int, int], mode: str) -> np.ndarray | None:
    """An 8-bit image (H, W, C) of exactly `size` (width, height) in `mode` (RGB or L)."""
    pyvips = _pyvips()
    if pyvips is None:
        return None
    width, height = size
    try:
        # fail_on=warning: any damage makes vips give up, and Pillow decides what is corrupt.
        src = source(view)  # referenced until the pixels are out: libvips calls it back
        options = {"height": height, "size": "force", "no_rotate": True}
        im = pyvips.Image.thumbnail_source(src, width, option_string="fail_on=warning", **options)
        if im.format != "uchar":
            return None
        bands = im.bands
        if mode == "RGB":
            if bands in (1, 2):
                im = im[0].bandjoin([im[0], im[0]])
            elif bands == 4:
                im = im.extract_band(0, n=3)
        elif bands >= 3:
            im = im.extract_band(0, n=3).colourspace("b-w")
        elif bands == 2:
            im = im[0]
        pixels = im.numpy()
        del im, src
    except pyvips.Error:
        return None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return pixels if pixels.shape[:2] == (height, width) else None


def reduce_region(
    view: memoryview, box: tuple[float, float, float, float], factors: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The whole pixels around `box` (left, top, right, bottom), box-averaged by `factors`.

    Returns:
        (8-bit pixels (H, W, C) with C = 1..4, the region's top-left corner in the image).
    """
    pyvips = _pyvips()
    if pyvips is None:
        return None
    left, top, right, bottom = box
    x0, y0 = int(left), int(top)
    try:
        src = source(view)  # referenced until the pixels are out: libvips calls it back
        im = pyvips.Image.new_from_source(src, "", access="sequential", fail_on="warning")
        if im.format != "uchar" or im.bands > 4:
            return None
        width = min(im.width, -int(-right // 1)) - x0
        height = min(im.height, -int(-bottom // 1)) - y0
        im = im.crop(x0, y0, width, height)
        if factors != (1, 1):
            im = im.shrink(*factors)
        pixels = im.numpy()
        del im, src
    except pyvips.Error:
        return None
    return (pixels if pixels.ndim == 3 else pixels[:, :, None]), (x0, y0)


def shrink_mask(view: memoryview, size: tuple[int, int]) -> np.ndarray | None:
    """An 8-bit grey PNG mask reduced to `size` (height, width) by nearest neighbour.

    Only what needs no conversion: 8-bit grey (no palette, no transparency, no 16-bit),
    shrunk (never enlarged) on both axes.
    """
    pyvips = _pyvips()
    if pyvips is None or bytes(view[:8]) != _PNG_MAGIC or bytes(view[24:26]) != b"\x08\x00":
        return None
    height, width = size
    try:
        src = source(view)  # referenced until the pixels are out: libvips calls it back
        im = pyvips.Image.new_from_source(src, "", access="sequential", fail_on="warning")
        if im.bands != 1 or im.format != "uchar" or im.width < width or im.height < height:
            return None
        im = im.reduceh(im.width / width, kernel="nearest")
        im = im.reducev(im.height / height, kernel="nearest")
        ids = im.numpy()
        del im, src
    except pyvips.Error:
        return None
    return np.ascontiguousarray(ids) if ids.shape == (height, width) else None
