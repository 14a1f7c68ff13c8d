"""The geometry of one decode, fixed before any pixel: output shape and mode, crop box, DCT need."""

from __future__ import annotations

import math
from typing import NamedTuple

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine.decode._headers import (
    ImageHeader,
)
from pixcrawler_engine.decode._pixels import (
    CHANNELS,
    GREY,
)

__all__ = ["Box", "Plan", "make_plan", "output_mode", "output_shape", "stored_need"]

Box = tuple[float, float, float, float]


class Plan(NamedTuple):
    """Where the pixels of one image go; sizes are (width, height) in the oriented frame.

    Attributes:
        shape: the output (H, W, C).
        mode: the 8-bit Pillow mode of the output: L, LA, RGB or RGBA.
        source: the image's own size, oriented.
        size: what the image (or `box` of it) is resized to; None keeps the size.
        box: the region of the source that is resized (crop), in source pixels.
        offset: (top, left) of the resized image in the output (pad).
        need: the smallest whole-image size the resize needs, for DCT scaling.
    """

    shape: tuple[int, int, int]
    mode: str
    source: tuple[int, int]
    size: tuple[int, int] | None
    box: Box | None
    offset: tuple[int, int]
    need: tuple[int, int]


def output_shape(header: ImageHeader, policy: DecodePolicy) -> tuple[int, int, int]:
    """The (H, W, C) `decode_image` returns for an image with this header under `policy`."""
    return make_plan(header, policy).shape


def output_mode(header: ImageHeader, color: str) -> str:
    """The 8-bit mode of the output: RGB and L as asked; keep follows the file's channels."""
    if color != "keep":
        return color
    mode = header.mode
    if mode in GREY:
        return "L"
    if mode in ("LA", "La"):
        return "LA"
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and header.transparency):
        return "RGBA"
    return "RGB"  # RGB, P without transparency, CMYK, YCbCr, LAB, HSV


def make_plan(header: ImageHeader, policy: DecodePolicy) -> Plan:
    w, h = header.width, header.height
    if header.orientation >= 5:  # rotated by 90 degrees: the output frame swaps the axes
        w, h = h, w
    mode = output_mode(header, policy.color)
    channels = CHANNELS[mode]
    if policy.image_size is None:
        return Plan((h, w, channels), mode, (w, h), None, None, (0, 0), (w, h))
    th, tw = policy.image_size
    if policy.resize == "stretch":
        return Plan((th, tw, channels), mode, (w, h), (tw, th), None, (0, 0), (tw, th))
    if policy.resize == "crop":
        scale = max(tw / w, th / h)  # cover the output, then take its centre
        cw, ch = min(w, tw / scale), min(h, th / scale)
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        need = (math.ceil(w * scale), math.ceil(h * scale))
        return Plan((th, tw, channels), mode, (w, h), (tw, th), box, (0, 0), need)
    scale = min(tw / w, th / h)  # fit inside the output
    if policy.resize == "fit" and scale >= 1:  # fit never upscales
        return Plan((h, w, channels), mode, (w, h), None, None, (0, 0), (w, h))
    nw, nh = min(tw, max(1, round(w * scale))), min(th, max(1, round(h * scale)))
    if policy.resize == "fit":
        return Plan((nh, nw, channels), mode, (w, h), (nw, nh), None, (0, 0), (nw, nh))
    # Centred as `ImageOps.pad` places it (Python's round: half a pixel goes to even).
    offset = (round((th - nh) / 2), round((tw - nw) / 2))
    return Plan((th, tw, channels), mode, (w, h), (nw, nh), None, offset, (nw, nh))


def stored_need(header: ImageHeader, plan: Plan) -> tuple[int, int]:
    """`plan.need` in the stored (unrotated) frame, where the decoder works."""
    nw, nh = plan.need
    return (nh, nw) if header.orientation >= 5 else (nw, nh)
