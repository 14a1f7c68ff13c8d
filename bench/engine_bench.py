"""Engine benchmark: per-core ceiling, the engine at 1 and N workers, torch DataLoader baselines.

Run as `python -m bench.engine_bench --out bench/results`. Everything runs side by side in one
process tree on the same chunks of 640x480-class real-photo JPEGs, decoded to 224x224.

    a  single-process loop of our decode + resize (the per-core ceiling)
    b  this engine, 1 worker and one per core
    c  torch DataLoader(num_workers=cores, batch_size=64), Image.open().convert("RGB") + resize
    d  the same DataLoader calling our decode function
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from bench._util import TreeRss, build_bench_store, cpu_count, describe_machine

SIZE = (224, 224)


def _members(store: Path, job: str) -> list[tuple[str, str]]:
    out = []
    for path in sorted((store / "jobs" / job / "chunks").glob("*.zip"), key=lambda p: int(p.stem)):
        with zipfile.ZipFile(path) as zf:
            for line in zf.read("manifest.jsonl").decode().splitlines():
                out.append((str(path), json.loads(line)["file"]))
    return out


class ZipImages:
    """A map-style torch dataset over the chunk zips, as a torch user would write it."""

    def __init__(self, members: list[tuple[str, str]], ours: bool) -> None:
        self.members = members
        self.ours = ours
        self._zips: dict[str, zipfile.ZipFile] = {}

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> Any:
        import torch
        from PIL import Image

        path, name = self.members[i]
        zf = self._zips.get(path) or self._zips.setdefault(path, zipfile.ZipFile(path))
        data = zf.read(name)
        if self.ours:
            from pixcrawler_engine import DecodePolicy
            from pixcrawler_engine.decode._image import decode_image

            arr = decode_image(data, DecodePolicy(image_size=SIZE))
        else:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            arr = np.asarray(img.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR))
        return torch.from_numpy(arr)


def run_loop(store: Path, job: str) -> dict[str, Any]:
    from pixcrawler_engine import DecodePolicy
    from pixcrawler_engine.decode._image import decode_image

    policy = DecodePolicy(image_size=SIZE)
    members = _members(store, job)
    zips: dict[str, zipfile.ZipFile] = {}
    start = time.perf_counter()
    first = None
    for i, (path, name) in enumerate(members):
        zf = zips.get(path) or zips.setdefault(path, zipfile.ZipFile(path))
        decode_image(zf.read(name), policy)
        if i == 63:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return _result(len(members), seconds, first or seconds, 64, rss=None)


def _result(n: int, seconds: float, first: float, first_n: int, rss: int | None) -> dict[str, Any]:
    """End-to-end and steady-state (after the first batch) rates of one run."""
    steady = (n - first_n) / (seconds - first) if n > first_n and seconds > first else 0.0
    return {
        "images": n,
        "seconds": seconds,
        "first_batch_s": first,
        "images_per_s": n / seconds,
        "steady_images_per_s": steady,
        "peak_rss": rss or 0,
    }


def run_engine(store: Path, job: str, workers: int, size: tuple[int, int] = SIZE) -> dict[str, Any]:
    from pixcrawler_engine import DecodePolicy, EngineConfig, JobSource, Stream
    from pixcrawler_engine.sources._jobapi import JobClient

    client = JobClient(f"file://{store}", None)
    source = JobSource(client, client.get_job(job))
    config = EngineConfig(num_workers=workers, batch_rows=64)
    with TreeRss() as rss:
        start = time.perf_counter()
        first, first_n = None, 0
        n = 0
        checksum = 0
        with Stream(source, config=config, policy=DecodePolicy(image_size=size)) as stream:
            for batch in stream:
                images = batch.images
                assert isinstance(images, np.ndarray)
                checksum += int(images[:, 0, 0, 0].sum())  # touch the pixels
                n += len(images)
                if first is None:
                    first, first_n = time.perf_counter() - start, n
        seconds = time.perf_counter() - start
    return _result(n, seconds, first or seconds, first_n, rss.peak)


def run_dataloader(store: Path, job: str, ours: bool, workers: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    dataset = ZipImages(_members(store, job), ours)
    loader: DataLoader[Any] = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=64,
        num_workers=workers,
        multiprocessing_context="spawn",
    )
    with TreeRss() as rss:
        start = time.perf_counter()
        first, first_n = None, 0
        n = 0
        for batch in loader:
            n += len(batch)
            if first is None:
                first, first_n = time.perf_counter() - start, n
        seconds = time.perf_counter() - start
    return _result(n, seconds, first or seconds, first_n, rss.peak)


def receive_cost(repeats: int = 2000) -> dict[str, float]:
    """Consumer-side cost of one 64x224x224x3 batch, as `Stream._map` does it, in microseconds.

    Lease, finalizer, Arrow foreign buffer over the slot, IPC read and the (B,H,W,C) view.
    """
    import weakref

    import pyarrow as pa

    from pixcrawler_engine.runtime._batch import (
        BatchBuilder,
        image_views,
        read_batch,
        record_batch,
        write_batch,
    )
    from pixcrawler_engine.runtime._shm import OwnerLock, SlotPool, attach
    from pixcrawler_engine.runtime._stream import _Lease

    builder = BatchBuilder((224, 224, 3), capacity=64)
    for i in range(64):
        image = builder.next_image()
        assert image is not None
        builder.add(
            image, label="x", key=str(i), chunk=0, index=i, orig_size=(640, 480), metadata=None
        )
    batch = record_batch(builder)
    token = f"{os.getpid()}_{secrets.token_hex(8)}"
    lock = OwnerLock(token)
    pool = SlotPool(token, 1, 16 << 20)
    released: list[int] = []
    try:
        mapping = attach(pool.names[0])
        nbytes = write_batch(batch, mapping.buf)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            lease = _Lease(mapping)
            weakref.finalize(lease, released.append, 0)
            buf = pa.foreign_buffer(lease.array.ctypes.data, nbytes, base=lease)
            images = image_views(read_batch(buf))
            times.append(time.perf_counter() - t)
            assert isinstance(images, np.ndarray) and images.shape == (64, 224, 224, 3)
            del images, buf, lease
        assert len(released) == repeats  # every lease went back when its views did
        mapping.close()
    finally:
        pool.close()
        lock.release()
    times.sort()
    return {
        "median_us": statistics.median(times) * 1e6,
        "p90_us": times[len(times) * 9 // 10] * 1e6,
    }


# Peak RSS is read from VmHWM: ru_maxrss of a child includes its parent's peak on Linux.
_HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

HUGE = (
    _HWM
    + """
import sys, time
from pixcrawler_engine import DecodePolicy
from pixcrawler_engine.decode._image import decode_image
data = open(sys.argv[1], "rb").read()
base = hwm()
t = time.perf_counter()
out = decode_image(data, DecodePolicy(image_size=(1024, 1024), resize="fit"))
dt = time.perf_counter() - t
print(base, hwm(), dt, *out.shape)
"""
)

FULL = (
    _HWM
    + """
import sys, time, io
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
data = open(sys.argv[1], "rb").read()
base = hwm()
t = time.perf_counter()
img = Image.open(io.BytesIO(data)).convert("RGB")
img.thumbnail((1024, 1024))
dt = time.perf_counter() - t
print(base, hwm(), dt, img.size[1], img.size[0], 3)
"""
)


def huge_jpeg(root: Path) -> Path:
    """A ~133-megapixel JPEG made from a real photo (skimage's astronaut, upscaled)."""
    path = root / "huge-133mp.jpg"
    if not path.exists():
        from PIL import Image
        from skimage import data

        img = Image.fromarray(data.astronaut()).resize((14000, 9500), Image.Resampling.BILINEAR)
        img.save(path, quality=85)
    return path


def run_huge(root: Path) -> dict[str, Any]:
    path = huge_jpeg(root)
    out: dict[str, Any] = {"megapixels": 14000 * 9500 / 1e6}
    for name, script in (("ours", HUGE), ("full_decode", FULL)):
        res = subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
        )
        base, peak, dt, *shape = res.stdout.split()
        out[name] = {
            "process_peak_rss_mb": int(peak) / 1024,  # the whole worker-like process
            "decode_rss_increase_mb": (int(peak) - int(base)) / 1024,
            "seconds": float(dt),
            "shape": [int(s) for s in shape],
        }
    return out


def run_case(case: str, store: Path, job: str) -> dict[str, Any]:
    """One case in a fresh process, so that its process tree holds only what it needs."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.engine_bench",
            "--case",
            case,
            "--store",
            str(store),
            "--job",
            job,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def _one(case: str, store: Path, job: str) -> dict[str, Any]:
    cores = cpu_count()
    if case == "a_loop":
        return run_loop(store, job)
    if case.startswith("b_engine_"):
        return run_engine(store, job, int(case.rsplit("_", 1)[1]))
    if case == "c_dataloader_pil":
        return run_dataloader(store, job, False, cores)
    if case == "d_dataloader_ours":
        return run_dataloader(store, job, True, cores)
    raise ValueError(case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=3, help="the photos, packed this many times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_one(args.case, args.store, args.job)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cores = cpu_count()
    work = Path(tempfile.mkdtemp(prefix="pxc-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # ~0.6 GB of photos and stores
    store, job = build_bench_store(work, copies=args.copies, n_photos=args.photos)
    store10, job10 = build_bench_store(work, copies=10 * args.copies, n_photos=args.photos)

    cases = ["a_loop", "b_engine_1", f"b_engine_{cores}", "c_dataloader_pil", "d_dataloader_ours"]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for case in cases:
            runs[case].append(run_case(case, store, job))
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {
            key: statistics.median(r[key] for r in rs)
            for key in ("images_per_s", "steady_images_per_s", "first_batch_s")
        }
        summary[name]["peak_rss_mb"] = statistics.median(r["peak_rss"] for r in rs) / 2**20
        summary[name]["runs"] = rs
    steady = {k: v["steady_images_per_s"] for k, v in summary.items()}
    big = run_case(f"b_engine_{cores}", store10, job10)
    engine_n = f"b_engine_{cores}"
    ratios = {
        "b_N_over_N_times_a": steady[engine_n] / (cores * steady["a_loop"]),
        "b_N_over_c": steady[engine_n] / steady["c_dataloader_pil"],
        "b_N_over_d": steady[engine_n] / steady["d_dataloader_ours"],
        "end_to_end_b_N_over_c": summary[engine_n]["images_per_s"]
        / summary["c_dataloader_pil"]["images_per_s"],
        "rss_10x_over_1x": big["peak_rss"] / 2**20 / summary[engine_n]["peak_rss_mb"],
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe_machine(),
        "images": runs["a_loop"][0]["images"],
        "summary": summary,
        "ratios": ratios,
        "engine_10x": {
            "images": big["images"],
            "peak_rss_mb": big["peak_rss"] / 2**20,
            "steady_images_per_s": big["steady_images_per_s"],
        },
        "receive_batch": receive_cost(),
        "huge_jpeg": run_huge(work),
    }
    (args.out / "engine.json").write_text(json.dumps(result, indent=2))
    chart(result, args.out / "engine.png")
    print(json.dumps({k: result[k] for k in ("ratios", "receive_batch", "huge_jpeg")}, indent=2))
    for name, s in summary.items():
        print(
            f"{name:20s} steady {s['steady_images_per_s']:7.1f} img/s, end-to-end "
            f"{s['images_per_s']:7.1f} img/s, first batch {s['first_batch_s']:.2f} s, "
            f"peak RSS {s['peak_rss_mb']:.0f} MB"
        )


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    rates = [result["summary"][n]["steady_images_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(names, rates, color=["#888", "#4a7", "#2a5", "#c66", "#c96"][: len(names)])
    ax.set_xlabel("images/s after the first batch (640x480-class JPEG -> 224x224)")
    m = result["machine"]
    ax.set_title(f"pixcrawler engine, {m['cpus']} cores, {result['date']}")
    for i, r in enumerate(rates):
        ax.text(r, i, f" {r:.0f}", va="center")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


if __name__ == "__main__":
    main()
