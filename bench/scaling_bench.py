"""Scaling benchmark: the engine from one worker to one per core, and a GPU training feed.

Run as `python -m bench.scaling_bench --out bench/results/scaling.json` (part of `make bench`;
on a lent GPU machine through `bench/device.sh`). Every case runs in a fresh process,
interleaved round by round; medians are reported.

    curve   the engine (batches of 64) over 640x480-class real-photo JPEGs -> 224x224 at 1, 2,
            4, ... workers up to one per core, beside one process running the same decode in
            a loop (the per-core ceiling)
    tiny    the same worker counts on 32x32 digit PNGs kept at 32x32, where decoding is nearly
            free: the rate that one stream's supervisor and consumer allow
    feed    one pass as a training loop consumes it, num_workers = cores, batches of 64 moved
            to the GPU where there is one (else only read):
              iter_batches    iter_batches(64), torch.from_numpy(images).to(device)
              torch_batches   DataLoader(to_torch(iterable=True, batch_size=64), batch_size=None)
              torch_pinned    the same with to_torch(..., pin_memory=True) (GPU only)
              loader_pinned   the same with DataLoader(..., pin_memory=True) (GPU only)
              torch_pil       DataLoader(num_workers=cores, batch_size=64, pin_memory=on a GPU)
                              over the chunk zips, PIL convert("RGB") + resize
            On a GPU the pixels of every batch are summed there: the engine's cases must agree.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bench._util import build_bench_store, cpu_count, describe_machine

BATCH = 64
SIZE = (224, 224)
ENGINE_FEEDS = ("iter_batches", "torch_batches", "torch_pinned", "loader_pinned")


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... below `cores`, then `cores`."""
    counts = [1]
    while counts[-1] * 2 < cores:
        counts.append(counts[-1] * 2)
    return [*counts, cores] if cores > 1 else counts


def has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def feed(mode: str, store: Path, job: str, workers: int) -> dict[str, Any]:
    """One pass of `mode`, each batch moved to the GPU (if any) as a training step would."""
    import torch
    from torch.utils.data import DataLoader

    from bench._photo_sets import members
    from bench.adapters_bench import ZipPhotos, read_pixels, timed_pass
    from pixcrawler import load_dataset

    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    if gpu is not None:
        torch.zeros(1, device=gpu)  # the CUDA context, before the clock starts
    sums: list[Any] = []

    def move(images: Any) -> int:
        if gpu is None:
            return read_pixels((images,))
        on_gpu = images.to(gpu, non_blocking=True)
        sums.append(on_gpu.sum(dtype=torch.int64))
        return len(on_gpu)

    def synced(images: Iterable[Any]) -> Iterator[Any]:
        yield from images
        if gpu is not None:
            torch.cuda.synchronize()  # the last copies count

    torch.set_num_threads(1)
    start = time.perf_counter()
    if mode == "torch_pil":
        photos: Any = ZipPhotos(members(store, job))
        loader: Any = DataLoader(
            photos, batch_size=BATCH, num_workers=workers, pin_memory=gpu is not None
        )
        images: Iterable[Any] = (x for x, _ in loader)
    else:
        dataset = load_dataset(
            job, base_url=store.as_uri(), image_size=SIZE, num_workers=workers, progress=False
        )
        if mode == "iter_batches":
            # The views are read-only; a transfer only reads them.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            images = (torch.from_numpy(x) for x, _ in dataset.iter_batches(BATCH))
        elif mode in ENGINE_FEEDS:
            batches = dataset.to_torch(
                iterable=True, batch_size=BATCH, pin_memory=mode == "torch_pinned"
            )
            loader = DataLoader(batches, batch_size=None, pin_memory=mode == "loader_pinned")
            images = (x for x, _ in loader)
        else:
            raise ValueError(mode)
    result = timed_pass(start, synced(images), move)
    result["pixel_sum"] = int(torch.stack(sums).sum()) if sums else None
    return result


def copy_to_gpu(repeats: int = 50) -> dict[str, float]:
    """Milliseconds to move one 64x224x224x3 uint8 batch to the GPU, pageable and pinned."""
    import torch

    out = {}
    for name, pinned in (("pageable_ms", False), ("pinned_ms", True)):
        batch = torch.randint(0, 256, (BATCH, *SIZE, 3), dtype=torch.uint8)
        if pinned:
            batch = batch.pin_memory()
        times = []
        for _ in range(repeats + 5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            batch.to("cuda", non_blocking=pinned)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        out[name] = statistics.median(times[5:])
    return out


def run_case(case: str, store: Path, job: str) -> dict[str, Any]:
    """One case in this process (the parent starts a fresh process for each)."""
    from bench import engine_bench

    if case == "loop":
        return engine_bench.run_loop(store, job)
    if case.startswith("feed_"):
        return feed(case.removeprefix("feed_"), store, job, cpu_count())
    kind, _, arg = case.rpartition("_")
    if kind == "engine":
        return engine_bench.run_engine(store, job, int(arg))
    if kind == "tiny":
        return engine_bench.run_engine(store, job, int(arg), size=(32, 32))
    raise ValueError(case)


def fresh(case: str, store: Path, job: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.scaling_bench", "--case", case]
    res = subprocess.run(
        [*cmd, "--store", str(store), "--job", job], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


KEYS = ("images_per_s", "steady_images_per_s", "first_batch_s")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in KEYS}
    if "peak_rss" in runs[0]:
        out["peak_rss_mb"] = statistics.median(r["peak_rss"] for r in runs) / 2**20
    sums = {r.get("pixel_sum") for r in runs}
    if sums != {None}:
        out["pixel_sums"] = sorted(sums)
    out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaling.json"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=8, help="the ~800 photos, packed N times")
    parser.add_argument("--tiny-copies", type=int, default=12, help="the 1,797 digits, N times")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.store, args.job)))
        return
    from bench.overhead_bench import build_store as build_digits_store

    cores = cpu_count()
    counts = worker_counts(cores)
    gpu = gpu_facts() if has_gpu() else None  # once: the parent then holds a CUDA context
    work = Path(tempfile.mkdtemp(prefix="pxc-scaling-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    photos = build_bench_store(work, copies=args.copies)
    digits = (build_digits_store(work / "tiny", copies=args.tiny_copies), "digits")
    feeds = ["iter_batches", "torch_batches", *(ENGINE_FEEDS[2:] if gpu else ()), "torch_pil"]
    cases = {
        "loop": photos,
        **{f"engine_{n}": photos for n in counts},
        **{f"tiny_{n}": digits for n in counts},
        **{f"feed_{mode}": photos for mode in feeds},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    for done in range(1, args.rounds + 1):  # interleaved, so drift hits every case alike
        for case, (store, job) in cases.items():
            runs[case].append(fresh(case, store, job))
            print(f"   {case:20s} {json.dumps(runs[case][-1])[:110]}", flush=True)
        result = report(runs, counts, gpu, rounds=done)  # each round's: a cut-off run keeps it
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.out)
    print(table(result))


def report(
    runs: dict[str, list[dict[str, Any]]],
    counts: list[int],
    gpu: dict[str, Any] | None,
    rounds: int,
) -> dict[str, Any]:
    summary = {case: summarise(rs) for case, rs in runs.items()}
    sums = {s for case in runs if case.removeprefix("feed_") in ENGINE_FEEDS
            for s in summary[case].get("pixel_sums", [])}  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": describe_machine(),
        "gpu": gpu and gpu["name"],
        "rounds": rounds,
        "images": runs["loop"][0]["images"],
        "tiny_images": runs[f"tiny_{counts[0]}"][0]["images"],
        "worker_counts": counts,
        "summary": summary,
        "curve": curve(summary, counts),
        "copy_to_gpu": gpu and gpu["copy_to_gpu"],
        "engine_feeds_agree": len(sums) == 1 if gpu else None,
    }


def gpu_facts() -> dict[str, Any]:
    import torch

    return {"name": str(torch.cuda.get_device_name()), "copy_to_gpu": copy_to_gpu()}


def curve(summary: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """Per worker count: steady img/s, speed-up over 1 worker, and the share of N x the
    one-process loop (the per-core ceiling) that N workers reach."""
    loop = summary["loop"]["steady_images_per_s"]
    one = summary["engine_1"]["steady_images_per_s"]
    out = {}
    for n in counts:
        rate = summary[f"engine_{n}"]["steady_images_per_s"]
        out[str(n)] = {
            "steady_images_per_s": rate,
            "speedup": rate / one,
            "of_n_loops": rate / (n * loop),
            "tiny_steady_images_per_s": summary[f"tiny_{n}"]["steady_images_per_s"],
            "tiny_images_per_s": summary[f"tiny_{n}"]["images_per_s"],
        }
    return out


def table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    lines = [
        "| workers | steady img/s | speed-up | of N x one-process loop | digits 32x32 img/s |",
        "|---|---|---|---|---|",
    ]
    for n, row in result["curve"].items():
        lines.append(
            f"| {n} | {row['steady_images_per_s']:.0f} | {row['speedup']:.2f}x | "
            f"{row['of_n_loops']:.2f} | {row['tiny_steady_images_per_s']:.0f} |"
        )
    lines += ["", "| case | img/s | steady img/s | first batch s |", "|---|---|---|---|"]
    for case, row in summary.items():
        if case.startswith(("loop", "feed_")):
            lines.append(
                f"| {case} | {row['images_per_s']:.0f} | {row['steady_images_per_s']:.0f} | "
                f"{row['first_batch_s']:.2f} |"
            )
    lines.append(
        f"copy to GPU: {result['copy_to_gpu']}; engine feeds agree: {result['engine_feeds_agree']}"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
