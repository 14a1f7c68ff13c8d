"""Helpers for the specification-example tests: the jobs, the server, and what the examples assume.

`run(code, server, ...)` executes one example as the specification prints it, with only its
job ids and keys swapped for real ones (and, where a test says so, `epochs=10` / `range(10)`
cut to keep the suite fast on two cores). The base URL comes from `PIXCRAWLER_BASE_URL` (the
`env` fixture), so the code itself needs no change. The helpers the examples call without
defining them (`process`, `train_model`, `process_batch`, `MyModel`, and `dataset` / `model`
for snippets that use one) are provided here.

Jobs served: "digits" (all 1,797 scikit-learn digits, 32x32, chunks of 500) for the
scikit-learn examples, "digits-small" (10 of each digit, chunks of 32) for the rest, and
"pending" (processing, 42%) for the error-handling examples.
"""

from __future__ import annotations

import re
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ServerProcess, start_server

from pixcrawler import _demo_data
from pixcrawler_engine.sources._pack import pack

SMALL = "digits-small"
# The accuracy each scikit-learn example printed, by classifier (reported by the tests).
SKLEARN_ACCURACY: dict[str, float] = {}
# Warnings that torch and Keras raise about the examples' own settings, not about the SDK:
# `num_workers=4` on this 2-core machine, Keras 3's `shuffle=True` default with a tf.data
# input, and Keras 3's advice against `input_shape=` in a Sequential layer.
TORCH_4_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
KERAS_SHUFFLE = pytest.mark.filterwarnings("ignore:`shuffle=True` was passed:UserWarning")
KERAS_INPUT_SHAPE = pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`:UserWarning")


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # an ImportError, or torchvision's RuntimeError beside a CPU-only torch
        return False
    return True


NEEDS_TORCHVISION = pytest.mark.skipif(
    not _torchvision_importable(),
    reason="torchvision is not installed: no torchvision build on PyPI imports beside this "
    "CPU-only torch 2.13 ('operator torchvision::nms does not exist')",
)


# ---- the server and its jobs ----------------------------------------------------------------


_STORES: dict[str, Path] = {}


def spec_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of the specification jobs, built once per session (both modules share it)."""
    if "store" not in _STORES:
        root = tmp_path_factory.mktemp("spec")
        digits = _demo_data.build_digits(root / "digits")
        small = _demo_data.build_digits(root / "small", limit=10)
        store = root / "store"
        pack(digits, store, "digits", chunk_size=500)
        pack(small, store, SMALL, chunk_size=32)
        pack(small, store, "pending", chunk_size=32, status="processing", progress=42)
        _STORES["store"] = store
    return _STORES["store"]


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Any]:
    """The real server over the specification jobs (imported by each example module)."""
    server: ServerProcess = start_server(spec_store(tmp_path_factory), keys_file)
    try:
        yield server
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.output()


@pytest.fixture
def env(spec_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The base URL (and, for `load_dataset("job_id")`, the key) from the environment."""
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", spec_server.url)
    monkeypatch.setenv("PIXCRAWLER_API_KEY", spec_server.api_key)
    return spec_server


# ---- helpers the examples assume ------------------------------------------------------------


class Calls:
    """Records what the example's user code received."""

    def __init__(self) -> None:
        self.images = 0
        self.batches: list[tuple[tuple[int, ...], int]] = []

    def process(self, *args: Any) -> None:
        image = args[0]
        assert isinstance(image, np.ndarray) and image.ndim == 3 and image.dtype == np.uint8
        self.images += 1

    def train_model(self, images: Any, labels: Any) -> None:
        images = np.asarray(images)
        if images.ndim == 3:  # one image at a time
            self.images += 1
        else:
            assert len(images) == len(labels)
            self.batches.append((images.shape, len(labels)))

    def process_batch(self, images: np.ndarray, labels: list[Any]) -> None:
        assert images.ndim == 4 and len(images) == len(labels)
        self.batches.append((images.shape, len(labels)))


def my_model() -> Any:
    """`MyModel`: a small CNN classifier over (B, 3, H, W) images, 10 classes."""
    import torch.nn as nn

    class MyModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
            )
            self.head = nn.Linear(8 * 16, 10)

        def forward(self, x: Any) -> Any:
            return self.head(self.features(x).flatten(1))

    return MyModel


def keras_model() -> Any:
    """`model` for the `to_tensorflow()` docstring example."""
    import tensorflow as tf

    model = tf.keras.Sequential(
        [tf.keras.layers.Flatten(), tf.keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def run(
    code: str,
    server: Any,
    *,
    job: str = SMALL,
    key: str | None = None,
    epochs: int | None = None,
    **names: Any,
) -> dict[str, Any]:
    """Runs one example: the job ids and keys swapped, epochs cut if asked, nothing else."""
    code = textwrap.dedent(code)
    for placeholder in ("job_abc123", "job_123", "job_id"):
        code = code.replace(f'"{placeholder}"', f'"{job}"')
    for placeholder in ("your_api_key", "your_key", "key"):
        code = code.replace(f'"{placeholder}"', f'"{key or server.api_key}"')
    if epochs is not None:  # only the loop counts, to keep the suite fast
        code = re.sub(r"epochs=10\b", f"epochs={epochs}", code)
        code = code.replace("range(10)", f"range({epochs})")
    calls = Calls()
    namespace: dict[str, Any] = {
        "__name__": "spec_example",
        "process": calls.process,
        "train_model": calls.train_model,
        "process_batch": calls.process_batch,
        "calls": calls,
        **names,
    }
    exec(compile(code, "<specification example>", "exec"), namespace)
    return namespace


def a_dataset(server: Any, job: str = SMALL) -> Any:
    """`dataset` for snippets that use one without loading it."""
    from pixcrawler import load_dataset

    return load_dataset(job, api_key=server.api_key)
