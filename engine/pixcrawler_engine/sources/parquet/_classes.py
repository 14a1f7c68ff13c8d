"""What a segmentation dataset calls its mask classes, from its own metadata or a file.

Class ids in a mask mean what the dataset says they mean. A dataset says it in one of these
places, looked at in this order:

    the Parquet files' key-value metadata: `mask_classes` or `id2label` (JSON)
    an `id2label.json` (or `mask_classes.json`) beside the Parquet files, or one or two
    folders up (the root of a Hugging Face dataset whose shards are in `data/`)

`parse_class_names` reads the forms such files take: a JSON list of names (index = id), a JSON
object `{"<id>": "<name>"}` (id2label) or `{"<name>": <id>}` (label2id), or plain text with
one name a line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CLASS_FILES", "class_names_from_metadata", "parse_class_names"]

CLASS_FILES = ("id2label.json", "mask_classes.json")
_META_KEYS = (b"mask_classes", b"id2label")
_MAX_BYTES = 1 << 20


def parse_class_names(text: str, *, where: str) -> dict[int, str]:
    """Class id -> name from the text of a class-name file or metadata value.

    Raises:
        ValueError: the text is none of the accepted forms; the message says which they are.
    """
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = [line.strip() for line in text.splitlines()]
        while data and not data[-1]:
            data.pop()
    names: dict[int, str] = {}
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        names = {i: n for i, n in enumerate(data) if n}
    elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        try:
            names = {int(k): v for k, v in data.items()}
        except ValueError:
            names = {}
    elif isinstance(data, dict) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in data.values()
    ):
        names = {v: str(k) for k, v in data.items()}
    if not names or not all(0 <= i <= 255 for i in names):
        raise ValueError(
            f"{where}: mask class names must be a JSON list of names (the index is the id), "
            'a JSON object {"<id>": "<name>"} with ids 0-255, or one name a line'
        )
    return names


def class_names_from_metadata(
    metadata: Mapping[bytes, bytes] | None, location: str, remote: bool
) -> dict[int, str] | None:
    """The mask class names a Parquet dataset carries (see the module doc), or None."""
    for key in _META_KEYS:
        raw = (metadata or {}).get(key)
        if raw:
            return parse_class_names(raw.decode("utf-8", "replace"), where=f"metadata {key!r}")
    if remote:
        return None
    folder = Path(os.path.abspath(location)).parent
    for here in (folder, folder.parent, folder.parent.parent):
        for name in CLASS_FILES:
            path = here / name
            if path.is_file() and path.stat().st_size <= _MAX_BYTES:
                return parse_class_names(path.read_text(encoding="utf-8"), where=str(path))
    return None
