"""The `export-images` command of the `pixcrawler` CLI, registered on `_cli.main`.

`pixcrawler export-images SOURCE --output DIR` exports a segmentation dataset in Parquet
shards (ARTeFACT and the like: a local path, folder, glob, `file://` or `http(s)://` URL) as
PNG folders, masks, visualizations, metadata.csv and statistics.json
(`pixcrawler_engine.export._images`). Exit status: 0 done (bad samples are listed, not fatal,
unless `--on-error raise`; each is one `warning:` line on stderr), 1 a failure (no sample
exported counts as one), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, cast

import click

from pixcrawler.cli._main import main

__all__ = ["export_images"]

ENV_TOKEN = "HF_TOKEN"


@main.command("export-images")
@click.argument("source", nargs=-1, required=True)
@click.option(
    "--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Export folder (images/, annotations/, annotations_rgb/, visualizations/, ...).",
)  # fmt: skip
@click.option(
    "--max-side", default=1024, show_default=True, type=click.IntRange(min=1),
    help="Longest side of exported images (never upscaled).",
)  # fmt: skip
@click.option("--max-samples", type=click.IntRange(min=0), help="Export the first N samples.")
@click.option("--all", "all_samples", is_flag=True, help="Export every sample (the default).")
@click.option("--image-column", help="The image column (default: inferred from the schema).")
@click.option("--mask-column", help="The mask column (default: inferred; 'none' for none).")
@click.option("--label-column", help="The label column (default: inferred; 'none' for none).")
@click.option(
    "--num-workers", type=click.IntRange(min=1), help="Decode processes [one per CPU core]."
)
@click.option(
    "--on-error", default="warn", show_default=True, type=click.Choice(["raise", "skip", "warn"]),
    help="A sample that cannot be decoded stops the export, or is left out (and listed).",
)  # fmt: skip
@click.option(
    "--mask-classes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='What mask ids mean: a JSON list of names, {"<id>": "<name>"}, or one name a line '
    "[default: the dataset's id2label metadata, ARTeFACT's names for ARTeFACT, else the ids].",
)  # fmt: skip
@click.option("--visualizations", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def export_images(
    source: tuple[str, ...],
    output: Path,
    max_side: int,
    max_samples: int | None,
    all_samples: bool,
    image_column: str | None,
    mask_column: str | None,
    label_column: str | None,
    num_workers: int | None,
    on_error: str,
    mask_classes: Path | None,
    visualizations: int,
    no_progress: bool,
) -> None:
    """Export SOURCE (Parquet shards: paths, globs, file:// or http(s):// URLs) as PNG folders.

    A private Hugging Face dataset's token is read from the HF_TOKEN variable.
    """
    from pixcrawler.cli._words import sample_lines
    from pixcrawler_engine._config import OnError
    from pixcrawler_engine.export._images import export_images as run_export
    from pixcrawler_engine.sources.parquet._source import ParquetSource

    if all_samples and max_samples is not None:
        raise click.UsageError("give --max-samples N or --all, not both")

    def choice(value: str | None) -> str | Literal[False] | None:
        return False if value is not None and value.lower() == "none" else value

    src = ParquetSource(
        list(source),
        image_column=image_column,
        mask_column=choice(mask_column),
        label_column=choice(label_column),
        token=os.environ.get(ENV_TOKEN) or None,
    )
    columns = src.columns
    click.echo(
        f"{len(src)} samples in {len(src.files)} file(s); image column {columns.image!r}, "
        f"mask column {columns.mask!r}, label column {columns.label!r}",
        err=True,
    )
    try:
        with sample_lines("export-images"):
            result = run_export(
                src,
                output,
                max_side=max_side,
                max_samples=max_samples,
                num_workers=num_workers,
                on_error=cast(OnError, on_error),
                visualizations=visualizations,
                progress=not no_progress,
                mask_classes=mask_classes,
            )
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if result.samples == 0:
        why = (
            f"all {result.failed} could not be decoded (the lines above say why; "
            f"{result.output / 'statistics.json'} lists them)"
            if result.failed
            else "the source has no rows to export"
        )
        raise click.ClickException(f"no sample was exported: {why}")
    failed = (
        f", {result.failed} could not be decoded (see statistics.json)" if result.failed else ""
    )
    click.echo(
        f"Exported {result.samples} samples to {result.output} in {result.seconds:.1f} s{failed}"
    )
