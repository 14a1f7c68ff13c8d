"""The per-image cost of each process role, on a job where decoding is nearly free.

The job is scikit-learn's digits as 32x32 PNGs, copied 12 times (21,564 images, chunks of 500).
A fresh consumer process (`image_size=32`: one fixed shape, nothing to resize) reads the first
5,000 images and, in another round, all of them,
with `Dataset.iter_batches(B)`; a sampler thread reads the CPU time of every process of the
stream (psutil, every 20 ms, the last value seen of each pid). The marginal CPU per image of a
role is (CPU of the big run - CPU of the small run) / (images of big - images of small):
- supervisor side: the supervisor and the zygote;
- consumer: the user's process (the sampler's own CPU is measured apart and taken out);
- worker: all decode workers together, per image (decoding such a PNG is ~10-20 us of it).
The implied ceiling of one stream is 1 / (serial CPU per image) for the supervisor and the
consumer. A second part runs the whole job with num_workers 4, 8 and 16 on this machine
(oversubscribed): every sample once and in order.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._util import describe_machine

COPIES = 12
CHUNK = 500

CONSUMER = """
import json, sys, threading, time
import psutil
from pixcrawler import load_dataset

store, limit, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
me = psutil.Process()
seen: dict[int, tuple[str, float]] = {}
stop = threading.Event()
sampler_cpu = [0.0]

def role(p: psutil.Process) -> str:
    if p.ppid() == me.pid:
        return "supervisor"
    parent = psutil.Process(p.ppid())
    return "zygote" if parent.ppid() == me.pid else "worker"

def sample() -> None:
    for p in me.children(recursive=True):
        try:
            t = p.cpu_times()
            seen[p.pid] = (role(p), t.user + t.system)
        except psutil.Error:
            pass

def run_sampler() -> None:
    t0 = time.thread_time()
    while not stop.wait(0.02):
        sample()
    sampler_cpu[0] = time.thread_time() - t0

# No spare for a next pass: the small run stops early (no spare) and the big one ends (one),
# which would charge a spare's start-up to the images between them.
ds = load_dataset("digits", base_url="file://" + store, num_workers=workers, image_size=32,
                  progress=False, warm_start=False)  # fmt: skip
thread = threading.Thread(target=run_sampler, daemon=True)
cpu0 = time.process_time()
wall0 = time.perf_counter()
thread.start()
n = 0
keys = []
for images, labels in ds.iter_batches(batch_size=batch):
    n += len(labels)
    if n >= limit:
        break
sample()
wall = time.perf_counter() - wall0
stop.set(); thread.join()
consumer = time.process_time() - cpu0 - sampler_cpu[0]
roles: dict[str, float] = {}
for r, cpu in seen.values():
    roles[r] = roles.get(r, 0.0) + cpu
print(json.dumps({"images": n, "wall": wall, "consumer": consumer, **roles}))
ds.close()
"""

ORDER = """
import json, sys
from pixcrawler import load_dataset
store, workers = sys.argv[1], int(sys.argv[2])
ds = load_dataset(
    "digits", base_url="file://" + store, num_workers=workers, image_size=32, progress=False
)
keys = []
for batch in ds.iter_engine_batches():
    keys.extend(batch.keys)
print(json.dumps({"images": len(keys), "keys": keys[:3], "unique": len(set(keys))}))
"""


def build_store(root: Path, copies: int = COPIES) -> Path:
    from pixcrawler._demo_data import build_digits
    from pixcrawler_engine.sources._pack import pack

    src = build_digits(root / "digits-src")
    files = sorted(p for p in src.rglob("*.png"))
    lines = [
        json.dumps({"file": str(f.relative_to(root)), "label": f.parent.name, "copy": c})
        for c in range(copies)
        for f in files
    ]
    listing = root / "digits.jsonl"
    listing.write_text("\n".join(lines) + "\n")
    store = root / "store"
    pack(listing, store, "digits", chunk_size=CHUNK)
    return store


def consume(store: Path, limit: int, batch: int, workers: int = 2) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CONSUMER, str(store), str(limit), str(batch), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def marginal(store: Path, total: int, batch: int, rounds: int) -> dict[str, Any]:
    small_n = 5000
    per_round = []
    for _ in range(rounds):  # interleaved: small, big, small, big, ...
        small, big = consume(store, small_n, batch), consume(store, total + 1, batch)
        n = big["images"] - small["images"]
        per_round.append(
            {
                role: (big.get(role, 0.0) - small.get(role, 0.0)) / n * 1e6
                for role in ("supervisor", "zygote", "consumer", "worker")
            }
        )
    result = {
        role: statistics.median(r[role] for r in per_round)
        for role in ("supervisor", "zygote", "consumer", "worker")
    }
    result["supervisor_side"] = statistics.median(r["supervisor"] + r["zygote"] for r in per_round)
    serial = max(result["supervisor_side"], result["consumer"])
    result["ceiling_img_s"] = 1e6 / serial if serial > 0 else float("inf")
    result["rounds"] = per_round
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pxc-bench-") as tmp:
        store = build_store(Path(tmp))
        total = 1797 * COPIES
        consume(store, 2000, 64)  # warm-up
        result: dict[str, Any] = {
            "what": f"digits 32x32 PNG x{COPIES} ({total} images, chunks of {CHUNK}), 2 workers",
            "machine": describe_machine(),
            "unit": "CPU microseconds per image at the margin (5,000 vs all images)",
            "batch_64": marginal(store, total, 64, args.rounds),
            "batch_16": marginal(store, total, 16, args.rounds),
            "oversubscribed": {},
        }
        for workers in (4, 8, 16):
            out = subprocess.run(
                [sys.executable, "-c", ORDER, str(store), str(workers)],
                capture_output=True,
                text=True,
                check=True,
            )
            run = json.loads(out.stdout)
            result["oversubscribed"][str(workers)] = {
                "images": run["images"],
                "every_sample_once": run["images"] == total == run["unique"],
            }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("machine",)}
    for key in ("batch_64", "batch_16"):
        summary[key] = {k: round(v, 1) for k, v in result[key].items() if k != "rounds"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
