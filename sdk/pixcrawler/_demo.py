"""`make demo`: the main job end to end on the bundled demo data and a local server.

1. build demo images from real photos and digits shipped in scikit-image / scikit-learn
2. pack them into a local job store (`pixcrawler pack`)
3. start the reference server (`pixcrawler serve`) on a free loopback port
4. load each job with the SDK, download, decode (224x224) and export it to Parquet through
   the engine's worker processes, with a progress bar
5. read the Parquet back, draw a preview grid of decoded images and their labels
6. print a summary and stop the server
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def _start_server(store: Path, key: str) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, PIXCRAWLER_API_KEY=key)  # by environment: never on a command line
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


def _stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _export(job: str, url: str, key: str, target: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from pixcrawler import load_dataset
    from pixcrawler_engine import DecodePolicy, EngineConfig, JobSource
    from pixcrawler_engine.export._driver import export_job
    from pixcrawler_engine.sources._jobapi import JobClient

    dataset = load_dataset(job, api_key=key, base_url=url, image_size=SIZE)
    info = dataset.info
    client = JobClient(url, key)
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


def _preview(parquet_dirs: list[Path], out: Path, per_class: int = 2) -> Path:
    """A grid of decoded images read back from the Parquet export: a few of every class."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    tiles: list[tuple[Image.Image, str]] = []
    for folder in parquet_dirs:
        shown: dict[Any, int] = {}
        for shard in sorted((folder / "data").glob("*.parquet")):
            parquet = pq.ParquetFile(shard)
            meta = parquet.schema_arrow.metadata or {}
            info = json.loads(meta.get(b"huggingface", b"{}")).get("info", {})
            names = info.get("features", {}).get("label", {}).get("names")
            for group in range(parquet.num_row_groups):
                labels = parquet.read_row_group(group, columns=["label"])["label"].to_pylist()
                rows = []
                for row, label in enumerate(labels):
                    if shown.get(label, 0) < per_class:
                        shown[label] = shown.get(label, 0) + 1
                        rows.append(row)
                if not rows:
                    continue
                images = parquet.read_row_group(group, columns=["image"])["image"]
                for row in rows:
                    img = Image.open(io.BytesIO(images[row]["bytes"].as_py())).convert("RGB")
                    label = labels[row]
                    tiles.append((img, str(names[label]) if names else str(label)))
    cols = 8
    tile = 128
    grid_rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * tile, grid_rows * (tile + 16)), "white")
    draw = ImageDraw.Draw(grid)
    for n, (img, label) in enumerate(tiles):
        x, y = (n % cols) * tile, (n // cols) * (tile + 16)
        grid.paste(img.resize((tile, tile)), (x, y))
        draw.text((x + 4, y + tile + 2), label[:20], fill="black")
    path = out / "preview.png"
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = _pack_demo(out)
    key = secrets.token_urlsafe(16)
    server, url = _start_server(store, key)
    print(f"server: {url} (store {store})", flush=True)
    try:
        results = [_export(job, url, key, out / "parquet" / job) for job in JOBS]
    finally:
        _stop_server(server)
    preview = _preview([Path(r["parquet"]) for r in results], out)
    print("\nsummary")
    for r in results:
        print(
            f"  {r['job']:7s} {r['images']:5d} images in {r['chunks']} chunks, "
            f"{r['classes']} classes: {r['seconds']:.1f} s ({r['images_per_s']:.0f} img/s) "
            f"-> {r['parquet']}"
        )
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(f"preview: {preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
