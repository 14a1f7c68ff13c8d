"""The iterable PyTorch dataset: epochs, ranks and exact mid-epoch resume over the engine.

Every rank, DataLoader worker and resumed run computes the same global order of an epoch
from (job version, seed, epoch) alone (NOTE [epoch order] in `pixcrawler_engine.runtime._epoch`)
and takes its share of it: at each step the W ranks take the next W x B samples, rank r the
B after the first r x B. Inside DataLoader workers, worker k of K takes the rank's batches
k, k + K, ..., which DataLoader hands out round robin: the rank's order again.

The state (`state_dict`) is plain JSON: the job, the order's parameters, the epoch and how
many samples of the epoch's global order all ranks together have consumed; a run restored
from it (at any world size) starts the epoch there and decodes nothing before it. Per sample
under ranks, that count stops at whole turns (world size x engine batch rows). A DataLoader
worker's state also holds its own place (its units handed out whole, and rows of the next),
which only the same worker of as many workers restores (`StatefulDataLoader` gives each
worker its own). With `batch_size`, every batch is one step of the order (in a worker, one
unit), shorter by what was skipped and empty where all of it was bad: counts match `len()`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data

from pixcrawler._chunks import JobRef, LocalChunks
from pixcrawler._labels import LabelCoder
from pixcrawler._parquet_ref import ParquetRef
from pixcrawler._rebatch import check_batch_size, count_batches, rebatch
from pixcrawler._torch_tensors import alloc, can_pin, images_tensor, pinned_alloc
from pixcrawler._torch_world import PassState, by_step, world
from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine.runtime._chunk import decode_records
from pixcrawler_engine.runtime._epoch import Share, epoch_groups, units
from pixcrawler_engine.runtime._stream import Batch, SampleWarning, Stream

__all__ = ["TorchIterableDataset"]

STATE_VERSION = 1
PLACE = ("id", "of", "units", "rows")  # a DataLoader worker's place in its state


class TorchIterableDataset(torch.utils.data.IterableDataset[Any]):
    """An iterable dataset streamed by the engine: epochs, ranks, resume.

    Each `iter()` is an epoch: `set_epoch(n)` sets it, else it advances by one per pass
    (inside DataLoader workers the dataset is a copy made each epoch: call `set_epoch`, or
    use `persistent_workers=True`). With `shuffle=True` the order depends only on the seed
    and the epoch. Under `torch.distributed` (or `RANK`/`WORLD_SIZE`) the ranks share each
    epoch without overlap, all with the same number of batches: the last, incomplete step is
    padded with samples from the epoch's start (or dropped with `drop_last=True`). In the
    main process (`num_workers=0`) the rank's share streams through the engine's decode
    processes; inside DataLoader workers each worker decodes its batches itself.

    With `batch_size`, each item is a whole batch `(images, labels)`: images a uint8
    (B, H, W, C) tensor, labels an int64 (B,) tensor of class indices (a list where labels are
    neither class names nor ints); read it with `DataLoader(dataset, batch_size=None)`. A batch
    that lies inside one engine batch shares the engine's shared-memory slot (no copy; the
    slot stays leased while the tensor lives, so it stays valid after the next batch), one
    that spans engine batches is copied once.

    `state_dict()` / `load_state_dict()` save and restore the position in the epoch, for
    torchdata's `StatefulDataLoader` (see the module docstring).

    Attributes:
        class_to_idx: class name -> label index, in the job's `labels` order.
        classes: the class names, index order.
    """

    def __init__(
        self,
        ref: JobRef | ParquetRef,
        config: EngineConfig,
        policy: DecodePolicy,
        output: Callable[[np.ndarray, Any], tuple[Any, Any]],
        class_to_idx: dict[str, int],
        transform: Callable[[Any], Any] | None,
        *,
        batch_size: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        metadata: Callable[[Batch], tuple[list[dict[str, Any]]]] | None = None,
    ) -> None:
        check_batch_size(batch_size, optional=True)
        self.ref = ref
        self.config = config
        self.policy = policy
        self.transform = transform
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.metadata = metadata
        self.epoch = 0
        self._output = output
        self.class_to_idx = class_to_idx
        self.classes = list(class_to_idx)
        self._start = 0  # where the next pass starts in its epoch (a loaded state)
        self._resume: tuple[int, int, int, int] | None = None  # a worker's: id, of, units, rows
        self._pass: PassState | None = None

    # ---- epochs and state -------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the next pass (the same on every rank), from its start."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch, self._start, self._resume, self._pass = epoch, 0, None, None

    def state_dict(self) -> dict[str, Any]:
        """Where the current pass stands, as plain JSON data (see `load_state_dict`).

        Inside a DataLoader worker it also holds the worker's own place (`worker`), which
        only the same worker of as many workers can restore.
        """
        p = self._pass
        state: dict[str, Any] = {"epoch": self.epoch, "consumed": self._start}
        place = self._resume
        if p is not None and p.worker is not None:
            state = {"epoch": p.epoch, "consumed": p.start}
            place = (*p.worker, p.units, p.rows)
        elif p is not None:
            consumed = self._total()
            if not p.done and p.items < p.expected:
                consumed = min(consumed, p.start + self._consumed(p.items, p.world_size))
            state = {"epoch": p.epoch, "consumed": consumed}
        if place is not None:
            state["worker"] = dict(zip(PLACE, place, strict=True))
        return {**self._identity(), **state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Makes the next pass continue the saved epoch where it stood, at any world size.

        Raises:
            ValueError: the state belongs to another job, job version, order or dataset
                size; the message names what differs.
        """
        mine = self._identity()
        if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
            raise ValueError(
                f"not a state of this dataset ({state!r:.80}); pass what state_dict() returned"
            )
        differ = [k for k in mine if state.get(k) != mine[k]]
        if differ:
            said = ", ".join(f"{k}={state.get(k)!r} (now {mine[k]!r})" for k in differ)
            raise ValueError(
                f"this state was saved for another dataset or order: {said}; load the dataset "
                "as it was saved, or start the epoch afresh with set_epoch()"
            )
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if not isinstance(epoch, int) or not isinstance(consumed, int) or consumed < 0:
            raise ValueError(f"a state needs int 'epoch' and 'consumed', got {state!r:.120}")
        place = state.get("worker")
        resume = None
        if place is not None:
            values = [place.get(k) for k in PLACE] if isinstance(place, dict) else []
            ints = [v for v in values if isinstance(v, int) and v >= 0]
            if len(ints) != len(PLACE):
                raise ValueError(f"a worker's state needs int id, of, units, rows: {place!r:.120}")
            resume = (ints[0], ints[1], ints[2], ints[3])
        elif consumed >= self._total():
            epoch, consumed = epoch + 1, 0  # saved at the end of the epoch: the next one
        self.epoch, self._start, self._resume, self._pass = epoch, consumed, resume, None

    def _identity(self) -> dict[str, Any]:
        manifest = self.ref.manifest
        return {
            "state_version": STATE_VERSION,
            "job_id": manifest.job_id,
            "version": manifest.version,
            "num_images": self._total(),
            "shuffle": self.config.shuffle,
            "seed": self.config.seed,
            "shuffle_window": self.config.shuffle_window,
        }

    def _total(self) -> int:
        return sum(c.num_images for c in self.ref.manifest.chunks)

    def _step(self) -> int:
        """Samples a rank takes per step: its batch size (engine batches when per sample)."""
        return self.batch_size or self.config.rows_for(self.policy.fixed_shape)

    def _share(self, size: int, rank: int) -> Share:
        step = self._step()
        return Share(epoch=self.epoch, start=self._start, rank=rank, world_size=size, step=step,
                     drop_last=self.drop_last and size > 1,
                     per_sample=self.batch_size is None)  # fmt: skip

    def _consumed(self, items: int, size: int) -> int:
        """Samples of the global order consumed once every rank has handed out `items`."""
        if size == 1:
            return items * (self.batch_size or 1)
        step = self._step()
        per_step = 1 if self.batch_size else step  # items per step of one rank
        return (items // per_step) * size * step

    # ---- iteration ----------------------------------------------------------------------
    def __len__(self) -> int:
        """Images (or batches, with `batch_size`) of this rank's share of the next epoch.

        Fewer come out when bad images are skipped.
        """
        rank, size = world()
        return self._expected(self._share(size, rank), size)

    def _expected(self, share: Share, size: int) -> int:
        images = share.count(self._total())
        if size > 1 and self.batch_size is not None:
            return len(share.ranges(self._total()))  # one batch per step
        batches = count_batches(images, self.batch_size, self.drop_last)
        return images if batches is None else batches

    def __iter__(self) -> Iterator[Any]:
        rank, size = world()
        share = self._share(size, rank)
        info = torch.utils.data.get_worker_info()
        worker = None if info is None else (info.id, info.num_workers)
        units, rows = self._resumed_at(worker)
        self.epoch, self._start = share.epoch + 1, 0  # the next pass: the next epoch
        p = self._pass = PassState(share.epoch, share.start, size, self._expected(share, size),
                               worker, units=units, rows=rows)  # fmt: skip
        if worker is None:
            batches = self._stream(share)
        else:
            batches = self._decode_here(share, *worker, skip=(units, rows))
        if not self.batch_size:
            items = self._samples(batches)
        else:  # one batch per step (a worker: per unit), however many samples were skipped
            sizes = self._unit_sizes(share)
            if worker is not None:
                sizes = sizes[worker[0] :: worker[1]][units:]  # this worker's, still to come
            steps = zip(sizes, by_step(batches, sizes), strict=False)
            items = (item for n, group in steps for item in self._step_batches(group, n))
        try:
            for n, item in enumerate(items, 1):
                p.items = n  # handed out: consumed
                if worker is not None and self.batch_size:
                    p.units = units + n
                yield item
            p.done = True
        finally:
            batches.close()  # stops the engine pass now, not when the generator is collected

    def _resumed_at(self, worker: tuple[int, int] | None) -> tuple[int, int]:
        """The units and rows a loaded worker state says this worker handed out already."""
        resume, self._resume = self._resume, None
        if resume is None:
            return 0, 0
        if worker != resume[:2]:
            where = "the main process" if worker is None else f"worker {worker[0]} of {worker[1]}"
            raise ValueError(
                f"this state was saved by DataLoader worker {resume[0]} of {resume[1]} and "
                f"is loaded in {where}: restore it with num_workers={resume[1]}"
            )
        return resume[2], resume[3]

    def _unit_sizes(self, share: Share) -> list[int]:
        """Positions of each step of `share`, in order (inside DataLoader workers: units,
        which the workers decode round robin)."""
        step = self._step()
        ranges = share.ranges(self._total())
        return [min(step, hi - p) for lo, hi in ranges for p in range(lo, hi, step)]

    def _samples(self, batches: Iterator[Batch]) -> Iterator[tuple[Any, ...]]:
        p = self._pass
        counting = p is not None and p.worker is not None  # a worker's batches are its units
        for batch in batches:
            images = batch.images
            meta = self.metadata(batch)[0] if self.metadata else None
            for i, label in enumerate(batch.labels):
                item = self._output(images[i], label)
                if counting:
                    assert p is not None
                    last = i + 1 == len(batch)
                    p.units, p.rows = p.units + last, 0 if last else p.rows + 1
                yield item if meta is None else (*item, meta[i])
            if counting and not len(batch):
                assert p is not None
                p.units, p.rows = p.units + 1, 0

    def _step_batches(self, group: list[Batch], size: int) -> Iterable[tuple[Any, ...]]:
        """The batch of one step: empty where every sample of it was bad, so that every rank
        (and every unit of a worker) hands out one batch per step."""
        if group:
            return self._batches(group)
        if self.drop_last and self.batch_size is not None and size < self.batch_size:
            return []  # a short last step, dropped whatever it held
        images = torch.empty((0, *(self.policy.fixed_shape or (0, 0, 0))), dtype=torch.uint8)
        if self.transform is not None:
            images = self.transform(images)
        labels: Any = torch.empty(0, dtype=torch.int64) if self.class_to_idx else []
        return [(images, labels, *([[]] if self.metadata else []))]

    def _batches(self, batches: Iterable[Batch]) -> Iterator[tuple[Any, ...]]:
        pin = self.pin_memory and torch.utils.data.get_worker_info() is None and can_pin()
        coder = LabelCoder(self.class_to_idx)
        metadata = self.metadata

        def extract(batch: Batch) -> tuple[Any, ...]:
            labels = coder(batch)
            return (labels, *metadata(batch)) if metadata else (labels,)

        assert self.batch_size is not None
        for rows in rebatch(
            batches,
            self.batch_size,
            drop_last=self.drop_last,
            shape=self.policy.fixed_shape,
            extract=extract,
            alloc=pinned_alloc if pin else alloc,
        ):
            images = images_tensor(rows, pin=pin)
            labels = rows.columns[0]
            if isinstance(labels, np.ndarray):
                labels = torch.from_numpy(labels)
                if pin:
                    labels = labels.pin_memory()
            if self.transform is not None:
                images = self.transform(images)
            yield (images, labels, *rows.columns[1:])

    def _stream(self, share: Share) -> Generator[Batch, None, None]:
        if not share.count(self._total()):
            return
        source = self.ref.source()
        # Engine batches no bigger than a step: then a batch that does not cross a block of
        # the order is one engine batch, handed out without a copy.
        rows = self.config.rows_for(self.policy.fixed_shape)
        config = self.config.replace(batch_rows=min(rows, self._step()))
        try:
            stream = Stream(source, config=config, policy=self.policy, share=share)
        finally:
            source.close()  # the supervisor has its own copy
        with stream:
            yield from stream

    def _decode_here(
        self, share: Share, worker: int, workers: int, *, skip: tuple[int, int] = (0, 0)
    ) -> Generator[Batch, None, None]:
        """Worker `worker` of `workers`: the rank's units worker, worker + workers, ...; after
        a restored state, from its `skip[0]`-th unit on, less that unit's first `skip[1]` rows.
        """
        skip_units, skip_rows = skip
        chunks = self.ref.manifest.chunks
        groups = epoch_groups(
            [c.num_images for c in chunks],
            chunk_ids=[c.index for c in chunks],
            shuffle=self.config.shuffle,
            seed=self.config.seed,
            window=self.config.shuffle_window,
            share=share,
        )
        cache = LocalChunks(self.ref)
        try:
            mine = 0
            for n, pieces in enumerate(units(groups, self._step())):
                if n % workers != worker:
                    continue
                mine += 1
                if mine <= skip_units:
                    continue
                records, reads, ids = [], [], []
                for g, lo, hi in pieces:
                    group = groups[g]
                    ids_of = [chunks[i].index for i in group.chunks]
                    opened = [cache.open(chunk) for chunk in ids_of]  # once per piece
                    for part, row in group.rows(lo, hi):
                        reader, listed = opened[part]
                        records.append(listed[row])
                        reads.append(reader.read)
                        ids.append(ids_of[part])
                batch, _, errors = decode_records(records, reads, self.policy, chunk=ids)
                if self.policy.on_error == "warn":
                    for key, message in errors:
                        warnings.warn(SampleWarning(message, key), stacklevel=2)
                rows, skip_rows = skip_rows, 0  # handed out before the state was saved
                yield Batch(batch.slice(rows) if rows else batch, skipped=len(errors))
        finally:
            cache.discard()
