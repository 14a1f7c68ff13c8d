"""Parquet export benchmark: `export_job` (encoded and decoded) beside the `datasets` library.

Run as `python -m bench.parquet_export --out bench/results/parquet.json`. Every case reads the
same packed job (real-photo JPEGs and PNGs, ~70% 640x480-class, chunks of 500) from a local
`file://` store and writes Parquet that `datasets.load_dataset("parquet", ...)` reads with an
`Image` column; the cases run interleaved, `--repeats` times, and medians are reported.

    pixcrawler_encoded   export_job(format="parquet"): the stored bytes, no decoding
    datasets_encoded     Dataset.from_dict({image: {bytes, path}}).cast_column(Image())
                         .to_parquet(): the same bytes, all held in memory first
    pixcrawler_decoded   export_job(format="parquet", 224x224): engine decode, lossless PNG
    datasets_decoded     the same from_dict + cast_column, then .map(convert RGB + resize to
                         224x224, num_proc=cores) and .to_parquet() (PNG, as `datasets` encodes)

Peak RSS is summed over the process tree (decoders and `map` workers included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._util import TreeRss

SIZE = (224, 224)


def build_store(root: Path, photos: int) -> tuple[Path, str]:
    from pixcrawler._demo_data import build_photos
    from pixcrawler_engine.sources._pack import pack

    store = root / "store"
    if not (store / "jobs" / "bench" / "job.json").exists():
        build_photos(root / "photos", n=photos)
        pack(root / "photos", store, "bench", chunk_size=500, verify="header")
    return store, "bench"


def _source(store: Path, job: str) -> Any:
    from pixcrawler_engine.sources._base import JobSource
    from pixcrawler_engine.sources._jobapi import JobClient

    client = JobClient(store.as_uri(), None)
    return JobSource(client, client.get_job(job))


def _read_members(store: Path, job: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Every image as the `datasets` Image struct, and its label, in dataset order."""
    images, labels = [], []
    chunks = sorted((store / "jobs" / job / "chunks").glob("*.zip"), key=lambda p: int(p.stem))
    for path in chunks:
        with zipfile.ZipFile(path) as zf:
            for line in zf.read("manifest.jsonl").decode().splitlines():
                entry = json.loads(line)
                images.append({"bytes": zf.read(entry["file"]), "path": entry["file"]})
                labels.append(entry["label"])
    return images, labels


def pixcrawler_case(store: Path, job: str, out: Path, decoded: bool) -> None:
    from pixcrawler_engine._config import DecodePolicy, EngineConfig
    from pixcrawler_engine.export._driver import export_job

    policy = DecodePolicy(image_size=SIZE) if decoded else None
    source = _source(store, job)
    try:
        export_job(source, out, format="parquet", policy=policy, config=EngineConfig())
    finally:
        source.close()


def _resize(example: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    image = example["image"].convert("RGB").resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
    return {"image": image}


def datasets_case(store: Path, job: str, out: Path, decoded: bool) -> None:
    import datasets

    images, labels = _read_members(store, job)
    ds = datasets.Dataset.from_dict({"image": images, "label": labels})
    ds = ds.cast_column("image", datasets.Image())
    if decoded:
        ds = ds.map(_resize, num_proc=os.cpu_count() or 1)
    out.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out / "train.parquet"))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


def measure(case: Callable[[Path], None], scratch: Path) -> dict[str, float]:
    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    with TreeRss() as rss:
        start = time.perf_counter()
        case(out)
        seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_rss_mib": rss.peak / 2**20,
        "output_mib": _size(out) / 2**20,
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--photos", type=int, default=2000, help="images in the job")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (medians)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the job store here")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="pxc-bench-parquet-"))
    store, job = build_store(root, args.photos)
    job_json = json.loads((store / "jobs" / job / "job.json").read_text())
    cases: dict[str, Callable[[Path], None]] = {
        "pixcrawler_encoded": lambda o: pixcrawler_case(store, job, o, False),
        "datasets_encoded": lambda o: datasets_case(store, job, o, False),
        "pixcrawler_decoded": lambda o: pixcrawler_case(store, job, o, True),
        "datasets_decoded": lambda o: datasets_case(store, job, o, True),
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name, case in cases.items():  # interleaved: machine noise hits every case alike
            runs[name].append(measure(case, root / "scratch"))
            print(f"repeat {repeat + 1}: {name} {runs[name][-1]['seconds']:.2f}s", flush=True)
    images = job_json["num_images"]
    input_mib = job_json["size_bytes"] / 2**20
    results = {}
    for name, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        results[name] = {
            "median_seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 1),
            "input_mib_per_second": round(input_mib / seconds, 1),
            "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in rs), 1),
            "output_mib": round(rs[0]["output_mib"], 1),
            "runs_seconds": [round(r["seconds"], 3) for r in rs],
        }
    for kind in ("encoded", "decoded"):
        ours, theirs = results[f"pixcrawler_{kind}"], results[f"datasets_{kind}"]
        results[f"speedup_{kind}"] = round(theirs["median_seconds"] / ours["median_seconds"], 2)
    report = {
        "benchmark": "parquet_export",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "datasets": datasets.__version__,
        },
        "job": {
            "images": images,
            "chunks": len(job_json["chunks"]),
            "input_mib": round(input_mib, 1),
        },
        "image_size_decoded": list(SIZE),
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
