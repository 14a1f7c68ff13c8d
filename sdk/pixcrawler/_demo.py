"""`make demo`: the main job end to end on the bundled demo data and a local server.

1. build demo images from real photos and digits shipped in scikit-image / scikit-learn
2. pack them into a local job store (`pixcrawler pack`)
3. start the reference server (`pixcrawler serve`) on a free loopback port (no API key: a
   loopback server needs none)
4. load each job with the SDK, download, decode (224x224) and export it to Parquet through
   the engine's worker processes, with a progress bar
5. draw a preview grid of both jobs (`Dataset.preview`'s grid, a row per job and class)
6. print a summary, stop the server, and print the commands a user runs next: serve the
   store, load a job in Python, train a tiny model (`train_tiny.py`, written beside)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pixcrawler._demo_next import free_port, next_steps

__all__ = ["main"]

JOBS = ("photos", "digits")
SIZE = (224, 224)


def _pack_demo(out: Path) -> Path:
    from pixcrawler._demo_data import build_digits, build_photos
    from pixcrawler_engine.sources._pack import pack

    store = out / "store"
    sources = {"photos": lambda d: build_photos(d, n=1200), "digits": build_digits}
    for job, build in sources.items():
        if (store / "jobs" / job / "job.json").exists():
            continue
        src = out / "src" / job
        if not src.exists():
            print(f"building demo images: {job}", flush=True)
            build(src)
        pack(src, store, job, chunk_size=500)
    return store


def start_server(store: Path) -> tuple[subprocess.Popen[str], str]:
    # On loopback no key is needed; a key in the caller's environment would turn auth on.
    env = {k: v for k, v in os.environ.items() if k != "PIXCRAWLER_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixcrawler", "serve", str(store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if " on http" not in line:
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _export(job: str, url: str, target: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from pixcrawler import load_dataset
    from pixcrawler_engine import DecodePolicy, EngineConfig, JobSource
    from pixcrawler_engine.export._driver import export_job
    from pixcrawler_engine.sources._jobapi import JobClient

    dataset = load_dataset(job, base_url=url, image_size=SIZE)
    info = dataset.info
    client = JobClient(url, None)
    source = JobSource(client, client.get_job(job))
    start = time.perf_counter()
    with tqdm(total=info.num_images, desc=f"{job}: download, decode, export", unit="img") as bar:

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        result = export_job(
            source,
            target,
            format="parquet",
            policy=DecodePolicy(image_size=SIZE),
            config=EngineConfig(),
            progress=progress,
        )
    seconds = time.perf_counter() - start
    source.close()
    dataset.close()
    return {
        "job": job,
        "images": info.num_images,
        "chunks": info.num_chunks,
        "classes": len(info.labels),
        "seconds": round(seconds, 2),
        "images_per_s": round(info.num_images / seconds, 1),
        "parquet": str(result.path),
    }


def _preview(url: str, out: Path) -> Path:
    """The grid of both jobs: a row per job and class, as `pixcrawler preview` draws it."""
    from pixcrawler import load_dataset
    from pixcrawler._preview import draw_preview

    datasets = [(job, load_dataset(job, base_url=url, progress=False)) for job in JOBS]
    try:
        return draw_preview(datasets, out / "preview.png", n=6, tile=80)
    finally:
        for _, dataset in datasets:
            dataset.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = _pack_demo(out)
    server, url = start_server(store)
    print(f"server: {url} (store {store})", flush=True)
    try:
        results = [_export(job, url, out / "parquet" / job) for job in JOBS]
        preview = _preview(url, out)
    finally:
        stop_server(server)
    print("\nsummary")
    for r in results:
        print(
            f"  {r['job']:7s} {r['images']:5d} images in {r['chunks']} chunks, "
            f"{r['classes']} classes: {r['seconds']:.1f} s ({r['images_per_s']:.0f} img/s) "
            f"-> {r['parquet']}"
        )
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"preview: {preview} (a row per job and class)")
    print(next_steps(out, store, free_port()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
