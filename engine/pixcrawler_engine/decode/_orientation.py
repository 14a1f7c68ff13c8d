"""Where an image says which way is up: the places `ImageOps.exif_transpose` reads, by hand.

`PIL.Image.Image.getexif` (and so `exif_transpose`) takes the orientation from the EXIF block
(JPEG APP1 `Exif`, PNG `eXIf`, or an ImageMagick "Raw profile type exif" PNG text chunk of
hex digits), and, when EXIF has no Orientation tag, from XMP's `tiff:Orientation` (JPEG APP1
XMP, PNG iTXt `XML:com.adobe.xmp`). The header walk of `_headers` collects those fields into
an `info` dict shaped like Pillow's and asks `orientation_from_info`, so JPEG and PNG follow
the same rules as the formats Pillow reads for us (WebP, AVIF, TIFF).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

__all__ = ["EXIF_ORIENTATION", "orientation_from_info", "png_text"]

EXIF_ORIENTATION = 0x0112  # the tag
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_XMP_ORIENTATION_TEXT = re.compile(r'tiff:Orientation(="|>)([0-9])')
_TEXT_KEYS = (b"Raw profile type exif", b"XML:com.adobe.xmp", b"exif")
_MAX_TEXT = 1 << 20


def png_text(kind: bytes, body: bytes, info: dict[str, Any]) -> None:
    """Puts a text chunk that can carry orientation into `info`, as Pillow's PNG plugin does.

    Args:
        kind: `tEXt`, `zTXt` or `iTXt`.
        body: the chunk's data.
        info: the fields collected so far (a later chunk of the same key replaces one).
    """
    key, _, value = body.partition(b"\x00")
    if key not in _TEXT_KEYS:
        return
    try:
        if kind == b"zTXt":
            value = _inflate(value[1:]) if value[:1] == b"\x00" else b""
        elif kind == b"iTXt":
            flag, method, rest = value[0], value[1], value[2:]
            value = rest.split(b"\x00", 2)[2]
            if flag:
                if method != 0:
                    return
                value = _inflate(value)
            if key == b"XML:com.adobe.xmp":
                info["xmp"] = value
            value.decode("utf-8")  # Pillow drops an iTXt that is not UTF-8
    except (IndexError, ValueError, zlib.error):
        return
    if key == b"exif" and kind == b"tEXt":
        info["exif"] = value  # Pillow keeps a tEXt "exif" as bytes
    else:
        info[key.decode("latin-1")] = value.decode("utf-8" if kind == b"iTXt" else "latin-1")


def _inflate(data: bytes) -> bytes:
    """zlib-decompressed `data`, at most 1 MiB of it (a text chunk is small, a bomb is not)."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out


def orientation_from_info(info: Mapping[Any, Any]) -> int:
    """The orientation `ImageOps.exif_transpose` applies, from an image's `info`-like fields.

    As `PIL.Image.Image.getexif`: the EXIF block (`exif`, else an ImageMagick "Raw profile
    type exif" text), then, when EXIF has no Orientation tag, XMP's `tiff:Orientation`
    (`XML:com.adobe.xmp` text, else `xmp` bytes). A value outside 1..8 means none (1).
    """
    exif = info.get("exif")
    if exif is None and isinstance(info.get("Raw profile type exif"), str):
        try:
            exif = bytes.fromhex("".join(info["Raw profile type exif"].split("\n")[3:]))
        except ValueError:
            exif = None
    tag = None
    if isinstance(exif, (bytes, bytearray, memoryview)):
        tiff = memoryview(exif)
        tag = _exif_tag(tiff[6:] if tiff[:6] == b"Exif\x00\x00" else tiff)
    if tag is None:
        xmp = info.get("XML:com.adobe.xmp")
        digit: str | bytes | None = None
        if xmp and isinstance(xmp, str):
            found = _XMP_ORIENTATION_TEXT.search(xmp)
            digit = found[2] if found else None
        elif isinstance(info.get("xmp"), bytes):
            raw = _XMP_ORIENTATION.search(info["xmp"])
            digit = raw[2] if raw else None
        tag = int(digit) if digit is not None else None
    return tag if tag is not None and 1 <= tag <= 8 else 1


def _exif_tag(tiff: memoryview) -> int | None:
    """The Orientation tag of IFD0 in a TIFF-structured EXIF block; None if absent."""
    try:
        order = bytes(tiff[:2])
        if order not in (b"II", b"MM"):
            return None
        end = "<" if order == b"II" else ">"
        (ifd,) = struct.unpack_from(end + "I", tiff, 4)
        (count,) = struct.unpack_from(end + "H", tiff, ifd)
        for i in range(count):
            tag, kind, _, value = struct.unpack_from(end + "HHIH", tiff, ifd + 2 + 12 * i)
            if tag == EXIF_ORIENTATION:
                # SHORT is the standard type; Pillow also accepts LONG written by some tools.
                if kind == 4:
                    (value,) = struct.unpack_from(end + "I", tiff, ifd + 2 + 12 * i + 8)
                return int(value)
    except struct.error:
        pass  # a truncated EXIF block means "no orientation", as for Pillow
    return None
