"""Which samples an export writes and in which order: the seeded shuffle and the first-N cut.

`Selection` is the policy (`shuffle`, `seed`, `max_samples`); `SelectedSource` applies it to a
source. The shuffled order is the engine's chunk-level one (NOTE [epoch order] in
`runtime._epoch`): chunks in `default_rng(seed).permutation`, the samples of each chunk in
`default_rng([seed, chunk]).permutation`, so `download --shuffle --seed S` writes the samples
in the order `load_dataset(..., shuffle=True, seed=S, shuffle_window=1)` yields them in its
first epoch (an export writes chunk by chunk, so it cannot mix chunks). The cut keeps the first
`max_samples` samples of that order: whole chunks, then the head of one more.

An export's output row of a sample (its row of `images.npy`, its place in the shards) is a
pure function of the selection and the job, so a resumed export puts every sample where the
first run would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixcrawler_engine.runtime._schedule import chunk_order, record_order
from pixcrawler_engine.sources._base import ChunkPlan, Source, SourceWrapper
from pixcrawler_engine.sources._record import Record

__all__ = ["SelectedSource", "Selection"]


@dataclass(frozen=True, kw_only=True)
class Selection:
    """Which samples of a job an export writes, in which order.

    Attributes:
        shuffle: the engine's seeded shuffle (chunk order, then within each chunk).
        seed: the shuffle's seed.
        max_samples: only the first samples of that order; None for all.
    """

    shuffle: bool = False
    seed: int = 0
    max_samples: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool)
            or not isinstance(self.max_samples, int)
            or self.max_samples < 1
        ):
            raise ValueError(f"max_samples must be an int >= 1, got {self.max_samples!r}")

    def identity(self) -> dict[str, Any]:
        """What a resumed export must share with the first run."""
        return {
            "shuffle_seed": self.seed if self.shuffle else None,
            "max_samples": self.max_samples,
        }

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> Selection:
        """The selection an export's state records (the keys `identity()` gives)."""
        seed = identity.get("shuffle_seed")
        return cls(
            shuffle=seed is not None, seed=seed or 0, max_samples=identity.get("max_samples")
        )

    def records(self, chunk: int, records: Sequence[Record], keep: int) -> list[Record]:
        """A chunk's records as an export writes them: in the shuffled order, the first `keep`.

        `keep` is the chunk's `num_records` in the selected plan (`SelectedSource.plan()`).
        """
        if self.shuffle:
            # The engine's within-chunk shuffle (runtime._schedule.record_order).
            order = record_order(len(records), seed=self.seed, chunk=chunk)
            return [records[i] for i in order[:keep]]
        return list(records[:keep])


class SelectedSource(SourceWrapper):
    """A source whose plan and records follow a `Selection`; chunks in output order."""

    def __init__(self, source: Source, selection: Selection) -> None:
        super().__init__(source)
        self.selection = selection
        plans = source.plan()
        order = chunk_order(len(plans), shuffle=selection.shuffle, seed=selection.seed)
        left = selection.max_samples if selection.max_samples is not None else -1
        self._plans: list[ChunkPlan] = []
        self._offsets: dict[int, int] = {}
        self._first: dict[int, int] = {}
        total = 0
        for i in order:
            plan = plans[int(i)]
            keep = plan.num_records if left < 0 else min(plan.num_records, left)
            if left == 0:
                break
            self._plans.append(ChunkPlan(plan.index, keep, plan.size_bytes, plan.first_index))
            self._offsets[plan.index] = total
            self._first[plan.index] = plan.first_index
            total += keep
            if left > 0:
                left -= keep
        self.total = total
        self._sizes = {p.index: p.num_records for p in plans}
        self._inverse: dict[int, np.ndarray] = {}

    @property
    def chunk_order(self) -> list[int]:
        """The selected chunks' indices, in output order."""
        return [p.index for p in self._plans]

    def plan(self) -> list[ChunkPlan]:
        return list(self._plans)

    def records(self, chunk: int, path: Path) -> list[Record]:
        keep = next(p.num_records for p in self._plans if p.index == chunk)
        return self.selection.records(chunk, self.source.records(chunk, path), keep)

    def rows(self, chunk: int, indices: np.ndarray) -> np.ndarray:
        """The output rows of samples of `chunk`, given by their dataset `indices`."""
        within = np.asarray(indices, dtype=np.int64) - self._first[chunk]
        if self.selection.shuffle:
            inverse = self._inverse.get(chunk)
            if inverse is None:
                perm = self._permutation(chunk, self._sizes[chunk])
                inverse = np.empty_like(perm)
                inverse[perm] = np.arange(len(perm))
                self._inverse[chunk] = inverse
            within = inverse[within]
        return within + self._offsets[chunk]

    def _permutation(self, chunk: int, n: int) -> np.ndarray:
        # The engine's within-chunk shuffle: the same seed, the same order.
        return np.asarray(record_order(n, seed=self.selection.seed, chunk=chunk))
