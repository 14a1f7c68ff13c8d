"""One engine pass of a dataset: a `Stream` with its progress bar, tracked until it ends.

`Dataset` keeps the passes still running in a weak set, so that `close()` can stop them; a pass
abandoned by its caller (a `break`, garbage collection) closes its stream in `finally`.

A pass runs on the supervisor that waits in the dataset's `Spare` (launched ahead, or parked
by the pass before), and parks its own there when it ends cleanly (NOTE [spare] and NOTE
[parked] in `pixcrawler_engine.runtime._launch`): epochs after the first skip the processes'
start-up.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

from pixcrawler_engine._config import DecodePolicy, EngineConfig
from pixcrawler_engine.runtime._epoch import Share
from pixcrawler_engine.runtime._launch import Spare, modules_of
from pixcrawler_engine.runtime._stream import Batch, Stream
from pixcrawler_engine.sources._base import Source

__all__ = ["ahead_modules", "run_pass"]


def ahead_modules(source: Source, config: EngineConfig) -> tuple[str, ...]:
    """What a waiting supervisor imports ahead of its run: the modules of its source, and
    numpy when the run shuffles (its order; 0.05-0.1 s of the supervisor's CPU that otherwise
    comes first in the pass, before its first task)."""
    return modules_of(source) + (("numpy",) if config.shuffle else ())


def run_pass(
    source: Source,
    config: EngineConfig,
    policy: DecodePolicy,
    share: Share,
    streams: weakref.WeakSet[Stream],
    progress_bar: Callable[[int], Any],
    spare: Spare | None = None,
    *,
    ahead: bool = True,
) -> Iterator[Batch]:
    """The batches of one engine pass over `source`, counted on a bar (None: no bar).

    It runs on `spare`'s waiting supervisor if there is one, and with `ahead` parks its
    supervisor there for the next pass when it ends (False for a one-off pass, a conversion).
    """
    total = share.count(sum(p.num_records for p in source.plan()))
    if total == 0:
        source.close()
        return
    bar = progress_bar(total)
    try:
        launched = spare.take() if spare is not None else None
        home = spare if ahead else None
        stream = Stream(source, config=config, policy=policy, share=share, launched=launched,
                        home=home)  # fmt: skip
    finally:
        # The supervisor got its own copy of the source; this one's connection can go.
        source.close()
    streams.add(stream)
    try:
        for batch in stream:
            yield batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        stream.close()
        streams.discard(stream)
        if bar is not None:
            bar.close()
