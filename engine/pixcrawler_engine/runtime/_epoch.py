"""The order of an epoch, and the share of it one stream delivers: pure functions of counts.

NOTE [epoch order]: an epoch's global order is a function of the chunks' sample counts, the
seed, the epoch and `shuffle_window` only, so every rank, every DataLoader worker and a
resumed run compute the same one without talking to each other. Unshuffled, it is the
dataset order. Shuffled, it is a block shuffle (MosaicML Streaming's py1b):

    1. the chunks are permuted, seeded by (seed, epoch);
    2. the permuted chunks are cut into blocks of `shuffle_window` chunks (the remainder
       joins the last block, so a block holds `window` to `2 * window - 1` chunks);
    3. the samples of each block are permuted uniformly, seeded by (seed, the block's chunk
       ids, epoch).

A batch then mixes the samples of `window` chunks, while only the chunks of the current
block (and the prefetched ones) are on disk: memory is bounded by chunk files and slots, not
by decoded pixels. With `shuffle_window=1` epoch 0 is the chunk-level order that exports and
`to_ray` deliver (chunks, then samples within each chunk).

A `Share` picks one stream's part of that order. `start` samples are already consumed (a
resumed epoch). Then the `world_size` ranks take turns: at each step rank r takes the `step`
samples after the first `r * step`, so together the ranks take the next `world_size * step`
samples of the global order (MosaicML's elastic determinism: the union does not depend on
the world size). The last, incomplete turn is padded by repeating samples from the start of
the epoch so that every rank gets the same number of samples, or with `drop_last` dropped:
whole (every rank, whole steps only), or with `per_sample` down to a multiple of the world
size (every rank, as many samples: `DistributedSampler`'s convention).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Group", "Share", "epoch_groups", "units"]


@dataclass(frozen=True, kw_only=True)
class Share:
    """Which part of an epoch's global order one stream delivers (see NOTE [epoch order]).

    Attributes:
        epoch: the epoch, which seeds the shuffle.
        start: samples of the epoch's global order already consumed by all ranks together.
        rank: this stream's rank.
        world_size: how many ranks take turns.
        step: samples each rank takes per turn (its batch size).
        drop_last: drop the last, incomplete turn instead of padding it.
        per_sample: with `drop_last`, drop only what the ranks cannot share evenly (the
            ranks hand out samples, not batches of `step`).
    """

    epoch: int = 0
    start: int = 0
    rank: int = 0
    world_size: int = 1
    step: int = 1
    drop_last: bool = False
    per_sample: bool = False

    def __post_init__(self) -> None:
        for name in ("epoch", "start", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("world_size", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank {self.rank} is not below world_size {self.world_size}: ranks are numbered "
                "0 .. world_size - 1 (check RANK and WORLD_SIZE, or torch.distributed's group)"
            )

    def count(self, total: int) -> int:
        """How many samples this share of an epoch of `total` samples holds (padding too)."""
        return sum(hi - lo for lo, hi in self.ranges(total))

    def ranges(self, total: int) -> list[tuple[int, int]]:
        """This share's positions of an epoch of `total` samples, as [lo, hi) ranges in order:
        one per step (one in all at world size 1 with `step` 1), so that no decode task (cut
        within a range) spans two steps.

        Positions at or past `total` are padding: position p stands for sample p - total.

        Raises:
            ValueError: `start` is past the end of the epoch.
        """
        if self.start > total:
            raise ValueError(
                f"start={self.start} is past the end of the epoch ({total} samples): the state "
                "was saved for a larger dataset"
            )
        left = total - self.start
        turn = self.world_size * self.step
        full, tail = divmod(left, turn)
        if self.world_size == 1 and self.step == 1:
            return [(self.start, total)] if left else []
        first = self.start + self.rank * self.step
        out = [(first + k * turn, first + k * turn + self.step) for k in range(full)]
        each = -(-tail // self.world_size)  # padded so that every rank gets as many
        if self.drop_last:
            each = tail // self.world_size if self.per_sample else 0
        if each:
            lo = self.start + full * turn + self.rank * each
            out.append((lo, lo + each))
        return out


@dataclass
class Group:
    """A block of chunks whose samples are delivered in one permuted order.

    Attributes:
        chunks: positions in the plan of the block's chunks, in the block's order.
        counts: samples of each of those chunks.
        key: what seeds the block's permutation (None: not shuffled).
        ranges: the selected positions of the block's order, as [lo, hi) ranges, ascending.
    """

    chunks: list[int]
    counts: list[int]
    key: list[int] | None
    ranges: list[tuple[int, int]] = field(default_factory=list)
    _perm: Any = None
    _offsets: Any = None

    @property
    def size(self) -> int:
        return sum(self.counts)

    def rows(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """(chunk slot in `chunks`, record within that chunk) of positions [lo, hi)."""
        if self.key is None:  # the dataset order: one chunk, its records in order
            return [(0, i) for i in range(lo, hi)]
        import numpy as np

        if self._perm is None:
            self._perm = _permutation(self.size, self.key)
            self._offsets = np.cumsum([0, *self.counts])
        picked = self._perm[lo:hi]
        parts = np.searchsorted(self._offsets, picked, side="right") - 1
        return list(zip(parts.tolist(), (picked - self._offsets[parts]).tolist(), strict=True))

    def next_start(self, end: int) -> int | None:
        """Where delivery continues after position `end`; None when the group is done."""
        i = bisect.bisect_right(self.ranges, (end, float("inf"))) - 1
        if i >= 0 and self.ranges[i][0] <= end < self.ranges[i][1]:
            return end
        return self.ranges[i + 1][0] if i + 1 < len(self.ranges) else None


def _permutation(n: int, key: list[int]) -> Any:
    import numpy as np  # only for shuffled runs: the supervisor stays light

    return np.random.default_rng(key).permutation(n)


def _seed(seed: int, epoch: int, *keys: int) -> list[int]:
    # Epoch 0 keeps the entropy of the chunk-level shuffle that exports and to_ray deliver.
    return [seed, *keys] if epoch == 0 else [seed, *keys, epoch]


def epoch_groups(
    counts: Sequence[int],
    *,
    chunk_ids: Sequence[int],
    shuffle: bool,
    seed: int,
    window: int,
    share: Share,
) -> list[Group]:
    """The groups of one stream's share of an epoch, in delivery order (NOTE [epoch order]).

    Groups with nothing selected are left out; padding comes last, as groups of its own.

    Args:
        counts: samples of each chunk of the plan.
        chunk_ids: each chunk's id (what seeds a block's permutation).
        shuffle: the block shuffle; else the dataset order.
        seed: the shuffle's seed.
        window: chunks per shuffle block.
        share: the part of the epoch to deliver.
    """
    n = len(counts)
    if not shuffle:
        blocks = [[i] for i in range(n)]
    else:
        import numpy as np

        order = [int(i) for i in np.random.default_rng(_seed(seed, share.epoch)).permutation(n)]
        cuts = list(range(0, n, window))
        if len(cuts) > 1 and n - cuts[-1] < window:
            cuts.pop()  # the remainder joins the last block
        blocks = [order[c : cuts[k + 1] if k + 1 < len(cuts) else n] for k, c in enumerate(cuts)]
    groups = [
        Group(
            chunks=block,
            counts=[counts[i] for i in block],
            key=_seed(seed, share.epoch, *(chunk_ids[i] for i in block)) if shuffle else None,
        )
        for block in blocks
    ]
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + g.size)
    total = starts[-1]
    padding: list[Group] = []
    for lo, hi in share.ranges(total):
        _assign(groups, starts, lo, min(hi, total), merge=share.step == 1)
        p = max(lo, total)
        while p < hi:  # padding: the epoch's first samples again, in groups of their own
            a = (p - total) % total
            b = min(total, a + hi - p)
            for k, piece in _split(groups, starts, a, b):
                if not padding or padding[-1].chunks is not groups[k].chunks:
                    padding.append(Group(groups[k].chunks, groups[k].counts, groups[k].key))
                padding[-1].ranges.append(piece)
            p += b - a
    return [g for g in groups if g.ranges] + padding


def _split(
    groups: list[Group], starts: list[int], lo: int, hi: int
) -> list[tuple[int, tuple[int, int]]]:
    """Global positions [lo, hi) as (group, [a, b) within it) pieces."""
    out = []
    g = bisect.bisect_right(starts, lo) - 1
    while lo < hi and g < len(groups):
        end = min(hi, starts[g + 1])
        if end > lo:
            out.append((g, (lo - starts[g], end - starts[g])))
        lo = end
        g += 1
    return out


def _assign(groups: list[Group], starts: list[int], lo: int, hi: int, *, merge: bool) -> None:
    """Selects global positions [lo, hi) in the groups; with `merge`, a range that continues
    the last one extends it (without, steps stay ranges of their own: no task spans two)."""
    for g, (a, b) in _split(groups, starts, lo, hi):
        ranges = groups[g].ranges
        if merge and ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)  # contiguous: one range
        else:
            ranges.append((a, b))


def units(groups: list[Group], size: int) -> Iterator[list[tuple[int, int, int]]]:
    """The groups' selected positions in order, cut into runs of `size` (the last shorter).

    Each run is a list of (group, lo, hi) pieces. A rank's steps are ranges of `step`
    positions, so with `size == step` every run is one step.
    """
    run: list[tuple[int, int, int]] = []
    room = size
    for g, group in enumerate(groups):
        for lo, hi in group.ranges:
            while lo < hi:
                take = min(room, hi - lo)
                run.append((g, lo, lo + take))
                lo += take
                room -= take
                if room == 0:
                    yield run
                    run, room = [], size
    if run:
        yield run
