"""Where Parquet shards are and what their columns hold: addresses, and image/mask/label roles.

`resolve` turns an address (a path, folder, glob, `file://` or `http(s)://` URL, or a list)
into the files it names, each with a short unique name (the prefix of its rows' keys).
`infer_columns` reads a schema and its `huggingface` metadata and picks the columns:

    image     an `Image` feature (`struct<bytes: binary, path: string>`) or a binary column;
              one named `image`/`img` first
    mask      another image column named like a mask (`mask`, `annotation`, `segmentation`,
              not `rgb`/`color`): class ids, decoded without interpolation
    label     a `ClassLabel` feature (its names become the labels), else `label`/`labels`
    metadata  every other column that is not image bytes (material, content, ...), as JSON
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import pyarrow as pa

from pixcrawler_engine.sources._http import redact_url

__all__ = ["ColumnChoice", "Columns", "Shard", "infer_columns", "resolve"]

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "photo", "picture")
_MASK_WORDS = ("mask", "annotation", "segmentation", "seg")
_NOT_MASK_WORDS = ("rgb", "color", "colour", "vis", "overlay", "preview")
_LABEL_NAMES = ("label", "labels", "class", "category")
ColumnChoice = str | Literal[False] | None


@dataclass(frozen=True)
class Shard:
    location: str  # a local path or a URL
    name: str  # unique among the source's files: the start of every key
    remote: bool


@dataclass(frozen=True)
class Columns:
    """The roles of a Parquet schema's columns.

    Attributes:
        image: the image column; `image_struct` says whether it is `struct<bytes, path>`.
        mask: the mask column, or None.
        label: the label column, or None; `label_names` are a ClassLabel's names.
        metadata: the columns passed on as each sample's metadata.
    """

    image: str
    image_struct: bool
    mask: str | None = None
    mask_struct: bool = False
    label: str | None = None
    label_names: tuple[str, ...] | None = None
    metadata: tuple[str, ...] = ()


def resolve(address: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Shard]:
    """The Parquet files an address names, in order (globs and folders sorted by path).

    Raises:
        FileNotFoundError: a local path or glob that matches no file.
        ValueError: a glob in an HTTP URL (list the URLs instead).
    """
    items = [address] if isinstance(address, (str, os.PathLike)) else list(address)
    if not items:
        raise ValueError("no Parquet address given")
    files: list[tuple[str, bool]] = []
    for item in items:
        text = os.fspath(item)
        if text.startswith(("http://", "https://")):
            if glob.has_magic(urlsplit(text).path):
                raise ValueError(
                    f"{redact_url(text)}: globs work on local paths only; list the URLs"
                )
            files.append((text, True))
            continue
        if text.startswith("file://"):
            text = url2pathname(urlsplit(text).path)
        path = os.path.expanduser(text)
        if glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).rglob("*.parquet") if p.is_file())
        elif os.path.isfile(path):
            found = [path]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"no Parquet file at {text!r}")
        files.extend((os.path.abspath(p), False) for p in found)
    return _named(files)


def _named(files: list[tuple[str, bool]]) -> list[Shard]:
    """Names files by the shortest path tail that tells them apart (the keys' prefix)."""
    parts = [
        unquote(urlsplit(loc).path).strip("/").split("/") if remote else Path(loc).parts
        for loc, remote in files
    ]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    if len(set(names)) != len(names):
        raise ValueError("the same Parquet file is listed twice")
    return [Shard(loc, name, remote) for (loc, remote), name in zip(files, names, strict=True)]


def _hf_features(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_struct(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t) or t.get_field_index("bytes") < 0:
        return False
    return _is_binary(t.field("bytes").type)


def infer_columns(
    schema: pa.Schema,
    *,
    image_column: str | None = None,
    mask_column: ColumnChoice = None,
    label_column: ColumnChoice = None,
) -> Columns:
    """Picks the image, mask, label and metadata columns of a schema (see the module doc).

    Args:
        schema: the Arrow schema of the Parquet files (with its `huggingface` metadata).
        image_column: the image column; None infers it.
        mask_column: the mask column; None infers one if any, False means none.
        label_column: the label column; None infers one if any, False means none.

    Raises:
        ValueError: no image column, or a named column that is missing or of the wrong type.
    """
    features = _hf_features(schema)
    names = schema.names
    candidates = [f.name for f in schema if _is_image_struct(f.type) or _is_binary(f.type)]
    listing = ", ".join(f"{f.name} ({f.type})" for f in schema)

    def pick(name: str, what: str) -> str:
        if name not in names:
            raise ValueError(f"no column {name!r} for the {what}; the columns are: {listing}")
        if name not in candidates:
            raise ValueError(
                f"column {name!r} is {schema.field(name).type}, not image bytes "
                "(struct<bytes: binary, path: string> or binary)"
            )
        return name

    def mask_like(name: str) -> bool:
        low = name.lower()
        return any(w in low for w in _MASK_WORDS) and not any(w in low for w in _NOT_MASK_WORDS)

    if image_column is not None:
        image = pick(image_column, "images")
    else:
        hf = [n for n in candidates if features.get(n, {}).get("_type") == "Image"]
        ordered = hf + [n for n in candidates if n not in hf]
        named = [n for n in ordered if n.lower() in _IMAGE_NAMES]
        plain = [n for n in ordered if not mask_like(n)]
        if not ordered:
            raise ValueError(
                "this Parquet data has no image column (a struct<bytes: binary, path: string> "
                f"or binary column); its columns are: {listing}"
            )
        image = (named or plain or ordered)[0]
    mask: str | None = None
    if isinstance(mask_column, str):
        mask = pick(mask_column, "masks")
        if mask == image:
            raise ValueError(f"column {mask!r} cannot be both the image and the mask")
    elif mask_column is None:
        mask = next((n for n in candidates if n != image and mask_like(n)), None)
    label: str | None = None
    label_names: tuple[str, ...] | None = None
    if isinstance(label_column, str):
        if label_column not in names:
            raise ValueError(
                f"no column {label_column!r} for the labels; the columns are: {listing}"
            )
        if label_column in candidates:
            raise ValueError(f"column {label_column!r} holds bytes, not labels")
        label = label_column
    elif label_column is None:
        class_labels = [
            n
            for n in names
            if features.get(n, {}).get("_type") == "ClassLabel" and n not in candidates
        ]
        plain_labels = [n for n in names if n.lower() in _LABEL_NAMES and n not in candidates]
        label = (class_labels or plain_labels or [None])[0]
    if label is not None and features.get(label, {}).get("_type") == "ClassLabel":
        raw = features[label].get("names")
        label_names = tuple(str(n) for n in raw) if isinstance(raw, list) else None
    taken = {image, mask, label}
    metadata = tuple(n for n in names if n not in taken and n not in candidates)
    return Columns(
        image=image,
        image_struct=_is_image_struct(schema.field(image).type),
        mask=mask,
        mask_struct=mask is not None and _is_image_struct(schema.field(mask).type),
        label=label,
        label_names=label_names,
        metadata=metadata,
    )
