"""Engine configuration: the decode policy and the runtime knobs, as frozen dataclasses.

TOML files in `configs/` are parsed into these only at the edges (CLI, server, bench), with
`EngineConfig.from_toml`. Every value is checked in `__post_init__`, and the message says how to
fix it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ROW_OVERHEAD",
    "SLOT_OVERHEAD",
    "ColorMode",
    "DecodePolicy",
    "EngineConfig",
    "OnError",
    "ResizeMode",
]

# Room in a slot for the IPC framing and the non-pixel columns of one batch (and one row).
SLOT_OVERHEAD = 1 << 16
ROW_OVERHEAD = 4096

# NOTE [batch rows]: a decoded batch costs the same in the supervisor (a task, its result, a
# message to the consumer), in the consumer (a slot to map and release) and in a worker's
# framing whether it holds 64 photos or 64 thumbnails; on 32x32 images those costs were most of
# the supervisor's and the consumer's CPU per image. So by default (`batch_rows=None`) a batch
# holds 64 images, or as many small fixed-size images as fill `AUTO_BATCH_BYTES` of pixels (at
# most `MAX_AUTO_ROWS`): 341 of 32x32 RGB, 85 of 64x64, 64 of anything from 91x91 up.
DEFAULT_BATCH_ROWS = 64
AUTO_BATCH_BYTES = 1 << 20
MAX_AUTO_ROWS = 1024

ResizeMode = Literal["fit", "crop", "pad", "stretch"]
ColorMode = Literal["RGB", "L", "keep"]
OnError = Literal["raise", "skip", "warn"]

_RESIZE_MODES = ("fit", "crop", "pad", "stretch")
_COLOR_MODES = ("RGB", "L", "keep")
_ON_ERROR = ("raise", "skip", "warn")


@dataclass(frozen=True, kw_only=True)
class DecodePolicy:
    """How one encoded image becomes pixels.

    Attributes:
        image_size: output (height, width), or None to keep each image's own size. With
            `resize="fit"` it is a bounding box and the output keeps the aspect ratio.
        resize: `stretch` to exactly image_size; `crop` to cover it and centre-crop;
            `pad` to fit inside and pad with zeros; `fit` to fit inside (never upscaled).
        color: `RGB` (3 channels), `L` (1 channel) or `keep` (the file's own channels, 8-bit).
        max_pixels: width x height read from the header above which a sample is refused
            before any decoding (a decompression bomb).
        on_error: what a bad sample does: `raise` stops the run, `skip` drops it silently
            (counted), `warn` drops it with a warning (counted).
    """

    image_size: tuple[int, int] | None = None
    resize: ResizeMode = "stretch"
    color: ColorMode = "RGB"
    max_pixels: int = 250_000_000
    on_error: OnError = "raise"

    def __post_init__(self) -> None:
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(
                    f"image_size must be (height, width) with two positive ints, got "
                    f"{self.image_size!r}; for example image_size=(224, 224)"
                )
            object.__setattr__(self, "image_size", size)
        if self.resize not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {self.resize!r}")
        if self.color not in _COLOR_MODES:
            raise ValueError(f"color must be one of {_COLOR_MODES}, got {self.color!r}")
        if self.on_error not in _ON_ERROR:
            raise ValueError(f"on_error must be one of {_ON_ERROR}, got {self.on_error!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")

    @property
    def fixed_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) when every output image has the same shape, else None."""
        if self.image_size is None or self.resize == "fit" or self.color == "keep":
            return None
        return (*self.image_size, 1 if self.color == "L" else 3)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Runtime knobs of one engine run. Memory is bounded by these, not by the dataset.

    Attributes:
        num_workers: decode processes; None means one per CPU core.
        max_workers: chunk downloads at once.
        prefetch_chunks: chunks downloaded ahead of the one being decoded (K).
        batch_rows: samples per decoded batch (one shared-memory slot each); None: 64, or more
            for small fixed-size images (NOTE [batch rows]; `rows_for` gives it).
        num_slots: shared-memory slots in the pool (S); None means 2 per worker + 2.
        slot_bytes: bytes per slot; None sizes it from the decode policy
            (batch_rows fixed-size images), or 64 MiB for variable-size output.
        timeout: seconds for one HTTP request to make progress (connect and read).
        retries: attempts per chunk download, the first included.
        backoff: base of the exponential backoff between attempts, in seconds.
        retry_after_cap: longest `Retry-After` honoured, in seconds.
        worker_timeout: seconds a worker may spend on one sample (not one batch) before it is
            deemed hung, killed and replaced.
        heartbeat_timeout: seconds the consumer waits for any sign of life from the
            supervisor (it pings after a second of silence) before raising `WorkerError`.
        verify_ssl: verify TLS certificates (a path to a CA bundle is accepted too).
        shuffle: shuffle the order each epoch: a block shuffle that mixes the samples of
            `shuffle_window` chunks (see NOTE [epoch order] in `runtime._epoch`).
        seed: seed of the shuffle; the same seed and epoch give the same order for any
            num_workers, DataLoader workers or world size.
        shuffle_window: chunks whose samples the shuffle mixes together; they are on disk at
            once (their compressed files, not decoded pixels), and the first batch of an
            epoch waits for all of them. 1 shuffles chunk order and within chunks only.
        cache_dir: where downloaded chunks are kept between runs; None downloads into a
            temporary folder removed at the end of the run.
        cache_limit_bytes: size above which the least recently used cached chunks go.
        warm_start: a consumer that runs passes (`Dataset`) keeps a supervisor waiting for
            its next pass: the last pass's, parked with its zygote, or one started ahead (see
            NOTE [parked] and NOTE [spare] in `runtime._launch`); False starts each pass's
            supervisor when the pass begins.
        split_ends: the run's first task and its last `num_workers` tasks are cut into a
            piece per worker, so that the workers share the first batch and end together
            (NOTE [task sizes] in `runtime._schedule`); exports turn it off, as their files'
            row groups follow the engine's batches and must not depend on `num_workers`.
    """

    num_workers: int | None = None
    max_workers: int = 4
    prefetch_chunks: int = 4
    batch_rows: int | None = None
    num_slots: int | None = None
    slot_bytes: int | None = None
    timeout: float = 300.0
    retries: int = 3
    backoff: float = 0.5
    retry_after_cap: float = 30.0
    worker_timeout: float = 120.0
    heartbeat_timeout: float = 60.0
    verify_ssl: bool | str = True
    shuffle: bool = False
    seed: int = 0
    shuffle_window: int = 8
    cache_dir: str | None = None
    cache_limit_bytes: int = 10 * 2**30
    warm_start: bool = True
    split_ends: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        if self.num_workers is not None:
            positive("num_workers", self.num_workers)
        positive("max_workers", self.max_workers)
        positive("prefetch_chunks", self.prefetch_chunks)
        if self.batch_rows is not None:
            positive("batch_rows", self.batch_rows)
        positive("shuffle_window", self.shuffle_window)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        positive("retries", self.retries)
        if self.num_slots is not None:
            positive("num_slots", self.num_slots)
            if self.num_slots < 2:
                raise ValueError(f"num_slots must be at least 2, got {self.num_slots}")
        if self.slot_bytes is not None:
            positive("slot_bytes", self.slot_bytes)
        if not isinstance(self.heartbeat_timeout, (int, float)) or self.heartbeat_timeout <= 0:
            raise ValueError(
                f"heartbeat_timeout must be a number of seconds > 0, got {self.heartbeat_timeout!r}"
            )
        for name in ("timeout", "backoff", "retry_after_cap", "worker_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    @property
    def workers(self) -> int:
        """The number of decode processes this config starts."""
        return self.num_workers or os.cpu_count() or 1

    @property
    def slots(self) -> int:
        """The number of shared-memory slots this config allocates."""
        return self.num_slots or 2 * self.workers + 2

    def rows_for(self, fixed_shape: tuple[int, ...] | None) -> int:
        """Samples per decoded batch for images of `fixed_shape` (None: of any size)."""
        if self.batch_rows is not None:
            return self.batch_rows
        if fixed_shape is None:
            return DEFAULT_BATCH_ROWS
        fill = AUTO_BATCH_BYTES // max(1, math.prod(fixed_shape))
        return max(DEFAULT_BATCH_ROWS, min(MAX_AUTO_ROWS, fill))

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """Reads the `[engine]` table of a TOML file; keyword overrides win."""
        if sys.version_info >= (3, 11):  # imported here: every worker imports this module
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        with open(path, "rb") as f:
            table = tomllib.load(f).get("engine", {})
        unknown = set(table) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys in [engine] of {path}: {sorted(unknown)}")
        return cls(**{**table, **overrides})
