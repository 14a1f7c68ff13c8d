"""Dataset metadata: the frozen `DatasetInfo` record, built from a job manifest, and its summary.

`DatasetInfo` is what `Dataset.info` returns and what the CLI's `info` command prints (through
`DatasetInfo.summary()`). Class indices follow the job's `labels` list, in its order, the way
torchvision's `ImageFolder` numbers its folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatasetInfo", "format_bytes"]


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """Metadata and statistics of one dataset (a PixCrawler job).

    Attributes:
        job_id: the job's id.
        status: `completed` (a dataset is only loaded from a completed job).
        num_images: images in the dataset.
        num_chunks: chunk archives the dataset is stored in.
        chunk_size: images per chunk (the last one may hold fewer).
        size_bytes: total compressed size of the chunks.
        created_at: when the job was created (ISO 8601, as the API reports it).
        labels: the class names of the job, in class-index order.
        version: the job's content version (changes when the job is re-packed).
        class_to_idx: class name -> class index (`labels[i]` has index `i`).
    """

    job_id: str
    status: str
    num_images: int
    num_chunks: int
    chunk_size: int
    size_bytes: int
    created_at: str
    labels: tuple[Any, ...]
    version: str
    class_to_idx: Mapping[str, int] = field(default_factory=dict)

    __hash__ = None  # type: ignore[assignment]  # holds a dict: not hashable

    def __post_init__(self) -> None:
        # A private copy: the record must not change when the caller's mapping does.
        object.__setattr__(self, "class_to_idx", dict(self.class_to_idx))

    @classmethod
    def from_manifest(cls, manifest: Any) -> DatasetInfo:
        """Builds the record from a `JobManifest` (see `pixcrawler_engine.sources._jobapi`)."""
        labels = tuple(manifest.labels)
        return cls(
            job_id=manifest.job_id,
            status=manifest.status,
            num_images=manifest.num_images,
            num_chunks=len(manifest.chunks),
            chunk_size=manifest.chunk_size,
            size_bytes=manifest.size_bytes,
            created_at=manifest.created_at,
            labels=labels,
            version=manifest.version,
            class_to_idx=class_index(labels),
        )

    @property
    def classes(self) -> list[str]:
        """The class names, index order (torchvision's `ImageFolder.classes`)."""
        return list(self.class_to_idx)

    def summary(self) -> str:
        """A human-readable block, as `pixcrawler info` prints it."""
        created = self.created_at.replace("T", " ").removesuffix("Z")
        names = ", ".join(str(label) for label in self.labels[:10])
        if len(self.labels) > 10:
            names += ", ..."
        lines = [
            f"Dataset: {self.job_id}",
            f"Status: {self.status}",
            f"Images: {self.num_images:,}",
            f"Chunks: {self.num_chunks}",
            f"Size: {format_bytes(self.size_bytes)}",
            f"Created: {created}",
            f"Labels: {names} ({len(self.labels)} classes)" if self.labels else "Labels: none",
        ]
        return "\n".join(lines)


def class_index(labels: tuple[Any, ...]) -> dict[str, int]:
    """Class name -> index for the string labels of a job, in the job's order."""
    return {label: i for i, label in enumerate(labels) if isinstance(label, str)}


def format_bytes(size: int) -> str:
    """`2.5 GB`-style size, decimal units like the specification's examples."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
