"""export-images: the ARTeFACT tool's layout, its CLI, bad samples, and memory on huge images.

The exports run on ARTeFACT-shaped shards written by `datasets` (`artefact_data`); the CLI runs
as a real subprocess. The memory test exports a dataset holding a real 133-megapixel JPEG and
its full-resolution mask, and samples the RSS of the whole process tree (CLI, supervisor, fork
server, workers) while it runs.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from artefact_data import Artefact, build
from PIL import Image

from pixcrawler_engine import DecodeError, SampleWarning
from pixcrawler_engine.export._images import export_images
from pixcrawler_engine.export._segmentation import PALETTE, visualization
from pixcrawler_engine.sources.parquet._source import ParquetSource

MEMORY_LIMIT = 1 << 30  # 1 GiB, summed over every process of the export
CLI = [sys.executable, "-m", "pixcrawler", "export-images"]


@pytest.fixture(scope="module")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> Artefact:
    return build(tmp_path_factory.mktemp("artefact"), n_small=13, rows_per_group=4)


def run_cli(*args: str | Path | int, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_export_writes_the_tools_layout(artefact: Artefact, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = export_images(ParquetSource(artefact.glob), out, max_side=256, progress=False)
    assert (result.samples, result.failed) == (13, 0)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert len(names) == 13 and names[0] == "00000_af00000.png"
    for folder in ("annotations", "annotations_rgb"):
        assert sorted(p.name for p in (out / folder).iterdir()) == names
    assert len(list((out / "visualizations").iterdir())) == 10
    assert not list(out.rglob(".*.tmp"))  # every file renamed once complete
    with open(out / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(13))
    assert [r["id"] for r in rows] == list(artefact.ids)
    assert {"material", "content", "type", "original_width", "classes"} <= set(rows[0])
    source_rows = pq.read_table(artefact.shards[0]).to_pylist()
    for row, src in zip(rows, source_rows, strict=False):
        image, mask = png(out / row["image"]), png(out / row["annotation"])
        assert max(image.shape[:2]) <= 256 and image.shape[:2] == mask.shape
        assert (int(row["original_width"]), int(row["original_height"])) == artefact.sizes[
            int(row["index"])
        ]
        with Image.open(io.BytesIO(src["annotation"]["bytes"])) as im:
            nearest = np.asarray(im.resize(mask.shape[::-1], Image.Resampling.NEAREST))
        np.testing.assert_array_equal(mask, nearest)  # values kept, geometry of its image
        np.testing.assert_array_equal(png(out / row["annotation_rgb"]), PALETTE[mask])
        assert row["classes"] == " ".join(map(str, np.unique(mask)))
    stats = json.loads((out / "statistics.json").read_text())
    assert (stats["samples"], stats["failed"], stats["samples_with_masks"]) == (13, 0, 13)
    classes = stats["class_distribution"]
    assert set(classes) <= {str(c) for c in [*range(16), 255]} and classes["255"]["name"]
    total = sum(int(png(out / r["annotation"]).size) for r in rows)
    assert sum(c["pixels"] for c in classes.values()) == total
    counts = stats["metadata_counts"]
    assert set(counts) == {"material", "content", "type"}  # the id names, it does not describe
    assert sum(counts["material"].values()) == 13
    assert stats["sizes"]["original_width"]["max"] == max(w for w, _ in artefact.sizes)


def test_visualization_has_four_panels() -> None:
    image = np.full((20, 30, 3), 100, np.uint8)
    mask = np.full((20, 30), 255, np.uint8)
    mask[5:10, 5:10] = 3
    vis = visualization(image, mask)
    assert vis.shape == (20, 4 * 30 + 3 * 4, 3)
    overlay = vis[:, 3 * 34 :]
    np.testing.assert_array_equal(overlay[0, 0], image[0, 0])  # background: the image
    assert (overlay[7, 7] != image[7, 7]).any()  # damage: blended with its colour


def test_cli_max_samples(artefact: Artefact, tmp_path: Path) -> None:
    done = run_cli(artefact.glob, "--output", tmp_path, "--max-samples", 5, "--num-workers", 1)
    assert done.returncode == 0, done.stderr
    assert "Exported 5 samples" in done.stdout
    assert "mask column 'annotation'" in done.stderr
    assert len(list((tmp_path / "images").iterdir())) == 5
    assert json.loads((tmp_path / "statistics.json").read_text())["requested"] == 5


def test_cli_usage_and_refusals(artefact: Artefact, tmp_path: Path) -> None:
    both = run_cli(artefact.glob, "-o", tmp_path, "--max-samples", 1, "--all")
    assert both.returncode == 2 and "--max-samples N or --all" in both.stderr
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"], "material": ["Paper"]}), plain)
    refused = run_cli(plain, "-o", tmp_path / "x")
    assert refused.returncode == 1 and "no image column" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = run_cli(tmp_path / "nothing.parquet", "-o", tmp_path / "y")
    assert missing.returncode == 1 and "no Parquet file" in missing.stderr


def test_bad_samples_are_listed_and_the_rest_is_exported(tmp_path: Path) -> None:
    import datasets

    rows = []
    for i in range(4):
        image, mask = io.BytesIO(), io.BytesIO()
        Image.new("RGB", (30, 20), (40 * i, 80, 120)).save(image, "PNG")
        Image.new("L", (30, 20), 255 if i else 3).save(mask, "PNG")
        rows.append({"id": f"s{i}", "image": {"bytes": image.getvalue(), "path": None},
                     "annotation": {"bytes": mask.getvalue(), "path": None}})  # fmt: skip
    rows[2]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "annotation": datasets.Image()}
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.warns(SampleWarning, match=r"sample 'd.parquet:2'"):
        result = export_images(
            ParquetSource(tmp_path / "d.parquet"), tmp_path / "o", progress=False
        )
    assert (result.samples, result.failed) == (3, 1)
    stats = json.loads((tmp_path / "o" / "statistics.json").read_text())
    assert stats["failures"][0]["key"] == "d.parquet:2"
    assert "PNG" in stats["failures"][0]["error"]
    assert sorted(p.name for p in (tmp_path / "o" / "images").iterdir()) == [
        "00000_s0.png", "00001_s1.png", "00003_s3.png"
    ]  # fmt: skip
    with pytest.raises(DecodeError, match=r"d\.parquet:2"):
        export_images(
            ParquetSource(tmp_path / "d.parquet"), tmp_path / "r", on_error="raise", progress=False
        )
    failing = run_cli(tmp_path / "d.parquet", "-o", tmp_path / "c", "--on-error", "raise")
    assert failing.returncode == 1 and "d.parquet:2" in failing.stderr


def _peak_tree_rss(proc: subprocess.Popen[bytes]) -> int:
    """Samples the RSS summed over `proc` and its descendants until it exits; the peak."""
    root, peak, done = psutil.Process(proc.pid), 0, threading.Event()
    while proc.poll() is None:
        total = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in tree:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        done.wait(0.02)
    return peak


def test_a_133_megapixel_jpeg_exports_under_1_gib(tmp_path: Path) -> None:
    """The seed tool's crash: a 133 MP photo with its full-size mask, in bounded memory."""
    data = build(tmp_path / "huge", n_small=6, huge=("jpeg",), rows_per_group=4)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, data.glob, "-o", str(out), "--num-workers", "1", "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = _peak_tree_rss(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert peak < MEMORY_LIMIT, f"peak RSS over the process tree {peak / 2**20:.0f} MiB"
    (huge,) = data.huge_ids
    image = png(next((out / "images").glob(f"*_{huge}.png")))
    mask = png(next((out / "annotations").glob(f"*_{huge}.png")))
    assert image.shape == (695, 1024, 3) and mask.shape == (695, 1024)
    assert set(np.unique(mask)) <= set(range(16)) | {255}
