"""Odd real images through the decoder, the engine and `pack` (see `odd_images`).

Orientation stored in XMP or in an ImageMagick "Raw profile type exif" chunk is applied as
`ImageOps.exif_transpose` applies it; valid images that no decoder here reads are
"unsupported", not "corrupt"; what decoders say (libtiff on stderr, Pillow's warnings) never
reaches stderr raw: it becomes one line naming the sample; `pack` checks files with the
decoder, lists every bad file at once, and packs the others with `--skip-bad`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import odd_images as odd
import pytest
from PIL import Image, ImageOps
from skimage import data as skdata

from pixcrawler import DecodeError, UnsupportedImageError, load_dataset
from pixcrawler_engine import DecodePolicy, EngineConfig, JobClient, JobSource, Stream
from pixcrawler_engine.decode._image import decode_image, probe
from pixcrawler_engine.runtime._chunk import decode_records
from pixcrawler_engine.runtime._stream import SampleWarning
from pixcrawler_engine.sources._pack import pack
from pixcrawler_engine.sources._record import Record

# --------------------------------------------------------------------------- orientation

CASES: dict[str, Callable[[Image.Image, int], bytes]] = {
    "jpeg-xmp-attribute": odd.jpeg_with_xmp,
    "jpeg-xmp-element": lambda im, o: odd.jpeg_with_xmp(im, o, element=True),
    "jpeg-exif-without-orientation-and-xmp": lambda im, o: odd.jpeg_with_xmp(
        im, o, exif={"make": "PixCrawler"}
    ),
    "png-raw-profile-zTXt": odd.png_with_raw_profile,
    "png-raw-profile-tEXt": lambda im, o: odd.png_with_raw_profile(im, o, chunk="tEXt"),
    "png-raw-profile-iTXt": lambda im, o: odd.png_with_raw_profile(im, o, chunk="iTXt"),
    "png-xmp-iTXt": odd.png_with_xmp,
    "webp-xmp": odd.webp_with_xmp,
}


def _pillow(data: bytes) -> np.ndarray:
    """What Pillow gives: `ImageOps.exif_transpose`, full size, RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return odd.chelsea()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("case", sorted(CASES))
def test_orientation_from_xmp_and_raw_profiles(
    photo: Image.Image, case: str, orientation: int
) -> None:
    data = CASES[case](photo, orientation)
    expected = _pillow(data)
    assert expected.shape == ((451, 300, 3) if orientation >= 5 else (300, 451, 3))
    assert probe(data).orientation == orientation
    full = decode_image(data, DecodePolicy())
    assert full.shape == expected.shape
    assert np.abs(full.astype(int) - expected).max() <= (0 if case.startswith("png") else 1)
    # Reduced-scale decodes (JPEG DCT scaling) are oriented too.
    small = decode_image(data, DecodePolicy(image_size=(100, 150), resize="fit"))
    reference = np.asarray(ImageOps.contain(Image.fromarray(expected), (150, 100)))
    assert small.shape == reference.shape
    assert np.abs(small.astype(int) - reference).mean() < 3


def test_exif_orientation_wins_over_xmp(photo: Image.Image) -> None:
    """As in Pillow: XMP is read only when EXIF has no Orientation tag."""
    data = odd.jpeg_with_xmp(photo, 6, exif={"orientation": 1})
    assert probe(data).orientation == 1
    assert decode_image(data, DecodePolicy()).shape == _pillow(data).shape == (300, 451, 3)


# ----------------------------------------------------------------- unsupported or corrupt

UNSUPPORTED = {
    "12-bit JPEG": (odd.jpeg12, "12-bit JPEG"),
    "WebP-compressed TIFF": (odd.webp_tiff, "WEBP compression support is not configured"),
    "ARGB4444 BMP": (odd.bmp_argb4444, "Unsupported BMP bitfields layout"),
}
CORRUPT = {
    "truncated JPEG": (odd.truncated_jpeg, "truncated"),
    "damaged TIFF": (odd.damaged_tiff, "ZIPDecode: Decoding error"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_valid_but_unsupported_images_are_not_called_corrupt(name: str) -> None:
    build, said = UNSUPPORTED[name]
    with pytest.raises(UnsupportedImageError) as info:
        decode_image(build(), DecodePolicy(image_size=(64, 64)))
    message = str(info.value)
    assert message.startswith("unsupported image") and said in message
    assert "corrupt" not in message and "re-fetch" not in message


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_images_are_still_corrupt(name: str) -> None:
    build, said = CORRUPT[name]
    with pytest.raises(DecodeError) as info:
        decode_image(build(), DecodePolicy(image_size=(64, 64)))
    assert not isinstance(info.value, UnsupportedImageError)
    assert "corrupt or truncated" in str(info.value) and said in str(info.value)


# ------------------------------------------------------------------- decoder chatter


def test_libtiff_lines_never_reach_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DecodeError) as info:
        decode_image(odd.damaged_tiff(), DecodePolicy())
    assert "ZIPDecode" in str(info.value)  # quoted in the sample's error
    assert capfd.readouterr().err == ""  # and nowhere else


def test_chatter_in_a_batch_names_its_own_sample(capfd: pytest.CaptureFixture[str]) -> None:
    # A batch holds fd 2 on the chatter sink from its first sample to its last: a line a C
    # library prints in the middle of one sample (here the read of the second) belongs to that
    # sample, not to the next, and fd 2 is the process's own again afterwards.
    images = {f"d{i}": _real("PNG", name) for i, name in enumerate(("coffee", "astronaut", "cat"))}

    def read(ref: str) -> bytes:
        if ref == "d1":
            os.write(2, b"libfoo: warning: odd marker in the second image\n")
        return images[ref]

    records = [Record(key=f"k{i}", ref=ref, label=0, index=i) for i, ref in enumerate(images)]
    notes: list[tuple[str, str]] = []
    batch, covered, errors = decode_records(
        records, read, DecodePolicy(image_size=(32, 32)), chunk=7, notes=notes
    )
    assert (batch.num_rows, covered, errors) == (3, 3, [])
    assert [key for key, _ in notes] == ["k1"], notes
    assert "chunk 7, sample 'k1': the decoder said: libfoo: warning: odd marker" in notes[0][1]
    os.write(2, b"after the batch\n")
    assert capfd.readouterr().err == "after the batch\n"


def _odd_source(root: Path) -> Path:
    """Digits, a CMYK JPEG Pillow warns about (decodes fine), a damaged and a WebP TIFF."""
    from pixcrawler import _demo_data

    src = _demo_data.build_digits(root / "src", limit=3, classes=(0, 1))
    (src / "odd").mkdir()
    (src / "odd" / "a-cmyk.jpg").write_bytes(odd.cmyk_jpeg_with_broken_exif())
    (src / "odd" / "b-damaged.tif").write_bytes(odd.damaged_tiff())
    (src / "odd" / "c-webp.tif").write_bytes(odd.webp_tiff())
    return src


def test_an_engine_run_reports_each_sample_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    src = _odd_source(tmp_path)
    pack(src, tmp_path / "store", "odd", chunk_size=4, verify="header")
    client = JobClient(f"file://{tmp_path / 'store'}", None)
    source = JobSource(client, client.get_job("odd"))
    policy = DecodePolicy(image_size=(32, 32), on_error="warn")
    caplog.set_level(logging.WARNING, logger="pixcrawler_engine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Stream(source, config=EngineConfig(num_workers=2), policy=policy) as stream:
            keys = [k for batch in stream for k in batch.keys]
    assert len(keys) == 7  # 6 digits and the CMYK JPEG; the two TIFFs are left out
    bad = [str(w.message) for w in caught if issubclass(w.category, SampleWarning)]
    assert len(bad) == 2 and all("odd/" in m for m in bad), bad
    assert any("ZIPDecode" in m and "corrupt" in m for m in bad)
    assert any("unsupported image" in m and "WEBP" in m for m in bad)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "Truncated File Read" in notes[0] and "odd/a-cmyk.jpg" in notes[0]
    err = capfd.readouterr().err
    assert "ZIPDecode" not in err and "WEBP" not in err and "UserWarning" not in err


# ------------------------------------------------------------------------------ pack


def _real(fmt: str, name: str = "coffee") -> bytes:
    out = io.BytesIO()
    Image.fromarray(getattr(skdata, name)()).resize((96, 64)).save(out, fmt)
    return out.getvalue()


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixcrawler", *map(str, args)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_pack_lists_every_bad_file_and_skips_them_on_request(tmp_path: Path) -> None:
    src = _odd_source(tmp_path)
    (src / "formats").mkdir()
    for fmt, ext in (("JPEG2000", "jp2"), ("AVIF", "avif"), ("PPM", "ppm")):
        (src / "formats" / f"x.{ext}").write_bytes(_real(fmt))
    (src / "odd" / "d-12bit.jpg").write_bytes(odd.jpeg12())
    (src / "odd" / "e-4444.bmp").write_bytes(odd.bmp_argb4444())
    (src / "odd" / "f-notes.jpg").write_text("not an image at all")
    bad = {"odd/b-damaged.tif", "odd/c-webp.tif", "odd/d-12bit.jpg", "odd/e-4444.bmp",
           "odd/f-notes.jpg"}  # fmt: skip
    store = tmp_path / "store"
    refused = _run("pack", src, "--store", store, "--job-id", "odd")
    assert refused.returncode == 1
    assert f"{len(bad)} of 15 files cannot be packed" in refused.stderr, refused.stderr
    for name in bad:
        assert name in refused.stderr
    assert "--skip-bad" in refused.stderr and "on_error" not in refused.stderr
    assert not (store / "jobs" / "odd").exists()
    packed = _run("pack", src, "--store", store, "--job-id", "odd", "--skip-bad")
    assert packed.returncode == 0, packed.stderr
    assert "Packed 10 images" in packed.stdout and "5 files refused" in packed.stdout
    # What the decoders said: one line for the CMYK file, nothing raw.
    lines = packed.stderr.strip().splitlines()
    assert lines == [line for line in lines if line.startswith("warning: ")], packed.stderr
    assert len(lines) == 1 and "odd/a-cmyk.jpg" in lines[0] and "Truncated File Read" in lines[0]
    assert "site-packages" not in packed.stderr and "ZIPDecode" not in packed.stderr
    report_lines = (store / "jobs" / "odd" / "refused.jsonl").read_text().splitlines()
    report = [json.loads(x) for x in report_lines]
    assert {r["file"] for r in report} == bad
    kinds = {r["file"]: r["kind"] for r in report}
    assert kinds["odd/d-12bit.jpg"] == kinds["odd/c-webp.tif"] == "unsupported"
    assert kinds["odd/e-4444.bmp"] == "unsupported"
    assert kinds["odd/b-damaged.tif"] == kinds["odd/f-notes.jpg"] == "corrupt"
    # Everything packed loads, the formats the decoder reads included.
    with load_dataset("odd", base_url=f"file://{store}", image_size=32, progress=False) as ds:
        _, labels = ds.to_arrays()
    assert sorted(labels.tolist()).count("formats") == 3 and len(labels) == 10


def test_pack_shows_twenty_bad_files_and_counts_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bad").mkdir(parents=True)
    for i in range(25):
        (src / "bad" / f"{i:02d}.png").write_text(f"not a PNG {i}")
    (src / "good").mkdir()
    (src / "good" / "x.png").write_bytes(_real("PNG"))
    with pytest.raises(ValueError) as info:
        pack(src, tmp_path / "store", "j")
    message = str(info.value)
    assert "25 of 26 files cannot be packed" in message and "... and 5 more" in message
    assert "bad/19.png" in message and "bad/20.png" not in message
