"""Decode speed side by side (issue #14): the engine beside the usual pipelines, one run.

Run as `python -m bench.speed_bench [--out results.json]`. On the 1,500-photo benchmark set
(640x480-class JPEGs, `bench._photo_sets`) to 224x224 RGB, each case in a fresh process,
the cases interleaved round by round (medians quoted):

    loop_draft    one process: Pillow `draft` + BILINEAR resize (the usual fast path, per core)
    loop_general  one process: `decode_image` on its general path (OpenCV off)
    loop_fast     one process: `decode_image` on the chosen fast path (per-core rate)
    engine        `load_dataset(..., num_workers=2).iter_batches(64)`
    dataloader    torch DataLoader(num_workers=2, batch_size=64) over the files,
                  `Image.open().convert("RGB").resize((224, 224), BILINEAR)` (torchvision's
                  Resize on a PIL image)
    hf_streaming  `datasets.load_dataset("imagefolder", streaming=True)`, the same transform

"steady" is images/s after the first batch; "full" is the whole pass from the call that
starts it (start-up included); `first` is the first batch's latency.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench._util import describe_machine

SIZE = (224, 224)
WORKERS = 2
CASES = ("loop_draft", "loop_general", "loop_fast", "engine", "dataloader", "hf_streaming")


def _files(files: Path) -> list[Path]:
    return sorted(p for p in files.rglob("*") if p.is_file() and not p.name.startswith("."))


def timed(start: float, batches: Iterable[int]) -> dict[str, float]:
    first = first_n = None
    n = 0
    for size in batches:
        n += size
        if first is None:
            first, first_n = time.perf_counter() - start, n
    seconds = time.perf_counter() - start
    first = first or seconds
    steady = (n - (first_n or 0)) / (seconds - first) if seconds > first else 0.0
    return {"images": n, "full": n / seconds, "steady": steady, "first": first}


def _pil(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))


def loop(files: list[Path], how: str) -> dict[str, float]:
    from PIL import Image

    from pixcrawler_engine._config import DecodePolicy
    from pixcrawler_engine.decode import _fast
    from pixcrawler_engine.decode._image import decode_image

    if how == "general":
        _fast.opencv = lambda: None  # type: ignore[assignment]
    policy = DecodePolicy(image_size=SIZE)
    datas = [p.read_bytes() for p in files]

    def draft(data: bytes) -> Any:
        import io

        im = Image.open(io.BytesIO(data))
        im.draft("RGB", SIZE)
        return im.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR)

    start = time.perf_counter()
    for data in datas:
        draft(data) if how == "draft" else decode_image(data, policy)
    seconds = time.perf_counter() - start
    return {"images": len(datas), "full": len(datas) / seconds, "steady": len(datas) / seconds}


def run_case(case: str, store: Path, job: str, files: Path) -> dict[str, float]:
    if case.startswith("loop_"):
        return loop(_files(files), case.split("_", 1)[1])
    if case == "engine":
        from pixcrawler import load_dataset

        start = time.perf_counter()
        ds = load_dataset(
            job, base_url=store.as_uri(), image_size=SIZE, num_workers=WORKERS, progress=False
        )
        return timed(start, (len(x) for x, _ in ds.iter_batches(batch_size=64)))
    if case == "dataloader":
        import numpy as np
        import torch
        from torch.utils.data import DataLoader

        torch.set_num_threads(1)
        paths = _files(files)

        class Files(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(paths)

            def __getitem__(self, i: int) -> Any:
                return torch.from_numpy(np.ascontiguousarray(_pil(paths[i])))

        start = time.perf_counter()
        loader = DataLoader(Files(), batch_size=64, num_workers=WORKERS)
        return timed(start, (len(b) for b in loader))
    if case == "hf_streaming":
        import datasets
        import numpy as np
        from PIL import Image

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        start = time.perf_counter()
        stream = datasets.load_dataset(
            "imagefolder", data_dir=str(files), split="train", streaming=True
        )

        def batches() -> Iterable[int]:
            for batch in stream.iter(batch_size=64):
                images = [
                    np.asarray(im.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))
                    for im in batch["image"]
                ]
                yield len(images)

        return timed(start, batches())
    raise ValueError(case)


def fresh(case: str, work: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.speed_bench", "--case", case, "--work", str(work)]
    load = os.getloadavg()[0]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), load_avg_1min=load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pxc-speed")
    args = parser.parse_args()
    from bench._photo_sets import build_set

    store, job, files = build_set(args.work, "bench")
    if args.case:
        print(json.dumps(run_case(args.case, store, job, files)))
        return
    available = [c for c in CASES if c != "hf_streaming" or _has("datasets")]
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in available}
    for _ in range(args.repeats):
        for case in available:
            runs[case].append(fresh(case, args.work))
            print(case, runs[case][-1], flush=True)
    med = {
        c: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "images"}
        for c, rs in runs.items()
    }
    engine, loader = med["engine"], med["dataloader"]
    ratios = {
        "engine_steady_over_dataloader_steady": engine["steady"] / loader["steady"],
        "engine_full_over_dataloader_full": engine["full"] / loader["full"],
        "engine_full_over_steady": engine["full"] / engine["steady"],
        "engine_steady_over_workers_x_loop_fast": engine["steady"]
        / (WORKERS * med["loop_fast"]["steady"]),
        "loop_fast_over_loop_draft": med["loop_fast"]["steady"] / med["loop_draft"]["steady"],
        "loop_fast_over_loop_general": med["loop_fast"]["steady"] / med["loop_general"]["steady"],
    }
    if "hf_streaming" in med:
        ratios["engine_steady_over_hf_steady"] = engine["steady"] / med["hf_streaming"]["steady"]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "photos": len(_files(files)),
        "medians": med,
        "ratios": ratios,
        "runs": runs,
    }
    for case, row in med.items():
        print(f"{case:14} " + "  ".join(f"{k} {v:8.2f}" for k, v in row.items()))
    for name, value in ratios.items():
        print(f"{name:42} {value:5.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
