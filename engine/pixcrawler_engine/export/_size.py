"""The image size of a numpy export given none: the one size that every image's header says.

`images.npy` holds one (N, H, W, C) array, so every image needs one shape. Without an image
size from the user, `common_size` reads the header of every selected image (never its pixels)
and returns the size they all share, in the oriented frame (an EXIF rotation by 90 degrees
swaps it). Images of several sizes are refused with the most frequent sizes and the way out
(an image size to resize them to). The chunks are fetched into the export's own download
folder, where the export then finds them: nothing is downloaded twice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode._image import probe

__all__ = ["MixedSizes", "common_size"]

_SHOWN = 5


class MixedSizes(ValueError):
    """The images differ in size; `sizes` counts them by (height, width)."""

    def __init__(self, message: str, sizes: Counter[tuple[int, int]]) -> None:
        super().__init__(message)
        self.sizes = sizes


def common_size(source: Any, chunks: list[int], fetch: Any) -> tuple[int, int]:
    """The (height, width) every image of `chunks` has, read from the headers.

    Args:
        source: the export's source (its `records` and `opener`).
        chunks: the chunks to read, in order.
        fetch: `fetch(chunks) -> iterator of (chunk, path)`, the export's ordered fetcher.

    Raises:
        MixedSizes: the images are not all of one size; the message proposes an image size.
        DecodeError: a header cannot be read (the export would fail on that sample anyway).
    """
    sizes: Counter[tuple[int, int]] = Counter()
    opener = source.opener()
    for chunk, path in fetch(chunks):
        reader = opener.open(str(path))
        try:
            for record in source.records(chunk, path):
                try:
                    header = probe(reader.read(record.ref))
                except DecodeError as exc:
                    raise DecodeError(
                        f"chunk {chunk}, sample {record.key!r}: {exc}",
                        chunk_id=chunk,
                        key=record.key,
                    ) from exc
                size = (header.height, header.width)
                sizes[size if header.orientation < 5 else size[::-1]] += 1
        finally:
            reader.close()
    if not sizes:
        raise MixedSizes("the job holds no images to export", sizes)
    if len(sizes) > 1:
        (h, w), _ = sizes.most_common(1)[0]
        shown = ", ".join(f"{w}x{h}: {n:,}" for (h, w), n in sizes.most_common(_SHOWN))
        more = f" and {len(sizes) - _SHOWN} more sizes" if len(sizes) > _SHOWN else ""
        raise MixedSizes(
            f"the images differ in size ({shown}{more}; width x height: count), and numpy "
            f"needs one: pass an image size to resize them to, for example image_size=({h}, {w})",
            sizes,
        )
    return next(iter(sizes))
