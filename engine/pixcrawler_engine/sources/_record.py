"""One sample of a chunk before decoding: the `Record` every source yields."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Record"]


class Record(NamedTuple):
    """One sample of a chunk, before decoding: where its bytes are and what it is.

    A named tuple, not a dataclass: a chunk has hundreds of them, built in one pass over its
    manifest and pickled to workers, and a tuple is several times cheaper at both.
    """

    key: str  # unique within the source, shown in errors
    ref: Any  # how the chunk reader finds its bytes (zip member name, row number)
    label: Any
    index: int  # type: ignore[assignment]  # position in the unshuffled dataset (shadows tuple.index)
    metadata: str = "{}"  # JSON of the other manifest fields
    mask_ref: Any = None  # where its segmentation mask's bytes are, if it has one
    name: str | None = None  # what else tells people which sample it is (an id, a path)
