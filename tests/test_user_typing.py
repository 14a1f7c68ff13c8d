"""A user's own type checker sees our types: after the editable install, and from the wheel.

A script in a folder of its own (no project configuration in sight) calls `load_dataset`;
`mypy` must resolve `pixcrawler` and reveal the concrete `Dataset`, as it would for a user
who ran the README's `pip install -e .`, or installed the built wheel.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """\
from pixcrawler import load_dataset
from pixcrawler_engine import DecodePolicy

dataset = load_dataset("job_123", api_key="key", image_size=(224, 224))
reveal_type(dataset)
reveal_type(dataset.info)
reveal_type(DecodePolicy().image_size)
"""


def _mypy(folder: Path, python: str) -> str:
    (folder / "script.py").write_text(SCRIPT)
    (folder / "mypy.ini").write_text("[mypy]\n")  # a user's empty config: no mypy_path
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--python-executable",
            python,
            "--no-incremental",
            "--config-file",
            "mypy.ini",
            "script.py",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


def _assert_resolved(output: str) -> None:
    assert "Cannot find implementation or library stub" not in output, output
    assert 'Revealed type is "pixcrawler._dataset.Dataset"' in output, output
    assert 'Revealed type is "pixcrawler._info.DatasetInfo"' in output, output
    assert 'Revealed type is "tuple[int, int] | None"' in output, output
    assert "Success: no issues found" in output, output


def test_mypy_sees_the_editable_install(tmp_path: Path) -> None:
    # This test environment is the README's editable install.
    _assert_resolved(_mypy(tmp_path, sys.executable))


@pytest.mark.timeout(600)
def test_mypy_sees_the_installed_wheel(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--disable-pip-version-check",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("pixcrawler_sdk-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = str(env / "bin" / "python")
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    files = subprocess.run(
        [python, "-c", "import pixcrawler, pixcrawler_engine; print(pixcrawler.__file__)"],
        capture_output=True,
        text=True,
    )
    # The wheel's own copy (its dependencies are not installed in this bare venv).
    assert str(env) in files.stdout or "No module named" in files.stderr, files
    _assert_resolved(_mypy(tmp_path, python))
