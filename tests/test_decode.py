"""decode_image / decode_mask / probe on real photos (skimage, sklearn) encoded in memory.

The reference for every pixel check is Pillow itself: a full-size decode, `exif_transpose`,
`convert`, and `ImageOps` resizing with BILINEAR. Reduced-scale JPEG decoding is not
bit-identical to that, so resized JPEG outputs are compared by mean absolute error (a wrong
orientation, channel order or crop gives errors of tens of levels; the right one about 1).
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps
from skimage import data as skdata
from sklearn.datasets import load_sample_images

from pixcrawler_engine._config import ColorMode, DecodePolicy, ResizeMode
from pixcrawler_engine._errors import DecodeError
from pixcrawler_engine.decode import _fast, _headers, _image, _plan
from pixcrawler_engine.decode._image import decode_image, probe
from pixcrawler_engine.decode._mask import decode_mask
from pixcrawler_engine.decode._plan import output_shape

BILINEAR = Image.Resampling.BILINEAR


# --------------------------------------------------------------------------- inputs


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def with_orientation(im: Image.Image, fmt: str, orientation: int, **params: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **params)


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    """451x300 RGB: not square, so every orientation gives a different picture."""
    return Image.fromarray(skdata.chelsea())


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def camera() -> Image.Image:
    return Image.fromarray(skdata.camera())


@pytest.fixture(scope="module")
def china() -> Image.Image:
    return Image.fromarray(load_sample_images().images[0])


def png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one), samples `pixels` (uint16, HxWx3)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    h, w = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(h, w * 6 // 2).view(np.uint8).reshape(h, w * 6)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height (its data is one empty row)."""
    crc = zlib.crc32
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13) + ihdr + struct.pack(">I", crc(ihdr))
        + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", crc(idat))
    )  # fmt: skip


def bomb_jpeg(width: int, height: int) -> bytes:
    """SOI and a baseline frame header claiming width x height, and nothing else."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


# --------------------------------------------------------------------------- reference


def reference(data: bytes, policy: DecodePolicy) -> np.ndarray:
    """What Pillow gives with a full-size decode, for comparison."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if policy.color == "keep":
        transparent = im.mode == "PA" or (im.mode == "P" and "transparency" in im.info)
        keep = {"1": "L", "P": "RGBA" if transparent else "RGB", "PA": "RGBA", "CMYK": "RGB"}
        im = im.convert(keep.get(im.mode, im.mode))
    elif policy.color == "RGB":
        im = im.convert("RGBA").convert("RGB") if im.mode in ("P", "PA") else im.convert("RGB")
    elif policy.color == "L":
        im = im.convert("RGB").convert("L") if im.mode not in ("L", "1", "RGB") else im.convert("L")
    if policy.image_size is not None:
        th, tw = policy.image_size
        if policy.resize == "stretch":
            im = im.resize((tw, th), BILINEAR)
        elif policy.resize == "crop":
            im = ImageOps.fit(im, (tw, th), BILINEAR)
        elif policy.resize == "pad":
            im = ImageOps.pad(im, (tw, th), BILINEAR, color=0)
        elif im.width > tw or im.height > th:
            im = ImageOps.contain(im, (tw, th), BILINEAR)
    out = np.asarray(im)
    return out[:, :, None] if out.ndim == 2 else out


# A JPEG decoded at a reduced DCT scale, then resized, differs from the full decode + BILINEAR
# reference by 1-2.7 levels (mean) on these photos: as much as BICUBIC differs from BILINEAR on
# the same full decode (0.8-2.1). A wrong pixel geometry or orientation costs tens of levels.
JPEG_TOLERANCE = 3.0


def mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def check(data: bytes, policy: DecodePolicy, tolerance: float) -> np.ndarray:
    """Decodes, checks dtype/layout/shape (against output_shape too) and content."""
    out = decode_image(data, policy)
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    assert out.shape == output_shape(probe(data), policy)
    assert mae(out, reference(data, policy)) <= tolerance
    return out


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("fmt", "mode", "params"),
    [
        ("JPEG", "RGB", {}),
        ("JPEG", "L", {}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGB", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "LA", {}),
        ("PNG", "L", {}),
        ("PNG", "1", {}),
        ("PNG", "P", {}),
        ("PNG", "P", {"transparency": 0}),
        ("PNG", "I;16", {}),
        ("GIF", "P", {"transparency": 0}),
        ("WEBP", "RGB", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
    ],
)
def test_probe_matches_pillow(chelsea: Image.Image, fmt: str, mode: str, params: dict) -> None:
    im = chelsea.convert("L").convert(mode) if mode in ("1", "I;16") else chelsea.convert(mode)
    data = encode(im, fmt, **params)
    header = probe(data)
    opened = Image.open(io.BytesIO(data))
    assert (header.format, header.width, header.height) == (opened.format, *opened.size)
    assert header.mode == opened.mode
    assert header.orientation == 1
    if opened.mode == "P":
        assert header.transparency == ("transparency" in opened.info)


def test_probe_is_cheap_and_takes_memoryview(astronaut: Image.Image) -> None:
    data = encode(astronaut, "JPEG")
    start = time.perf_counter()
    for _ in range(100):
        header = probe(memoryview(data))
    assert time.perf_counter() - start < 0.5  # a header walk, ~10 us; no decoding
    assert (header.width, header.height, header.mode) == (512, 512, "RGB")


# --------------------------------------------------------------------------- resize modes


def lanczos_psnr(out: np.ndarray, data: bytes, policy: DecodePolicy) -> float:
    """PSNR (dB) of `out` against a full decode resized by Pillow's LANCZOS, same geometry."""
    header = probe(data)
    plan = _plan.make_plan(header, policy)
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(plan.mode)
    target = np.zeros(plan.shape, np.uint8)
    if plan.size is not None:
        im = im.resize(plan.size, Image.Resampling.LANCZOS, box=plan.box)
    _image._write(im, plan, target)
    mse = float(np.mean((out.astype(np.float64) - target) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


@pytest.fixture(params=["general", "fast"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on the general (Pillow) path, OpenCV disabled, and on the default one."""
    if request.param == "general":
        monkeypatch.setattr(_fast, "opencv", lambda: None)
    return str(request.param)


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad", "fit"])
@pytest.mark.parametrize("size", [(224, 224), (120, 300), (300, 120), (700, 900)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_resize_modes(
    china: Image.Image, resize: ResizeMode, size: tuple[int, int], fmt: str, path: str
) -> None:
    data = encode(china, fmt, quality=92) if fmt == "JPEG" else encode(china, fmt)
    policy = DecodePolicy(image_size=size, resize=resize)
    if path == "fast":  # OpenCV's resize: sharper than the reference, measured against LANCZOS
        out = decode_image(data, policy)
        assert out.shape == output_shape(probe(data), policy)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fast, "opencv", lambda: None)
            general = lanczos_psnr(decode_image(data, policy), data, policy)
        # >= 32 dB, or no worse than the general path where even that is lower (a crop of
        # china.jpg to 120x300: 30.9 dB for both)
        assert lanczos_psnr(out, data, policy) >= min(32.0, general - 1.0)
    else:  # PNG is decoded at full size and resized as the reference does (reducing_gap aside)
        out = check(data, policy, tolerance=JPEG_TOLERANCE if fmt == "JPEG" else 0.5)
    th, tw = size
    if resize == "fit":
        scale = min(tw / 640, th / 427, 1.0)
        assert abs(out.shape[1] - 640 * scale) <= 1 and abs(out.shape[0] - 427 * scale) <= 1
        assert out.shape[0] <= th and out.shape[1] <= tw
    else:
        assert out.shape == (th, tw, 3)
    if resize == "pad" and th / 427 > tw / 640:  # letterbox: zero rows above and below
        assert not out[0].any() and not out[-1].any() and out[th // 2].any()


def test_no_resize_is_the_full_decode(chelsea: Image.Image) -> None:
    for data in (encode(chelsea, "JPEG", quality=90), encode(chelsea, "PNG")):
        out = decode_image(data, DecodePolicy())
        assert out.shape == (300, 451, 3)
        # libjpeg-turbo in simplejpeg and in Pillow: the same integer IDCT and upsampling.
        assert np.abs(out.astype(int) - reference(data, DecodePolicy())).max() <= 1


@pytest.mark.parametrize(("width", "height"), [(641, 479), (17, 9), (1000, 8), (333, 334)])
def test_reduced_jpeg_scale_matches_simplejpeg(
    astronaut: Image.Image, width: int, height: int
) -> None:
    """Our choice of DCT scale is simplejpeg's, so the fast path never falls back to Pillow."""
    data = encode(astronaut.resize((width, height)), "JPEG")
    for size in [(5, 5), (100, 100), (height // 3 + 1, width // 2 + 1), (height, width)]:
        header = probe(data)
        plan = _plan.make_plan(header, DecodePolicy(image_size=size))
        target = np.empty(plan.shape, np.uint8)
        assert _image._decode_jpeg(_headers.as_view(data), header, plan, target)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "TIFF-deflate", "AVIF"])
def test_exif_orientation(chelsea: Image.Image, orientation: int, fmt: str) -> None:
    params: dict[str, object] = {"quality": 95} if fmt in ("JPEG", "WEBP", "AVIF") else {}
    if fmt == "TIFF-deflate":  # libtiff's path in Pillow
        params = {"compression": "tiff_deflate"}
    data = with_orientation(chelsea, fmt.split("-")[0], orientation, **params)
    header = probe(data)
    assert (header.width, header.height) == (451, 300)  # as stored, whatever the orientation
    assert probe(data).orientation == orientation
    full = decode_image(data, DecodePolicy())
    expected = reference(data, DecodePolicy())
    assert full.shape == expected.shape == ((451, 300, 3) if orientation >= 5 else (300, 451, 3))
    assert np.abs(full.astype(int) - expected).max() <= 1
    # Reduced-scale JPEG decodes happen in the stored frame: the output must still be upright.
    for policy in (
        DecodePolicy(image_size=(100, 60)),
        DecodePolicy(image_size=(64, 128), resize="crop"),
        DecodePolicy(image_size=(128, 128), resize="fit"),
        DecodePolicy(image_size=(128, 128), resize="pad", color="L"),
    ):
        check(data, policy, tolerance=JPEG_TOLERANCE)


def test_orientation_on_the_pillow_jpeg_path(
    chelsea: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's `draft` fallback (simplejpeg refusing the file) orients and scales too."""
    calls = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise ValueError("refused by the test")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", refuse)
    for orientation in (1, 3, 6, 7):
        data = with_orientation(chelsea.resize((902, 600)), "JPEG", orientation, quality=95)
        check(data, DecodePolicy(image_size=(150, 100), resize="crop"), tolerance=JPEG_TOLERANCE)
        check(
            data,
            DecodePolicy(image_size=(200, 200), resize="fit", color="L"),
            tolerance=JPEG_TOLERANCE,
        )
    assert calls


# --------------------------------------------------------------------------- colour


def test_cmyk_jpeg_adobe_inverted(chelsea: Image.Image) -> None:
    data = encode(chelsea.convert("CMYK"), "JPEG", quality=95)
    assert b"Adobe" in data  # libjpeg writes the Adobe marker; Pillow stores CMYK inverted
    assert probe(data).mode == "CMYK"
    out = check(data, DecodePolicy(), tolerance=0.5)
    assert mae(out, np.asarray(chelsea)) < 3  # the colours of the photo, not inverted
    check(data, DecodePolicy(image_size=(100, 150)), tolerance=2.0)
    assert decode_image(data, DecodePolicy(color="keep")).shape == (300, 451, 3)
    check(data, DecodePolicy(image_size=(100, 150), color="L"), tolerance=2.0)


def test_palette_with_transparency(chelsea: Image.Image) -> None:
    pal = chelsea.quantize(32)
    index = int(np.bincount(np.asarray(pal).ravel()).argmax())  # the commonest colour
    for fmt in ("PNG", "GIF"):
        data = encode(pal, fmt, transparency=index)
        rgba = decode_image(data, DecodePolicy(color="keep"))
        assert rgba.shape == (300, 451, 4) == output_shape(probe(data), DecodePolicy(color="keep"))
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
        np.testing.assert_array_equal(rgba[:, :, 3] == 0, np.asarray(pal) == index)
        np.testing.assert_array_equal(rgba, expected)
        rgb = check(data, DecodePolicy(), tolerance=0)  # alpha dropped, colours kept
        np.testing.assert_array_equal(rgb, expected[:, :, :3])
        check(data, DecodePolicy(image_size=(64, 64), color="L"), tolerance=0.5)
    # Per-entry alpha (tRNS with several levels): bytes transparency, where P->RGB warns.
    alphas = bytes(range(0, 256, 8))
    data = encode(pal, "PNG", transparency=alphas)
    keep = decode_image(data, DecodePolicy(color="keep"))
    np.testing.assert_array_equal(keep[:, :, 3], np.frombuffer(alphas, np.uint8)[np.asarray(pal)])
    np.testing.assert_array_equal(keep[:, :, :3], np.asarray(pal.convert("RGB")))
    plain = encode(pal, "PNG")
    keep = decode_image(plain, DecodePolicy(color="keep"))
    np.testing.assert_array_equal(keep, np.asarray(pal.convert("RGB")))


def test_sixteen_bit_is_scaled_not_clipped(camera: Image.Image, astronaut: Image.Image) -> None:
    grey = np.asarray(camera)
    wide = grey.astype(np.uint16) * 257  # 0..255 -> 0..65535
    big_endian = Image.frombytes("I;16B", camera.size, wide.astype(">u2").tobytes())
    inputs = {
        "I;16 PNG": encode(Image.fromarray(wide), "PNG"),
        "I;16B TIFF": encode(big_endian, "TIFF"),
        "I TIFF": encode(Image.fromarray(wide.astype(np.int32)), "TIFF"),
        "F TIFF": encode(Image.fromarray(grey.astype(np.float32)), "TIFF"),
    }
    modes: tuple[tuple[ColorMode, int], ...] = (("L", 1), ("RGB", 3), ("keep", 1))
    for name, data in inputs.items():
        for color, channels in modes:
            out = decode_image(data, DecodePolicy(color=color))
            assert out.shape == (512, 512, channels), name
            np.testing.assert_array_equal(out[:, :, 0], grey, err_msg=name)
        small = decode_image(data, DecodePolicy(image_size=(128, 128), color="L"))
        assert (
            mae(
                small,
                reference(encode(camera, "PNG"), DecodePolicy(image_size=(128, 128), color="L")),
            )
            < 0.6
        )
    # Rounded: 128 / 257 -> 0, 129 -> 1, 2698 -> 10, 32896 -> 128, 65406 -> 254, 65535 -> 255.
    ramp = np.array([[0, 128, 129, 2698, 32896, 65406, 65535]], np.uint16)
    got = decode_image(encode(Image.fromarray(ramp), "PNG"), DecodePolicy(color="L"))
    assert got[0, :, 0].tolist() == [0, 0, 1, 10, 128, 254, 255]
    rgb16 = png16_rgb(np.asarray(astronaut).astype(np.uint16) * 257)
    np.testing.assert_array_equal(decode_image(rgb16, DecodePolicy()), np.asarray(astronaut))


@pytest.mark.parametrize(
    ("mode", "channels"), [("L", 1), ("LA", 2), ("RGB", 3), ("RGBA", 4), ("1", 1), ("P", 3)]
)
def test_keep_and_alpha(chelsea: Image.Image, mode: str, channels: int) -> None:
    im = chelsea.convert("RGBA")
    im.putalpha(Image.fromarray((np.asarray(chelsea.convert("L")) // 2).astype(np.uint8)))
    im = chelsea.quantize(64) if mode == "P" else im.convert(mode)
    data = encode(im, "PNG")
    keep = decode_image(data, DecodePolicy(color="keep"))
    assert keep.shape == (300, 451, channels)
    expected = np.asarray(
        im.convert("L") if mode == "1" else im.convert("RGB") if mode == "P" else im
    )
    np.testing.assert_array_equal(keep, expected.reshape(keep.shape))
    # RGB drops alpha exactly like Pillow's convert("RGB"); L is one channel.
    rgb = check(data, DecodePolicy(), tolerance=0)
    np.testing.assert_array_equal(rgb, np.asarray(im.convert("RGB")))
    grey = check(data, DecodePolicy(color="L"), tolerance=0.5)
    assert grey.shape == (300, 451, 1)
    check(data, DecodePolicy(image_size=(96, 128), resize="crop", color="keep"), tolerance=1.0)


def test_grey_outputs_from_jpeg(chelsea: Image.Image, camera: Image.Image) -> None:
    data = encode(chelsea, "JPEG", quality=95)
    grey = check(data, DecodePolicy(color="L"), tolerance=1.0)  # libjpeg's Y channel
    assert grey.shape == (300, 451, 1)
    check(data, DecodePolicy(image_size=(100, 100), color="L"), tolerance=2.0)
    mono = encode(camera, "JPEG", quality=95)
    assert decode_image(mono, DecodePolicy(color="keep")).shape == (512, 512, 1)
    rgb = check(mono, DecodePolicy(image_size=(200, 200)), tolerance=1.5)
    assert (rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 1] == rgb[:, :, 2]).all()


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF", "PPM", "JPEG2000"])
def test_other_formats(china: Image.Image, fmt: str) -> None:
    im = china.quantize(256).convert("RGB") if fmt == "GIF" else china
    data = encode(im, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    check(data, DecodePolicy(), tolerance=0)
    check(data, DecodePolicy(image_size=(160, 160), resize="crop"), tolerance=0.5)


# --------------------------------------------------------------------------- out=


def test_out_receives_the_pixels(chelsea: Image.Image) -> None:
    slot = np.zeros(2**21, np.uint8)  # like a shared-memory slot
    cases = [
        (encode(chelsea, "JPEG"), DecodePolicy(image_size=(224, 224))),
        (encode(chelsea, "JPEG"), DecodePolicy()),  # decoded straight into `out`
        (encode(chelsea.resize((902, 600)), "JPEG"), DecodePolicy(image_size=(300, 451))),
        (with_orientation(chelsea, "JPEG", 6), DecodePolicy(color="L")),
        (encode(chelsea, "PNG"), DecodePolicy(image_size=(100, 200), resize="pad")),
        (encode(chelsea.convert("RGBA"), "PNG"), DecodePolicy(color="keep")),
    ]
    offset = 64
    for data, policy in cases:
        shape = output_shape(probe(data), policy)
        size = int(np.prod(shape))
        out = slot[offset : offset + size].reshape(shape)
        out[...] = 7  # stale bytes from a previous batch must all be overwritten
        got = decode_image(data, policy, out=out)
        assert got is out and np.shares_memory(got, slot)
        np.testing.assert_array_equal(got, decode_image(data, policy))
        offset += size


def test_out_of_the_wrong_shape_is_a_caller_bug(chelsea: Image.Image) -> None:
    data = encode(chelsea, "JPEG")
    with pytest.raises(ValueError, match="shape"):
        decode_image(data, DecodePolicy(), out=np.empty((300, 451, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        decode_image(data, DecodePolicy(), out=np.empty((300, 451, 3), np.float32))


# --------------------------------------------------------------------------- budget


@pytest.mark.parametrize("make", [bomb_png, bomb_jpeg])
def test_budget_refuses_before_decoding(
    make: Callable[[int, int], bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make(60000, 60000)
    assert len(data) < 200
    header = probe(data)  # Pillow's Image.open would warn (an error here) or raise
    assert (header.width, header.height) == (60000, 60000)

    def no_pillow(view: memoryview) -> None:
        raise AssertionError("Pillow was asked to open a refused image")

    monkeypatch.setattr(_image, "open_pillow", no_pillow)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(DecodeError, match=r"60000x60000 = 3,600,000,000 pixels.*max_pixels"):
        decode_image(data, DecodePolicy(image_size=(224, 224)))
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.05 and peak < 1_000_000
    with pytest.raises(DecodeError, match="max_pixels"):
        decode_mask(data, None, max_pixels=250_000_000)


def test_budget_applies_to_every_format(chelsea: Image.Image) -> None:
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"):
        data = encode(chelsea, fmt)
        with pytest.raises(DecodeError, match="451x300 = 135,300 pixels"):
            decode_image(data, DecodePolicy(max_pixels=135_299))
        assert decode_image(data, DecodePolicy(max_pixels=135_300)).shape == (300, 451, 3)


def test_over_pillows_bomb_limit_but_within_budget(camera: Image.Image) -> None:
    """A 100-megapixel PNG header: Pillow's Image.open warns; probe and the budget do not."""
    data = bomb_png(10000, 10000)
    assert probe(data).width == 10000
    with pytest.raises(DecodeError, match=r"truncated|corrupt"):  # no pixels: a clear error
        decode_image(data, DecodePolicy(image_size=(64, 64)))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("empty", "empty"),
        ("html", "HTML"),
        ("json", "JSON"),
        ("text", "not a supported image"),
        ("eps", "not a supported image"),
        ("truncated_jpeg", "truncated"),
        ("jpeg_header_only", "corrupt or truncated"),
        ("truncated_png", "truncated"),
        ("png_bad_crc", "corrupt|CRC|crc"),
        ("jpeg_magic_then_junk", "corrupt or truncated"),
    ],
)
def test_bad_input_raises_decode_error(chelsea: Image.Image, name: str, match: str) -> None:
    jpeg, png = encode(chelsea, "JPEG"), encode(chelsea, "PNG")
    corrupt_png = bytearray(png)
    corrupt_png[60:80] = b"\x00" * 20  # inside the first IDAT: its CRC no longer matches
    data = {
        "empty": b"",
        "html": b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>",
        "json": b'{"error": "rate limited"}',
        "text": b"this is not an image, just a text file saved as .jpg",
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n",
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "jpeg_header_only": jpeg[:200],
        "truncated_png": png[: len(png) // 2],
        "png_bad_crc": bytes(corrupt_png),
        "jpeg_magic_then_junk": b"\xff\xd8\xff" + b"plain text after the magic",
    }[name]
    for policy in (DecodePolicy(), DecodePolicy(image_size=(64, 64), color="L")):
        with pytest.raises(DecodeError, match=match) as info:
            decode_image(data, policy)
        assert "on_error" in str(info.value) or "budget" in str(info.value)
        if name not in ("empty",):
            assert info.value.__cause__ is not None or name in ("html", "json", "text", "eps")
    with pytest.raises(DecodeError):
        decode_mask(data, None, max_pixels=10**8)


def test_junk_probe_raises_decode_error() -> None:
    for data in (b"", b"<html></html>", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(DecodeError):
            probe(data)


@pytest.mark.parametrize("fmt", ["JPEG", "JPEG-progressive", "PNG", "GIF", "WEBP", "TIFF"])
def test_damaged_files_never_leak_library_errors(chelsea: Image.Image, fmt: str) -> None:
    """Every cut and every damaged header byte of a real file gives pixels or a DecodeError."""
    name, _, variant = fmt.partition("-")
    good = with_orientation(chelsea, name, 6, **({"progressive": True} if variant else {}))
    cuts = sorted({*range(0, 64, 3), *range(64, len(good), max(1, len(good) // 25))})
    damaged = [good[:cut] for cut in cuts]
    for pos in range(2, 160, 5):  # markers, lengths, IHDR/SOF fields, EXIF offsets
        broken = bytearray(good)
        broken[pos] ^= 0xFF
        damaged.append(bytes(broken))
    policies = (DecodePolicy(), DecodePolicy(image_size=(64, 96), resize="crop", color="L"))
    for data in damaged:
        for policy in policies:
            try:
                out = decode_image(memoryview(data), policy)
            except DecodeError:
                continue
            assert out.shape == output_shape(probe(data), policy)
        try:
            decode_mask(data, (32, 32), max_pixels=10**7)
        except DecodeError:
            pass


# --------------------------------------------------------------------------- masks


@pytest.fixture(scope="module")
def class_ids(camera: Image.Image) -> np.ndarray:
    """ARTeFACT-like labels from a real picture: 16 classes by brightness, 255 background."""
    grey = np.asarray(camera)
    ids = (grey // 16).astype(np.uint8)
    ids[grey < 20] = 255
    return ids


def test_masks_keep_values_exactly(class_ids: np.ndarray) -> None:
    as_l = Image.fromarray(class_ids)
    as_p = Image.fromarray(class_ids, "L").convert("P")  # identity palette...
    as_p.putpalette(np.asarray(load_sample_images().images[0])[0, :256].ravel().tolist())
    for mask in (as_l, as_p):  # ...replaced by arbitrary colours: the indices are the values
        data = encode(mask, "PNG")
        ids = decode_mask(data, None, max_pixels=10**7)
        assert ids.dtype == np.uint8 and ids.shape == (512, 512) and ids.flags.writeable
        np.testing.assert_array_equal(ids, class_ids)
        for size in ((128, 128), (300, 700), (512, 512), (77, 13)):
            small = decode_mask(data, size, max_pixels=10**7)
            assert small.shape == size
            np.testing.assert_array_equal(
                small, np.asarray(as_l.resize(size[::-1], Image.Resampling.NEAREST))
            )
            assert set(np.unique(small)) <= set(np.unique(class_ids))


def test_mask_modes(class_ids: np.ndarray, camera: Image.Image) -> None:
    wide = encode(Image.fromarray(class_ids.astype(np.uint16)), "PNG")
    np.testing.assert_array_equal(decode_mask(wide, None, max_pixels=10**7), class_ids)
    binary = encode(Image.fromarray(class_ids < 8), "PNG")
    np.testing.assert_array_equal(
        decode_mask(binary, None, max_pixels=10**7), (class_ids < 8).astype(np.uint8)
    )
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(Image.fromarray(class_ids), "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(
        decode_mask(rotated, None, max_pixels=10**7), np.rot90(class_ids, -1)
    )
    for bad, match in (
        (encode(camera.convert("RGB"), "PNG"), "one channel"),
        (encode(Image.fromarray(class_ids.astype(np.uint16) * 300), "PNG"), "outside 0..255"),
    ):
        with pytest.raises(DecodeError, match=match):
            decode_mask(bad, None, max_pixels=10**7)


# --------------------------------------------------------------------------- huge images

HUGE_SIZE = (12000, 11000)  # 132 megapixels: over Pillow's 89M warning, like ARTeFACT's largest

MAKE_HUGE = textwrap.dedent(
    """
    import sys
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    photo.save(sys.argv[1], quality=90)
    photo.resize((int(sys.argv[3]), int(sys.argv[4])), Image.Resampling.BILINEAR).save(
        sys.argv[2], quality=85
    )
    """
)

# Peak RSS is read from VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child
# of a big parent (pytest after building the huge photo) would report the parent's peak.
MEASURE = textwrap.dedent(
    """
    import sys, time
    import simplejpeg
    from pixcrawler_engine._config import DecodePolicy
    from pixcrawler_engine.decode._image import decode_image

    def peak_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024

    path, kind, small = sys.argv[1:4]
    if kind == "pillow":  # simplejpeg refuses: Pillow's draft path does the work
        def refuse(*args, **kwargs):
            raise ValueError("refused")
        simplejpeg.decode_jpeg = refuse
    policy = DecodePolicy(image_size=None if kind == "full" else (1024, 1024), resize="fit")
    with open(small, "rb") as f:
        decode_image(f.read(), policy)  # loads the libraries and warms the allocator
    with open(path, "rb") as f:
        data = f.read()
    before = peak_mb()
    start = time.perf_counter()
    out = decode_image(data, policy)
    seconds = time.perf_counter() - start
    print(out.shape[0], out.shape[1], int(out.mean()), peak_mb() - before, seconds)
    """
)


@pytest.fixture(scope="session")
def huge_jpeg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 12000x11000 baseline JPEG of the astronaut, and a small one, made once (in a child
    process, so this one does not keep the ~500 MB it takes)."""
    folder = tmp_path_factory.mktemp("huge")
    small, huge = folder / "small.jpg", folder / "huge.jpg"
    subprocess.run(
        [sys.executable, "-c", MAKE_HUGE, str(small), str(huge), *map(str, HUGE_SIZE)],
        check=True,
        timeout=120,
    )
    return huge, small


@pytest.mark.parametrize("kind", ["simplejpeg", "pillow", "full"])
def test_huge_jpeg_decodes_in_bounded_memory(huge_jpeg: tuple[Path, Path], kind: str) -> None:
    """A 132-megapixel JPEG (396 MB of pixels) asked for at 1024 px peaks far below that.

    `full` (no resize) is the control: it shows the measurement sees a full-size decode.
    """
    path, small = huge_jpeg
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", MEASURE, str(path), kind, str(small)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    height, width, mean, rss_increase_mb, seconds = result.stdout.split()
    assert 40 < int(mean) < 200  # the photo, not a blank image
    if kind == "full":
        assert (int(height), int(width)) == HUGE_SIZE[::-1]
        assert int(rss_increase_mb) > 350
        return
    assert (int(height), int(width)) == (939, 1024)  # 11000/12000 * 1024, rounded
    assert int(rss_increase_mb) < 150, f"peak RSS grew by {rss_increase_mb} MB"
    assert float(seconds) < 15


def test_huge_png_shrinks_while_decoding_and_matches_pillow() -> None:
    """Over 16 MP a PNG goes through libvips (shrink-on-load); pixels agree with Pillow's."""
    pyvips = pytest.importorskip("pyvips", reason="the vips extra is not installed")
    from skimage import data

    big = Image.fromarray(data.astronaut()).resize((5000, 4000), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    big.save(out, "PNG", compress_level=1)
    policy = DecodePolicy(image_size=(200, 250))
    got = decode_image(out.getvalue(), policy)
    expected = np.asarray(big.resize((250, 200), Image.Resampling.BILINEAR, reducing_gap=None))
    assert got.shape == (200, 250, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 3.0
    assert pyvips.version(0) >= 8
