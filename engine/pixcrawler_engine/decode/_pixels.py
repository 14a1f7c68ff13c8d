"""8-bit pixels from any Pillow mode: orientation tables, colour conversion, the budget, errors.

Shared by the image and mask decoders. Pillow's errors become `DecodeError` (or
`UnsupportedImageError`) here, and what it says meanwhile is taken (see `library_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from pixcrawler_engine._errors import DecodeError, UnsupportedImageError
from pixcrawler_engine.decode import _chatter
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
    "check_supported",
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
    """Refuses, before decoding, an image over the pixel budget or one no decoder can read."""
    check_supported(header)
    if header.pixels > max_pixels:
        raise DecodeError(
            f"the {header.format} image is {header.width}x{header.height} = {header.pixels:,} "
            f"pixels, over the budget of {max_pixels:,} (DecodePolicy.max_pixels); nothing was "
            "decoded. Raise max_pixels if such images are expected, or skip them with "
            "on_error='skip'"
        )


def check_supported(header: ImageHeader) -> None:
    """Refuses an image its header marks as one the decoders cannot read (a 12-bit JPEG)."""
    if header.unsupported is not None:
        raise UnsupportedImageError(_unsupported_text(header.unsupported))


def _unsupported_text(what: str) -> str:
    return (
        f"unsupported image: {what}. The file is valid, so fetching it again will not help: "
        "convert it (to an 8-bit PNG or JPEG, say), or skip such samples with on_error='skip'"
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
    """Turns Pillow's errors into DecodeError (with the cause chained); takes its chatter.

    What the decoder says meanwhile (libtiff's stderr lines, Pillow's warnings, see
    `_chatter`) is reported as one line for the sample on success, and quoted in the error
    on failure, where it also tells an unsupported feature (`UnsupportedImageError`) from a
    corrupt file.
    """
    said: list[str] = []
    try:
        with _chatter.capture(said):
            yield
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise DecodeError(str(exc) + _quoted(said)) from exc
    except MemoryError as exc:
        raise DecodeError(
            f"out of memory decoding the {what}; lower DecodePolicy.max_pixels or use fewer workers"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, ...
        if _chatter.unsupported(exc, said):
            raise UnsupportedImageError(
                _unsupported_text(f"the {what} ({type(exc).__name__}: {exc}{_quoted(said)})")
            ) from exc
        raise DecodeError(
            f"cannot decode the {what}: {type(exc).__name__}: {exc}{_quoted(said)}. The file "
            "is corrupt or truncated: re-fetch it, or skip such samples with on_error='skip'"
        ) from exc
    _chatter.report(said, what)


def _quoted(said: list[str]) -> str:
    return f" (the decoder said: {_chatter.summary(said)})" if said else ""
