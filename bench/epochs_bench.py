"""The training feed's targets: epoch 2 from the cache, the shuffle's cost, resume's first batch.

A job of real photos (640x480-class JPEGs, chunks of 500 as `make demo` packs them; `--chunk`
changes it) is served over HTTP by the real
`pixcrawler serve` on loopback; each case is a fresh process reading it to 224x224 with
2 workers and `iter_batches(64)`:
- `cold`: epoch 1 with an empty cache (every chunk over HTTP);
- `warm`: epoch 2 of the same process (every chunk from the cache), in dataset order;
- `warm_shuffled`: the same, with `shuffle=True` (the block shuffle, window 8);
- `first_batch` / `resume_90`: a fresh process's first batch of an epoch from the cache,
  and its first batch with `start=` 90 % of the epoch.
Rounds are interleaved; medians are quoted, with the ratios the issue sets targets on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import describe_machine
from pixcrawler._demo import start_server, stop_server

SCRIPT = """
import json, sys, time
from pixcrawler import load_dataset
url, cache, case = sys.argv[1], sys.argv[2], sys.argv[3]
ds = load_dataset("photos", base_url=url, num_workers=2, image_size=224, progress=False,
                  cache_dir=cache, shuffle=case == "warm_shuffled", seed=1)
out = {}
def epoch(**kw):
    t0, first, n = time.perf_counter(), None, 0
    for images, _ in ds.iter_batches(64, **kw):
        n += len(images)
        if first is None:
            first = time.perf_counter() - t0
            if case in ("first_batch", "resume_90"):
                return n, first, first
    return n, time.perf_counter() - t0, first
if case == "cold":
    n, s, _ = epoch()
    out = {"images": n, "img_s": n / s}
elif case in ("warm", "warm_shuffled"):
    epoch()  # epoch 1 fills the cache (it is warm already: the cold case ran first)
    n, s, _ = epoch()
    out = {"images": n, "img_s": n / s}
else:
    start = int(len(ds) * 0.9) if case == "resume_90" else 0
    n, s, first = epoch(start=start)
    out = {"first_batch_s": first}
print(json.dumps(out))
"""


def _store(root: Path, n_photos: int, chunk: int) -> Path:
    from pixcrawler._demo_data import build_photos
    from pixcrawler_engine.sources._pack import pack

    src = root / "photos"
    build_photos(src, n=n_photos)
    store = root / "store"
    pack(src, store, "photos", chunk_size=chunk, verify="header")
    return store


def _run(url: str, cache: Path, case: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, url, str(cache), case],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return dict(json.loads(out.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--photos", type=int, default=1200)
    parser.add_argument("--chunk", type=int, default=500)
    args = parser.parse_args()
    cases = ("warm", "warm_shuffled", "first_batch", "resume_90")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in ("cold", *cases)}
    with tempfile.TemporaryDirectory(prefix="pxc-bench-epochs-") as tmp:
        store = _store(Path(tmp), args.photos, args.chunk)
        proc, url = start_server(store)
        try:
            for r in range(args.rounds):
                cache = Path(tmp) / f"cache-{r}"
                runs["cold"].append(_run(url, cache, "cold"))
                for case in cases:
                    runs[case].append(_run(url, cache, case))
                    time.sleep(0.2)
        finally:
            stop_server(proc)

    def med(case: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[case])

    result = {
        "what": f"photos over HTTP (pixcrawler serve, loopback), chunks of {args.chunk}, "
        "224x224, 2 workers, batch 64",
        "machine": describe_machine(),
        "rounds": args.rounds,
        "images": runs["cold"][0]["images"],
        "cold_img_s": med("cold", "img_s"),
        "warm_img_s": med("warm", "img_s"),
        "warm_shuffled_img_s": med("warm_shuffled", "img_s"),
        "epoch2_over_epoch1": med("warm", "img_s") / med("cold", "img_s"),
        "shuffle_cost": 1 - med("warm_shuffled", "img_s") / med("warm", "img_s"),
        "first_batch_s": med("first_batch", "first_batch_s"),
        "resume_90_first_batch_s": med("resume_90", "first_batch_s"),
        "resume_over_fresh": med("resume_90", "first_batch_s")
        / med("first_batch", "first_batch_s"),
        "targets": {
            "epoch2_over_epoch1": ">= 1.3",
            "shuffle_cost": "<= 0.10",
            "resume_over_fresh": "<= 2",
        },
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=2))


if __name__ == "__main__":
    main()
