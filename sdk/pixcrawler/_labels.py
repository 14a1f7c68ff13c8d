"""Labels of engine batches as the frameworks take them: class indices, a batch at a time.

A job's string labels become class indices in the order of its `labels` list (as torchvision's
`ImageFolder` numbers its folders); int labels stay themselves. `LabelCoder` does it for a
whole engine batch in a few numpy calls (`Batch.label_indices`), with no Python per sample;
labels that have no index (dicts, or strings of a job without class names) come out as the
manifest's values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcrawler_engine.runtime._batch import labels_of
from pixcrawler_engine.runtime._classes import ClassIndex

if TYPE_CHECKING:
    from pixcrawler_engine.runtime._stream import Batch

__all__ = ["LabelCoder", "is_int"]


def is_int(value: Any) -> bool:
    """An int label (bools are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


class LabelCoder:
    """Turns each engine batch's labels into an int64 index array, or a list of values.

    Args:
        class_to_idx: class name -> index (`DatasetInfo.class_to_idx`).
        indexed: whether labels are indices; None decides at the first batch: indices when
            the job has class names or the first label is an int, values otherwise.
    """

    def __init__(self, class_to_idx: Mapping[str, int], indexed: bool | None = None) -> None:
        self.indexed = True if class_to_idx else indexed
        names: list[str | None] = [None] * (max(class_to_idx.values(), default=-1) + 1)
        for name, index in class_to_idx.items():
            names[index] = name  # positions of non-string labels stay unmatched
        self.classes = ClassIndex(names)

    def __call__(self, batch: Batch) -> np.ndarray | list[Any]:
        """int64 (B,) class indices, or the B labels as the manifest has them.

        Raises:
            ValueError: indices are expected and a label is neither a class name nor an int.
        """
        if self.indexed is None:
            if not len(batch):
                return []
            self.indexed = is_int(labels_of(batch.record_batch.slice(0, 1))[0])
        return batch.label_indices(self.classes) if self.indexed else batch.labels
