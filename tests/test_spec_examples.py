"""The specification's examples, part 1: Quick Start, Core Concepts, API Reference, Usage Examples.

Each runs as the specification prints it, against the real server (see `spec_helpers.run`).
Part 2 (integration, performance, error handling, best practices) is in
`test_spec_examples_more.py`.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from spec_helpers import (
    KERAS_SHUFFLE,
    NEEDS_TORCHVISION,
    SKLEARN_ACCURACY,
    SMALL,
    TORCH_4_WORKERS,
    a_dataset,
    env,
    keras_model,
    my_model,
    run,
    spec_server,
)

__all__ = ["env", "spec_server"]  # fixtures, imported for pytest to find

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
