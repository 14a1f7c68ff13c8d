"""The `download`, `list` and `info` commands of the `pixcrawler` CLI, registered on `_cli.main`.

The API key comes from `--api-key` or `PIXCRAWLER_API_KEY` and the base URL from `--base-url`
or `PIXCRAWLER_BASE_URL`; the key is never printed, not even in `--help`. Exit status: 0 done,
1 a failure (one `Error: ...` line on stderr, from `_cli._Group`), 2 a usage error, 130
interrupted (`download` resumes when run again).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import click

from pixcrawler.cli._main import CONFIGS, main

__all__ = ["download", "info", "list_jobs"]

DEFAULT_BASE_URL = "https://api.pixcrawler.com"
ENV_API_KEY = "PIXCRAWLER_API_KEY"
ENV_BASE_URL = "PIXCRAWLER_BASE_URL"
# numpy output needs one shape for every image; this is torchvision's usual input size.
DEFAULT_NUMPY_SIZE = (224, 224)
FORMATS = ("numpy", "images", "zip", "parquet")
RESIZE_MODES = ("stretch", "crop", "pad", "fit")


class ImageSize(click.ParamType):
    """`HxW` (or `N` for a square) with positive integers, as (height, width)."""

    name = "HxW"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value).strip().lower()
        parts = text.split("x")
        if len(parts) == 1:
            parts = parts * 2
        try:
            height, width = (int(p) for p in parts)
        except ValueError:
            height = width = -1
        if height <= 0 or width <= 0 or len(parts) != 2:
            self.fail(
                f"{value!r} is not a size: give HEIGHTxWIDTH with two positive integers, "
                "for example 224x224 (or 224 for a square)",
                param,
                ctx,
            )
        return (height, width)


def _api_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--api-key` and `--base-url`, shared by the commands that talk to the job API."""
    f = click.option(
        "--base-url",
        envvar=ENV_BASE_URL,
        default=DEFAULT_BASE_URL,
        show_default=True,
        show_envvar=True,
        help="Job API URL, or file:///path/to/store for a local job store.",
    )(f)
    return click.option(
        "--api-key",
        envvar=ENV_API_KEY,
        default=None,
        show_envvar=True,
        help="PixCrawler API key (not needed for file:// stores).",
    )(f)


def _client(api_key: str | None, base_url: str, config: Any) -> Any:
    from pixcrawler_engine.sources._jobapi import JobClient

    scheme = urlsplit(base_url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise click.BadParameter(
            f"{base_url!r}: use https://host, http://host or file:///path/to/store",
            param_hint="'--base-url'",
        )
    if not api_key and scheme != "file":
        raise click.UsageError(f"no API key: pass --api-key or set {ENV_API_KEY}")
    return JobClient.from_config(base_url, api_key or None, config)


def _engine_config(**overrides: Any) -> Any:
    from pixcrawler_engine._config import EngineConfig

    given = {k: v for k, v in overrides.items() if v is not None}
    path = CONFIGS / "engine.toml"
    return EngineConfig.from_toml(path, **given) if path.is_file() else EngineConfig(**given)


def _ray_runner(address: str | None, **options: Any) -> contextlib.AbstractContextManager[Any]:
    """`--ray`: connected to Ray, the runner whose tasks write the parts; None without it."""
    if address is None:
        return contextlib.nullcontext()
    if options["format"] != "parquet":
        raise click.BadOptionUsage("ray_address", "--ray writes --format parquet only")
    from pixcrawler._ray_export import ray_runner

    return ray_runner(address, **options)


@main.command()
@click.argument("job_id")
@_api_options
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default="./datasets",
    show_default=True,
    help="Folder the dataset goes into, as <output-dir>/<job_id>/.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="numpy",
    show_default=True,
    help="numpy: images.npy + labels; images: a folder per label; zip: the chunk files; "
    "parquet: Hugging Face-style shards.",
)
@click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Parallel download threads [default: 4].",
)
@click.option(
    "--num-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Decode processes [default: one per CPU core].",
)
@click.option(
    "--image-size",
    type=ImageSize(),
    default=None,
    metavar="HxW",
    help="Decode and resize to HxW [numpy default: 224x224; images and parquet default: the "
    "original files, not decoded].",
)
@click.option(
    "--resize",
    type=click.Choice(RESIZE_MODES),
    default="stretch",
    show_default=True,
    help="How images reach --image-size: stretch, crop (cover, centre-crop), pad, or fit "
    "(inside, aspect kept; not for numpy).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep verified chunks in this cache, shared with other runs.",
)
@click.option(
    "--cache", "use_cache", is_flag=True, help="Use the default cache ($XDG_CACHE_HOME/pixcrawler)."
)
@click.option("--no-progress", is_flag=True, help="Disable the progress bar.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Write a parquet export with Ray: one task per chunk on the cluster at ADDRESS "
    "(no value: RAY_ADDRESS, else a local instance). The output folder must be shared.",
)
def download(
    job_id: str,
    api_key: str | None,
    base_url: str,
    output_dir: Path,
    fmt: str,
    max_workers: int | None,
    num_workers: int | None,
    image_size: tuple[int, int] | None,
    resize: str,
    cache_dir: Path | None,
    use_cache: bool,
    no_progress: bool,
    ray_address: str | None,
) -> None:
    """Download dataset JOB_ID to <output-dir>/<JOB_ID>/ in the chosen format.

    An interrupted download (Ctrl-C, a lost connection, a killed process) resumes when the
    same command is run again: finished chunks are neither downloaded nor written twice.
    """
    from pixcrawler_engine._config import DecodePolicy, ResizeMode
    from pixcrawler_engine.export._driver import export_job
    from pixcrawler_engine.export._state import safe_name
    from pixcrawler_engine.sources._base import JobSource
    from pixcrawler_engine.sources._cache import ChunkCache

    if fmt == "zip" and image_size is not None:
        raise click.BadOptionUsage(
            "image_size", "--image-size does not apply to --format zip: the chunks stay as they are"
        )
    if fmt == "numpy" and resize == "fit":
        raise click.BadOptionUsage(
            "resize", "--resize fit gives images of different sizes, which numpy cannot stack"
        )
    if fmt == "numpy" and image_size is None:
        image_size = DEFAULT_NUMPY_SIZE
    mode = cast(ResizeMode, resize)
    policy = DecodePolicy(image_size=image_size, resize=mode) if image_size else None
    config = _engine_config(max_workers=max_workers, num_workers=num_workers)
    cache = None
    if cache_dir is not None or use_cache:
        cache = ChunkCache(cache_dir, limit_bytes=config.cache_limit_bytes)
    from tqdm import tqdm

    ray_options = {"base_url": base_url, "api_key": api_key, "config": config, "cache": cache}
    with (
        _client(api_key, base_url, config) as client,
        _ray_runner(ray_address, format=fmt, policy=policy, **ray_options) as runner,
    ):
        manifest = client.get_job(job_id)
        target = output_dir / safe_name(manifest.job_id)
        bars: list[Any] = []  # opened on the first report: a refused export shows no bar

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, unit="img", desc=job_id, disable=no_progress))
            bars[0].update(done - bars[0].n)

        try:
            result = export_job(
                JobSource(client, manifest),
                target,
                format=fmt,
                policy=policy,
                config=config,
                cache=cache,
                progress=progress,
                runner=runner,
            )
        except KeyboardInterrupt:
            for bar in bars:
                bar.close()
            click.echo(
                f"Interrupted: {target} is incomplete; run the same command again to resume.",
                err=True,
            )
            sys.exit(130)
        finally:
            for bar in bars:
                bar.close()
    if result.already_complete:
        click.echo(f"{target} already holds the complete {fmt} export of {job_id}; nothing to do.")
        return
    resumed = (
        f" (resumed: {result.chunks_resumed} of {result.chunks_resumed + result.chunks_written} "
        "chunks were already written)"
        if result.chunks_resumed
        else ""
    )
    how = f"{fmt}, {image_size[0]}x{image_size[1]}" if image_size else fmt
    click.echo(f"Saved {result.num_images:,} images of {job_id} to {target} ({how}){resumed}.")


@main.command("list")
@_api_options
def list_jobs(api_key: str | None, base_url: str) -> None:
    """List the datasets (jobs) your API key can read."""
    from pixcrawler._info import format_bytes

    with _client(api_key, base_url, _engine_config()) as client:
        jobs = client.list_jobs()
    if not jobs:
        click.echo("No datasets.")
        return
    header = ("JOB ID", "STATUS", "IMAGES", "CHUNKS", "SIZE", "CREATED")
    rows = [header]
    for job in jobs:
        chunks = job.get("num_chunks", len(job.get("chunks") or []))
        size = job.get("size_bytes")
        rows.append(
            (
                str(job.get("job_id", "?")),
                str(job.get("status", "?")),
                f"{job['num_images']:,}" if isinstance(job.get("num_images"), int) else "?",
                str(chunks),
                format_bytes(size) if isinstance(size, int) else "?",
                str(job.get("created_at", "")).replace("T", " ").removesuffix("Z"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.argument("job_id")
@_api_options
def info(job_id: str, api_key: str | None, base_url: str) -> None:
    """Show the metadata of dataset JOB_ID (images, chunks, size, labels)."""
    from pixcrawler._info import DatasetInfo

    with _client(api_key, base_url, _engine_config()) as client:
        manifest = client.get_job(job_id, require_complete=False)
    click.echo(DatasetInfo.from_manifest(manifest).summary())
    if manifest.status != "completed":
        click.echo(f"Progress: {manifest.progress:g}%")
