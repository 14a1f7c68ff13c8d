"""The image formats the decoder reads, and the file extension each gets: one list for all.

The decoder (`_headers`), `pack` (which accepts what the decoder reads) and the exports (which
name files by format) share it. It imports nothing, so that processes that never decode (the
supervisor) can know the formats without loading Pillow.
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
