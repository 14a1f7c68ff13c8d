"""Decoding a segmentation mask: class ids kept exactly, nearest-neighbour resize, orientation.

A large 8-bit grey PNG mask shrunk to its image's output size is reduced by libvips while it
decodes (`_vips.shrink_mask`: the same pixels as Pillow's NEAREST, +11 MB instead of the whole
mask, 133 MB for a 133 MP one); everything else is decoded by Pillow.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode._headers import (
    as_view,
    header_from_pillow,
    open_pillow,
    sniff,
)
from pixcrawler_engine.decode._pixels import (
    HIGH_DEPTH,
    TRANSPOSE,
    check_budget,
    library_errors,
)
from pixcrawler_engine.decode._vips import VIPS_MIN_PIXELS, shrink_mask

__all__ = ["decode_mask"]


def decode_mask(
    data: bytes | memoryview, size: tuple[int, int] | None, *, max_pixels: int
) -> np.ndarray:
    """Decodes a segmentation mask (class ids) into a C-contiguous uint8 (H, W) array.

    Values are kept exactly: a palette image gives its indices, with no colour conversion and
    no interpolation. EXIF orientation, if any, is applied (a lossless transpose), so a mask
    stays aligned with its image. Use a lossless format: JPEG masks carry compression noise.

    Args:
        data: the encoded mask, a single-channel image (PNG mode L or P typically; `1` gives
            0/1; 16-bit masks are accepted when every value fits in 0..255).
        size: output (height, width), resized with NEAREST; None keeps the mask's size.
        max_pixels: the pixel budget, checked on the header before decoding.

    Raises:
        DecodeError: corrupt or not an image, over the budget, or not a single-channel mask.
        ValueError: `size` is not two positive ints (a bug in the caller).
    """
    if size is not None and (len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"size must be (height, width) with two positive ints, got {size!r}")
    view = as_view(data)
    header = sniff(view)
    if header is not None:
        check_budget(header, max_pixels)
        if (
            size is not None
            and header.mode == "L"
            and header.orientation == 1
            and header.pixels >= VIPS_MIN_PIXELS
        ):
            ids = shrink_mask(view, size)
            if ids is not None:
                return ids
    with library_errors("mask"):
        im: Image.Image = open_pillow(view)
        header = header or header_from_pillow(im)
        check_budget(header, max_pixels)
        im.load()
        if im.mode in ("L", "P"):
            # NEAREST transposes and resizes of an L or P image copy values (P: its indices);
            # working on the image itself avoids two full-size copies (a 133 MP mask: -260 MB).
            if header.orientation != 1:
                im = im.transpose(TRANSPOSE[header.orientation])
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
            return np.array(im)
        if im.mode == "1" or im.mode in HIGH_DEPTH - {"F"}:
            ids = np.asarray(im)
            if ids.size and (ids.min() < 0 or ids.max() > 255):
                raise DecodeError(
                    f"the {im.mode} mask has values {ids.min()}..{ids.max()}, outside 0..255; "
                    "store class ids as an 8-bit PNG (mode L or P)"
                )
        else:
            raise DecodeError(
                f"a mask must be one channel of class ids (PNG mode L or P), this one is "
                f"{im.mode}; convert colour-coded masks to class ids first"
            )
        im = Image.fromarray(ids.astype(np.uint8, copy=False))
        if header.orientation != 1:
            im = im.transpose(TRANSPOSE[header.orientation])
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
        return np.array(im)
