"""The image formats the decoder reads (and `pack` packs): one list, with no import of Pillow.

`pack`'s store and the supervisor read it; importing Pillow there would cost every stream.
"""

from __future__ import annotations

__all__ = ["FORMAT_EXTENSIONS", "SUPPORTED_FORMATS"]

FORMAT_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "JPEG2000": ".jp2",
    "PPM": ".ppm",  # the whole family: PBM, PGM, PPM, PNM, PFM
    "AVIF": ".avif",
}
"""Every format the decoder reads (and so `pack` packs), with its file extension."""
SUPPORTED_FORMATS = tuple(FORMAT_EXTENSIONS)
