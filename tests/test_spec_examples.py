"""Every code example of the SDK specification, run as written against the real server.

The examples are copied verbatim from the specification (seeds/004); only their job ids and
API keys are replaced (`"job_123"` -> a real job, `"key"` -> a real key), and the base URL
comes from `PIXCRAWLER_BASE_URL`, so the code itself stays as the specification prints it.
Where noted, `epochs=10` / `range(10)` is cut to keep this suite fast on two cores; nothing
else is changed. The helpers the examples assume (`process`, `train_model`, `process_batch`,
`MyModel`, and `dataset` / `model` for snippets that use them without defining them) are
defined here.

Jobs served: "digits" (all 1,797 scikit-learn digits, 32x32, chunks of 500) for the
scikit-learn examples, "digits-small" (10 of each digit) for the rest, "pending" (processing,
42%) for the error-handling examples.
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
from pixcrawler.engine._store import pack

SMALL = "digits-small"
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


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("spec")
    digits = _demo_data.build_digits(root / "digits")
    small = _demo_data.build_digits(root / "small", limit=10)
    store = root / "store"
    pack(digits, store, "digits", chunk_size=500)
    pack(small, store, SMALL, chunk_size=32)
    pack(small, store, "pending", chunk_size=32, status="processing", progress=42)
    server: ServerProcess = start_server(store, keys_file)
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


# ---- Quick Start ------------------------------------------------------------------------------


def test_quick_start_basic_usage(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset

        # Load dataset (lazy loading)
        dataset = load_dataset(
            job_id="job_abc123",
            api_key="your_api_key"
        )

        # Iterate through images
        for image, label in dataset:
            print(f"Image shape: {image.shape}, Label: {label}")

        # Or use with scikit-learn
        X, y = dataset.to_arrays()
        from sklearn.model_selection import train_test_split
        X_train, X_test, y_train, y_test = train_test_split(X, y)
        """,
        env,
    )
    out = capsys.readouterr().out
    assert out.count("Image shape: (32, 32, 3), Label: ") == 100
    assert ns["X_train"].shape == (75, 32, 32, 3) and len(ns["y_test"]) == 25


@TORCH_4_WORKERS
def test_quick_start_pytorch(env: Any) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset
        from torch.utils.data import DataLoader

        dataset = load_dataset("job_abc123", api_key="your_key")
        torch_dataset = dataset.to_torch()

        dataloader = DataLoader(
            torch_dataset,
            batch_size=32,
            shuffle=True,
            num_workers=4
        )

        for batch in dataloader:
            images, labels = batch
            # Train your model
        """,
        env,
    )
    assert tuple(ns["images"].shape[1:]) == (3, 32, 32) and str(ns["labels"].dtype) == "torch.int64"


# ---- Core Concepts ----------------------------------------------------------------------------


def test_lazy_loading(env: Any) -> None:
    ns = run(
        """
        dataset = load_dataset("job_id")  # No download yet

        # Download happens here
        for image, label in dataset:  # Downloads chunk 1
            process(image)
            # After chunk 1 exhausted, downloads chunk 2
        """,
        env,
        load_dataset=__import__("pixcrawler").load_dataset,
    )
    assert ns["calls"].images == 100


def test_streaming_api(env: Any) -> None:
    ns = run(
        """
        # Memory-efficient iteration
        for image, label in dataset:
            train_model(image, label)

        # Batch streaming
        for batch in dataset.iter_batches(batch_size=64):
            images, labels = batch
            train_model(images, labels)
        """,
        env,
        dataset=a_dataset(env),
    )
    assert ns["calls"].images == 100
    assert ns["calls"].batches == [((64, 32, 32, 3), 64), ((36, 32, 32, 3), 36)]


# ---- API Reference (docstring examples) -------------------------------------------------------


@KERAS_SHUFFLE
def test_api_reference_docstring_examples(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.model_selection import train_test_split
    from torch.utils.data import DataLoader

    ns = run(
        """
        dataset = load_dataset("job_123", api_key="key")
        for image, label in dataset:
            print(image.shape)

        for image, label in dataset:
            process(image, label)

        for images, labels in dataset.iter_batches(batch_size=64):
            train_model(images, labels)

        X, y = dataset.to_arrays()
        X_train, X_test, y_train, y_test = train_test_split(X, y)

        df = dataset.to_dataframe()
        df.head()

        torch_dataset = dataset.to_torch()
        dataloader = DataLoader(torch_dataset, batch_size=32)

        tf_dataset = dataset.to_tensorflow()
        tf_dataset = tf_dataset.batch(32).prefetch(1)
        model.fit(tf_dataset, epochs=10)

        info = dataset.info
        sizes = (dataset.num_images, dataset.num_chunks, dataset.chunk_size)
        """,
        env,
        epochs=1,  # spec: epochs=10
        load_dataset=__import__("pixcrawler").load_dataset,
        train_test_split=train_test_split,
        DataLoader=DataLoader,
        model=keras_model(),
    )
    assert capsys.readouterr().out.count("(32, 32, 3)") == 100
    assert ns["calls"].images == 100 and len(ns["df"]) == 100
    assert len(ns["dataloader"]) == 4 and ns["sizes"] == (100, 4, 32)
    assert ns["info"].job_id == SMALL and ns["info"].labels == tuple("0123456789")


@NEEDS_TORCHVISION
def test_to_torch_docstring_with_torchvision(env: Any) -> None:
    from torch.utils.data import DataLoader

    ns = run(
        """
        from torchvision import transforms
        transform = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5], std=[0.5])
        ])
        torch_dataset = dataset.to_torch(transform=transform)
        dataloader = DataLoader(torch_dataset, batch_size=32)
        """,
        env,
        dataset=a_dataset(env),
        DataLoader=DataLoader,
    )
    images, _ = next(iter(ns["dataloader"]))
    assert tuple(images.shape) == (32, 3, 32, 32)


# ---- Usage Examples ---------------------------------------------------------------------------


def test_example_1_simple_iteration(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(
        """
        from pixcrawler import load_dataset

        dataset = load_dataset("job_123", api_key="key")

        # Process images one by one
        for image, label in dataset:
            print(f"Image: {image.shape}, Label: {label}")
        """,
        env,
    )
    assert capsys.readouterr().out.count("Image: (32, 32, 3), Label: ") == 100


def test_example_2_batch_processing(env: Any) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset

        dataset = load_dataset("job_123", api_key="key")

        # Process in batches
        for images, labels in dataset.iter_batches(batch_size=64):
            # images shape: (64, H, W, C)
            # labels: list of 64 labels
            process_batch(images, labels)
        """,
        env,
    )
    assert ns["calls"].batches == [((64, 32, 32, 3), 64), ((36, 32, 32, 3), 36)]


SKLEARN_ACCURACY: dict[str, float] = {}


def test_example_3_scikit_learn(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset
        from sklearn.model_selection import train_test_split
        from sklearn.ensemble import RandomForestClassifier

        # Load dataset
        dataset = load_dataset("job_123", api_key="key")
        X, y = dataset.to_arrays()

        # Flatten images for sklearn
        X_flat = X.reshape(X.shape[0], -1)

        # Train/test split
        X_train, X_test, y_train, y_test = train_test_split(
            X_flat, y, test_size=0.2, random_state=42
        )

        # Train model
        clf = RandomForestClassifier()
        clf.fit(X_train, y_train)
        print(f"Accuracy: {clf.score(X_test, y_test)}")
        """,
        env,
        job="digits",
    )
    assert ns["X"].shape == (1797, 32, 32, 3)
    accuracy = float(re.findall(r"Accuracy: ([0-9.]+)", capsys.readouterr().out)[0])
    SKLEARN_ACCURACY["random_forest"] = accuracy
    assert accuracy > 0.9


@TORCH_4_WORKERS
def test_example_4_pytorch_training_loop(env: Any) -> None:
    import torch

    ns = run(
        """
        from pixcrawler import load_dataset
        from torch.utils.data import DataLoader
        import torch.nn as nn
        import torch.optim as optim

        # Load dataset
        dataset = load_dataset("job_123", api_key="key")
        torch_dataset = dataset.to_torch()

        # Create dataloader
        train_loader = DataLoader(
            torch_dataset,
            batch_size=32,
            shuffle=True,
            num_workers=4
        )

        # Training loop
        model = MyModel()
        criterion = nn.CrossEntropyLoss()
        optimizer = optim.Adam(model.parameters())

        for epoch in range(10):
            for images, labels in train_loader:
                optimizer.zero_grad()
                outputs = model(images)
                loss = criterion(outputs, labels)
                loss.backward()
                optimizer.step()
        """,
        env,
        epochs=2,  # spec: range(10)
        MyModel=my_model(),
    )
    assert ns["epoch"] == 1 and torch.isfinite(ns["loss"])


@KERAS_SHUFFLE
def test_example_5_tensorflow_training(env: Any) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset
        import tensorflow as tf

        # Load dataset
        dataset = load_dataset("job_123", api_key="key")
        tf_dataset = dataset.to_tensorflow()

        # Prepare dataset
        tf_dataset = tf_dataset.batch(32).prefetch(tf.data.AUTOTUNE)

        # Build and train model
        model = tf.keras.Sequential([
            tf.keras.layers.Conv2D(32, 3, activation='relu'),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation='softmax')
        ])

        model.compile(
            optimizer='adam',
            loss='sparse_categorical_crossentropy',
            metrics=['accuracy']
        )

        model.fit(tf_dataset, epochs=10)
        """,
        env,
        epochs=2,  # spec: epochs=10
    )
    assert len(ns["model"].history.history["loss"]) == 2


def test_example_6_pandas(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset

        dataset = load_dataset("job_123", api_key="key")
        df = dataset.to_dataframe()

        # Analyze dataset
        print(df.head())
        print(df['label'].value_counts())
        print(df.describe())

        # Filter by label
        cat_images = df[df['label'] == 'cat']
        print(f"Found {len(cat_images)} cat images")
        """,
        env,
    )
    assert len(ns["df"]) == 100 and "Found 0 cat images" in capsys.readouterr().out


# ---- Integration with ML Frameworks -----------------------------------------------------------


def test_integration_scikit_learn_grid_search(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(
        """
        from pixcrawler import load_dataset
        from sklearn.model_selection import train_test_split, GridSearchCV
        from sklearn.svm import SVC
        from sklearn.preprocessing import StandardScaler

        dataset = load_dataset("job_123", api_key="key")
        X, y = dataset.to_arrays()

        # Flatten and normalize
        X_flat = X.reshape(X.shape[0], -1)
        scaler = StandardScaler()
        X_scaled = scaler.fit_transform(X_flat)

        # Split
        X_train, X_test, y_train, y_test = train_test_split(
            X_scaled, y, test_size=0.2
        )

        # Grid search
        param_grid = {'C': [0.1, 1, 10], 'kernel': ['rbf', 'linear']}
        grid = GridSearchCV(SVC(), param_grid, cv=5)
        grid.fit(X_train, y_train)

        print(f"Best params: {grid.best_params_}")
        print(f"Test accuracy: {grid.score(X_test, y_test)}")
        """,
        env,
        job="digits",
    )
    out = capsys.readouterr().out
    accuracy = float(re.findall(r"Test accuracy: ([0-9.]+)", out)[0])
    SKLEARN_ACCURACY["svc_grid_search"] = accuracy
    print(f"scikit-learn accuracies on the 1,797 digits: {SKLEARN_ACCURACY}")
    assert "Best params: {" in out and accuracy > 0.9


@NEEDS_TORCHVISION
def test_integration_pytorch_with_torchvision(env: Any) -> None:
    run(
        """
        from pixcrawler import load_dataset
        from torch.utils.data import DataLoader, random_split
        from torchvision import transforms
        import torch.nn as nn

        # Custom transform
        transform = transforms.Compose([
            transforms.ToPILImage(),
            transforms.Resize((224, 224)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.485, 0.456, 0.406],
                               std=[0.229, 0.224, 0.225])
        ])

        dataset = load_dataset("job_123", api_key="key")
        torch_dataset = dataset.to_torch(transform=transform)

        # Train/val split
        train_size = int(0.8 * len(torch_dataset))
        val_size = len(torch_dataset) - train_size
        train_dataset, val_dataset = random_split(
            torch_dataset, [train_size, val_size]
        )

        # Dataloaders
        train_loader = DataLoader(train_dataset, batch_size=32, shuffle=True)
        val_loader = DataLoader(val_dataset, batch_size=32)

        # Training
        model = MyModel()
        criterion = nn.CrossEntropyLoss()
        optimizer = torch.optim.Adam(model.parameters())

        for epoch in range(10):
            model.train()
            for images, labels in train_loader:
                optimizer.zero_grad()
                outputs = model(images)
                loss = criterion(outputs, labels)
                loss.backward()
                optimizer.step()

            # Validation
            model.eval()
            val_loss = 0
            with torch.no_grad():
                for images, labels in val_loader:
                    outputs = model(images)
                    val_loss += criterion(outputs, labels).item()

            print(f"Epoch {epoch}: Val Loss = {val_loss/len(val_loader)}")
        """,
        env,
        epochs=1,  # spec: range(10)
        MyModel=my_model(),
        torch=__import__("torch"),  # the example uses torch.optim and torch.no_grad
    )


@KERAS_SHUFFLE
@KERAS_INPUT_SHAPE
def test_integration_tensorflow_keras(env: Any) -> None:
    ns = run(
        """
        from pixcrawler import load_dataset
        import tensorflow as tf
        from tensorflow.keras import layers, models

        dataset = load_dataset("job_123", api_key="key")
        tf_dataset = dataset.to_tensorflow()

        # Preprocessing
        def preprocess(image, label):
            image = tf.image.resize(image, [224, 224])
            image = tf.cast(image, tf.float32) / 255.0
            return image, label

        tf_dataset = tf_dataset.map(preprocess)

        # Train/val split
        dataset_size = dataset.num_images
        train_size = int(0.8 * dataset_size)
        train_dataset = tf_dataset.take(train_size).batch(32).prefetch(1)
        val_dataset = tf_dataset.skip(train_size).batch(32).prefetch(1)

        # Model
        model = models.Sequential([
            layers.Conv2D(32, 3, activation='relu', input_shape=(224, 224, 3)),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation='relu'),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation='relu'),
            layers.Dropout(0.5),
            layers.Dense(10, activation='softmax')
        ])

        model.compile(
            optimizer='adam',
            loss='sparse_categorical_crossentropy',
            metrics=['accuracy']
        )

        # Train
        history = model.fit(
            train_dataset,
            validation_data=val_dataset,
            epochs=10
        )
        """,
        env,
        epochs=1,  # spec: epochs=10
    )
    assert set(ns["history"].history) >= {"loss", "val_loss", "accuracy"}


# ---- Performance & Memory ---------------------------------------------------------------------


def test_performance_lazy_and_eager_loading(env: Any) -> None:
    ns = run(
        """
        # Only loads one chunk at a time (~300 MB)
        for image, label in dataset:
            process(image)

        # Loads entire dataset into memory
        X, y = dataset.to_arrays()  # May use 10+ GB for large datasets
        """,
        env,
        dataset=a_dataset(env),
    )
    assert ns["calls"].images == 100 and ns["X"].shape == (100, 32, 32, 3)


# ---- Error Handling ---------------------------------------------------------------------------

ERROR_HANDLING = """
from pixcrawler import load_dataset
from pixcrawler.exceptions import (
    AuthenticationError,
    JobNotCompleteError,
    DownloadError
)

try:
    dataset = load_dataset("job_123", api_key="key")

    for image, label in dataset:
        process(image)

except AuthenticationError:
    print("Invalid API key")
except JobNotCompleteError as e:
    print(f"Job still processing: {e.progress}% complete")
except DownloadError as e:
    print(f"Download failed: {e.chunk_id}")
except Exception as e:
    print(f"Unexpected error: {e}")
"""


@pytest.mark.parametrize(
    ("job", "key", "printed"),
    [
        (SMALL, None, ""),
        ("pending", None, "Job still processing: 42.0% complete"),
        (SMALL, "pxc-not-a-key", "Invalid API key"),
    ],
)
def test_error_handling_example(
    env: Any, capsys: pytest.CaptureFixture[str], job: str, key: str | None, printed: str
) -> None:
    ns = run(ERROR_HANDLING, env, job=job, key=key)
    assert capsys.readouterr().out.strip() == printed
    assert ns["calls"].images == (100 if not printed else 0)


def test_error_handling_download_error(
    env: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chunk that disappears from the server between load and iteration.
    from pixcrawler.engine._store import chunk_path

    path = chunk_path(env.store, SMALL, 2)
    moved = path.with_suffix(".gone")
    import pixcrawler

    dataset = pixcrawler.load_dataset(SMALL, api_key=env.api_key)
    path.rename(moved)
    try:
        run(
            """
            from pixcrawler.exceptions import DownloadError
            try:
                for image, label in dataset:
                    process(image)
            except DownloadError as e:
                print(f"Download failed: {e.chunk_id}")
            """,
            env,
            dataset=dataset,
        )
    finally:
        moved.rename(path)
    assert capsys.readouterr().out.strip() == "Download failed: 2"


def test_manual_retry_with_tenacity(env: Any) -> None:
    pytest.importorskip("tenacity", reason="tenacity is not installed (dev extra)")
    ns = run(
        """
        from tenacity import retry, stop_after_attempt, wait_exponential

        @retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=1, min=2, max=10))
        def load_with_retry(job_id, api_key):
            return load_dataset(job_id, api_key)

        dataset = load_with_retry("job_123", "key")
        """,
        env,
        load_dataset=__import__("pixcrawler").load_dataset,
    )
    assert ns["dataset"].num_images == 100


# ---- Best Practices ---------------------------------------------------------------------------


def test_best_practice_1_lazy_loading(env: Any) -> None:
    ns = run(
        """
        # ✅ Good: Memory efficient
        for image, label in dataset:
            train_model(image, label)

        # ❌ Bad: Loads everything into memory
        X, y = dataset.to_arrays()  # May crash with large datasets
        """,
        env,
        dataset=a_dataset(env),
    )
    assert ns["calls"].images == 100 and len(ns["y"]) == 100


def test_best_practice_2_batch_processing(env: Any) -> None:
    ns = run(
        """
        # ✅ Good: Efficient batch processing
        for images, labels in dataset.iter_batches(batch_size=64):
            train_model(images, labels)

        # ❌ Bad: Processing one by one is slow
        for image, label in dataset:
            train_model(image.reshape(1, -1), [label])
        """,
        env,
        dataset=a_dataset(env),
    )
    assert len(ns["calls"].batches) == 2 + 100


def test_best_practice_3_parallel_downloads(env: Any) -> None:
    ns = run(
        """
        # ✅ Good: Fast parallel downloads
        dataset = load_dataset("job_id", api_key="key", max_workers=8)

        # ❌ Bad: Slow sequential downloads
        dataset = load_dataset("job_id", api_key="key", max_workers=1)
        """,
        env,
        load_dataset=__import__("pixcrawler").load_dataset,
    )
    assert ns["dataset"].config.max_workers == 1


@pytest.mark.parametrize(
    ("job", "printed"),
    [(SMALL, ""), ("pending", "Wait for job to complete: 42.0%")],
)
def test_best_practice_4_error_handling(
    env: Any, capsys: pytest.CaptureFixture[str], job: str, printed: str
) -> None:
    from pixcrawler.exceptions import AuthenticationError, JobNotCompleteError

    run(
        """
        # ✅ Good: Handle specific errors
        try:
            dataset = load_dataset("job_id", api_key="key")
        except JobNotCompleteError as e:
            print(f"Wait for job to complete: {e.progress}%")
        except AuthenticationError:
            print("Check your API key")

        # ❌ Bad: Catch-all exception
        try:
            dataset = load_dataset("job_id", api_key="key")
        except Exception:
            pass  # What went wrong?
        """,
        env,
        job=job,
        load_dataset=__import__("pixcrawler").load_dataset,
        JobNotCompleteError=JobNotCompleteError,
        AuthenticationError=AuthenticationError,
    )
    assert capsys.readouterr().out.strip() == printed


def test_best_practice_5_progress_tracking(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    ns = run(
        """
        # ✅ Good: Show progress to user
        from tqdm import tqdm

        dataset = load_dataset("job_id", api_key="key")
        for image, label in tqdm(dataset, total=dataset.num_images):
            process(image)

        # ❌ Bad: No feedback
        for image, label in dataset:
            process(image)  # User has no idea how long this takes
        """,
        env,
        load_dataset=__import__("pixcrawler").load_dataset,
    )
    assert ns["calls"].images == 200 and "100/100" in capsys.readouterr().err


def test_best_practice_6_resource_cleanup(env: Any) -> None:
    ns = run(
        """
        # ✅ Good: Use context manager (future feature)
        with load_dataset("job_id", api_key="key") as dataset:
            for image, label in dataset:
                process(image)
        # Automatic cleanup

        # ✅ Also good: Explicit cleanup
        dataset = load_dataset("job_id", api_key="key")
        try:
            for image, label in dataset:
                process(image)
        finally:
            dataset.close()  # Release resources
        """,
        env,
        load_dataset=__import__("pixcrawler").load_dataset,
    )
    assert ns["calls"].images == 200
