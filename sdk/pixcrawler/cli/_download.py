"""The `download` command: a job exported to numpy, image folders, zip or Parquet, resumably.

Exit status: 0 done, 1 a failure (one `Error: ...` line on stderr, from `_main._Group`), 2 a
usage error, 130 interrupted (`download` resumes when run again).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, cast

import click

from pixcrawler.cli._api import ImageSize, api_options, client, engine_config
from pixcrawler.cli._main import main

__all__ = ["download"]

FORMATS = ("numpy", "images", "zip", "parquet")
RESIZE_MODES = ("stretch", "crop", "pad", "fit")
COLOR_MODES = ("RGB", "L", "keep")
ON_ERROR = ("raise", "skip", "warn")


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
@api_options
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
    help="Decode and resize to HxW [numpy default: the images' own size when they all share "
    "one; images and parquet default: the original files, not decoded].",
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
    "--color",
    type=click.Choice(COLOR_MODES),
    default=None,
    help="Decode to RGB, L (grayscale) or keep (the file's channels; not for numpy) "
    "[numpy default: RGB; images and parquet: decoded only with --color or --image-size].",
)
@click.option(
    "--on-error",
    type=click.Choice(ON_ERROR),
    default="raise",
    show_default=True,
    help="An image that cannot be decoded stops the download (raise), or is left out "
    "(skip), with a line on stderr naming it (warn).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse images with more pixels than this, before decoding [default: 250,000,000].",
)
@click.option(
    "--shuffle", is_flag=True, help="Write the samples in a seeded random order (see --seed)."
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help=(
        "Seed of --shuffle [default: 0]; the order of load_dataset(shuffle=True, seed=..., "
        "shuffle_window=1)'s first epoch."
    ),
)
@click.option(
    "--max-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Write only the first N samples (of the shuffled order with --shuffle).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Start over when the folder holds an export of other options or another job version "
    "(otherwise refused, so that a resumed download never mixes two).",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep verified chunks in this cache, shared with other runs.",
)
@click.option(
    "--cache",
    "use_cache",
    is_flag=True,
    help="Use the default cache ($PIXCRAWLER_CACHE, else $XDG_CACHE_HOME/pixcrawler).",
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
    ca_bundle: Path | None,
    output_dir: Path,
    fmt: str,
    max_workers: int | None,
    num_workers: int | None,
    image_size: tuple[int, int] | None,
    resize: str,
    color: str | None,
    on_error: str,
    max_pixels: int | None,
    shuffle: bool,
    seed: int | None,
    max_samples: int | None,
    force: bool,
    cache_dir: Path | None,
    use_cache: bool,
    no_progress: bool,
    ray_address: str | None,
) -> None:
    """Download dataset JOB_ID to <output-dir>/<JOB_ID>/ in the chosen format.

    An interrupted download (Ctrl-C, a lost connection, a killed process) resumes when the
    same command is run again: finished chunks are neither downloaded nor written twice.
    """
    from pixcrawler.cli._words import sample_lines
    from pixcrawler_engine.export._driver import export_job
    from pixcrawler_engine.export._order import Selection
    from pixcrawler_engine.export._state import safe_name
    from pixcrawler_engine.sources._base import JobSource
    from pixcrawler_engine.sources._cache import ChunkCache

    policy = _download_policy(fmt, image_size, resize, color, on_error, max_pixels)
    if fmt == "zip" and (shuffle or max_samples is not None):
        flag = "--shuffle" if shuffle else "--max-samples"
        raise click.BadOptionUsage(
            flag, f"{flag} does not apply to --format zip: the chunk files stay whole"
        )
    if seed is not None and not shuffle:
        raise click.BadOptionUsage("seed", "--seed only applies with --shuffle")
    selection = Selection(shuffle=shuffle, seed=seed or 0, max_samples=max_samples)
    config = engine_config(max_workers=max_workers, num_workers=num_workers, verify_ssl=ca_bundle)
    cache = None
    if cache_dir is not None or use_cache:
        cache = ChunkCache(cache_dir, limit_bytes=config.cache_limit_bytes)
    from tqdm import tqdm

    ray_options = {"base_url": base_url, "api_key": api_key, "config": config, "cache": cache}
    with (
        client(api_key, base_url, config) as jobs,
        sample_lines("download"),
        _ray_runner(ray_address, format=fmt, policy=policy, **ray_options) as runner,
    ):
        manifest = jobs.get_job(job_id)
        target = output_dir / safe_name(manifest.job_id)
        bars: list[Any] = []  # opened on the first report: a refused export shows no bar

        def progress(done: int, total: int) -> None:
            if not bars:
                bars.append(tqdm(total=total, unit="img", desc=job_id, disable=no_progress))
            bars[0].update(done - bars[0].n)

        try:
            result = export_job(
                JobSource(jobs, manifest),
                target,
                format=fmt,
                policy=policy,
                config=config,
                cache=cache,
                progress=progress,
                selection=selection,
                force=force,
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
    click.echo(_saved_line(result, job_id, fmt, image_size))


def _download_policy(
    fmt: str,
    image_size: tuple[int, int] | None,
    resize: str,
    color: str | None,
    on_error: str,
    max_pixels: int | None,
) -> Any:
    """The decode policy of a download (None: the files are kept as they are), or a usage error."""
    from pixcrawler_engine._config import DecodePolicy

    if fmt == "zip":
        for flag, given in (("--image-size", image_size), ("--color", color)):
            if given is not None:
                raise click.BadOptionUsage(
                    flag, f"{flag} does not apply to --format zip: the chunks stay as they are"
                )
    if fmt == "numpy" and resize == "fit" and image_size is not None:
        raise click.BadOptionUsage(
            "resize", "--resize fit gives images of different sizes, which numpy cannot stack"
        )
    if fmt == "numpy" and color == "keep":
        raise click.BadOptionUsage(
            "color", "--color keep gives images of different channels, which numpy cannot stack"
        )
    if fmt == "zip" or (fmt != "numpy" and image_size is None and color is None):
        return None
    extra = {} if max_pixels is None else {"max_pixels": max_pixels}
    return DecodePolicy(
        image_size=image_size,
        resize=cast(Any, resize),
        color=cast(Any, color or "RGB"),
        on_error=cast(Any, on_error),
        **extra,
    )


def _saved_line(result: Any, job_id: str, fmt: str, asked: tuple[int, int] | None) -> str:
    """The last line of a download: what was written where."""
    if result.already_complete:
        return f"{result.path} already holds the complete {fmt} export of {job_id}; nothing to do."
    resumed = (
        f" (resumed: {result.chunks_resumed} of {result.chunks_resumed + result.chunks_written} "
        "chunks were already written)"
        if result.chunks_resumed
        else ""
    )
    how = fmt
    if result.image_size is not None:
        h, w = result.image_size
        how += f", {h}x{w}" + (" (the images' own size)" if asked is None else "")
    saved = result.num_images - result.skipped
    skipped = f"; {result.skipped:,} left out: they could not be decoded" if result.skipped else ""
    return f"Saved {saved:,} images of {job_id} to {result.path} ({how}){resumed}{skipped}."
