"""Ray benchmark: `Dataset.to_ray()` with 1 and 2 CPUs beside the one-process loop and the engine.

Run as `python -m bench.ray_bench --out bench/results/ray.json`. Every case runs in a fresh
process, the cases interleaved `--repeats` times (medians are kept), on the engine benchmark's
job: 640x480-class real-photo JPEGs decoded to 224x224, chunks of 500.

    a_loop      one process, our decode + resize in a loop (the per-core ceiling)
    b_engine_N  the engine with N decode workers
    ray_N       a local Ray instance of N CPUs (`ray.init(num_cpus=N)`), `to_ray()`,
                `iter_batches(batch_size=64, batch_format="numpy")` twice: `ray.init` time;
                the cold pass's first batch and images/s (Ray Data starts its actors and
                workers); the warm pass's images/s (an epoch 2: the sustained rate) and its
                CPU ms per image over the process tree (which other jobs on the machine do
                not inflate); peak RSS over the tree (raylet, GCS, agents, workers)

Then the ARTeFACT-shaped shards (a 133 MP JPEG and a 100 MP PNG with full-size masks) are read
at 1024x1024 through a 200 MiB object store: its peak use, spills and fallback allocations.
Without Ray installed the result says so and nothing runs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import TreeCpu, TreeRss, build_bench_store, describe_machine

SIZE = (224, 224)
TESTS = Path(__file__).resolve().parent.parent / "tests"


def _ray_init(cpus: int, store_bytes: int, tmp: str) -> float:
    import ray
    import ray.data

    start = time.perf_counter()
    ray.init(
        num_cpus=cpus,
        object_store_memory=store_bytes,
        include_dashboard=False,
        _temp_dir=tmp,
        logging_level=logging.ERROR,
    )
    seconds = time.perf_counter() - start
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return seconds


def _pass(ds: Any) -> tuple[int, float, float]:
    """One pass over a Ray dataset: (images, seconds, seconds to the first batch)."""
    start = time.perf_counter()
    first, n, checksum = None, 0, 0
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        images = batch["image"]
        checksum += int(images[:, 0, 0, 0].sum())  # touch the pixels
        n += len(images)
        if first is None:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return n, seconds, first or seconds


def run_ray(store: Path, job: str, cpus: int) -> dict[str, Any]:
    """A cold pass (Ray Data starts its actors and workers), then a warm one (an epoch 2)."""
    import ray

    from pixcrawler import load_dataset

    with tempfile.TemporaryDirectory(prefix="pxr-", dir="/tmp") as tmp, TreeRss() as rss:
        init = _ray_init(cpus, 512 << 20, tmp)
        try:
            dataset = load_dataset(job, base_url=store.as_uri(), image_size=SIZE, progress=False)
            ds = dataset.to_ray()
            n, seconds, first = _pass(ds)
            with TreeCpu() as cpu:
                warm_n, warm_seconds, warm_first = _pass(ds)
        finally:
            ray.shutdown()
    assert warm_n == n
    return {
        "images": n,
        "seconds": seconds,
        "ray_init_s": init,
        "first_batch_s": first,
        "images_per_s": n / seconds,
        "warm_images_per_s": n / warm_seconds,
        "warm_first_batch_s": warm_first,
        "end_to_end_images_per_s": n / (seconds + init),
        "peak_rss": rss.peak,
        "cpu_ms_per_image": cpu.seconds * 1000 / n,  # the warm pass: Ray's steady cost
    }


def run_artefact(cache: Path, store_mib: int = 200) -> dict[str, Any]:
    """ARTeFACT-shaped shards read at 1024x1024 through a small object store."""
    import ray

    sys.path.insert(0, str(TESTS))
    from artefact_data import build
    from ray_helpers import ObjectStoreWatch

    from pixcrawler import load_dataset

    built = build(cache / "data-22", n_small=22, huge=("jpeg", "png"), rows_per_group=4)
    with tempfile.TemporaryDirectory(prefix="pxr-", dir="/tmp") as tmp, TreeRss() as rss:
        _ray_init(2, store_mib << 20, tmp)
        try:
            dataset = load_dataset(built.glob, image_size=(1024, 1024), progress=False)
            start = time.perf_counter()
            n = 0
            with ObjectStoreWatch() as watch:
                for batch in dataset.to_ray().iter_batches(batch_size=4, batch_format="numpy"):
                    n += len(batch["key"])
            seconds = time.perf_counter() - start
        finally:
            ray.shutdown()
    return {
        "samples": n,
        "expected": len(built.ids),
        "largest_megapixels": round(max(w * h for w, h in built.sizes) / 1e6, 1),
        "seconds": seconds,
        "object_store_limit_mb": store_mib << 20 >> 20,
        "object_store_peak_mb": watch.peak / 2**20,
        "object_store_capacity_mb": watch.capacity / 2**20,
        "spilled_mb": watch.spilled / 2**20,
        "fallback_mb": watch.fallback / 2**20,
        "within_limit": watch.peak <= store_mib << 20 and not watch.spilled and not watch.fallback,
        "peak_rss_mb": rss.peak / 2**20,
    }


def _one(case: str, store: Path, job: str) -> dict[str, Any]:
    from bench.engine_bench import run_engine, run_loop

    load = os.getloadavg()[0]  # what else the machine was doing
    if case.startswith("ray_"):
        result = run_ray(store, job, int(case.rsplit("_", 1)[1]))
    else:
        with TreeCpu() as cpu:
            if case == "a_loop":
                result = run_loop(store, job)
            elif case.startswith("b_engine_"):
                result = run_engine(store, job, int(case.rsplit("_", 1)[1]))
            else:
                raise ValueError(case)
        result["cpu_ms_per_image"] = cpu.seconds * 1000 / result["images"]
    return {**result, "load_average": load}


def run_case(case: str, store: Path, job: str) -> dict[str, Any]:
    """One case in a fresh process, so that its process tree holds only what it needs."""
    cmd = [sys.executable, "-m", "bench.ray_bench", "--case", case, "--store", str(store)]
    res = subprocess.run([*cmd, "--job", job], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = (
        "images_per_s",
        "steady_images_per_s",  # the engine's: after its first batch
        "warm_images_per_s",
        "warm_first_batch_s",
        "end_to_end_images_per_s",
        "first_batch_s",
        "ray_init_s",
        "cpu_ms_per_image",
    )
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in keys if k in rs[0]}
        summary[name]["peak_rss_mb"] = statistics.median(r["peak_rss"] for r in rs) / 2**20
        summary[name]["runs"] = rs
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/ray.json"))
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=3, help="the photos, packed this many times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "pixcrawler-artefact-bench"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_one(args.case, args.store, args.job)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": describe_machine()}
    try:
        import ray

        result["ray_version"] = ray.__version__
    except ImportError:
        result["skipped"] = "Ray is not installed: pip install 'pixcrawler-sdk[ray]'"
        args.out.write_text(json.dumps(result, indent=2))
        print(result["skipped"])
        return
    # Other jobs share the machine: the load around the runs says how much to trust them.
    result["load_average_start"] = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="pxc-ray-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # ~0.6 GB of photos and stores
    store, job = build_bench_store(work, copies=args.copies, n_photos=args.photos)
    cases = ["a_loop", "b_engine_2", "ray_1", "ray_2"]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for case in cases:
            runs[case].append(run_case(case, store, job))
    summary = summarize(runs)
    loop = summary["a_loop"]["images_per_s"]
    result["images"] = runs["a_loop"][0]["images"]
    result["summary"] = summary
    # A Ray dataset's sustained rate is its warm pass (epoch 2 on); the loop's is its rate.
    result["ratios"] = {
        "ray_2_warm_over_loop": summary["ray_2"]["warm_images_per_s"] / loop,
        "ray_1_warm_over_loop": summary["ray_1"]["warm_images_per_s"] / loop,
        "ray_2_cold_over_loop": summary["ray_2"]["images_per_s"] / loop,
        "ray_2_warm_over_engine_2": summary["ray_2"]["warm_images_per_s"]
        / summary["b_engine_2"]["steady_images_per_s"],
    }
    result["artefact"] = run_artefact(args.cache)
    result["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ratios", "artefact")}, indent=2))
    for name, s in summary.items():
        ray_part = ""
        if "ray_init_s" in s:
            ray_part = (
                f", warm {s['warm_images_per_s']:.1f} img/s, ray.init {s['ray_init_s']:.2f} s"
            )
        print(
            f"{name:12s} {s['images_per_s']:7.1f} img/s, first batch {s['first_batch_s']:.2f} s"
            f"{ray_part}, peak RSS {s['peak_rss_mb']:.0f} MB, "
            f"CPU {s['cpu_ms_per_image']:.2f} ms/img"
        )


if __name__ == "__main__":
    main()
