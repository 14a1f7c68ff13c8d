"""A Parquet source's API token, shipped apart from the source (a Ray task carries it sealed)."""

from __future__ import annotations

import copy

from pixcrawler_engine.sources.parquet._source import ParquetSource

__all__ = ["split_token", "with_token"]


def split_token(source: ParquetSource) -> tuple[ParquetSource, str | None]:
    """A copy of `source` without its token, and the token."""
    clone = copy.copy(source)
    clone._token = None
    return clone, source._token


def with_token(source: ParquetSource, token: str | None) -> ParquetSource:
    """A copy of `source` that sends `token` to the files' origin (None: no token)."""
    clone = copy.copy(source)
    clone._token = token
    return clone
