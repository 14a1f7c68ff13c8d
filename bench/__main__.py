"""`make bench`: every benchmark in one go; JSON (and charts) under --out, quoted in the README."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SUITES = {
    "engine": ["-m", "bench.engine_bench", "--out", "{out}"],
    "decode": ["-m", "bench.decode_compare", "--out", "{out}/decode.json"],
    "speed": ["-m", "bench.speed_bench", "--out", "{out}/speed.json"],
    "parquet": ["-m", "bench.parquet_export", "--out", "{out}/parquet.json"],
    "artefact": ["-m", "bench.artefact_bench", "--out", "{out}/artefact.json"],
    "startup": ["-m", "bench.startup_bench", "--out", "{out}/startup.json"],
    "overhead": ["-m", "bench.overhead_bench", "--out", "{out}/overhead.json"],
    "adapters": ["-m", "bench.adapters_bench", "--out", "{out}/adapters.json"],
    "ray": ["-m", "bench.ray_bench", "--out", "{out}/ray.json"],
    "epochs": ["-m", "bench.epochs_bench", "--out", "{out}/epochs.json"],
    "scaling": ["-m", "bench.scaling_bench", "--out", "{out}/scaling.json"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--only", choices=sorted(SUITES), action="append")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only or list(SUITES):
        print(f"== {name}", flush=True)
        cmd = [sys.executable, *(a.format(out=args.out) for a in SUITES[name])]
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
