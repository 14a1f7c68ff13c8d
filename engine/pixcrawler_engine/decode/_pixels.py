"""8-bit pixels from any Pillow mode: orientation tables, colour conversion, the budget, errors.

Shared by the image and mask decoders. Pillow's errors become `DecodeError` here, and its
warnings are muted (see `library_errors`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode._headers import (
    ImageHeader,
)

__all__ = [
    "CHANNELS",
    "FLIPS_X",
    "FLIPS_Y",
    "GREY",
    "HIGH_DEPTH",
    "TRANSPOSE",
    "check_budget",
    "library_errors",
    "to_mode",
    "to_uint8",
]

_T = Image.Transpose


# EXIF orientation -> the transpose that undoes it (as in `ImageOps.exif_transpose`).
TRANSPOSE = {
    2: _T.FLIP_LEFT_RIGHT,
    3: _T.ROTATE_180,
    4: _T.FLIP_TOP_BOTTOM,
    5: _T.TRANSPOSE,
    6: _T.ROTATE_270,
    7: _T.TRANSVERSE,
    8: _T.ROTATE_90,
}


# Orientations whose upright x (y) axis runs against the stored image's.
FLIPS_X = frozenset({2, 3, 6, 7})


FLIPS_Y = frozenset({3, 4, 7, 8})


HIGH_DEPTH = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


GREY = frozenset({"1", "L"}) | HIGH_DEPTH


CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def check_budget(header: ImageHeader, max_pixels: int) -> None:
    """Refuses an image whose header claims more pixels than the budget (before decoding)."""
    if header.pixels > max_pixels:
        raise DecodeError(
            f"the {header.format} image is {header.width}x{header.height} = {header.pixels:,} "
            f"pixels, over the budget of {max_pixels:,} (DecodePolicy.max_pixels); nothing was "
            "decoded. Raise max_pixels if such images are expected, or skip them with "
            "on_error='skip'"
        )


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """Converts a loaded image of any Pillow mode to the 8-bit `mode` (L, LA, RGB, RGBA)."""
    if im.mode in HIGH_DEPTH:
        im = Image.fromarray(to_uint8(np.asarray(im), im.mode))
    if im.mode == mode:
        return im
    if im.mode in ("P", "PA"):
        # Through RGBA when there is transparency: Pillow's P->RGB warns and may mix up
        # transparent entries; RGBA->RGB then drops alpha like any RGBA image.
        transparent = im.mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if transparent else "RGB")
    if mode == "L" and im.mode not in ("1", "L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV have no direct grey conversion
    return im if im.mode == mode else im.convert(mode)


def to_uint8(samples: np.ndarray, mode: str) -> np.ndarray:
    """Scales 16/32-bit integer or float samples to 8-bit (rounded, not clipped at 255)."""
    if mode == "F":  # Pillow's convention for float images: the 0..255 scale
        return np.clip(np.rint(np.nan_to_num(samples)), 0, 255).astype(np.uint8)
    wide = (
        samples.astype(np.uint32) if mode != "I" else np.clip(samples, 0, 65535).astype(np.uint32)
    )
    return ((wide + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)


@contextlib.contextmanager
def library_errors(what: str) -> Iterator[None]:
    """Turns Pillow's errors into DecodeError (with the cause chained) and mutes its warnings."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise DecodeError(str(exc)) from exc
    except MemoryError as exc:
        raise DecodeError(
            f"out of memory decoding the {what}; lower DecodePolicy.max_pixels or use fewer workers"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ...
        raise DecodeError(
            f"cannot decode the {what}: {type(exc).__name__}: {exc}. The file is corrupt or "
            "truncated: re-fetch it, or skip such samples with on_error='skip'"
        ) from exc
