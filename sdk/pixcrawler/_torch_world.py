"""Steps, ranks and a pass's place for the iterable PyTorch dataset (`_torch_iterable`).

`by_step` groups engine batches by the step of the epoch's order they cover, so that a rank
hands out one batch per step whatever was skipped; `world` reads the rank and world size;
`PassState` is where a pass stands, for `state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed

from pixcrawler_engine.runtime._stream import Batch

__all__ = ["PassState", "by_step", "world"]


def by_step(batches: Iterator[Batch], sizes: list[int]) -> Iterator[list[Batch]]:
    """Engine batches grouped by the step of the order they cover (`sizes[i]` positions
    each): one group per step, in order, empty where every sample of the step was bad.

    A task never spans two steps (see NOTE [epoch order]), so whole engine batches make a
    step. A batch's `skipped` positions lie before its rows or among them (a stream adds the
    count of a batch left empty to the next batch), so they count first; steps that no batch
    reaches (bad to the end) come out empty too.
    """
    steps = iter(sizes)
    left = next(steps, None)
    group: list[Batch] = []
    for batch in batches:
        for covered, rows in ((batch.skipped, None), (len(batch), batch)):
            if left is None:
                break
            if rows is not None and covered:
                group.append(rows)
            left -= covered
            while left is not None and left <= 0:
                yield group
                group = []
                size = next(steps, None)
                left = None if size is None else left + size
    if left is not None:
        yield group
        yield from ([] for _ in steps)


@dataclass
class PassState:
    """Where a pass stands (`state_dict`): items handed out, and inside a DataLoader worker
    its own units (steps of the order it decodes) handed out whole and rows of the next."""

    epoch: int
    start: int
    world_size: int
    expected: int  # items of the whole pass when no sample is bad
    worker: tuple[int, int] | None = None  # (id, workers)
    items: int = 0
    units: int = 0
    rows: int = 0
    done: bool = False


def world() -> tuple[int, int]:
    """(rank, world size): `torch.distributed`'s when initialised, else `RANK`/`WORLD_SIZE`.

    Raises:
        ValueError: `RANK`/`WORLD_SIZE` are not ints, or the rank is not below the size.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        try:
            rank, size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        except ValueError as exc:
            raise ValueError(
                f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                "must be ints (torchrun sets both); unset them for a single process"
            ) from exc
    if not 0 <= rank < size:
        raise ValueError(
            f"rank {rank} is not in 0 .. world_size - 1 = {size - 1}: check RANK and WORLD_SIZE "
            "(or the process group)"
        )
    return rank, size
