"""The public surface of `pixcrawler` and `pixcrawler.exceptions` is pinned here (httpx style)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import pixcrawler
import pixcrawler.exceptions

PUBLIC = [
    "AuthenticationError",
    "Dataset",
    "DatasetInfo",
    "DecodeError",
    "DecompressionError",
    "DownloadError",
    "JobNotCompleteError",
    "NetworkError",
    "NotFoundError",
    "PixCrawlerError",
    "UnsupportedImageError",
    "WorkerError",
    "__version__",
    "load_dataset",
]


def _public_members(module: types.ModuleType) -> set[str]:
    """Names a module defines for its users: not private, not a submodule, not a __future__.

    Lazily loaded names are resolved first; typing helpers are not members.
    """
    for name in getattr(module, "__all__", []):
        getattr(module, name)
    return {
        name
        for name, value in vars(module).items()
        if (not name.startswith("_") or name == "__version__")
        and not isinstance(value, types.ModuleType)
        and type(value).__module__ != "__future__"  # `from __future__ import annotations`
        and name not in ("TYPE_CHECKING", "Any")
    }


def test_all_is_pinned() -> None:
    assert pixcrawler.__all__ == PUBLIC


def test_all_imports_are_exported() -> None:
    assert _public_members(pixcrawler) == set(pixcrawler.__all__)


def test_exceptions_module_exports_the_tree() -> None:
    exceptions = pixcrawler.exceptions
    assert _public_members(exceptions) == set(exceptions.__all__)
    for name in exceptions.__all__:
        error = getattr(exceptions, name)
        assert issubclass(error, exceptions.PixCrawlerError)
        assert getattr(pixcrawler, name) is error
        assert name in (exceptions.__doc__ or "")  # the tree is drawn in the docstring


def test_version_is_the_distributions() -> None:
    from importlib.metadata import version

    assert pixcrawler.__version__ == version("pixcrawler-sdk")


def test_import_stays_light() -> None:
    # Every engine process imports the package: no framework may come with it.
    code = (
        "import sys, pixcrawler; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'pandas', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


ENGINE_PUBLIC = [
    "EXPORT_FORMATS",
    "AuthenticationError",
    "Batch",
    "CacheWarning",
    "CachedSource",
    "ChunkCache",
    "ChunkPlan",
    "DecodeError",
    "DecodePolicy",
    "DecompressionError",
    "DownloadError",
    "EngineConfig",
    "ExportResult",
    "JobClient",
    "JobManifest",
    "JobNotCompleteError",
    "JobSource",
    "NetworkError",
    "NotFoundError",
    "ParquetSource",
    "PixCrawlerError",
    "Record",
    "SampleWarning",
    "SharedMemoryError",
    "Source",
    "Stream",
    "SubsetSource",
    "UnsupportedImageError",
    "WorkerError",
    "ZipOpener",
    "decode_chunk",
    "decode_image",
    "decode_mask",
    "decode_records",
    "export_job",
    "image_views",
    "labels_of",
    "mask_views",
    "output_shape",
    "pack",
    "probe",
    "read_batch",
    "schema_for",
    "write_batch",
]


def test_engine_all_is_pinned_and_resolves() -> None:
    import pixcrawler_engine as engine

    assert engine.__all__ == ENGINE_PUBLIC
    for name in engine.__all__:  # lazy names: each one imports
        assert getattr(engine, name) is not None
    assert sorted(dir(engine)) == sorted(ENGINE_PUBLIC)


def test_ray_module_exports() -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
    import pixcrawler.ray

    assert pixcrawler.ray.__all__ == ["PixCrawlerDatasource", "RaySource", "read_dataset"]
    defined = {
        name
        for name, value in vars(pixcrawler.ray).items()
        if getattr(value, "__module__", None) == "pixcrawler.ray" and not name.startswith("_")
    }
    assert defined == set(pixcrawler.ray.__all__)  # what it defines is what it exports
