"""Adapter benchmark: what torch and TensorFlow users get, beside iter_batches and their loaders.

Run as `python -m bench.adapters_bench --out bench/results/adapters.json`. On two photo sets
(`bench._photo_sets`: the demo photos and 1,500 benchmark JPEGs), decoded to 224x224, batches
of 64, `num_workers=2`, one full pass; every case runs in a fresh process, interleaved round by
round, and the medians are reported:

    iter_batches     dataset.iter_batches(64)
    torch_batches    DataLoader(to_torch(iterable=True, batch_size=64), batch_size=None)
    tf_batches       to_tensorflow(batch_size=64).prefetch(AUTOTUNE)
    torch_samples    DataLoader(to_torch(iterable=True), batch_size=64)
    torch_map        DataLoader(to_torch(), batch_size=64, num_workers=2); file:// chunks are
                     read in place, as warm as a cache gets
    tf_samples       to_tensorflow().batch(64).prefetch(AUTOTUNE)
    tf_idfd          TensorFlow's image_dataset_from_directory on the same images as files
    torch_pil        DataLoader(num_workers=2, batch_size=64) over the chunk zips with the usual
                     Image.open().convert("RGB").resize(BILINEAR)
    keras_ours       model.fit(to_tensorflow(batch_size=64), epochs=2): seconds per epoch
    keras_idfd       the same model fed by image_dataset_from_directory

plus the PSNR of ours and of `image_dataset_from_directory` against a full decode + LANCZOS.
"First batch" counts from before `load_dataset` (or the loader's construction); imports of
torch and TensorFlow come before the clock starts.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench._photo_sets import SETS, SIZE, build_set, members, quality
from bench._util import TreeCpu, describe_machine

BATCH = 64
WORKERS = 2
PASS_CASES = (
    "iter_batches",
    "torch_batches",
    "tf_batches",
    "torch_samples",
    "torch_map",
    "tf_samples",
    "tf_idfd",
    "torch_pil",
)
KERAS_CASES = ("keras_ours", "keras_idfd")


def timed_pass(start: float, batches: Iterable[Any], touch: Any) -> dict[str, Any]:
    """Images/s of one full pass, its first batch, the rate after the first batch, and the
    CPU time per image over every process of the pass.

    `tail_s` is the time from the last batch to the end of the loop: in TensorFlow, whose
    iterator at times takes ~1.2 s to end after its last element (its autotuning thread,
    seen with `image_dataset_from_directory` and a bare `from_generator` as well); the rate
    to the last batch (`to_last_images_per_s`) leaves it out."""
    first = first_n = None
    n = 0
    last = start
    with TreeCpu() as cpu:
        for batch in batches:
            n += touch(batch)
            last = time.perf_counter()
            if first is None:
                first, first_n = last - start, n
        seconds = time.perf_counter() - start
    first = first if first is not None else seconds
    steady = (n - (first_n or 0)) / (seconds - first) if seconds > first else 0.0
    return {
        "images": n,
        "seconds": seconds,
        "first_batch_s": first,
        "images_per_s": n / seconds,
        "to_last_images_per_s": n / (last - start) if last > start else 0.0,
        "tail_s": start + seconds - last,
        "steady_images_per_s": steady,
        "cpu_ms_per_image": cpu.seconds * 1e3 / max(n, 1),
    }


def read_pixels(batch: Any) -> int:
    """Reads one pixel of each image, as a model would read them all, without a copy: numpy
    arrays, torch tensors and (through `np.asarray`) TensorFlow tensors alike. Not
    `Tensor.numpy()`: TensorFlow's copies the whole batch each time."""
    import numpy as np

    images = np.asarray(batch[0])
    int(images[:, 0, 0, 0].sum())
    return len(images)


def load(store: Path, job: str) -> Any:
    from pixcrawler import load_dataset

    return load_dataset(
        job, base_url=store.as_uri(), image_size=SIZE, num_workers=WORKERS, progress=False
    )


def run_case(case: str, store: Path, job: str, files: Path) -> dict[str, Any]:
    """One case in this process (the parent starts a fresh process for each)."""
    if case.startswith(("tf_", "keras_")):
        import tensorflow as tf
    if case.startswith("torch_"):
        import torch
        from torch.utils.data import DataLoader
    start = time.perf_counter()
    if case == "iter_batches":
        # Held, as a training script holds its dataset: a dataset dropped with its last pass
        # stops its spare supervisor (warm_start) inside that pass's end, 0.03-0.12 s here.
        dataset = load(store, job)
        return timed_pass(start, dataset.iter_batches(BATCH), read_pixels)
    if case == "torch_batches":
        ds = load(store, job).to_torch(iterable=True, batch_size=BATCH)
        return timed_pass(start, DataLoader(ds, batch_size=None), read_pixels)
    if case == "torch_samples":
        ds = load(store, job).to_torch(iterable=True)
        return timed_pass(start, DataLoader(ds, batch_size=BATCH), read_pixels)
    if case == "torch_map":
        loader = DataLoader(load(store, job).to_torch(), batch_size=BATCH, num_workers=WORKERS)
        return timed_pass(start, loader, read_pixels)
    if case == "torch_pil":
        return timed_pass(start, pil_loader(store, job, torch, DataLoader), read_pixels)
    if case == "tf_batches":
        tf_ds = load(store, job).to_tensorflow(batch_size=BATCH).prefetch(tf.data.AUTOTUNE)
        return timed_pass(start, tf_ds, read_pixels)
    if case == "tf_samples":
        tf_ds = load(store, job).to_tensorflow().batch(BATCH).prefetch(tf.data.AUTOTUNE)
        return timed_pass(start, tf_ds, read_pixels)
    if case == "tf_idfd":
        return timed_pass(start, idfd(files, tf), read_pixels)
    if case in KERAS_CASES:
        if case == "keras_ours":
            dataset = load(store, job)
            classes = len(dataset.info.labels)
            feed = dataset.to_tensorflow(batch_size=BATCH).prefetch(tf.data.AUTOTUNE)
        else:
            classes = len([p for p in files.iterdir() if p.is_dir()])
            feed = idfd(files, tf)
        return keras_epochs(tf, feed, classes)
    raise ValueError(case)


def idfd(files: Path, tf: Any) -> Any:
    tf_ds = tf.keras.utils.image_dataset_from_directory(
        files, image_size=SIZE, batch_size=BATCH, shuffle=False, verbose=False
    )
    return tf_ds.prefetch(tf.data.AUTOTUNE)


class ZipPhotos:
    """A map-style dataset over the chunk zips, written as a torch user would."""

    def __init__(self, items: list[tuple[Path, str, str]]) -> None:
        self.items = items
        self.labels = {label: i for i, label in enumerate(sorted({x[2] for x in items}))}
        self._zips: dict[Path, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        import io
        import zipfile

        import numpy as np
        import torch
        from PIL import Image

        path, name, label = self.items[i]
        zf = self._zips.get(path) or self._zips.setdefault(path, zipfile.ZipFile(path))
        image = Image.open(io.BytesIO(zf.read(name))).convert("RGB")
        pixels = np.array(image.resize(SIZE, Image.Resampling.BILINEAR))
        return torch.from_numpy(pixels), self.labels[label]


def pil_loader(store: Path, job: str, torch: Any, loader_type: Any) -> Any:
    torch.set_num_threads(1)
    dataset = ZipPhotos(members(store, job))
    return loader_type(dataset, batch_size=BATCH, num_workers=WORKERS)


def keras_epochs(tf: Any, feed: Any, classes: int) -> dict[str, Any]:
    """Seconds per epoch of a small model trained for 2 epochs on `feed`."""
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((*SIZE, 3)),
            tf.keras.layers.Rescaling(1 / 255),
            tf.keras.layers.Conv2D(8, 3, strides=4, activation="relu"),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    marks: list[float] = []
    clock = tf.keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda *_: marks.append(time.perf_counter()),
        on_epoch_end=lambda *_: marks.append(time.perf_counter()),
    )
    with TreeCpu() as cpu:
        history = model.fit(feed, epochs=2, verbose=0, shuffle=False, callbacks=[clock])
    return {
        "epoch_s": [marks[1] - marks[0], marks[3] - marks[2]],
        "cpu_s": cpu.seconds,  # both epochs, every process, the model's own work included
        "loss": [float(v) for v in history.history["loss"]],
    }


def copy_cost(repeats: int = 50) -> dict[str, float]:
    """Milliseconds to copy one 64x224x224x3 uint8 batch (what a view saves), median and p90."""
    import numpy as np

    src = np.random.default_rng(0).integers(0, 256, (BATCH, *SIZE, 3), dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[len(times) * 9 // 10]}


def fresh(case: str, photo_set: str, work: Path) -> dict[str, Any]:
    """One case in a fresh process, with the machine's load average when it started."""
    cmd = [sys.executable, "-m", "bench.adapters_bench", "--case", case, "--set", photo_set]
    load = os.getloadavg()[0]
    res = subprocess.run([*cmd, "--work", str(work)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{case} on {photo_set} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), load_avg_1min=load)


PASS_KEYS = (
    "images_per_s",
    "to_last_images_per_s",
    "tail_s",
    "steady_images_per_s",
    "first_batch_s",
    "cpu_ms_per_image",
)


def summarise(runs: dict[str, list[dict[str, Any]]], images: int) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case, rs in runs.items():
        if case in KERAS_CASES:
            epochs = [statistics.median(r["epoch_s"][e] for r in rs) for e in (0, 1)]
            summary[case] = {
                "epoch_s": epochs,
                "epoch_images_per_s": [images / s for s in epochs],
                "cpu_ms_per_image": statistics.median(r["cpu_s"] for r in rs) * 1e3 / (2 * images),
                "runs": rs,
            }
            continue
        summary[case] = {key: statistics.median(r[key] for r in rs) for key in PASS_KEYS}
        summary[case]["runs"] = rs
    return summary


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    rate = {c: summary[c]["images_per_s"] for c in PASS_CASES}
    to_last = {c: summary[c]["to_last_images_per_s"] for c in PASS_CASES}
    first = {c: summary[c]["first_batch_s"] for c in PASS_CASES}
    return {
        "torch_batches_over_iter_batches": rate["torch_batches"] / rate["iter_batches"],
        "tf_batches_over_iter_batches": rate["tf_batches"] / rate["iter_batches"],
        "tf_batches_over_idfd": rate["tf_batches"] / rate["tf_idfd"],
        "tf_batches_over_iter_batches_to_last": to_last["tf_batches"] / to_last["iter_batches"],
        "tf_batches_over_idfd_to_last": to_last["tf_batches"] / to_last["tf_idfd"],
        "torch_batches_over_torch_pil": rate["torch_batches"] / rate["torch_pil"],
        "torch_first_batch_minus_iter_s": first["torch_batches"] - first["iter_batches"],
        "tf_first_batch_minus_iter_s": first["tf_batches"] - first["iter_batches"],
        "keras_epoch2_idfd_over_ours": summary["keras_idfd"]["epoch_s"][1]
        / summary["keras_ours"]["epoch_s"][1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapters.json"))
    parser.add_argument("--repeats", type=int, default=3)  # a median of 2 is their mean
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--set", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        store, job, files = build_set(args.work, args.set)
        print(json.dumps(run_case(args.case, store, job, files)))
        return
    work = Path(tempfile.mkdtemp(prefix="pxc-adapters-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # ~0.6 GB of photos and stores
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe_machine(),
        "batch_size": BATCH,
        "num_workers": WORKERS,
        "sets": {},
        "copy_batch": copy_cost(),
    }
    for photo_set in args.sets:
        store, job, files = build_set(work, photo_set)
        images = len(members(store, job))
        print(f"== {photo_set}: {images} images", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in PASS_CASES + KERAS_CASES}
        for _ in range(args.repeats):  # interleaved, so drift hits every case alike
            for case in runs:
                runs[case].append(fresh(case, photo_set, work))
                print(f"   {case:14s} {json.dumps(runs[case][-1])[:110]}", flush=True)
        summary = summarise(runs, images)
        loads = [r["load_avg_1min"] for rs in runs.values() for r in rs]
        result["sets"][photo_set] = {
            "images": images,
            "load_avg_1min_median": statistics.median(loads),
            "summary": summary,
            "ratios": ratios(summary),
            "quality": quality(store, job, files),
        }
        print(json.dumps(result["sets"][photo_set]["ratios"], indent=2), flush=True)
        print(json.dumps(result["sets"][photo_set]["quality"], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict[str, Any]) -> str:
    """The README's table: one row per case, a group of columns per photo set."""
    sets = list(result["sets"])
    head = " | ".join(f"{s} img/s | {s} first batch | {s} CPU ms/img" for s in sets)
    lines = [f"| path | {head} |", "|---|" + "---|---|---|" * len(sets)]
    for case in PASS_CASES:
        cells = []
        for s in sets:
            row = result["sets"][s]["summary"][case]
            cells += [
                f"{row['images_per_s']:.0f}",
                f"{row['first_batch_s']:.2f} s",
                f"{row['cpu_ms_per_image']:.2f}",
            ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    for case in KERAS_CASES:
        cells = []
        for s in sets:
            row = result["sets"][s]["summary"][case]
            epochs = " / ".join(f"{v:.1f}" for v in row["epoch_s"])
            cells += [f"epochs {epochs} s", "", f"{row['cpu_ms_per_image']:.2f}"]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
