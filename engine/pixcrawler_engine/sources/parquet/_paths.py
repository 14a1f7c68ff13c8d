"""Parquet image cells that hold only a path, and the names rows go by in messages.

A Hugging Face `Image` cell is `struct<bytes, path>`. Files written without embedding the
images (pandas, pyarrow, a `datasets` table saved without `embed_external_files`) keep only
the path. `resolve_path` finds such a file relative to the Parquet file's own folder, the way
the dataset was laid out, and refuses what it must not read: a remote Parquet file's paths
(they name files on someone else's disk), absolute paths and paths that leave the folder.
Every refusal says why, and becomes that sample's error under `on_error`.

`row_name` is how a message names a row: its id column, else its image path, so that the user
reads `'IMG_0042'` rather than `all.parquet:41`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = ["ID_COLUMNS", "NULL_CELL", "fill_paths", "resolve_path", "row_name"]

NULL_CELL = "\x00null"
"""The ref of a cell without bytes, until `fill_paths` has looked at its path."""
_BLOCK = 1 << 20

ID_COLUMNS = ("id", "image_id", "sample_id", "uid")
"""Columns that name a sample (the first one present is its name)."""


def row_name(metadata: dict[str, Any], path: str | None) -> str | None:
    """What a row is called: its id (see `ID_COLUMNS`), else its image path, else None."""
    for column in ID_COLUMNS:
        value = metadata.get(column)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
            return str(value)[:200]
    return path[:200] if path else None


def resolve_path(parquet: str, remote: bool, path: str | None, column: str) -> Path | str:
    """The local file a path-only image cell names, or why it cannot be read.

    Args:
        parquet: the Parquet file's location (a local path or a URL).
        remote: whether it is a URL.
        path: the cell's `path` (None when the cell has neither bytes nor path).
        column: the image column, for the message.

    Returns:
        The file's path, or a message saying why there are no bytes to decode.
    """
    if not path:
        return f"its {column!r} cell holds no bytes and no path (null)"
    where = f"its {column!r} cell holds no bytes, only the path {path!r}"
    if remote:
        return (
            f"{where}; paths are resolved only beside a local Parquet file (download the "
            "dataset with its image files, or use a Parquet file that embeds the bytes)"
        )
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.is_absolute() or path.startswith("~") or ".." in parts.parts:
        return (
            f"{where}, which leaves the Parquet file's folder; only paths relative to it are "
            "read (put the image files beside the Parquet file)"
        )
    folder = Path(os.path.abspath(parquet)).parent
    target = folder.joinpath(*parts.parts)
    if not target.is_file():
        return (
            f"{where}, and there is no file {target}; put the image files beside the Parquet file"
        )
    real = Path(os.path.realpath(target))
    if not real.is_relative_to(Path(os.path.realpath(folder))):
        return f"{where}, a link that leaves the Parquet file's folder ({real}); it is not read"
    return target


def fill_paths(
    parquet: str,
    remote: bool,
    refs: list[Any],
    paths: Sequence[str | None] | None,
    column: str,
    writer: Any,
) -> list[Any]:
    """`refs` with each `NULL_CELL` replaced: the bytes of the file its path names, copied
    into `writer` (a `RowsWriter`), or the message saying why there are none."""
    out = []
    for i, ref in enumerate(refs):
        if ref != NULL_CELL:
            out.append(ref)
            continue
        found = resolve_path(parquet, remote, paths[i] if paths else None, column)
        if isinstance(found, str):
            out.append(found)  # why not: the sample's error
            continue
        with open(found, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            ref, sink = writer.start_value(size)
            left = size
            while left and (block := src.read(min(_BLOCK, left))):
                sink(block)
                left -= len(block)
            if left:  # the file shrank meanwhile: keep the rows file consistent; it will not decode
                sink(bytes(left))
        out.append(ref)
    return out
