"""What an encoded image says about itself before any pixel is decoded: `ImageHeader`.

JPEG and PNG headers (the formats of nearly every dataset) are parsed here by hand: the frame
size, channel layout, palette transparency and EXIF orientation come from a walk over the
marker segments / chunks that stops at the first scan (`SOS`) or `IDAT`, so the pixel budget is
checked before Pillow sees the file. Other formats are opened with Pillow's plugin classes
directly, which reads only their header.

NOTE [Pillow's bomb check]: `PIL.Image.open` calls `_decompression_bomb_check`, which warns
above ~89 megapixels and raises above ~179, before `Image.draft` could shrink a JPEG. The
engine has its own budget (`DecodePolicy.max_pixels`, read from the header), so `open_pillow`
runs the same format detection as `Image.open` without that check, and without touching
`Image.MAX_IMAGE_PIXELS` (global state that would leak to the caller). Two plugins still check
on their own: TIFF at `load()` and GIF for frames larger than the canvas; above ~179 megapixels
those raise, and the caller turns that into a `DecodeError`.
"""

from __future__ import annotations

import functools
import importlib
import io
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from PIL import Image, ImageFile, TiffImagePlugin

from pixcrawler_engine.decode._formats import FORMAT_EXTENSIONS, SUPPORTED_FORMATS
from pixcrawler_engine.decode._orientation import (
    EXIF_ORIENTATION,
    orientation_from_info,
    png_text,
)

__all__ = [
    "FORMAT_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "ImageHeader",
    "as_view",
    "describe_junk",
    "open_pillow",
    "sniff",
]

# Formats a dataset may hold. Pillow's exotic plugins (EPS runs Ghostscript, TGA and others have
# weak magic numbers) are deliberately not tried on untrusted bytes.


_JPEG_MAGIC = b"\xff\xd8\xff"
_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic), i.e. C0-CF
# without DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# PNG (bit depth, colour type) -> the mode Pillow opens it in (PngImagePlugin._MODES).
_PNG_MODES = {
    (1, 0): "1",
    (2, 0): "L",
    (4, 0): "L",
    (8, 0): "L",
    (16, 0): "I;16",
    (8, 2): "RGB",
    (16, 2): "RGB",
    (1, 3): "P",
    (2, 3): "P",
    (4, 3): "P",
    (8, 3): "P",
    (8, 4): "LA",
    (16, 4): "RGBA",
    (8, 6): "RGBA",
    (16, 6): "RGBA",
}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


class ImageHeader(NamedTuple):
    """An image's format, stored size, mode and orientation, read without decoding pixels.

    Attributes:
        format: Pillow's format name: "JPEG", "PNG", "WEBP", ...
        width: stored width, before EXIF orientation.
        height: stored height, before EXIF orientation.
        mode: the Pillow mode the file opens in, e.g. "RGB", "L", "CMYK", "P", "I;16", "RGBA".
        orientation: EXIF orientation 1..8 (1 when absent or invalid).
        transparency: a palette (or colour-key) transparency is declared; a "P" image then
            decodes to RGBA under `color="keep"`.
        unsupported: why the decoders cannot read this valid image (a 12-bit JPEG), or None.

    A named tuple: one is made per image, at a third of a frozen dataclass's cost.
    """

    format: str
    width: int
    height: int
    mode: str
    orientation: int = 1
    transparency: bool = False
    unsupported: str | None = None

    @property
    def pixels(self) -> int:
        """width x height, the number the pixel budget is checked against."""
        return self.width * self.height


def as_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of `data`, without copying (shared-memory views stay shared)."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def sniff(view: memoryview) -> ImageHeader | None:
    """The header of a JPEG or PNG, parsed by hand; None for other (or unparseable) input.

    None is not an error: the caller then asks Pillow, which reports what is wrong.
    """
    try:
        if view[:3] == _JPEG_MAGIC:
            return _jpeg_header(view)
        if view[:8] == _PNG_MAGIC:
            return _png_header(view)
    except (struct.error, IndexError, ValueError):
        return None  # a truncated or malformed header: Pillow gives the precise error
    return None


def _jpeg_header(view: memoryview) -> ImageHeader | None:
    """Walks JPEG marker segments up to the first scan: SOFn, the first EXIF and the last XMP."""
    size = len(view)
    pos = 2
    frame: tuple[int, int, int, int] | None = None
    info: dict[str, Any] = {}
    while pos + 4 <= size:
        if view[pos] != 0xFF:
            return None  # garbage between segments; let the decoder judge
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS: the header is over
            break
        (length,) = struct.unpack_from(">H", view, pos + 2)
        body = view[pos + 4 : pos + 2 + length]
        if marker in _SOF_MARKERS and frame is None:
            precision, height, width, components = struct.unpack_from(">BHHB", body)
            frame = (width, height, components, precision)
        elif marker == 0xE1 and body[:6] == b"Exif\x00\x00":
            # Pillow (and so `ImageOps.exif_transpose`) reads the first EXIF segment's IFD.
            info.setdefault("exif", bytes(body))
        elif marker == 0xE1 and body[:29] == _XMP_JPEG:
            info["xmp"] = bytes(body[29:])  # the last one wins, as in Pillow
        pos += 2 + length
    if frame is None or frame[2] not in _JPEG_MODES or frame[0] == 0 or frame[1] == 0:
        return None  # no frame, a DNL height, or an odd component count: Pillow decides
    width, height, components, precision = frame
    unsupported = None
    if precision != 8:
        unsupported = f"a {precision}-bit JPEG (only 8-bit JPEGs can be decoded)"
    mode = _JPEG_MODES[components]
    orientation = orientation_from_info(info) if info else 1
    return ImageHeader("JPEG", width, height, mode, orientation, False, unsupported)


def _png_header(view: memoryview) -> ImageHeader | None:
    """Reads IHDR, then walks the chunks before IDAT for tRNS, EXIF, text and XMP."""
    length, kind = struct.unpack_from(">I4s", view, 8)
    if kind != b"IHDR" or length < 13:
        return None
    width, height, depth, colour = struct.unpack_from(">IIBB", view, 16)
    mode = _PNG_MODES.get((depth, colour))
    if mode is None or width == 0 or height == 0:
        return None
    transparency = False
    info: dict[str, Any] = {}
    pos = 8 + 12 + length
    # Chunks after IDAT are only read by a full decode; `probe` and `decode_image` must agree
    # on the output shape, so both use what precedes IDAT (where encoders put metadata).
    while pos + 8 <= len(view):
        length, kind = struct.unpack_from(">I4s", view, pos)
        if kind in (b"IDAT", b"IEND"):
            break
        body = view[pos + 8 : pos + 8 + length]
        if kind == b"tRNS":
            transparency = True
        elif kind == b"eXIf":
            info["exif"] = b"Exif\x00\x00" + bytes(body)
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            png_text(kind, bytes(body), info)
        pos += 12 + length
    orientation = orientation_from_info(info) if info else 1
    return ImageHeader("PNG", width, height, mode, orientation, transparency)


@functools.cache
def _openers() -> tuple[tuple[str, Callable[..., ImageFile.ImageFile], Any], ...]:
    """(format, plugin class, accept) for each supported format this Pillow build has."""
    from PIL import (
        BmpImagePlugin,
        GifImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        PpmImagePlugin,
    )

    openers: list[tuple[str, Callable[..., ImageFile.ImageFile], Any]] = [
        # The JPEG class itself, not `jpeg_factory`, which may return an MPO image (and MPO
        # checks the bomb limit on its own): the first frame is the image.
        ("JPEG", JpegImagePlugin.JpegImageFile, JpegImagePlugin._accept),
        ("PNG", PngImagePlugin.PngImageFile, PngImagePlugin._accept),
        ("GIF", GifImagePlugin.GifImageFile, GifImagePlugin._accept),
        ("BMP", BmpImagePlugin.BmpImageFile, BmpImagePlugin._accept),
        ("TIFF", TiffImagePlugin.TiffImageFile, TiffImagePlugin._accept),
        ("PPM", PpmImagePlugin.PpmImageFile, PpmImagePlugin._accept),
    ]
    for name, module in (
        ("WEBP", "WebPImagePlugin"),
        ("JPEG2000", "Jpeg2KImagePlugin"),
        ("AVIF", "AvifImagePlugin"),
    ):
        try:  # optional codecs of the Pillow build; importing a plugin registers it
            importlib.import_module(f"PIL.{module}")
            factory, accept = Image.OPEN[name]
        except (ImportError, KeyError):
            continue
        openers.append((name, factory, accept))
    return tuple(openers)


def open_pillow(view: memoryview) -> ImageFile.ImageFile:
    """Opens `view` with the first supported Pillow plugin that accepts it; reads the header only.

    This is `PIL.Image.open` restricted to SUPPORTED_FORMATS and without the global bomb check
    (see NOTE [Pillow's bomb check]); the pixel budget is the caller's.

    Raises:
        PIL.UnidentifiedImageError: no supported format accepts the bytes.
        Exception: whatever the plugin raises on a malformed header.
    """
    prefix = bytes(view[:16])
    fp = io.BytesIO(view)
    failure: tuple[str, Exception] | None = None
    for name, factory, accept in _openers() if len(view) else ():
        try:
            result = accept(prefix)
        except (IndexError, TypeError, struct.error):
            continue  # a prefix too short for this plugin's magic number
        if not result or isinstance(result, str):  # a str says why the plugin declined
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error) as exc:
            # The errors on which Image.open tries the next format; remember the first, as
            # bytes that carry a format's magic number are most likely a damaged file of it.
            failure = failure or (name, exc)
    if failure is not None:
        name, cause = failure
        raise Image.UnidentifiedImageError(
            f"the {name} header is corrupt or truncated ({cause}); re-fetch the file, or skip "
            "such samples with on_error='skip'"
        ) from cause
    raise Image.UnidentifiedImageError(describe_junk(view))


def header_from_pillow(im: Image.Image) -> ImageHeader:
    """The header of an image Pillow has opened (but not loaded)."""
    if im.format == "PNG":
        # `getexif` would decode a PNG to look for late chunks; PNGs go through `sniff`
        # anyway, and this reads what Pillow has seen before IDAT the same way.
        orientation = orientation_from_info(im.info)
    else:
        value = im.getexif().get(EXIF_ORIENTATION, 1)  # EXIF, then XMP, as Pillow reads them
        orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
    width, height = im.size
    if isinstance(im, TiffImagePlugin.TiffImageFile):
        # Pillow's TIFF plugin reports the size upright (and rotates the pixels at `load`);
        # the header is the stored size, as for every other format.
        width, height = im.tag_v2.get(256, width), im.tag_v2.get(257, height)
    return ImageHeader(
        im.format or "unknown", width, height, im.mode, orientation, "transparency" in im.info
    )


def describe_junk(view: memoryview) -> str:
    """Says what bytes that are no supported image look like, and what to do about them."""
    if len(view) == 0:
        return (
            "the input is empty (0 bytes): the source holds no image data for this sample (an "
            "empty file or a failed download); fix the source, or skip such samples with "
            "on_error='skip'"
        )
    head = bytes(view[:256]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        what = "an HTML page, not an image (often a download that got an error or login page)"
    elif head.startswith((b"<svg", b"<?xml")):
        what = "XML/SVG text; vector images are not supported, rasterise them first"
    elif head[:1] in (b"{", b"["):
        what = "JSON text, not an image"
    else:
        what = f"not a supported image (first bytes {bytes(view[:8]).hex(' ')})"
    return (
        f"the input ({len(view)} bytes) is {what}; supported formats: "
        f"{', '.join(SUPPORTED_FORMATS)}. Fix or re-fetch the file, or skip such samples "
        "with on_error='skip'"
    )
