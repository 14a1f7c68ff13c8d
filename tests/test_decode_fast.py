"""The fast decode path (`decode._fast`: OpenCV) against the general one (Pillow).

What the fast path declines (CMYK, 16-bit, palettes, alpha, a PNG's EXIF orientation, formats
other than JPEG/PNG/WebP, ...) must come out of the general path pixel for pixel as before: the
general path's outputs are made here by running it with OpenCV switched off, and compared
with the default path's. What the fast path takes is held to a quality bound instead.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import odd_images
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

from pixcrawler_engine._config import DecodePolicy, ResizeMode
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode import _fast
from pixcrawler_engine.decode._image import decode_image, probe
from pixcrawler_engine.decode._pixels import TRANSPOSE
from pixcrawler_engine.decode._plan import make_plan


def _save(im: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def _oriented(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(im, fmt, exif=exif.tobytes())


def corpus() -> dict[str, bytes]:
    """Real photos in every form the decoders meet: fast-path ones and declined ones."""
    rgb = Image.fromarray(skdata.chelsea())  # 451x300
    grey = Image.fromarray(skdata.camera()).resize((300, 211))
    wide = Image.fromarray(skdata.astronaut()).resize((600, 90))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    items: dict[str, Callable[[], bytes]] = {
        "jpeg_rgb": lambda: _save(rgb, "JPEG", quality=90),
        "jpeg_grey": lambda: _save(grey, "JPEG", quality=90),
        "jpeg_wide": lambda: _save(wide, "JPEG", quality=90),
        "jpeg_progressive": lambda: _save(rgb, "JPEG", quality=85, progressive=True),
        "jpeg_444": lambda: _save(rgb, "JPEG", quality=95, subsampling=0),
        "jpeg_cmyk": lambda: _save(rgb.convert("CMYK"), "JPEG"),
        "jpeg12": odd_images.jpeg12,
        "cmyk_broken_exif": odd_images.cmyk_jpeg_with_broken_exif,
        "jpeg_xmp": lambda: odd_images.jpeg_with_xmp(rgb, 6),
        "png_rgb": lambda: _save(rgb, "PNG"),
        "png_grey": lambda: _save(grey, "PNG"),
        "png_grey_2bit": lambda: _save(
            grey.convert("L").point(lambda v: v // 64 * 85), "PNG", bits=2
        ),
        "png_rgba": lambda: _save(rgba, "PNG"),
        "png_la": lambda: _save(grey.convert("LA"), "PNG"),
        "png_1": lambda: _save(grey.convert("1"), "PNG"),
        "png_p": lambda: _save(palette, "PNG"),
        "png_p_transparent": lambda: _save(palette_t, "PNG"),
        "png_16": lambda: _save(Image.fromarray(skdata.camera().astype(np.uint16) * 257), "PNG"),
        "bmp_argb4444": odd_images.bmp_argb4444,
        "png_xmp": lambda: odd_images.png_with_xmp(rgb, 3),
        "png_raw_profile": lambda: odd_images.png_with_raw_profile(rgb, 8),
        "webp_rgb": lambda: _save(rgb, "WEBP", quality=90),
        "webp_lossless": lambda: _save(rgb, "WEBP", lossless=True),
        "webp_rgba": lambda: _save(rgba, "WEBP", quality=90),
        "webp_xmp": lambda: odd_images.webp_with_xmp(rgb, 6),
        "gif": lambda: _save(palette, "GIF"),
        "bmp": lambda: _save(rgb, "BMP"),
        "tiff": lambda: _save(rgb, "TIFF"),
        "webp_tiff": odd_images.webp_tiff,
    }
    out = {name: build() for name, build in items.items()}
    for orientation in range(2, 9):
        out[f"jpeg_exif{orientation}"] = _oriented(rgb, "JPEG", orientation)
        out[f"png_exif{orientation}"] = _oriented(rgb, "PNG", orientation)
    return out


POLICIES = [DecodePolicy(image_size=None, color=color) for color in ("RGB", "L", "keep")] + [
    DecodePolicy(image_size=size, resize=resize, color=color)
    for size in ((224, 224), (64, 200), (500, 700))
    for resize in ("stretch", "crop", "pad", "fit")
    for color in ("RGB", "L", "keep")
]


def fast_may_apply(data: bytes) -> bool:
    """The images `_fast` may take (its own rules, restated): all others must be identical."""
    try:
        header = probe(data)
    except DecodeError:
        return False
    if header.unsupported:
        return False
    if header.format == "JPEG":  # any orientation: OpenCV turns the pixels upright
        return header.mode in ("L", "RGB")
    if header.orientation != 1:
        return False
    return (
        header.format in _fast.FAST_FORMATS
        and header.mode in ("RGB", "L")
        and not header.transparency
        and not (header.format == "PNG" and data[24] != 8)
    )


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


def _decode(data: bytes, policy: DecodePolicy) -> np.ndarray | str:
    try:
        return decode_image(data, policy)
    except DecodeError as exc:
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return corpus()


def test_declined_images_are_identical_to_the_general_path(
    images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    declined = {name: data for name, data in images.items() if not fast_may_apply(data)}
    assert len(declined) >= 25  # CMYK, 12-bit, 16-bit, palettes, alpha, orientations, ...
    fast = {(n, i): _decode(d, p) for n, d in declined.items() for i, p in enumerate(POLICIES)}
    monkeypatch.setattr(_fast, "opencv", lambda: None)
    for (name, i), got in fast.items():
        want = _decode(declined[name], POLICIES[i])
        if isinstance(want, str) or isinstance(got, str):
            assert got == want, (name, POLICIES[i])
        else:
            assert np.array_equal(got, want), (name, POLICIES[i])


def test_fast_images_keep_the_quality(
    images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = {name: data for name, data in images.items() if fast_may_apply(data)}
    assert {"jpeg_rgb", "jpeg_grey", "png_rgb", "png_grey", "webp_rgb"} <= set(taken)
    fast = {(n, i): decode_image(d, p) for n, d in taken.items() for i, p in enumerate(POLICIES)}
    monkeypatch.setattr(_fast, "opencv", lambda: None)
    for (name, i), got in fast.items():
        policy = POLICIES[i]
        want = decode_image(taken[name], policy)
        assert got.shape == want.shape, (name, policy)
        if policy.image_size is None and not name.startswith("jpeg"):
            # A PNG or WebP decode is exact whoever does it (OpenCV's libpng/libwebp, Pillow's).
            assert np.array_equal(got, want), (name, policy)
            continue
        # Two good resizes of the same pixels: far closer than either to a wrong geometry.
        assert _psnr(got, want) >= 30, (name, policy, _psnr(got, want))


def test_the_fast_path_is_the_default(images: dict[str, bytes]) -> None:
    """OpenCV is a dependency: the fast path is what runs, on one thread."""
    cv2 = _fast.opencv()
    assert cv2 is not None and cv2.getNumThreads() == 1
    header = probe(images["png_rgb"])
    plan = make_plan(header, DecodePolicy(image_size=(64, 64)))
    assert _fast.decode_other(memoryview(images["png_rgb"]), header, plan) is not None
    assert _fast.spng() is not None  # pyspng is a dependency too: RGB PNGs are libspng's


def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(position, length, kind) of each chunk of a PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks.append((pos, length, kind))
        pos += 12 + length
    return chunks


def _broken_checksum(data: bytes, kind: bytes) -> bytes:
    pos, length, _ = next(c for c in _png_chunks(data) if c[2] == kind)
    broken = bytearray(data)
    broken[pos + 8 + length] ^= 0xFF
    return bytes(broken)


@pytest.mark.parametrize("kind", [b"IHDR", b"pHYs", b"IDAT", b"IEND"])
def test_libspng_takes_the_png_checksums_as_the_general_path_does(
    kind: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libspng ignores chunk checksums: a wrong one before IDAT is refused as Pillow refuses
    it (with its words), one in IDAT or after is decoded as Pillow decodes it."""
    data = _broken_checksum(_save(Image.fromarray(skdata.chelsea()), "PNG", dpi=(72, 72)), kind)
    policy = DecodePolicy(image_size=None)
    fast = _decode(data, policy)
    monkeypatch.setattr(_fast, "opencv", lambda: None)
    general = _decode(data, policy)
    if kind in (b"IHDR", b"pHYs"):
        assert isinstance(fast, str) and fast == general and "checksum" in fast
    else:
        assert isinstance(fast, np.ndarray) and isinstance(general, np.ndarray)
        assert np.array_equal(fast, skdata.chelsea()) and np.array_equal(general, fast)


def test_without_pyspng_opencv_decodes_the_same_png(
    images: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libspng and OpenCV's libpng give the same pixels, resized alike."""
    policies = [DecodePolicy(image_size=None), DecodePolicy(image_size=(224, 224))]
    with_spng = [decode_image(images["png_rgb"], policy) for policy in policies]
    monkeypatch.setattr(_fast, "spng", lambda: None)
    for policy, want in zip(policies, with_spng, strict=True):
        assert np.array_equal(decode_image(images["png_rgb"], policy), want)


def test_without_opencv_the_general_path_runs_with_one_debug_line() -> None:
    """A missing wheel: no ImportError, the same pixels as the general path, one DEBUG line."""
    code = textwrap.dedent(
        """
        import io, logging, sys
        sys.modules["cv2"] = None  # import cv2 -> ImportError, as without the wheel
        records = []
        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record)
        logging.getLogger("pixcrawler_engine").addHandler(Keep())
        logging.getLogger("pixcrawler_engine").setLevel(logging.DEBUG)
        import numpy as np
        from PIL import Image
        from skimage import data
        from pixcrawler_engine._config import DecodePolicy
        from pixcrawler_engine.decode._image import decode_image
        im = Image.fromarray(data.chelsea())
        outs = []
        for fmt in ("JPEG", "PNG", "WEBP", "JPEG"):
            buf = io.BytesIO(); im.save(buf, fmt)
            outs.append(decode_image(buf.getvalue(), DecodePolicy(image_size=(64, 96))))
        assert all(o.shape == (64, 96, 3) for o in outs)
        lines = [r for r in records if "OpenCV" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.DEBUG, records
        np.save(sys.stdout.buffer, outs[0])
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    without = np.load(io.BytesIO(done.stdout))
    im = Image.fromarray(skdata.chelsea())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fast, "opencv", lambda: None)
        want = decode_image(_save(im, "JPEG"), DecodePolicy(image_size=(64, 96)))
    assert np.array_equal(without, want)


def _warp_reference(
    pixels: np.ndarray, box: tuple[float, ...], size: tuple[int, int]
) -> np.ndarray:
    """The box's exact geometry by `warpAffine` (how `resize_into` resized every box before)."""
    cv2 = _fast.opencv()
    x0, y0, x1, y1 = box
    fx, fy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    pixels = _fast.antialiased(pixels, fx, fy)
    inverse = np.array([[fx, 0.0, x0 + 0.5 * fx - 0.5], [0.0, fy, y0 + 0.5 * fy - 0.5]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(pixels, inverse, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
    return np.asarray(warped)


@settings(max_examples=400, deadline=None, derandomize=True)  # the same cases every run
# Found by this test: factors that keep the input's size made OpenCV copy it, not resize it.
@example(left=0, top=0, width=94.0, height=94.25, out_w=94, out_h=94, whole=False, colour="RGB")
@given(
    left=st.integers(0, 40) | st.floats(0.0, 40.0),
    top=st.integers(0, 40) | st.floats(0.0, 40.0),
    width=st.floats(40.0, 200.0),
    height=st.floats(40.0, 200.0),
    out_w=st.integers(30, 210),
    out_h=st.integers(30, 210),
    whole=st.booleans(),
    colour=st.sampled_from(["RGB", "L", "L as RGB"]),
)
def test_the_linear_resize_keeps_the_boxs_exact_geometry(
    left: float,
    top: float,
    width: float,
    height: float,
    out_w: int,
    out_h: int,
    whole: bool,
    colour: str,
) -> None:
    """`resize_into` samples a box where `warpAffine` does: integral and fractional origins
    and ends, shrinking and growing axes, a box that is the whole image but for a fraction of
    its last pixel (a JPEG decoded at n/8), grey into grey or RGB. The pixels are a photo's
    detail, so a geometry off by a fraction of a pixel shows (a whole-image `cv2.resize` is
    off by up to half of one)."""
    pixels = skdata.astronaut()[100:341, 150:391]
    if colour != "RGB":
        pixels = np.ascontiguousarray(pixels[:, :, 1])
    box = (float(left), float(top), left + width, top + height)
    if whole:  # the pixels end in the box's last (partial) pixel, and start at its origin
        right, bottom = int(np.ceil(box[2])), int(np.ceil(box[3]))
        pixels = pixels[int(top) : bottom, int(left) : right]
        box = (0.0, 0.0, box[2] - int(left), box[3] - int(top))
    fx, fy = (box[2] - box[0]) / out_w, (box[3] - box[1]) / out_h
    assume(fx <= 2 and fy <= 2)  # past 2x the area filter resizes (a path of its own)
    target = np.zeros((out_h, out_w, 1 if colour == "L" else 3), np.uint8)
    assert _fast.resize_into(pixels, box, (out_w, out_h), target)
    want = _warp_reference(pixels, box, (out_w, out_h))
    want = want.reshape(out_h, out_w, -1)
    assert np.abs(target.astype(int) - want).max() <= 1, (box, (out_w, out_h))


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_an_oriented_jpeg_is_the_upright_one_turned(orientation: int, resize: ResizeMode) -> None:
    """An EXIF-oriented JPEG takes the fast path: decoded at n/8, turned upright, resized from
    the box `_finish` uses. Its pixels are those of the same JPEG without the tag, resized in
    the stored frame and then turned. The stored size is odd, so the n/8 decode ends in a
    fraction of a pixel, which a flip moves to the start of an axis: a box that ignored it
    would be off by that fraction."""
    pixels = np.asarray(Image.fromarray(skdata.astronaut()).resize((451, 301)))
    stored = _save(Image.fromarray(pixels), "JPEG")  # as `_oriented` saves it, but the tag
    tagged = _oriented(Image.fromarray(pixels), "JPEG", orientation)
    size = (90, 120)  # (height, width) upright
    swapped = size[::-1] if orientation >= 5 else size
    turned = decode_image(tagged, DecodePolicy(image_size=size, resize=resize))
    plain = decode_image(stored, DecodePolicy(image_size=swapped, resize=resize))
    want = np.asarray(Image.fromarray(plain).transpose(TRANSPOSE[orientation]))
    diff = np.abs(turned.astype(int) - want)
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
