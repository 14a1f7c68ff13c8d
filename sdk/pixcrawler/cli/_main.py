"""The `pixcrawler` click group: its error handling, and where the configuration files are.

Each module of this package adds its commands with `@main.command()`; heavy modules are
imported inside the commands, so that `pixcrawler --help` stays fast. Errors that users can act
on (`PixCrawlerError`, `ValueError`, `OSError`) become `Error: <message>` on stderr, in the
words of the CLI (`_words.cli_words`: flags, not Python arguments), and exit status 1; usage
errors exit 2 (click's default).
Configuration files in `configs/` are read here, at the edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pixcrawler_engine._errors import PixCrawlerError

__all__ = ["main"]

# The repository's defaults; an installed package without them uses the built-in ones.
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


class _Group(click.Group):
    """A click group that turns expected errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from pixcrawler.cli._words import cli_words

        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            exc.message = cli_words(exc.message, ctx.invoked_subcommand)  # type: ignore[misc]
            raise
        except (PixCrawlerError, ValueError, OSError) as exc:
            raise click.ClickException(cli_words(str(exc), ctx.invoked_subcommand)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pixcrawler-sdk", prog_name="pixcrawler")
def main() -> None:
    """PixCrawler: pack, serve and load image datasets."""
