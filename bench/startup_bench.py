"""Start-up of one stream: time to the first batch, and the processes a stream costs.

Each round runs a fresh interpreter (a user's script) that reads a `file://` job of 640x480-class
photos to 224x224 with 2 workers, and reports, from its own clock:
- `script_s`: from the interpreter's start (its creation time, from /proc) to the first batch;
- `stream_s`: from `Stream(...)` to the first batch;
- the processes under the script once the first batch is in (supervisor, zygote, workers).
Then, in another fresh interpreter per round, a `Dataset`'s second epoch with `warm_start` on
and off (NOTE [spare] in `runtime._launch`), interleaved: `epoch2_first_s`, from the pass's
call to its first batch of 64, and `epoch2_full` (img/s) against `steady` (after its first batch).
A warm-up round goes first (the page cache), then `--rounds` rounds; medians are quoted.
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

from bench._util import build_bench_store, describe_machine

SCRIPT = """
import json, os, sys, time
import psutil
began = psutil.Process().create_time()
from pixcrawler_engine import DecodePolicy, EngineConfig, JobClient, JobSource, Stream
client = JobClient("file://" + sys.argv[1], None)
source = JobSource(client, client.get_job(sys.argv[2]))
config, policy = EngineConfig(num_workers=2), DecodePolicy(image_size=(224, 224))
t0 = time.perf_counter()
stream = Stream(source, config=config, policy=policy)
it = iter(stream)
batch = next(it)
first = time.perf_counter()
now = time.time()
family = psutil.Process().children(recursive=True)
print(json.dumps({
    "script_s": now - began,
    "stream_s": first - t0,
    "processes": len(family),
    "commands": sorted({" ".join(p.cmdline())[:60] for p in family}),
}))
stream.close()
"""


EPOCHS = """
import json, sys, time
from pixcrawler import load_dataset
ds = load_dataset(sys.argv[2], base_url="file://" + sys.argv[1], image_size=224, num_workers=2,
                  progress=False, warm_start=sys.argv[3] == "1")
for _ in ds.iter_batches(64):
    pass
time.sleep(0.5)  # a validation step, a checkpoint: anything between two epochs
t0 = time.perf_counter()
n = first = 0
for images, _ in ds.iter_batches(64):
    n += len(images)
    if not first:
        first, first_n = time.perf_counter() - t0, n
seconds = time.perf_counter() - t0
ds.close()
print(json.dumps({
    "epoch2_first_s": first,
    "epoch2_full": n / seconds,
    "epoch2_steady": (n - first_n) / (seconds - first),
}))
"""


def one(store: Path, job: str, script: str = SCRIPT, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", script, str(store), job, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pxc-bench-") as tmp:
        store, job = build_bench_store(Path(tmp), copies=1, n_photos=1000)
        one(store, job)  # warm-up: the page cache, .pyc files
        runs = [one(store, job) for _ in range(args.rounds)]
        epochs: dict[str, list[dict[str, Any]]] = {"warm": [], "cold": []}
        for _ in range(args.rounds):
            for name, flag in (("warm", "1"), ("cold", "0")):
                epochs[name].append(one(store, job, EPOCHS, flag))
    second = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in epochs.items()
    }
    for row in second.values():
        row["epoch2_full_over_steady"] = row["epoch2_full"] / row["epoch2_steady"]
    result = {
        "what": "first batch of a file:// job (640x480 JPEGs -> 224x224, 2 workers, batch 64)",
        "machine": describe_machine(),
        "rounds": args.rounds,
        "script_s_median": statistics.median(r["script_s"] for r in runs),
        "stream_s_median": statistics.median(r["stream_s"] for r in runs),
        "processes": runs[-1]["processes"],
        "commands": runs[-1]["commands"],
        "second_epoch": {
            "what": "2nd pass of a Dataset, iter_batches(64), 0.5 s after the 1st",
            **second,
        },
        "runs": runs,
        "epoch_runs": epochs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("runs")}, indent=2))


if __name__ == "__main__":
    main()
