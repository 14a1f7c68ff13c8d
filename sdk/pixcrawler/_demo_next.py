"""What `make demo` tells the user to run next, and the tiny training script it writes for it.

`next_steps` returns the three commands, spelled with the interpreter that ran the demo so they
work as printed: serve the demo store (loopback, no API key), load a job in Python, and train a
tiny PyTorch model on it with `train_tiny.py` (written next to the store).
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path

__all__ = ["TRAIN_SCRIPT", "free_port", "next_steps"]

PREFERRED_PORT = 8000  # the server's default (configs/server.toml)

TRAIN_SCRIPT = '''"""Train a tiny PyTorch model on the demo's digits job, from `pixcrawler serve`.

Written by `make demo`; run it while the demo store is served (see the demo's last lines).
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from pixcrawler import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    # 1,797 handwritten digits, 32x32 grey; labels "0".."9" become class indices.
    dataset = load_dataset("digits", base_url=args.base_url, color="L", progress=False)
    loader = DataLoader(dataset.to_torch(), batch_size=64, shuffle=True)
    classes = len(dataset.info.classes)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, classes),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(1, args.epochs + 1):
        seen = correct = 0
        total_loss = 0.0
        for images, labels in loader:
            optimizer.zero_grad()
            outputs = model(images)
            loss = loss_fn(outputs, labels)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
        print(f"epoch {epoch}: loss {total_loss / seen:.3f}, accuracy {correct / seen:.1%}")
    dataset.close()


if __name__ == "__main__":
    main()
'''


def free_port(preferred: int = PREFERRED_PORT) -> int:
    """`preferred` if nothing listens on it on loopback now, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free TCP port on 127.0.0.1")


def _shown(path: str | os.PathLike[str]) -> str:
    """A path as short as it can be written from here: relative below the current folder."""
    path = os.path.abspath(path)
    here = os.getcwd()
    rel = os.path.relpath(path, here)
    return rel if not rel.startswith("..") else path


def next_steps(out: Path, store: Path, port: int) -> str:
    """The demo's last lines: the commands to run next (and writes `out/train_tiny.py`)."""
    script = out / "train_tiny.py"
    tmp = script.with_name(f".{script.name}.tmp")
    tmp.write_text(TRAIN_SCRIPT, encoding="utf-8")
    tmp.replace(script)
    python = shlex.quote(_shown(sys.executable))
    url = f"http://127.0.0.1:{port}"
    load = (
        "from pixcrawler import load_dataset; "
        f"ds = load_dataset('digits', base_url='{url}'); "
        "X, y = ds.to_arrays(); print(ds.info.summary()); print(X.shape, y[:10])"
    )
    return "\n".join(
        [
            "",
            "next:",
            "  1. serve the demo store (loopback: no API key needed; leave it running):",
            f"       {python} -m pixcrawler serve {shlex.quote(_shown(store))} --port {port}",
            "  2. in another shell, load a job in Python:",
            f'       {python} -c "{load}"',
            "  3. train a tiny PyTorch model on it:",
            f"       {python} {shlex.quote(_shown(script))} --base-url {url}",
        ]
    )
