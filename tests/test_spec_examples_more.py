"""The specification's examples, part 2: Integration, Performance, Error Handling, Best Practices.

Each runs as the specification prints it, against the real server (see `spec_helpers.run`).
The scikit-learn examples use the "digits" job (all 1,797 digits) and print their accuracy.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from spec_helpers import (
    KERAS_INPUT_SHAPE,
    KERAS_SHUFFLE,
    NEEDS_TORCHVISION,
    SKLEARN_ACCURACY,
    SMALL,
    a_dataset,
    env,
    my_model,
    run,
    spec_server,
)

__all__ = ["env", "spec_server"]  # fixtures, imported for pytest to find

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
    from pixcrawler_engine.sources._store import chunk_path

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
    from pixcrawler_engine._errors import AuthenticationError, JobNotCompleteError

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
