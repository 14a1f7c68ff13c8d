"""The fast decode + resize path: OpenCV's resize after a reduced-scale JPEG decode, libspng
for RGB PNGs, OpenCV's decoders for other PNGs and WebP; the general (Pillow) path in
`_image` takes whatever this one declines.

Measured side by side in one process on one core (2026-11-30, 2-core Intel Xeon VM shared with
other jobs; 120 of the decode benchmark's 640x480-class photos, as JPEG and re-encoded as PNG
and WebP, to 224x224; `decode_image` end to end, medians of 5 interleaved rounds; PSNR
against a full decode + Pillow LANCZOS, mean (worst image)):

    case           general path                     fast path
    JPEG stretch   799/s  38.1 dB (31.7)           1097/s  39.3 dB (32.5)   1.37x
    JPEG crop      850/s  38.1 dB (31.3)           1145/s  38.7 dB (31.4)   1.35x
    PNG  stretch   149/s  39.5 dB (33.5)            209/s  42.5 dB (35.7)   1.40x
    WebP stretch   238/s  39.6 dB (33.6)            265/s  42.5 dB (35.8)   1.11x

(On 2026-11-29, before `_resize_box` and libspng, the fast path was 1.20x the general one
for JPEG stretch and 1.08x for PNG, on other photos.)

The general path is simplejpeg n/8 + Pillow for JPEG, Pillow for PNG/WebP.
(a crop of a full-size PNG/WebP is resized by Pillow from OpenCV's pixels: within noise.)
The resize alone after a JPEG's n/8 decode: Pillow 1,540/s, cv2.resize INTER_LINEAR 8,400/s
but 37.0 dB (28.4), cv2.warpAffine with the exact box 3,300/s, 40.4 dB (31.4), and with the
Gaussian below 2,300/s, 40.2 dB (34.0).

`cv2.resize` is the fastest resize, but it maps the whole decoded image onto the output: a
JPEG decoded at n/8 is ceil(size * n / 8) pixels, of which size * n / 8 are the image, and
the fraction of a pixel past it shifts the geometry by up to half an output pixel (28 dB on
sharp photos). `warpAffine` with the exact box keeps the geometry; so does `cv2.resize`
given scale factors instead of a size, on the box's own pixels (`_resize_box`), at 2.6x
warpAffine's speed (0.11 against 0.28 ms after a 640x480 JPEG's n/8 decode; 2026-11-30, the
same VM: `bench.decode_compare`'s fast path 869 -> 1,162 img/s, the same 39.7 dB (32.5)).
warpAffine stays for the boxes that resize cannot sample exactly. After a reduced-scale
decode the remaining shrink is < 2x, where a linear filter loses little (no aliasing to
speak of). A shrink past 2x (a full decode) is averaged by INTER_AREA when the box is the
whole image, and left to Pillow otherwise (a crop box, or an axis that grows: INTER_AREA
upscales by repeating pixels). A JPEG with an EXIF orientation is turned upright by OpenCV
(`upright`) after its n/8 decode and resized from the box Pillow's path uses, where a flip
has moved the decode's fraction of a pixel to the start of an axis (1.25x Pillow's path for
such JPEGs: 900 against 721 img/s, orientation 6, the photos above).

OpenCV is the `opencv-python-headless` dependency, libspng the `pyspng` one. Without OpenCV
(or when it does not load) every image takes the general path, after one DEBUG log line;
without pyspng, OpenCV decodes RGB PNGs too. OpenCV runs on one thread: the workers are the
parallelism, and the zygote forks workers after its warm-up, which must
leave no thread behind.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
import zlib
from typing import Any

import numpy as np

from pixcrawler_engine.decode import _chatter
from pixcrawler_engine.decode._headers import ImageHeader
from pixcrawler_engine.decode._plan import Plan
from pixcrawler_engine.decode._vips import VIPS_MIN_PIXELS

__all__ = [
    "FAST_FORMATS",
    "antialiased",
    "copy_into",
    "decode_other",
    "opencv",
    "resize_into",
    "spng",
    "upright",
]

logger = logging.getLogger(__name__)

FAST_FORMATS = frozenset({"PNG", "WEBP"})
"""Formats `decode_other` decodes (JPEG has its own fast decode in `_image`)."""

_CRC = struct.Struct(">I")
# pyspng takes `bytes` and copies them once more: a larger file goes to OpenCV, which reads
# it in place, so that a worker's peak does not grow by twice the file.
_SPNG_MAX_BYTES = 8 << 20
_LINEAR_MAX_SHRINK = 2.0
_BLUR = 0.35  # sigma = _BLUR * sqrt(shrink^2 - 1), by PSNR against LANCZOS on the photo set
_MIN_SIGMA = 0.3


@functools.cache
def spng() -> Any:
    """The pyspng module (libspng), the fast path's PNG decoder, or None when it cannot load."""
    try:
        import pyspng
    except (ImportError, OSError) as exc:
        logger.debug("pyspng is not available (%s); PNGs are decoded by OpenCV", exc)
        return None
    return pyspng


@functools.cache
def opencv() -> Any:
    """The cv2 module set up for a decode worker (one thread), or None when it cannot load."""
    try:
        import cv2
    except (ImportError, OSError) as exc:  # a missing wheel, or a missing system library
        logger.debug("OpenCV is not available (%s); images take the Pillow path", exc)
        return None
    cv2.setNumThreads(1)
    return cv2


def resize_into(
    pixels: np.ndarray,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    target: np.ndarray,
) -> bool:
    """Resizes `box` of `pixels` (H, W) or (H, W, C) to `size` (w, h), into `target`.

    `target` is (h, w, C) with C the channels of `pixels` (or 3 for a grey `pixels`, which is
    repeated). Returns False (nothing written) when no OpenCV resize keeps the quality.
    """
    x0, y0, x1, y1 = box
    ow, oh = size
    if box == (0.0, 0.0, pixels.shape[1], pixels.shape[0]) and size == box[2:]:
        # Already the output size: the very pixels (what Pillow's resize returns too).
        copy_into(pixels, target)
        return True
    cv2 = opencv()
    if cv2 is None:
        return False
    fx, fy = (x1 - x0) / ow, (y1 - y0) / oh
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    direct = channels == target.shape[2]
    dst = (target[:, :, 0] if channels == 1 else target) if direct else None
    if fx <= _LINEAR_MAX_SHRINK and fy <= _LINEAR_MAX_SHRINK:
        pixels = antialiased(pixels, fx, fy)
        # Output pixel centre (x + 0.5) maps to x0 + (x + 0.5) * fx in the source, whose
        # pixel centres are at i + 0.5: what Pillow's resize with `box=` samples.
        out = _resize_box(cv2, pixels, box, size, dst)
        if out is None:
            inverse = np.array([[fx, 0.0, x0 + 0.5 * fx - 0.5], [0.0, fy, y0 + 0.5 * fy - 0.5]])
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            out = cv2.warpAffine(
                pixels, inverse, (ow, oh), dst=dst, flags=flags, borderMode=cv2.BORDER_REPLICATE
            )
    elif fx >= 1 and fy >= 1 and box == (0.0, 0.0, pixels.shape[1], pixels.shape[0]):
        out = cv2.resize(pixels, (ow, oh), dst=dst, interpolation=cv2.INTER_AREA)
    else:
        return False
    if not np.shares_memory(out, target):
        copy_into(out, target)  # a grey image into three channels, or an unusual target
    return True


def antialiased(pixels: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """`pixels` made ready for a linear shrink by (fx, fy) <= 2: as they are, or blurred.

    A linear filter samples without averaging: past a shrink of ~1.35 a light Gaussian first
    (sigma grows with the shrink) keeps the aliasing down (china.jpg at 1.8x: 31.4 -> 34.0 dB
    against LANCZOS; Pillow's own path 34.9).
    """
    sx, sy = (_BLUR * np.sqrt(max(f * f - 1.0, 0.0)) for f in (fx, fy))
    if sx <= _MIN_SIGMA and sy <= _MIN_SIGMA:
        return pixels
    return np.asarray(
        opencv().GaussianBlur(pixels, (0, 0), sigmaX=max(sx, 0.01), sigmaY=max(sy, 0.01))
    )


def _resize_box(
    cv2: Any,
    pixels: np.ndarray,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    dst: np.ndarray | None,
) -> np.ndarray | None:
    """The linear resize of `box` by `cv2.resize` (2.6x `warpAffine`'s speed); None: not exact.

    `cv2.resize` maps its input's whole width onto the output, but given scale factors
    instead of a size it samples at (x + 0.5) / factor - 0.5, whatever size that makes. So
    the box's pixels, from its (whole) origin to the pixel its fractional end lies in,
    resized by output / box size give the box's exact geometry in the first (w, h) pixels,
    one column or row more where the fraction rounds up. Only where every sample's two
    neighbours lie in those pixels: a growing axis also reads the pixels beyond the box,
    which `warpAffine` takes from the image (or repeats at its edge).
    """
    x0, y0, x1, y1 = box
    ow, oh = size
    height, width = pixels.shape[:2]
    left, top = int(x0), int(y0)
    right, bottom = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if (left, top) != (x0, y0):
        return None
    if (x1 - x0 < ow or y1 - y0 < oh) and (left, top, right, bottom) != (0, 0, width, height):
        return None
    fx, fy = ow / (x1 - x0), oh / (y1 - y0)
    shape = (round((bottom - top) * fy), round((right - left) * fx))
    if shape == (bottom - top, right - left) and (fx, fy) != (1.0, 1.0):
        return None  # OpenCV copies an input whose size the factors keep: not a resize
    if shape != (oh, ow):
        dst = None  # one more row or column: resized aside, its (w, h) corner copied
    region = pixels[top:bottom, left:right]
    out = cv2.resize(region, None, dst=dst, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
    return out if out.shape[:2] == (oh, ow) else out[:oh, :ow]


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray | None:
    """`pixels` turned as EXIF `orientation` (2-8) says, as Pillow's `TRANSPOSE` turns them
    (a new contiguous array); None without OpenCV."""
    cv2 = opencv()
    if cv2 is None:
        return None
    turned = {
        2: lambda p: cv2.flip(p, 1),
        3: lambda p: cv2.rotate(p, cv2.ROTATE_180),
        4: lambda p: cv2.flip(p, 0),
        5: cv2.transpose,
        6: lambda p: cv2.rotate(p, cv2.ROTATE_90_CLOCKWISE),
        7: lambda p: cv2.rotate(cv2.transpose(p), cv2.ROTATE_180),
        8: lambda p: cv2.rotate(p, cv2.ROTATE_90_COUNTERCLOCKWISE),
    }[orientation](pixels)
    return np.asarray(turned).reshape(*turned.shape[:2], *pixels.shape[2:])


def copy_into(pixels: np.ndarray, target: np.ndarray) -> None:
    """`pixels` (H, W) or (H, W, C) into `target` (H, W, C'), a grey image repeated into RGB.

    OpenCV repeats grey into RGB 6x faster than numpy's broadcasting copy (0.8 against 4.9 us
    for 32x32): per image, that is most of the cost of a tiny one.
    """
    cv2 = opencv()
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2 and target.shape[2] == 3 and cv2 is not None:
        out = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB, dst=target)
        if out is not target:  # a target OpenCV could not write in place
            np.copyto(target, out)
    else:
        np.copyto(target, pixels if pixels.ndim == 3 else pixels[:, :, None])


def decode_other(view: memoryview, header: ImageHeader, plan: Plan) -> np.ndarray | None:
    """An 8-bit RGB or grey PNG/WebP, as (H, W, C); None: not handled. libspng decodes RGB
    PNGs (see `_decode_png`), OpenCV the rest (and RGB PNGs too, without pyspng).

    Declined (the general path decides): other formats and modes, transparency, an EXIF
    orientation, images libvips shrinks (`_vips`), and anything the decoder rejects (or,
    for OpenCV, comments on).
    """
    if (
        header.format not in FAST_FORMATS
        or header.mode not in ("RGB", "L")
        or header.transparency
        or header.orientation != 1
        or header.pixels >= VIPS_MIN_PIXELS
        or plan.mode not in ("RGB", "L")
        or (header.mode == "RGB" and plan.mode == "L")  # Pillow's own grey weights
        or (header.format == "PNG" and view[24] != 8)  # 16-bit: Pillow's own rounding
    ):
        return None
    cv2 = opencv()
    if cv2 is None:  # the fast path as a whole: its resize is OpenCV's
        return None
    if (
        header.format == "PNG"
        and header.mode == "RGB"
        and len(view) <= _SPNG_MAX_BYTES
        and spng() is not None
    ):
        return _decode_png(view, header)
    flag = cv2.IMREAD_GRAYSCALE if header.mode == "L" else cv2.IMREAD_COLOR_RGB
    said: list[str] = []
    try:  # libpng and libwebp write to fd 2
        pixels = _chatter.quietly(cv2.imdecode, said, np.frombuffer(view, np.uint8), flag)
    except cv2.error:
        return None
    if said or pixels is None or pixels.shape[:2] != (header.height, header.width):
        return None
    return pixels if pixels.ndim == 3 else pixels[:, :, None]


def _decode_png(view: memoryview, header: ImageHeader) -> np.ndarray | None:
    """libspng's decode of an 8-bit RGB PNG; None: declined.

    On the demo photos' RGB PNGs libspng takes 4.6 ms an image against OpenCV's 6.4 (1.4x),
    on grey ones 2.3 against 2.1, so grey PNGs stay with OpenCV (2026-11-30, one core of the
    2-core VM).

    libspng is told to ignore chunk checksums (pyspng's choice; the zlib stream's own check
    still holds), so the chunks before IDAT are checked here: Pillow refuses a file where
    one is wrong, and libpng too, so the general path decides as before.
    """
    pos = 8
    while True:
        if pos + 12 > len(view):
            return None
        length, kind = struct.unpack_from(">I4s", view, pos)
        if kind == b"IDAT":
            break
        end = pos + 8 + length
        if end + 4 > len(view) or zlib.crc32(view[pos + 4 : end]) != _CRC.unpack_from(view, end)[0]:
            return None
        pos = end + 4
    try:
        pixels: np.ndarray = spng().load(bytes(view), "RGB")
    except (RuntimeError, MemoryError):
        return None
    return pixels if pixels.shape[:2] == (header.height, header.width) else None
