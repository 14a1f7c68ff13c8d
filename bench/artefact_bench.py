"""ARTeFACT export, side by side: the seed tool's approach against `pixcrawler export-images`.

    python -m bench.artefact_bench --out bench/results/artefact.json [--small 22] [--workers 2]

Both run on the same ARTeFACT-shaped shards (`tests/artefact_data.py`: real photos, damage
masks, a 133-megapixel JPEG and a 100-megapixel PNG with full-resolution masks, in one row
group), written as the Hub's shards are (`datasets` 2.x: SNAPPY, one dictionary page per
column chunk; `--layout datasets` for today's uncompressed layout), each in its own
subprocess, while this process samples the RSS (and PSS, which counts shared pages once)
summed over that subprocess's whole tree:

    seed   the ARTeFACT tool's loop: `datasets.load_dataset(..., streaming=True)`, every
           `Image` column decoded by `datasets` at full size, then `thumbnail` (image) and a
           nearest-neighbour resize (mask), then the same PNGs written
    ours   `pixcrawler export-images` (ParquetSource + the engine), with 1 and N workers

Each case runs --rounds times (3), interleaved; the JSON keeps every run and quotes the median
time and the highest peaks. The dataset is built once into --cache (the huge photos take
~40 s the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench._util import describe_machine

_SEED = r"""
import io, json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
import datasets
from pixcrawler_engine.export._images import PALETTE, visualization

Image.MAX_IMAGE_PIXELS = None  # the tool raised Pillow's limit for ARTeFACT's scans
data, out, max_side = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
for d in ("images", "annotations", "annotations_rgb", "visualizations"):
    (out / d).mkdir(parents=True, exist_ok=True)
datasets.disable_progress_bars()
stream = datasets.load_dataset("parquet", data_files=data, split="train", streaming=True)
rows = []
for i, sample in enumerate(stream):
    image = sample["image"].convert("RGB")  # decoded at full size by datasets
    image.thumbnail((max_side, max_side))
    mask = sample["annotation"]
    mask = np.array(mask.resize(image.size, Image.Resampling.NEAREST))
    name = f"{i:05d}_{sample['id']}"
    image.save(out / "images" / f"{name}.png")
    Image.fromarray(mask).save(out / "annotations" / f"{name}.png")
    Image.fromarray(PALETTE[mask]).save(out / "annotations_rgb" / f"{name}.png")
    if i < 10:
        vis = visualization(np.asarray(image), mask)
        Image.fromarray(vis).save(out / "visualizations" / f"{name}.png")
    rows.append({"id": sample["id"], "material": sample["material"]})
    del image, mask, sample
(out / "metadata.json").write_text(json.dumps(rows))
"""


def _tree(proc: subprocess.Popen[bytes]) -> dict[str, float]:
    """Samples RSS and PSS summed over `proc`'s tree until it exits; the peaks, in MB.

    A sampled sum can miss a short peak (a sample every 20 ms, slower on a busy machine), so
    each process's own peak (VmHWM, kept by the kernel) is read too: their sum is an upper
    bound of the peak summed RSS that no timing can lower.
    """
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    hwm: dict[int, int] = {}
    stop = threading.Event()
    while proc.poll() is None:
        rss = pss = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:  # a process went away during the walk: sample again
            stop.wait(0.005)
            continue
        for p in tree:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            rss += info.rss
            pss += info.pss
            hwm[p.pid] = max(hwm.get(p.pid, 0), _vm_hwm(p.pid), info.rss)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        stop.wait(0.02)
    return {
        "peak_rss_mb": round(peak_rss / 1e6),
        "peak_pss_mb": round(peak_pss / 1e6),
        "sum_of_process_peaks_mb": round(sum(hwm.values()) / 1e6),
        "processes": len(hwm),
    }


def _vm_hwm(pid: int) -> int:
    """A process's peak RSS in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peaks = _tree(proc)
    _, err = proc.communicate()
    result: dict[str, Any] = {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        **peaks,
    }
    if proc.returncode:
        result["error_tail"] = err.decode(errors="replace")[-600:]
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median time and the highest peaks of a case's runs (each run kept too)."""
    ok = [r for r in runs if r["returncode"] == 0]
    summary: dict[str, Any] = {"returncode": max(r["returncode"] for r in runs), "runs": runs}
    if ok:
        summary["seconds"] = statistics.median(r["seconds"] for r in ok)
        summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
        summary["peak_pss_mb"] = max(r["peak_pss_mb"] for r in ok)
        summary["sum_of_process_peaks_mb"] = max(r["sum_of_process_peaks_mb"] for r in ok)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument("--small", type=int, default=22, help="ordinary photos in the dataset")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument(
        "--layout",
        choices=["hub", "datasets"],
        default="hub",
        help="how the shards are written (see tests/artefact_data.build)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case, interleaved")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "pixcrawler-artefact-bench"
    )
    args = parser.parse_args()
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from artefact_data import build

    data_dir = args.cache / f"data-{args.small}-{args.layout}"
    built = build(
        data_dir, n_small=args.small, huge=("jpeg", "png"), rows_per_group=4, layout=args.layout
    )
    shards = [str(p) for p in built.shards]
    dataset = {
        "layout": args.layout,
        "samples": len(built.ids),
        "shards_mb": round(sum(Path(p).stat().st_size for p in shards) / 1e6, 1),
        "largest_megapixels": round(max(w * h for w, h in built.sizes) / 1e6, 1),
        "huge": {
            i: f"{w}x{h}"
            for i, (w, h) in zip(built.ids, built.sizes, strict=True)
            if i in built.huge_ids
        },
    }
    results: dict[str, Any] = {"machine": describe_machine(), "dataset": dataset}
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="pxc-artefact-bench-") as tmp:
        env = {**os.environ, "HF_DATASETS_CACHE": str(Path(tmp) / "hf-cache")}
        cases = {"seed": [sys.executable, "-c", _SEED, built.glob, str(Path(tmp) / "seed"),
                          str(args.max_side)]}  # fmt: skip
        for workers in sorted({1, args.workers}):
            cases[f"ours_{workers}_workers"] = [
                sys.executable, "-m", "pixcrawler", "export-images", *shards, "--output",
                str(Path(tmp) / f"ours-{workers}"), "--max-side", str(args.max_side),
                "--num-workers", str(workers), "--no-progress",
            ]  # fmt: skip
        for round_ in range(args.rounds):  # interleaved: a busy spell hits every case alike
            for name, cmd in cases.items():
                print(f"round {round_ + 1}: {name} ...", flush=True)
                runs.setdefault(name, []).append(_run(cmd, env))
                print(f"  {runs[name][-1]}", flush=True)
    for name, case_runs in runs.items():
        results[name] = _summary(case_runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["returncode"] == 0 for k, r in results.items() if "returncode" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
