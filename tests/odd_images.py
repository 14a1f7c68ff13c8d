"""Odd real images, built from scikit-image photos: orientations stored outside EXIF, valid
images no installed decoder reads, damaged files whose decoders talk.

Pillow's and libjpeg-turbo's test corpora are not installed here, so each case of those
corpora that the product mishandled is rebuilt from a real photo with the library that writes
that kind of file (Pillow, tifffile + imagecodecs, or by hand where no library writes it).
"""

from __future__ import annotations

import io
import struct
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from skimage import data as skdata

__all__ = [
    "bmp_argb4444",
    "chelsea",
    "cmyk_jpeg_with_broken_exif",
    "damaged_tiff",
    "jpeg12",
    "jpeg_with_xmp",
    "png_with_raw_profile",
    "png_with_xmp",
    "truncated_jpeg",
    "webp_tiff",
    "webp_with_xmp",
    "xmp_packet",
]


def chelsea() -> Image.Image:
    """451x300 RGB: not square, so every orientation gives a different picture."""
    return Image.fromarray(skdata.chelsea())


def _astronaut(size: int = 128) -> np.ndarray:
    return np.asarray(Image.fromarray(skdata.astronaut()).resize((size, size)))


def _save(im: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def xmp_packet(orientation: int, *, element: bool = False) -> str:
    """An XMP packet holding `tiff:Orientation` as an attribute or as an element."""
    tiff = 'xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
    if element:
        body = (
            f'<rdf:Description rdf:about="" {tiff}>'
            f"<tiff:Orientation>{orientation}</tiff:Orientation></rdf:Description>"
        )
    else:
        body = f'<rdf:Description rdf:about="" {tiff} tiff:Orientation="{orientation}"/>'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'{body}</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    )


def _exif(**tags: Any) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[{"orientation": 0x0112, "make": 0x010F}[tag]] = value
    return exif.tobytes()


def jpeg_with_xmp(
    im: Image.Image, orientation: int, *, element: bool = False, exif: dict[str, Any] | None = None
) -> bytes:
    """A JPEG whose orientation is in an XMP APP1 segment (and maybe an EXIF without it)."""
    packet = xmp_packet(orientation, element=element).encode()
    params: dict[str, Any] = {"quality": 95, "xmp": packet}
    if exif is not None:
        params["exif"] = _exif(**exif)
    return _save(im, "JPEG", **params)


def webp_with_xmp(im: Image.Image, orientation: int) -> bytes:
    return _save(im, "WEBP", quality=95, xmp=xmp_packet(orientation).encode())


def png_with_xmp(im: Image.Image, orientation: int) -> bytes:
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp_packet(orientation))
    return _save(im, "PNG", pnginfo=info)


def png_with_raw_profile(im: Image.Image, orientation: int, *, chunk: str = "zTXt") -> bytes:
    """A PNG as ImageMagick writes EXIF: a "Raw profile type exif" text chunk of hex digits."""
    exif = _exif(orientation=orientation)
    digits = exif.hex()
    lines = [digits[i : i + 72] for i in range(0, len(digits), 72)]
    text = "\nexif\n" + f"{len(exif):8d}\n" + "\n".join(lines) + "\n"
    info = PngInfo()
    if chunk == "iTXt":
        info.add_itxt("Raw profile type exif", text, zip=True)
    else:
        info.add_text("Raw profile type exif", text, zip=chunk == "zTXt")
    return _save(im, "PNG", pnginfo=info)


def jpeg12() -> bytes:
    """scikit-image's camera as a valid 12-bit JPEG (libjpeg-turbo 3 via imagecodecs)."""
    samples = skdata.camera().astype(np.uint16) * 16
    return bytes(imagecodecs.jpeg8_encode(samples, level=90, bitspersample=12))


def webp_tiff() -> bytes:
    """A valid TIFF whose strips are WebP-compressed (tifffile + imagecodecs)."""
    out = io.BytesIO()
    tifffile.imwrite(out, _astronaut(), compression="webp")
    return out.getvalue()


def bmp_argb4444() -> bytes:
    """A valid 16-bit BMP with ARGB4444 bit fields (BITMAPV4HEADER), a layout Pillow lacks."""
    a = _astronaut(64).astype(np.uint16)
    h, w = a.shape[:2]
    pixels = (0xF << 12) | ((a[..., 0] >> 4) << 8) | ((a[..., 1] >> 4) << 4) | (a[..., 2] >> 4)
    rows = pixels[::-1].astype("<u2").tobytes()
    header = struct.pack("<IiiHHIIiiII", 108, w, h, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    header += struct.pack("<4I", 0x0F00, 0x00F0, 0x000F, 0xF000) + b"BGRs" + bytes(48)
    offset = 14 + len(header)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + header + rows


def damaged_tiff() -> bytes:
    """A deflate TIFF with bytes of its strip flipped: libtiff reports zlib errors on stderr."""
    crop = Image.fromarray(skdata.astronaut()[:128, :128])
    data = bytearray(_save(crop, "TIFF", compression="tiff_adobe_deflate"))
    for k in range(1008, 30000, 997):
        data[k] ^= 0x5A
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = _save(Image.fromarray(_astronaut()), "JPEG", quality=90)
    return data[: len(data) // 2]


def cmyk_jpeg_with_broken_exif() -> bytes:
    """A CMYK JPEG (decoded by Pillow) whose EXIF points past its end: Pillow warns, then
    decodes it fine."""
    exif = Image.Exif()
    exif[0x0110] = "PixCrawler test camera"
    raw = bytearray(exif.tobytes())
    tiff = 6  # after "Exif\0\0"
    end = ">" if raw[tiff : tiff + 2] == b"MM" else "<"
    (ifd,) = struct.unpack_from(end + "I", raw, tiff + 4)
    (count,) = struct.unpack_from(end + "H", raw, tiff + ifd)
    for i in range(count):
        entry = tiff + ifd + 2 + 12 * i
        if struct.unpack_from(end + "H", raw, entry)[0] == 0x0110:
            struct.pack_into(end + "I", raw, entry + 8, 5000)  # the model string: past the end
    cmyk = Image.fromarray(_astronaut()).convert("CMYK")
    return _save(cmyk, "JPEG", quality=90, exif=bytes(raw))
