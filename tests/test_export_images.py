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
from typing import Any

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
    assert set(classes) <= {str(c) for c in [*range(16), 255]}
    # ARTeFACT (told by its columns) gets ARTeFACT's class names.
    assert classes["255"]["name"] == "Background"
    assert all(classes[c]["name"] not in ("", c) for c in classes)
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
    with pytest.warns(SampleWarning, match=r"sample 's2' \(d\.parquet:2\)"):
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


# ---------------------------------------------------------------- any dataset, not only ARTeFACT


def _segmentation_parquet(folder: Path, rows: list[dict[str, Any]], **features: Any) -> Path:
    """A small segmentation dataset written by `datasets`: real photos, masks of ids 0-2."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    spec = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "mask": datasets.Image(),
         **features}
    )  # fmt: skip
    path = folder / "all.parquet"
    datasets.Dataset.from_list(rows, features=spec).to_parquet(str(path))
    return path


def _photo_and_mask(name: str, i: int) -> tuple[bytes, bytes]:
    from skimage import data as skdata

    photo = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((48, 32))
    mask = np.zeros((32, 48), np.uint8)
    mask[: 8 + i, :] = 1
    mask[20:, 30:] = 2
    image, annotation = io.BytesIO(), io.BytesIO()
    photo.save(image, "PNG")
    Image.fromarray(mask).save(annotation, "PNG")
    return image.getvalue(), annotation.getvalue()


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def street(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Not ARTeFACT: a ClassLabel column "scene", scalar columns, a list column, masks."""
    import datasets

    rows = []
    for i, name in enumerate(PHOTOS):
        image, mask = _photo_and_mask(name, i)
        rows.append({"id": f"img-{i}", "image": {"bytes": image, "path": None},
                     "mask": {"bytes": mask, "path": None}, "scene": i % 2,
                     "photographer": f"p{i}", "score": 0.5 * i, "tags": ["a", "b"]})  # fmt: skip
    return _segmentation_parquet(
        tmp_path_factory.mktemp("street") / "data",
        rows,
        scene=datasets.ClassLabel(names=["indoor", "outdoor"]),
        photographer=datasets.Value("string"),
        score=datasets.Value("float64"),
        tags=datasets.Sequence(datasets.Value("string")),
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_metadata_csv_has_the_label_and_every_scalar_column(street: Path, tmp_path: Path) -> None:
    for extra in ([], ["--label-column", "scene"]):
        out = tmp_path / f"o{len(extra)}"
        done = run_cli(street, "-o", out, "--num-workers", "1", "--no-progress", *extra)
        assert done.returncode == 0, done.stderr
        rows = _csv(out / "metadata.csv")
        assert [r["scene"] for r in rows] == ["indoor", "outdoor", "indoor", "outdoor"]
        assert [r["photographer"] for r in rows] == ["p0", "p1", "p2", "p3"]
        assert [float(r["score"]) for r in rows] == [0.0, 0.5, 1.0, 1.5]
        assert [r["id"] for r in rows] == ["img-0", "img-1", "img-2", "img-3"]
        assert "tags" not in rows[0]  # a list is not a scalar


def test_mask_classes_are_the_datasets_not_artefacts(street: Path, tmp_path: Path) -> None:
    def names(out: Path) -> dict[str, str]:
        stats = json.loads((out / "statistics.json").read_text())
        return {k: v["name"] for k, v in stats["class_distribution"].items()}

    plain = run_cli(street, "-o", tmp_path / "plain", "--no-progress")
    assert plain.returncode == 0, plain.stderr
    assert names(tmp_path / "plain") == {"0": "0", "1": "1", "2": "2"}  # not "Clean", "Peel"
    listed = tmp_path / "classes.txt"
    listed.write_text("road\nsky\ncar\n")
    given = run_cli(street, "-o", tmp_path / "given", "--mask-classes", listed, "--no-progress")
    assert given.returncode == 0, given.stderr
    assert names(tmp_path / "given") == {"0": "road", "1": "sky", "2": "car"}
    # The dataset's own id2label.json (at its root, the shards in data/) is read by itself.
    root = street.parent.parent
    (root / "id2label.json").write_text(json.dumps({"0": "floor", "1": "wall", "2": "lamp"}))
    try:
        own = run_cli(street, "-o", tmp_path / "own", "--no-progress")
    finally:
        (root / "id2label.json").unlink()
    assert own.returncode == 0, own.stderr
    assert names(tmp_path / "own") == {"0": "floor", "1": "wall", "2": "lamp"}
    listed.write_text('{"x": "y"}')
    bad = run_cli(street, "-o", tmp_path / "bad", "--mask-classes", listed)
    assert bad.returncode == 1 and "mask class names must be" in bad.stderr


def test_each_bad_sample_is_one_line_naming_it(tmp_path: Path) -> None:
    rows = []
    for i, name in enumerate(PHOTOS):
        image, mask = _photo_and_mask(name, i)
        rows.append({"id": f"img-{i}", "image": {"bytes": image, "path": None},
                     "mask": {"bytes": mask, "path": None}})  # fmt: skip
    rows[1]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    path = _segmentation_parquet(tmp_path / "d", rows)
    done = run_cli(path, "-o", tmp_path / "o", "--no-progress")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "sample 'img-1' (all.parquet:1)" in warned[0], done.stderr
    assert "--on-error skip" in warned[0] and "on_error=" not in done.stderr
    assert "SampleWarning" not in done.stderr and "warnings.warn" not in done.stderr
    assert "Exported 3 samples" in done.stdout


def test_path_only_cells_are_read_beside_the_parquet_file(tmp_path: Path) -> None:
    """A Parquet file that stores image paths only (written by pyarrow, not `datasets`)."""
    folder = tmp_path / "ds"
    (folder / "imgs").mkdir(parents=True)
    paths: list[str] = []
    for i, name in enumerate(PHOTOS[:3]):
        image, _ = _photo_and_mask(name, i)
        (folder / "imgs" / f"{name}.png").write_bytes(image)
        paths.append(f"imgs/{name}.png")
    (tmp_path / "outside.png").write_bytes(_photo_and_mask("coffee", 0)[0])
    paths += ["imgs/missing.png", "../outside.png"]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = pa.array([{"bytes": None, "path": p} for p in paths], image_type)
    pq.write_table(pa.table({"image": cells, "label": list("abcde")}), folder / "paths.parquet")
    done = run_cli(folder / "paths.parquet", "-o", tmp_path / "o", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "Exported 3 samples" in done.stdout
    exported = png(tmp_path / "o" / "images" / "00000.png")
    np.testing.assert_array_equal(exported, png(folder / "imgs" / "astronaut.png"))
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2
    assert "'imgs/missing.png'" in warned[0] and "no file" in warned[0]
    assert "'../outside.png'" in warned[1] and "leaves the Parquet file's folder" in warned[1]
    # Nothing to export at all is a failure, not a silent success.
    pq.write_table(pa.table({"image": cells.slice(3)}), folder / "none.parquet")
    none = run_cli(folder / "none.parquet", "-o", tmp_path / "n", "--no-progress")
    assert none.returncode == 1 and "no sample was exported" in none.stderr, none.stderr
