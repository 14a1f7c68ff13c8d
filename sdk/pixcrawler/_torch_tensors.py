"""Tensors for the torch adapter's batches: views of the engine's memory, pinned or not.

A batch that lies inside one engine batch becomes a tensor over the same memory (no copy):
the tensor keeps the view alive, the view keeps its shared-memory slot leased, so the tensor
stays valid for as long as it is kept. Batches assembled from pieces are copied once, into a
tensor from `alloc` or `pinned_alloc` (page-locked, where an accelerator exists).
"""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import torch

from pixcrawler._rebatch import Rows

__all__ = ["alloc", "can_pin", "images_tensor", "pinned_alloc"]


class _Writable:
    """A view's memory presented to numpy as writable, keeping the view (and its lease) alive.

    `torch.from_numpy` warns on read-only arrays, and the engine's views are read-only
    because Arrow hands them out so; the memory itself (a shared-memory slot mapped for
    writing, or the decoder's own array) is the batch's alone until its last view is gone,
    so a tensor may write into it. The tensor keeps the array, the array keeps this object,
    this object keeps the view and so the slot's lease.
    """

    __slots__ = ("__array_interface__", "_view")

    def __init__(self, view: np.ndarray) -> None:
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # (address, read-only flag)
        self.__array_interface__ = interface
        self._view = view


def images_tensor(rows: Rows, *, pin: bool) -> torch.Tensor:
    """The images of `rows` as a tensor: the assembled one, or the view itself (no copy)."""
    if rows.owner is not None:
        return cast("torch.Tensor", rows.owner)
    tensor = torch.from_numpy(np.asarray(_Writable(rows.images)))
    return tensor.pin_memory() if pin else tensor


def alloc(shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
    tensor = torch.empty(shape, dtype=torch.uint8)
    return tensor.numpy(), tensor


def pinned_alloc(shape: tuple[int, ...]) -> tuple[np.ndarray, torch.Tensor]:
    tensor = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
    return tensor.numpy(), tensor


def can_pin() -> bool:
    """Whether pinned memory exists here; warns as DataLoader does when it does not."""
    accelerator = getattr(torch, "accelerator", None)
    available = accelerator.is_available() if accelerator else torch.cuda.is_available()
    if not available:
        warnings.warn(
            "pin_memory=True, but no accelerator is found: the batches are ordinary "
            "(pageable) tensors",
            UserWarning,
            stacklevel=4,
        )
    return bool(available)
