"""The `pack` and `serve` commands: a folder of images becomes a job store, served over HTTP."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import click

from pixcrawler.cli._main import CONFIGS, main

__all__ = ["pack", "serve"]

_STATUSES = ("completed", "processing", "failed")


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--store", required=True, type=click.Path(path_type=Path), help="Job store root.")
@click.option("--job-id", required=True, help="Job id (letters, digits, '_', '.', '-').")
@click.option("--chunk-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--status", default="completed", show_default=True, type=click.Choice(_STATUSES))
@click.option("--progress", default=None, type=click.FloatRange(0, 100), help="Percent done.")
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Pack the files the decoder reads and list the others, with their reasons, in "
    "<job>/refused.jsonl (without it, any such file stops the pack, and all are listed).",
)
@click.option(
    "--verify",
    default="decode",
    show_default=True,
    type=click.Choice(["decode", "header"]),
    help="Check each file by decoding it at a small size, or by reading its header only "
    "(faster, blind to damaged pixel data).",
)
def pack(
    src: Path,
    store: Path,
    job_id: str,
    chunk_size: int,
    status: str,
    progress: float | None,
    skip_bad: bool,
    verify: str,
) -> None:
    """Pack SRC (a folder of class subfolders, or a JSONL list) into a job of the store.

    Every file is checked with the decoder that loads the job (JPEG, PNG, WebP, GIF, BMP,
    TIFF, JPEG 2000, the PPM family, AVIF).
    """
    import json

    from pixcrawler.cli._words import sample_lines
    from pixcrawler_engine.sources._pack import REPORT
    from pixcrawler_engine.sources._pack import pack as pack_job

    if progress is None:
        progress = 100 if status == "completed" else 0
    elif progress.is_integer():
        progress = int(progress)
    with sample_lines("pack"):
        path = pack_job(
            src,
            store,
            job_id,
            chunk_size=chunk_size,
            status=status,
            progress=progress,
            on_error="skip" if skip_bad else "raise",
            verify=cast(Any, verify),
        )
    count = json.loads((path / "job.json").read_text(encoding="utf-8"))["num_images"]
    report = path / REPORT
    refused = ""
    if report.is_file():
        n = len(report.read_text(encoding="utf-8").splitlines())
        refused = f"; {n:,} file{'s' * (n != 1)} refused, listed with the reasons in {report}"
    click.echo(f"Packed {count:,} images from {src} into {path}{refused}")


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default=None, help="Interface to listen on [configs/server.toml].")
@click.option("--port", default=None, type=click.IntRange(0, 65535), help="0: a free port.")
@click.option(
    "--api-key",
    envvar="PIXCRAWLER_API_KEY",
    default=None,
    help="A key with access to every job (or set PIXCRAWLER_API_KEY).",
)
@click.option(
    "--keys-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON {"<key>": ["job_a", ...] or "*"}.',
)
@click.option(
    "--generate-key",
    is_flag=True,
    help="Make a key (kept in STORE/.pixcrawler-api-key, mode 600) when none is given; "
    "needed to serve beyond loopback without --api-key or --keys-file.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML with a [server] table (default: configs/server.toml).",
)
def serve(
    store: Path,
    host: str | None,
    port: int | None,
    api_key: str | None,
    keys_file: Path | None,
    generate_key: bool,
    config_path: Path | None,
) -> None:
    """Serve the job STORE over the PixCrawler job API (v1) until SIGTERM or Ctrl-C.

    On a loopback interface (the default, 127.0.0.1) no key is needed: without one, every
    job is served to anyone on this machine. Any other --host needs --api-key, --keys-file
    or --generate-key.
    """
    from pixcrawler._server import ServerConfig
    from pixcrawler._server import serve as run_server
    from pixcrawler._server_keys import Access, generated_key, load_keys

    if config_path is None and (CONFIGS / "server.toml").is_file():
        config_path = CONFIGS / "server.toml"
    if config_path is not None:
        config = ServerConfig.from_toml(config_path, host=host, port=port)
    else:
        default = ServerConfig()
        config = dataclasses.replace(
            default,
            host=default.host if host is None else host,
            port=default.port if port is None else port,
        )
    keys: dict[str, Access] | None = None
    if api_key or keys_file is not None:
        keys = load_keys(api_key=api_key, keys_file=keys_file)
    elif generate_key:
        key, where = generated_key(store)
        keys = load_keys(api_key=key)
        click.echo(
            f"API key: in {where} (readable by you only); clients read it with "
            f'PIXCRAWLER_API_KEY="$(cat {where})"',
            err=True,
        )
    run_server(store, keys=keys, config=config)
