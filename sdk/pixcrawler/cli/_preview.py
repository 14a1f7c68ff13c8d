"""The `preview` command: a labelled grid of samples per class of jobs or Parquet data.

`pixcrawler preview JOB|PARQUET... -o grid.png` draws what `Dataset.preview` draws; with
several sources, each row says which one it comes from. Exit status: 0 written, 1 a failure,
2 a usage error.
"""

from __future__ import annotations

from pathlib import Path

import click

from pixcrawler.cli._api import api_options
from pixcrawler.cli._main import main

__all__ = ["preview"]


@main.command()
@click.argument("sources", nargs=-1, required=True, metavar="JOB|PARQUET...")
@api_options
@click.option(
    "--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
    help="The PNG to write.",
)  # fmt: skip
@click.option("-n", "per_class", default=8, show_default=True, type=click.IntRange(min=1),
              help="Samples per class (per row).")  # fmt: skip
@click.option("--tile", default=96, show_default=True, type=click.IntRange(min=16),
              help="Side of one tile, in pixels.")  # fmt: skip
def preview(
    sources: tuple[str, ...],
    api_key: str | None,
    base_url: str,
    ca_bundle: Path | None,
    output: Path,
    per_class: int,
    tile: int,
) -> None:
    """Draw a grid of samples, a row per class, of each job or Parquet dataset.

    A job id is read from --base-url; Parquet data is a path that says it is one (./data,
    /data/train.parquet, file://..., https://.../x.parquet). Masks are overlaid where the
    data has them.
    """
    from pixcrawler._load import load_dataset
    from pixcrawler._parquet_ref import is_parquet_address
    from pixcrawler._preview import draw_preview
    from pixcrawler.cli._api import check_api

    opened = []
    verify: bool | str = str(ca_bundle) if ca_bundle is not None else True
    try:
        for source in sources:
            if not is_parquet_address(source):
                check_api(api_key, base_url)  # the CLI's own checks, naming its flags
            opened.append(
                (source, load_dataset(source, api_key=api_key, base_url=base_url,
                                      verify_ssl=verify, progress=False))
            )  # fmt: skip
        path = draw_preview(opened, output, n=per_class, tile=tile)
    finally:
        for _, dataset in opened:
            dataset.close()
    rows = "the dataset" if len(sources) == 1 else f"{len(sources)} datasets, labelled by row"
    click.echo(f"Wrote {path}: up to {per_class} samples per class of {rows}.")
