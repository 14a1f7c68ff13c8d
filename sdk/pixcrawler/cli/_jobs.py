"""The `list` and `info` commands: the jobs a key can read, and one job's metadata.

Both print a table or block for people, or JSON with `--json` for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pixcrawler.cli._api import api_options, client, engine_config
from pixcrawler.cli._main import main

__all__ = ["info", "list_jobs"]


@main.command("list")
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of job summaries.")
def list_jobs(api_key: str | None, base_url: str, ca_bundle: Path | None, as_json: bool) -> None:
    """List the datasets (jobs) your API key can read."""
    from pixcrawler._info import format_bytes

    with client(api_key, base_url, engine_config(verify_ssl=ca_bundle)) as api:
        jobs = api.list_jobs()
    if as_json:
        click.echo(json.dumps(jobs, indent=1))
        return
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
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as one JSON object.")
def info(
    job_id: str, api_key: str | None, base_url: str, ca_bundle: Path | None, as_json: bool
) -> None:
    """Show the metadata of dataset JOB_ID (images, chunks, size, labels)."""
    import dataclasses

    from pixcrawler._info import DatasetInfo

    with client(api_key, base_url, engine_config(verify_ssl=ca_bundle)) as api:
        manifest = api.get_job(job_id, require_complete=False)
    summary = DatasetInfo.from_manifest(manifest)
    if as_json:
        fields = dataclasses.asdict(summary)
        fields["labels"] = list(summary.labels)
        fields["progress"] = manifest.progress
        click.echo(json.dumps(fields, indent=1))
        return
    click.echo(summary.summary())
    if manifest.status != "completed":
        click.echo(f"Progress: {manifest.progress:g}%")
