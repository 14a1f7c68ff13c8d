"""The preview grid (`Dataset.preview`, `pixcrawler preview`) and the demo's next steps.

The grid is checked by its geometry, its row labels (a `pixcrawler:rows` text chunk) and its
pixels: tiles are the engine's decode at tile size, masks are tinted in. The demo's last lines
are run exactly as printed: the server command, the Python one-liner, the training script.
"""

from __future__ import annotations

import io
import json
import shlex
import signal
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ServerProcess
from PIL import Image
from skimage import data as skdata

from pixcrawler import _demo_data, load_dataset
from pixcrawler._demo_next import free_port, next_steps
from pixcrawler._preview import _GAP, _LABEL_WIDTH, _TITLE
from pixcrawler.cli import main
from pixcrawler_engine.export._segmentation import PALETTE
from pixcrawler_engine.sources._pack import pack

TILE = 64


def _rows(path: Path) -> list[str]:
    with Image.open(path) as im:
        return json.loads(im.info["pixcrawler:rows"])


def _tile(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    top, left = _TITLE + row * (TILE + _GAP), _LABEL_WIDTH + col * (TILE + _GAP)
    return grid[top : top + TILE, left : left + TILE]


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Parquet segmentation dataset (`datasets`): 2 classes of photos, masks of ids 1 and 255."""
    rows = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        photo, mask = io.BytesIO(), io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 64)).save(photo, "PNG")
        ids = np.full((64, 64), 255, np.uint8)
        ids[:16] = 1  # the top quarter is class 1; the rest is background
        Image.fromarray(ids).save(mask, "PNG")
        rows.append({"image": {"bytes": photo.getvalue(), "path": None},
                     "mask": {"bytes": mask.getvalue(), "path": None}, "label": i % 2})  # fmt: skip
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["even", "odd"])})  # fmt: skip
    path = tmp_path_factory.mktemp("masked") / "seg.parquet"
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def test_dataset_preview_of_a_job(server: ServerProcess, tmp_path: Path) -> None:
    with load_dataset("demo", api_key=server.api_key, base_url=server.url, progress=False) as ds:
        path = ds.preview(tmp_path / "grid.png", n=3, tile=TILE)
        labels = list(ds.info.labels)
    assert _rows(path) == labels  # a row per class, in the job's class order
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape[0] == _TITLE + len(labels) * (TILE + _GAP) + _GAP
    assert grid.shape[1] == _LABEL_WIDTH + 3 * (TILE + _GAP) + _GAP
    for row in range(len(labels)):
        for col in range(3):
            assert (_tile(grid, row, col) != 255).any()  # every class has 3 samples


def test_masks_are_overlaid(masked: Path, tmp_path: Path) -> None:
    with load_dataset(str(masked), progress=False) as ds:
        path = ds.preview(tmp_path / "grid.png", n=2, tile=TILE)
    assert _rows(path) == ["even", "odd"]
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    with load_dataset(str(masked), image_size=TILE, progress=False) as plain:
        photo = next(iter(plain))[0].astype(int)  # the first sample, without its mask
    tile = _tile(grid, 0, 0)
    np.testing.assert_array_equal(tile[32:], photo[32:])  # background: the photo as it is
    tinted = photo[:16] * 0.55 + PALETTE[1] * 0.45
    assert np.abs(tile[:16] - tinted).max() <= 1  # class 1: tinted in its colour


def test_cli_preview_of_a_job_and_parquet_data(
    server: ServerProcess, masked: Path, tmp_path: Path
) -> None:
    out = tmp_path / "both.png"
    env = {"PIXCRAWLER_API_KEY": server.api_key, "PIXCRAWLER_BASE_URL": server.url}
    result = CliRunner().invoke(
        main, ["preview", "demo", str(masked), "-o", str(out), "-n", "2", "--tile", "32"], env=env
    )
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.stdout and out.is_file()
    rows = _rows(out)
    demo_labels = json.loads((server.store / "jobs" / "demo" / "job.json").read_text())["labels"]
    # Each row says which dataset it comes from.
    assert rows == [f"demo · {c}" for c in demo_labels] + [
        f"{masked} · {c}" for c in ("even", "odd")
    ]
    missing = CliRunner().invoke(main, ["preview", "nope", "-o", str(out)], env=env)
    assert missing.exit_code == 1 and "job 'nope' not found" in missing.stderr


def test_the_demos_next_steps_work_as_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commands `make demo` prints last, run as printed from where the demo ran."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo-out"
    src = _demo_data.build_digits(out / "src" / "digits", limit=12)
    store = out / "store"
    pack(src, store, "digits", chunk_size=50)
    text = next_steps(out, store, free_port(0))
    commands = [line.strip() for line in text.splitlines() if line.startswith("       ")]
    assert len(commands) == 3 and "serve" in commands[0] and "train_tiny.py" in commands[2]
    server = subprocess.Popen(shlex.split(commands[0]), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert "with no API key" in first, first
        loaded = subprocess.run(shlex.split(commands[1]), capture_output=True, text=True,
                                timeout=120, check=False)  # fmt: skip
        assert loaded.returncode == 0, loaded.stderr
        assert "Dataset: digits" in loaded.stdout and "(120, 32, 32, 3)" in loaded.stdout
        trained = subprocess.run(shlex.split(commands[2]), capture_output=True, text=True,
                                 timeout=300, check=False)  # fmt: skip
        assert trained.returncode == 0, trained.stderr
        assert "epoch 3: loss" in trained.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()
