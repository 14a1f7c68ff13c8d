"""Start-up of one stream: time to the first batch, and the processes a stream costs.

Each round runs a fresh interpreter (a user's script) that reads a `file://` job of 640x480-class
photos to 224x224 with 2 workers, and reports, from its own clock:
- `script_s`: from the interpreter's start (its creation time, from /proc) to the first batch;
- `stream_s`: from `Stream(...)` to the first batch;
- the processes under the script once the first batch is in (supervisor, zygote, workers).
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


def one(store: Path, job: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(store), job], capture_output=True, text=True, check=True
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
    result = {
        "what": "first batch of a file:// job (640x480 JPEGs -> 224x224, 2 workers, batch 64)",
        "machine": describe_machine(),
        "rounds": args.rounds,
        "script_s_median": statistics.median(r["script_s"] for r in runs),
        "stream_s_median": statistics.median(r["stream_s"] for r in runs),
        "processes": runs[-1]["processes"],
        "commands": runs[-1]["commands"],
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
