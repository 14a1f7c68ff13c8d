"""Demo source folders built from real images shipped in PyPI packages (never random noise).

    build_digits(dest)  scikit-learn's 1,797 handwritten digits, 32x32 grayscale PNGs
    build_photos(dest)  crops, flips and rescales of the photos bundled with scikit-image and
                        scikit-learn, mostly 640x480-class JPEGs, some PNG, some grayscale

Both write one subfolder per class under `dest` (the layout `pixcrawler pack` reads) and are
deterministic: the same arguments give the same files, byte for byte. scikit-learn and
scikit-image are dev dependencies, imported only when a builder runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["PHOTO_NAMES", "build_digits", "build_photos"]

# The bundled photos used, by the name that becomes their label. All of them ship inside the
# wheels (no download): scikit-image's `data` module and scikit-learn's sample images.
PHOTO_NAMES = (
    "astronaut",
    "camera",
    "chelsea",
    "china",
    "coffee",
    "coins",
    "flower",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)


def build_digits(
    dest: str | os.PathLike[str],
    *,
    limit: int | None = None,
    classes: tuple[int, ...] | None = None,
) -> Path:
    """Writes scikit-learn's handwritten digits as `dest/<digit>/<nnnn>.png`.

    Each 8x8 image (16 grey levels) is scaled to 0-255 and upscaled x4 (nearest) to 32x32.

    Args:
        dest: the source folder to create (or add to).
        limit: keep only the first `limit` images of each class (all 1,797 by default).
        classes: keep only these digits (all ten by default).

    Returns:
        `dest`.
    """
    from sklearn.datasets import load_digits

    dest = Path(dest)
    digits = load_digits()
    seen: dict[int, int] = {}
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(target)
        if classes is not None and label not in classes:
            continue
        if limit is not None and seen.get(label, 0) >= limit:
            continue
        seen[label] = seen.get(label, 0) + 1
        pixels = np.round(image * (255 / 16)).astype(np.uint8)
        big = Image.fromarray(pixels).resize((32, 32), Image.Resampling.NEAREST)
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        big.save(folder / f"{i:04d}.png", optimize=False)
    return dest


def build_photos(
    dest: str | os.PathLike[str],
    n: int = 1200,
    *,
    seed: int = 0,
    names: tuple[str, ...] = PHOTO_NAMES,
) -> Path:
    """Writes `n` crops of bundled photos as `dest/<photo name>/<nnnnn>.<jpg|png>`.

    About 70% are 640x480 or 480x640 (give or take 10%), the rest between 64 and 1024
    pixels a side; about 80% are JPEG (quality 75-95) and 20% PNG; about 15% are grayscale
    (plus the photos that are grayscale already). Each is a random crop of its photo,
    rescaled, and flipped half of the time.

    Args:
        dest: the source folder to create (or add to).
        n: number of images, spread evenly over the photos.
        seed: seed of every random choice.
        names: which of `PHOTO_NAMES` to use.

    Returns:
        `dest`.
    """
    unknown = set(names) - set(PHOTO_NAMES)
    if unknown:
        raise ValueError(f"unknown photo names {sorted(unknown)}; choose from {PHOTO_NAMES}")
    dest = Path(dest)
    photos = {name: _load_photo(name) for name in names}
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = names[i % len(names)]
        image = _variant(photos[name], rng)
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.8:
            quality = int(rng.integers(75, 96))
            image.save(folder / f"{i:05d}.jpg", quality=quality)
        else:
            image.save(folder / f"{i:05d}.png", optimize=False)
    return dest


def _load_photo(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    loader: Callable[[], np.ndarray] = getattr(skimage.data, name)
    return Image.fromarray(np.ascontiguousarray(loader()))


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random crop of `photo`, rescaled to a random size, maybe flipped and greyed."""
    if rng.random() < 0.7:
        w, h = (640, 480) if rng.random() < 0.75 else (480, 640)
        jitter = rng.uniform(0.9, 1.1)
        w, h = round(w * jitter), round(h * jitter)
    else:
        w, h = (int(v) for v in rng.integers(64, 1025, size=2))
    # The largest crop of the target's aspect ratio, then 50-100% of it somewhere inside.
    pw, ph = photo.size
    scale = min(pw / w, ph / h) * rng.uniform(0.5, 1.0)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    image = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if image.mode != "L" and rng.random() < 0.15:
        image = image.convert("L")
    return image
