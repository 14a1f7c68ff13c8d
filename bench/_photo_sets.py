"""The photo sets of the adapter benchmark, their export as files, and a quality check.

    demo    the demo job's photos: 1,200 crops of the bundled photos (80 % JPEG, 20 % PNG,
            some grayscale, 64 to 1,024 px a side), in chunks of 500 as `make demo` packs them
    bench   1,500 real-photo JPEGs, 640x480 class, in chunks of 500 (`build_bench_store`)

Each set is packed into a `file://` store, and its chunks' images are also written out as
files, `<label>/<index>_<name>`, for TensorFlow's `image_dataset_from_directory`.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._util import build_bench_store

SIZE = (224, 224)
SETS = ("demo", "bench")


def build_set(root: Path, name: str, bench_photos: int = 1500) -> tuple[Path, str, Path]:
    """(store, job id, folder of exported files) of one photo set, built once under `root`."""
    if name == "demo":
        from pixcrawler._demo_data import build_photos
        from pixcrawler_engine.sources._pack import pack

        store, job = root / "store", "photos"
        if not (store / "jobs" / job / "job.json").exists():
            src = root / "demo-photos"
            if not src.exists():
                build_photos(src, n=1200)
            pack(src, store, job, chunk_size=500)
    elif name == "bench":
        # About 80 % of the generated photos are JPEGs: make enough, keep the first ones.
        store, job = build_bench_store(
            root, n_photos=bench_photos * 5 // 4 + 100, limit=bench_photos
        )
    else:
        raise ValueError(f"unknown photo set {name!r}; choose from {SETS}")
    return store, job, export_files(store, job, root / f"files-{name}")


def members(store: Path, job: str) -> list[tuple[Path, str, str]]:
    """(chunk zip, member name, label) of every image of a job, in dataset order."""
    out = []
    chunks = sorted((store / "jobs" / job / "chunks").glob("*.zip"), key=lambda p: int(p.stem))
    for path in chunks:
        with zipfile.ZipFile(path) as zf:
            for line in zf.read("manifest.jsonl").decode().splitlines():
                entry = json.loads(line)
                out.append((path, entry["file"], str(entry["label"])))
    return out


def export_files(store: Path, job: str, dest: Path) -> Path:
    """The images of a job as files, a folder per label, for `image_dataset_from_directory`."""
    done = dest / ".done"
    if done.exists():
        return dest
    zips: dict[Path, zipfile.ZipFile] = {}
    for index, (path, name, label) in enumerate(members(store, job)):
        zf = zips.get(path) or zips.setdefault(path, zipfile.ZipFile(path))
        target = dest / label / f"{index:06d}_{Path(name).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(zf.read(name))
    for zf in zips.values():
        zf.close()
    done.touch()
    return dest


def reference_image(data: bytes) -> np.ndarray:
    """The quality reference: a full decode, RGB, Pillow's LANCZOS resize to 224x224."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    return np.asarray(rgb.resize(SIZE, Image.Resampling.LANCZOS))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse))


def quality(store: Path, job: str, files: Path) -> dict[str, Any]:
    """PSNR (dB) of ours and of TensorFlow's loader against the reference, image by image:
    mean, median, 5th percentile and worst over every image of the set."""
    import tensorflow as tf

    from pixcrawler import load_dataset

    items = members(store, job)
    refs = []
    zips: dict[Path, zipfile.ZipFile] = {}
    for path, name, _ in items:
        zf = zips.get(path) or zips.setdefault(path, zipfile.ZipFile(path))
        refs.append(reference_image(zf.read(name)))
    dataset = load_dataset(
        job, base_url=store.as_uri(), image_size=SIZE, num_workers=2, progress=False
    )
    ours = np.concatenate([np.array(x) for x, _ in dataset.iter_batches(batch_size=64)])
    tf_ds = tf.keras.utils.image_dataset_from_directory(
        files, image_size=SIZE, batch_size=64, shuffle=False, verbose=False
    )
    theirs = np.concatenate([x.numpy() for x, _ in tf_ds])
    # Exported names start with the dataset index: map TensorFlow's file order back to it.
    order = [int(Path(p).name.split("_", 1)[0]) for p in tf_ds.file_paths]
    theirs_by_index = np.empty_like(ours)
    theirs_by_index[order] = np.clip(np.round(theirs), 0, 255).astype(np.uint8)
    out: dict[str, Any] = {"images": len(refs)}
    for name, images in (("ours", ours), ("image_dataset_from_directory", theirs_by_index)):
        values = [psnr(image, ref) for image, ref in zip(images, refs, strict=True)]
        out[name] = {
            "mean_psnr_db": float(np.mean(values)),
            "median_psnr_db": float(np.median(values)),
            "p5_psnr_db": float(np.percentile(values, 5)),  # the worst 5 % of images
            "min_psnr_db": float(min(values)),
        }
    return out
