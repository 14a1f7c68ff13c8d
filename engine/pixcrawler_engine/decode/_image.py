"""Decoding one encoded image into uint8 pixels, in bounded memory: budget, scale, colour, resize.

The path of one image (`decode_image`):

1. The header is read without decoding (`_headers.sniff` for JPEG/PNG, Pillow's plugin for
   the rest) and width x height is checked against `DecodePolicy.max_pixels`: a decompression
   bomb is refused before a single pixel is allocated.
2. A JPEG whose output is smaller than the stored image is decoded at a reduced DCT scale
   (n/8, n = 1..8, the smallest that still covers the output): a 133-megapixel photo asked
   for at 1024 px never exists at full size in memory. simplejpeg (libjpeg-turbo) does this
   for YCbCr and grey JPEGs; CMYK/YCCK JPEGs, and any JPEG simplejpeg rejects, go through
   Pillow with `Image.draft` (scales 1/2, 1/4, 1/8), so Pillow has the last word on what is
   corrupt. PNG, TIFF, WebP and the others cannot be decoded at a reduced scale: a PNG or
   TIFF over 16 MP is shrunk by libvips while it decodes, rows at a time (`_vips`, when the
   `vips` extra is installed); the others are decoded once at full size (bounded by the
   budget) and resized.
   Measured on a 12000x11000 photo asked for at 1024 px: +26 MB peak RSS (simplejpeg), +19 MB
   (Pillow draft), against +378 MB for a full decode. Progressive JPEGs are the exception:
   libjpeg keeps a whole-image coefficient buffer (3 bytes per pixel at 4:2:0, 6 at 4:4:4)
   however small the output (+384 MB for the same photo); only the budget bounds them.
3. The orientation (all 8, from every place `ImageOps.exif_transpose` reads it: EXIF, an
   ImageMagick "Raw profile type exif" PNG text, XMP `tiff:Orientation`; see `_headers`)
   is applied to the reduced image, then the colour is made 8-bit
   (`L`, `LA`, `RGB` or `RGBA`), then the image is resized in the oriented frame by the
   policy's mode (`stretch`, `crop`, `pad`, `fit`) with Pillow's antialiased BILINEAR filter
   (a triangle filter whose support widens with the shrink factor, so no aliasing), with
   `reducing_gap=3.0` (a box pre-reduction when the remaining factor is >= 3, e.g. a large
   PNG: 4000x3000 to 224x224 takes half the time, 0.16 levels of mean difference).
4. The pixels are copied once into `out` (a shared-memory slot), or decoded straight into it
   by libjpeg when no resize or rotation is needed.

Why simplejpeg + Pillow resize: `python -m bench.decode_compare` (2026-11-22, 2-core AMD EPYC
VM shared with other jobs, pinned to one core, 640x480-class real photos to 224x224, median of
11 interleaved rounds; images/s relative to the usual `Image.open().convert("RGB").resize()`,
110 img/s): Pillow `draft` + resize 1.50x; simplejpeg (min size) + Pillow resize 1.95x;
the same with fastdct/fastupsample 1.91x (no faster, slightly worse); decoded as RGBX and
mapped by Pillow without a copy 1.88x; `decode_image` itself (header walk, checks, exact
geometry) 1.86x; simplejpeg + torch's SIMD antialiased resize 2.44x (the OpenCV-class bound,
but workers must not import torch). Pillow's `draft` only has power-of-two scales, so a
640x427 photo is decoded at full size for 224x224, where libjpeg-turbo's n/8 scales decode it
at 5/8. Against a full decode + BILINEAR, decode_image's mean error is 0.76 levels (PSNR
44.8 dB), less than the usual path's (default BICUBIC, 1.09).

Colour rules: EXIF orientation is applied as `ImageOps.exif_transpose` does. CMYK (Adobe-
inverted included) becomes RGB with Pillow's conversion (no ICC colour management). A palette
with transparency becomes RGBA; asked for RGB, alpha is dropped (like `convert("RGB")` on
RGBA, the colours under transparent pixels are kept). 16-bit samples (`I;16*`, and `I` taken
as 0..65535) are rounded to 8-bit (v / 257), not clipped; `F` is taken on the 0..255 scale,
as Pillow's `convert("L")` does; bilevel `1` becomes 0/255.

What Pillow and the C libraries say around a decode (Pillow's warnings about corrupt EXIF,
libtiff's lines on stderr) is taken by `_chatter`, never shown raw: it becomes one line naming
the sample (or a log record), and a caller's `-W error` does not turn it into a crash. An error
with such a message, or a header that says so (a 12-bit JPEG), is an `UnsupportedImageError`
when the file is valid but uses what no installed decoder reads, and a `DecodeError` (corrupt
or truncated) otherwise.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, JpegImagePlugin, TiffImagePlugin

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine.decode._fast import copy_into, decode_other, resize_into, upright
from pixcrawler_engine.decode._headers import (
    ImageHeader,
    as_view,
    header_from_pillow,
    open_pillow,
    sniff,
)
from pixcrawler_engine.decode._pixels import (
    FLIPS_X,
    FLIPS_Y,
    GREY,
    TRANSPOSE,
    check_budget,
    library_errors,
    to_mode,
)
from pixcrawler_engine.decode._plan import (
    Plan,
    make_plan,
    stored_need,
)
from pixcrawler_engine.decode._vips import VIPS_MIN_PIXELS, reduce_region, thumbnail

__all__ = ["decode_image", "probe"]

RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0

_ORIENTATION = 0x0112  # the EXIF tag


def probe(data: bytes | memoryview) -> ImageHeader:
    """Reads an image's header (format, stored size, mode, orientation) without decoding pixels.

    Raises:
        DecodeError: the bytes are empty, not a supported image, or a damaged header.
    """
    view = as_view(data)
    header = sniff(view)
    if header is None:
        with library_errors("image"):
            header = header_from_pillow(open_pillow(view))
    return header


def decode_image(
    data: bytes | memoryview,
    policy: DecodePolicy,
    *,
    out: np.ndarray | None = None,
    header: ImageHeader | None = None,
    plan: Plan | None = None,
) -> np.ndarray:
    """Decodes one encoded image into a C-contiguous uint8 (H, W, C) array.

    Args:
        data: the encoded bytes (any supported format; see `_headers.SUPPORTED_FORMATS`).
        policy: output size, resize mode, colour and pixel budget.
        out: an array of exactly `output_shape(probe(data), policy)` and dtype uint8 (e.g. a
            view into a shared-memory slot) that receives the pixels; allocated if None.
        header: `probe(data)`, when the caller has it already (it is not read again).
        plan: `make_plan(header, policy)`, with the header's budget checked, when the caller
            has both already.

    Returns:
        `out` (or the new array) holding the pixels: C = 3 for RGB, 1 for L, the file's own
        channels (1-4) for keep.

    Raises:
        DecodeError: the image is empty, corrupt, truncated, not a supported image, or over
            `policy.max_pixels`; nothing is decoded in that last case.
        ValueError: `out` has the wrong shape or dtype (a bug in the caller).
    """
    view = as_view(data)
    if header is None:
        header = sniff(view)
    opened: ImageFile.ImageFile | None = None
    if header is None:
        with library_errors("image"):
            opened = open_pillow(view)
            header = header_from_pillow(opened)
    if plan is None:
        check_budget(header, policy.max_pixels)
        plan = make_plan(header, policy)
    target = _target(plan.shape, out)
    if (
        header.format == "JPEG"
        and header.mode in ("L", "RGB")
        and _decode_jpeg(view, header, plan, target)
    ):
        return target
    if _decode_vips(view, header, plan, target):
        return target
    pixels = decode_other(view, header, plan)
    if pixels is not None:
        if not _fast_finish(pixels, 1.0, plan, target):
            # The same pixels Pillow decodes (an exact decode), resized as Pillow's path does.
            im = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
            _write(to_mode(_finish(im, 1, plan, 1.0), plan.mode), plan, target)
        return target
    what = f"{header.format} image ({header.width}x{header.height}, {header.mode})"
    with library_errors(what):
        im = opened or open_pillow(view)
        _write(_decode_pillow(im, header, plan), plan, target)
    return target


def _target(shape: tuple[int, int, int], out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.writeable:
        raise ValueError(
            f"out must be a writable uint8 array of shape {shape} (output_shape of this image "
            f"and policy), got {out.dtype} {out.shape}"
        )
    return out


def _decode_jpeg(view: memoryview, header: ImageHeader, plan: Plan, target: np.ndarray) -> bool:
    """The fast path: simplejpeg at the smallest n/8 scale that covers the output.

    Returns False (nothing decoded) when simplejpeg rejects the data; Pillow then decides.
    """
    width, height = header.width, header.height
    need_w, need_h = stored_need(header, plan)
    # libjpeg's scaled size is ceil(size * n / 8); the smallest n that covers the need.
    n = next(
        (n for n in range(1, 8) if -(-width * n // 8) >= need_w and -(-height * n // 8) >= need_h),
        8,
    )
    dw, dh = -(-width * n // 8), -(-height * n // 8)
    minimum = {"min_width": dw, "min_height": dh} if n < 8 else {}
    colorspace = "GRAY" if plan.mode == "L" else "RGB"
    # Straight into `out` when the decoded image is the output (no rotation, no resize).
    direct = (
        header.orientation == 1
        and plan.box is None
        and plan.size in (None, (dw, dh))
        and target.shape[:2] == (dh, dw)
        and target.flags.c_contiguous
    )
    try:
        if direct:
            simplejpeg.decode_jpeg(view, colorspace, buffer=target, **minimum)
            return True
        pixels = simplejpeg.decode_jpeg(view, colorspace, **minimum)
    except (ValueError, RuntimeError, MemoryError):
        return False
    if pixels.shape[:2] != (dh, dw):  # a scale other than ours: leave it to Pillow
        return False
    turned = pixels if header.orientation == 1 else upright(pixels, header.orientation)
    if turned is not None and _fast_finish(turned, n / 8, plan, target, header.orientation):
        return True
    with library_errors("JPEG image"):
        im = Image.fromarray(pixels[:, :, 0] if colorspace == "GRAY" else pixels)
        _write(_finish(im, header.orientation, plan, n / 8), plan, target)
    return True


def _decode_vips(view: memoryview, header: ImageHeader, plan: Plan, target: np.ndarray) -> bool:
    """A huge PNG/TIFF shrunk while libvips decodes it, rows at a time; False: not handled.

    A plain resize is libvips' own (`thumbnail`); a crop is cut and box-reduced by libvips
    (`reduce_region`), then resized by Pillow from the exact box, as Pillow's own path does
    after its `reducing_gap` pre-reduction.
    """
    if (
        header.format not in ("PNG", "TIFF")
        or header.pixels < VIPS_MIN_PIXELS
        or header.orientation != 1
        or plan.size is None
        or plan.mode not in ("RGB", "L")
    ):
        return False
    if plan.box is None:
        pixels = thumbnail(view, plan.size, plan.mode)
        if pixels is None:
            return False
        _write(Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels), plan, target)
        return True
    left, top, right, bottom = plan.box
    factors = (
        max(1, int((right - left) / plan.size[0] / REDUCING_GAP)),
        max(1, int((bottom - top) / plan.size[1] / REDUCING_GAP)),
    )
    region = reduce_region(view, plan.box, factors)
    if region is None:
        return False
    pixels, (x0, y0) = region
    im = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    fx, fy = factors
    box = (
        max(0.0, (left - x0) / fx),
        max(0.0, (top - y0) / fy),
        min(float(im.width), (right - x0) / fx),
        min(float(im.height), (bottom - y0) / fy),
    )
    im = to_mode(im, _working_mode(im.mode, plan.mode))
    im = im.resize(plan.size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    _write(to_mode(im, plan.mode), plan, target)
    return True


def _working_mode(mode: str, out: str) -> str:
    """The mode to resize in: a grey image stays grey until it is small (RGB is 3x the pixels;
    resizing one channel and copying it into three gives the same pixels)."""
    return "L" if out in ("RGB", "RGBA") and mode in GREY else out


def _decode_pillow(im: ImageFile.ImageFile, header: ImageHeader, plan: Plan) -> Image.Image:
    """Pillow's path: reduced-scale `draft` for JPEG, else a full decode; then the pixels."""
    scale = 1.0
    need = stored_need(header, plan)
    if isinstance(im, JpegImagePlugin.JpegImageFile) and (
        need[0] < header.width and need[1] < header.height
    ):
        drafted = im.draft("L" if plan.mode == "L" else None, need)
        if drafted is not None:
            scale = drafted[1][2] / header.width  # the box of the stored image, rescaled
    im.load()
    orientation = header.orientation
    if isinstance(im, TiffImagePlugin.TiffImageFile) and _ORIENTATION not in im.tag_v2:
        orientation = 1  # Pillow's TIFF plugin has applied it at `load` (and dropped the tag)
    small = _finish(to_mode(im, _working_mode(im.mode, plan.mode)), orientation, plan, scale)
    return to_mode(small, plan.mode)


def _finish(im: Image.Image, orientation: int, plan: Plan, scale: float) -> Image.Image:
    """Orients an 8-bit image decoded at `scale` of its size, then resizes it per the plan."""
    if orientation != 1:
        im = im.transpose(TRANSPOSE[orientation])
    if plan.size is None:
        return im
    box = _box(plan, im.size, scale, orientation)
    if im.size == plan.size and box == (0, 0, *im.size):
        return im
    return im.resize(plan.size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def _box(
    plan: Plan, size: tuple[int, int], scale: float, orientation: int
) -> tuple[float, float, float, float]:
    """The plan's source box in an upright image of `size` (w, h) decoded at `scale`.

    A decode at `scale` is ceil(size * scale) pixels, of which size * scale are the image: the
    fraction of a pixel past it is at the stored right/bottom edge, which orientation may have
    moved to the left/top. The box skips it, so the geometry stays exact.
    """
    width, height = size
    sw, sh = plan.source
    left, top, right, bottom = plan.box or (0.0, 0.0, float(sw), float(sh))
    x0 = width - sw * scale if orientation in FLIPS_X else 0.0
    y0 = height - sh * scale if orientation in FLIPS_Y else 0.0
    return (
        max(0.0, x0 + left * scale),
        max(0.0, y0 + top * scale),
        min(float(width), x0 + right * scale),
        min(float(height), y0 + bottom * scale),
    )


def _fast_finish(
    pixels: np.ndarray, scale: float, plan: Plan, target: np.ndarray, orientation: int = 1
) -> bool:
    """The fast path's resize (see `_fast`) of an image decoded at `scale` of its size and
    turned upright from `orientation`, into `target` as `_write` places it; False (nothing
    written): Pillow's path finishes."""
    height, width = pixels.shape[:2]
    as_is = plan.size is None or (
        plan.box is None and scale == 1.0 and plan.size == (width, height)
    )
    if as_is and (height, width) == target.shape[:2]:
        copy_into(pixels, target)  # a grey image is repeated into RGB
        return True
    if plan.size is None:
        return False
    box = _box(plan, (width, height), scale, orientation)
    if (plan.size[1], plan.size[0]) == target.shape[:2]:
        return resize_into(pixels, box, plan.size, target)
    # On False, Pillow's path writes the whole target again, border included.
    return resize_into(pixels, box, plan.size, _region(plan, target, plan.size))


def _region(plan: Plan, target: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The part of `target` an image of `size` (w, h) goes to, the border around it zeroed."""
    width, height = size
    top, left = plan.offset
    target[:top] = 0
    target[top + height :] = 0
    target[top : top + height, :left] = 0
    target[top : top + height, left + width :] = 0
    return target[top : top + height, left : left + width]


def _write(im: Image.Image, plan: Plan, target: np.ndarray) -> None:
    """Copies the pixels into `target`, centred with a zero border when smaller (pad)."""
    pixels = np.asarray(im)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width = pixels.shape[:2]
    if (height, width) == target.shape[:2]:
        np.copyto(target, pixels)
        return
    _region(plan, target, (width, height))[...] = pixels
