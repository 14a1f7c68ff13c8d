"""The `cache` commands: what the shared chunk cache holds (`info`) and emptying it (`clear`).

The cache is the one `load_dataset` (and `download --cache`) keeps verified chunks in, keyed
by job version; both commands take `--cache-dir` for another folder than the default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pixcrawler.cli._api import engine_config
from pixcrawler.cli._main import main

__all__ = ["cache"]

_DIR = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The cache folder; default: $PIXCRAWLER_CACHE, else $XDG_CACHE_HOME/pixcrawler, "
    "else ~/.cache/pixcrawler.",
)


def _open(cache_dir: Path | None) -> Any:
    from pixcrawler_engine.sources._cache import ChunkCache

    return ChunkCache(cache_dir, limit_bytes=engine_config().cache_limit_bytes)


@main.group()
def cache() -> None:
    """Show or clear the cache of verified chunks shared by runs on this machine."""


@cache.command()
@_DIR
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(cache_dir: Path | None, as_json: bool) -> None:
    """Where the cache is, its size and limit, and what each job version takes."""
    from pixcrawler._info import format_bytes

    store = _open(cache_dir)
    versions = store.versions()
    total = sum(size for _, _, size in versions.values())
    if as_json:
        listing = [
            {"version": v, "job_id": job, "chunks": n, "bytes": size}
            for v, (job, n, size) in sorted(versions.items())
        ]
        out = {"root": str(store.root), "bytes": total, "limit_bytes": store.limit_bytes}
        click.echo(json.dumps({**out, "versions": listing}, indent=1))
        return
    click.echo(f"Cache: {store.root}")
    limit = format_bytes(store.limit_bytes)
    click.echo(f"Size:  {format_bytes(total)} (limit {limit} by default)")
    if not versions:
        click.echo("Empty.")
        return
    rows = [("JOB ID", "VERSION", "CHUNKS", "SIZE")]
    for v, (job, n, size) in sorted(versions.items(), key=lambda kv: (kv[1][0] or "", kv[0])):
        rows.append((job or "?", v, str(n), format_bytes(size)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@cache.command()
@_DIR
@click.option("--version", "version", default=None, help="Only this job version.")
@click.option("--job", "job_id", default=None, help="Only the versions of this job id.")
def clear(cache_dir: Path | None, version: str | None, job_id: str | None) -> None:
    """Remove the cached chunks: all of them, or one job version's, or one job's."""
    from pixcrawler._info import format_bytes

    store = _open(cache_dir)
    if version is not None or job_id is not None:
        known = store.versions()
        matches = [
            v
            for v, (job, _, _) in known.items()
            if (version is None or v == version) and (job_id is None or job == job_id)
        ]
        if not matches:
            what = " and ".join(
                f"{name} {value}"
                for name, value in (("version", version), ("job", job_id))
                if value is not None
            )
            raise click.ClickException(
                f"the cache at {store.root} holds nothing of {what}; "
                "`pixcrawler cache info` lists what it holds"
            )
    freed = store.clear(version=version, job_id=job_id)
    click.echo(f"Removed {format_bytes(freed)} from {store.root}.")
