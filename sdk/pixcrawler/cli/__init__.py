"""The `pixcrawler` command line: the click group and its commands, one module per family.

_main.py           the group, its error handling, the configuration folder
_store.py          pack, serve
_api.py            what the job API commands share (--api-key, --base-url, --ca-bundle)
_download.py       download
_cache.py          cache info, cache clear
_jobs.py           list, info
_export_images.py  export-images
_preview.py        preview
"""

from __future__ import annotations

from pixcrawler.cli import _cache, _download, _export_images, _jobs, _preview, _store
from pixcrawler.cli._main import main

__all__ = ["main"]

del (
    _cache,
    _download,
    _export_images,
    _jobs,
    _preview,
    _store,
)  # imported for the commands they register on `main`
