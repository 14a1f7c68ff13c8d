"""What the commands that talk to the job API share: --api-key, --base-url, --ca-bundle, sizes.

The API key comes from `--api-key` or `PIXCRAWLER_API_KEY` and the base URL from `--base-url`
or `PIXCRAWLER_BASE_URL`; the key is never printed, not even in `--help`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from pixcrawler._server_keys import is_loopback
from pixcrawler.cli._main import CONFIGS

__all__ = ["ImageSize", "api_options", "check_api", "client", "engine_config"]

DEFAULT_BASE_URL = "https://api.pixcrawler.com"
ENV_API_KEY = "PIXCRAWLER_API_KEY"
ENV_BASE_URL = "PIXCRAWLER_BASE_URL"


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


def api_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--api-key` and `--base-url`, shared by the commands that talk to the job API."""
    f = click.option(
        "--base-url",
        envvar=ENV_BASE_URL,
        default=DEFAULT_BASE_URL,
        show_default=True,
        show_envvar=True,
        help="Job API URL, or file:///path/to/store for a local job store.",
    )(f)
    f = click.option(
        "--ca-bundle",
        type=click.Path(exists=True, path_type=Path),
        default=None,
        help="Trust this CA bundle (a PEM file or folder) for https:// servers.",
    )(f)
    return click.option(
        "--api-key",
        envvar=ENV_API_KEY,
        default=None,
        show_envvar=True,
        help="PixCrawler API key (not needed for file:// stores or a loopback server).",
    )(f)


def client(api_key: str | None, base_url: str, config: Any) -> Any:
    """A `JobClient` for --base-url with --api-key, after `check_api`."""
    from pixcrawler_engine.sources._jobapi import JobClient

    check_api(api_key, base_url)
    return JobClient.from_config(base_url, api_key or None, config)


def check_api(api_key: str | None, base_url: str) -> None:
    """Usage errors for a --base-url the CLI cannot use, or a missing key it needs."""
    scheme = urlsplit(base_url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise click.BadParameter(
            f"{base_url!r}: use https://host, http://host or file:///path/to/store",
            param_hint="'--base-url'",
        )
    if not api_key and scheme != "file" and not is_loopback(urlsplit(base_url).hostname or ""):
        # A server on this machine may run without keys (`pixcrawler serve` on loopback).
        raise click.UsageError(f"no API key: pass --api-key or set {ENV_API_KEY}")


def engine_config(**overrides: Any) -> Any:
    from pixcrawler_engine._config import EngineConfig

    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(given.get("verify_ssl"), Path):
        given["verify_ssl"] = str(given["verify_ssl"])
    path = CONFIGS / "engine.toml"
    return EngineConfig.from_toml(path, **given) if path.is_file() else EngineConfig(**given)
