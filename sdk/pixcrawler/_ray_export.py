"""`pixcrawler download --format parquet --ray [ADDRESS]`: an export whose parts Ray tasks write.

`export_job` keeps everything it does for a local export (the work folder, its lock and state,
resume, the final renames into `data/train-*.parquet`) and hands the chunks still to write to a
`RayRunner`: one Ray Data task per chunk (`ray.data.from_items(chunks).map(...)`), which fetches
the chunk with the job API client's retries, decodes it with the engine's `decode_records` and
writes its shard with the local export's own writer (`pixcrawler_engine` `write_part`), under a
temporary name renamed when complete. So a chunk is one file by construction, the files hold the
same rows, schema and bytes as a local export, and an interrupted export resumes, with or
without `--ray`. (Ray's own `write_parquet` would cut the output by block, merge chunks with
`min_rows_per_file`, and leave nothing to resume by.) Ray places the tasks and runs a task
again when its worker dies; the output folder must be one that every node can write (a shared
file system on a real cluster).

NOTE [ray connect]: `ray.init(address=...)` at an address where no Ray cluster answers retries
for many minutes inside Ray's C++ client, with no timeout to set. `connect` checks first that
the address takes TCP connections (a clear error within `CONNECT_TIMEOUT`), and a watchdog ends
the process with a clear error if `ray.init` still has not returned after `INIT_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pixcrawler._chunks import Credential, JobRef
from pixcrawler._ray_tasks import TaskKey, export_part, seal, unseal
from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine._errors import PixCrawlerError
from pixcrawler_engine.export._state import Workspace
from pixcrawler_engine.sources._base import ChunkPlan

__all__ = ["CONNECT_TIMEOUT", "INIT_TIMEOUT", "RayRunner", "connect", "ray_runner"]

CONNECT_TIMEOUT = 5.0
INIT_TIMEOUT = 120.0
_NOT_DISTRIBUTED = ("auto", "local")


@contextlib.contextmanager
def ray_runner(
    address: str | None,
    *,
    base_url: str,
    api_key: str | None,
    config: Any,
    cache: Any,
    format: str,
    policy: DecodePolicy | None,
) -> Iterator[RayRunner]:
    """Connected to Ray (see `connect`), a runner for `export_job(..., runner=...)`.

    Args:
        address: `--ray`'s value (see `connect`).
        base_url: the job API or store.
        api_key: the key (it reaches the tasks inside them, see `_ray_tasks`).
        config: the engine settings (`timeout`, `verify_ssl`, `batch_rows`).
        cache: the command's `ChunkCache`, or None.
        format: the export format (`parquet`).
        policy: the decode policy, or None for the stored files.
    """
    runner = RayRunner(
        base_url=base_url,
        credential=Credential(api_key),
        config=config,
        cache_dir=None if cache is None else str(cache.root),
        format=format,
        policy=policy,
    )
    disconnect = connect(address)
    try:
        yield runner
    finally:
        disconnect()


def connect(address: str | None) -> Callable[[], None]:
    """Connects this process to Ray; returns the function that disconnects it.

    Args:
        address: a Ray cluster's address (`host:port`, `ray://host:port`, `auto`); None or
            empty: `RAY_ADDRESS` if set, else a new local instance, stopped on disconnect.

    Raises:
        PixCrawlerError: Ray Data is not installed, or nothing answers at the address.
    """
    try:
        import ray
    except ImportError as exc:
        raise PixCrawlerError(
            "--ray needs Ray Data, which is not installed: pip install 'pixcrawler-sdk[ray]'"
        ) from exc
    if ray.is_initialized():
        return lambda: None  # someone else's connection: not ours to end
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is not None and target not in _NOT_DISTRIBUTED:
        _check_reachable(target)
    watchdog = threading.Timer(INIT_TIMEOUT, _give_up, args=(target,))
    watchdog.daemon = True
    watchdog.start()
    try:
        # Ray's own INFO and WARNING lines (token auth, dashboards) are not this command's.
        if target is None:
            ray.init(include_dashboard=False, logging_level=logging.ERROR)
        else:
            ray.init(address=target, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PixCrawlerError(
            f"cannot connect to the Ray cluster at {target}: {exc}; check --ray (or RAY_ADDRESS)"
        ) from exc
    finally:
        watchdog.cancel()
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command shows its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per execution
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return ray.shutdown


def _check_reachable(address: str) -> None:
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise PixCrawlerError(
            f"--ray {address!r} is not a Ray address: give HOST:PORT of the cluster's head "
            "(as `ray start --head` prints it), ray://HOST:PORT, or nothing for a local instance"
        )
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise PixCrawlerError(
            f"no Ray cluster answers at {host}:{port} ({exc.strerror or exc}); start one with "
            "`ray start --head` there, or check --ray (or RAY_ADDRESS)"
        ) from None


def _give_up(target: str | None) -> None:
    # See NOTE [ray connect]: ray.init cannot be interrupted; this process holds nothing else
    # yet (no export folder, no lock), so ending it is the only way out, and a clean one.
    sys.stderr.write(
        f"Error: the Ray cluster at {target or 'RAY_ADDRESS'} did not answer within "
        f"{INIT_TIMEOUT:.0f} s; check that it is a Ray cluster's address (--ray, RAY_ADDRESS)\n"
    )
    sys.stderr.flush()
    os._exit(1)


@dataclass(frozen=True, kw_only=True)
class _PartSpec:
    """What every export task of one run shares (small: it travels with each task)."""

    target: str
    format: str
    policy: DecodePolicy | None
    rows: int


class RayRunner:
    """Writes an export's parts with one Ray task per chunk (a `ChunkRunner` of `export_job`).

    Args:
        base_url: the job API or store.
        credential: the API key.
        config: the engine settings (`timeout`, `verify_ssl`, `batch_rows`).
        cache_dir: the shared chunk cache, or None.
        format: the export format (`parquet`).
        policy: the decode policy, or None for the stored files.
    """

    def __init__(
        self,
        *,
        base_url: str,
        credential: Credential,
        config: Any,
        cache_dir: str | None,
        format: str,
        policy: DecodePolicy | None,
    ) -> None:
        if format != "parquet":
            raise ValueError(f"--ray writes --format parquet only, not {format!r}")
        self.base_url = base_url
        self.credential = credential
        self.config = config
        self.cache_dir = cache_dir
        self.format = format
        self.policy = policy

    def __call__(
        self,
        ws: Workspace,
        manifest: Any,
        todo: Sequence[ChunkPlan],
        done: Callable[[int], None],
    ) -> None:
        import ray

        ref = JobRef(
            base_url=self.base_url,
            credential=self.credential,
            timeout=self.config.timeout,
            verify_ssl=self.config.verify_ssl,
            manifest=manifest,
            cache_dir=self.cache_dir,
        )
        chunks = list(todo)
        sealed, key = seal(ref)
        shared = ray.put(sealed)
        spec = _PartSpec(
            target=str(ws.target),
            format=self.format,
            policy=self.policy,
            rows=self.config.rows_for(self.policy and self.policy.fixed_shape),
        )
        if "label_kind" not in ws.state:
            # The first samples written fix the label column's type (see the parquet writer);
            # their chunk goes first, alone, and every other task gets the type it fixed.
            state = self._run(shared, key, spec, chunks[:1], ws.state, done)[0]
            ws.state.update(state)
            ws.save()
            chunks = chunks[1:]
        if chunks:
            self._run(shared, key, spec, chunks, ws.state, done)

    def _run(
        self,
        shared: Any,
        key: TaskKey,
        spec: _PartSpec,
        chunks: list[ChunkPlan],
        state: dict[str, Any],
        done: Callable[[int], None],
    ) -> list[dict[str, Any]]:
        import ray.data

        items = [{"chunk": p.index, "images": p.num_records} for p in chunks]
        task = functools.partial(_export_task, shared, key, spec, json.dumps(state))
        rows = ray.data.from_items(items, override_num_blocks=len(items)).map(task, num_cpus=1)
        states = []
        for row in rows.iter_rows():
            if row["error"] is not None:
                # Leaving the loop stops the other tasks; the parts committed so far stay.
                error = pickle.loads(row["error"])
                error.add_note(f"(in a Ray task writing chunk {row['chunk']})")
                raise error
            done(int(row["images"]))
            states.append(json.loads(row["state"]))
        return states


def _export_task(
    shared: Any, key: TaskKey, spec: _PartSpec, state: str, row: dict[str, Any]
) -> dict[str, Any]:
    """One export task: the part of chunk `row["chunk"]`. Runs in a Ray worker."""
    import ray

    ref = unseal(ray.get(shared), key)
    assert isinstance(ref, JobRef)
    out: dict[str, Any] = {"chunk": row["chunk"], "images": row["images"], "error": None}
    try:
        after = export_part(
            ref,
            spec.target,
            json.loads(state),
            format=spec.format,
            policy=spec.policy,
            chunk=int(row["chunk"]),
            keep=int(row["images"]),
            rows=spec.rows,
        )
    except PixCrawlerError as exc:
        # Sent back as a value: Ray Data would hand the driver only its text, and the command
        # reports our errors (DownloadError naming the chunk, ...) with their type.
        out.update(error=pickle.dumps(exc), state="{}")
        return out
    out["state"] = json.dumps(after)
    return out
