"""One sample of a chunk before decoding: the `Record` every source yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Record"]


@dataclass(frozen=True)
class Record:
    """One sample of a chunk, before decoding: where its bytes are and what it is."""

    key: str  # unique within the source, shown in errors
    ref: Any  # how the chunk reader finds its bytes (zip member name, row number)
    label: Any
    index: int  # position in the unshuffled dataset
    metadata: str = "{}"  # JSON of the other manifest fields
    mask_ref: Any = None  # where its segmentation mask's bytes are, if it has one
    name: str | None = None  # what else tells people which sample it is (an id, a path)
