"""Which input files `pack` accepts: those the engine's decoder reads, one list of formats for both.

Each file is checked with the decoder itself (`decode._image`), so that `pack` refuses exactly
what loading the job would fail on and accepts every format it reads (JPEG 2000, AVIF, the PPM
family included):

    verify="decode"  decode the file at a small size (a JPEG at a reduced DCT scale): damage in
                     the pixel data is found now; an image over the pixel budget is checked by
                     its header only (the decoder refuses it later, under `on_error`)
    verify="header"  read the header only: fast, blind to damaged pixel data

A refused file is a `Refused` (where, reason, kind), never an exception: `pack` gathers all of
them, then stops with the list or packs the others (`on_error`). What the decoder said about a
file it could read (a Pillow warning, a libtiff line) comes back as one line naming the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pixcrawler_engine._config import DecodePolicy
from pixcrawler_engine._errors import DecodeError, UnsupportedImageError
from pixcrawler_engine.decode._chatter import collect, summary
from pixcrawler_engine.decode._formats import FORMAT_EXTENSIONS
from pixcrawler_engine.decode._image import decode_image, probe

__all__ = ["Refused", "Verify", "check_file", "refusal_message", "write_report"]

Verify = Literal["decode", "header"]
Kind = Literal["missing", "unreadable", "unsupported", "corrupt"]

_CHECK = DecodePolicy(image_size=(64, 64), resize="fit")
_SHOWN = 20
_MAX_REASON = 200
# The decoder's advice on skipping samples: a list of refused files says it once, at the end.
_SKIP_HINT = re.compile(r"[,;.]?\s*(?:or )?skip (?:such samples|them) with on_error='skip'\.?")


@dataclass(frozen=True)
class Refused:
    """An input file `pack` cannot take, and why."""

    where: str  # how the user names it: its path in SRC, or "file (line N of list.jsonl)"
    reason: str
    kind: Kind


def check_file(path: Path, where: str, verify: Verify) -> tuple[str, str | None] | Refused:
    """Checks one input file with the engine's decoder.

    Returns:
        (the chunk member extension of its format, what the decoder said or None), or why
        it is refused.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Refused(where, f"file not found ({path}); fix the path or add the file", "missing")
    except OSError as exc:
        return Refused(
            where,
            f"cannot read {path} ({exc.strerror or exc}); check its permissions",
            "unreadable",
        )
    with collect() as said:
        try:
            header = probe(data)
            if header.unsupported is not None:
                raise UnsupportedImageError(f"unsupported image: {header.unsupported}")
            if verify == "decode" and header.pixels <= _CHECK.max_pixels:
                decode_image(data, _CHECK)
        except DecodeError as exc:
            kind: Kind = "unsupported" if isinstance(exc, UnsupportedImageError) else "corrupt"
            return Refused(where, _short(str(exc)), kind)
    extension = FORMAT_EXTENSIONS.get(header.format, ".bin")
    return extension, (summary(said) if said else None)


def _short(reason: str) -> str:
    reason = _SKIP_HINT.sub("", reason).strip()
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def refusal_message(refused: Sequence[Refused], total: int) -> str:
    """The error listing the refused files (the first 20), when none may be skipped."""
    lines = [f"{len(refused)} of {total} files cannot be packed (nothing was written):"]
    lines += [f"  {r.where}: {r.reason}" for r in refused[:_SHOWN]]
    if len(refused) > _SHOWN:
        lines.append(f"  ... and {len(refused) - _SHOWN} more")
    lines.append(
        "Fix or remove them, or pack the others with on_error='skip' (a report then lists "
        "every refused file and why)."
    )
    return "\n".join(lines)


def write_report(path: Path, refused: Sequence[Refused]) -> None:
    """Writes the refused files as JSON lines: {"file", "kind", "reason"}."""
    path.write_text(
        "".join(
            json.dumps({"file": r.where, "kind": r.kind, "reason": r.reason}) + "\n"
            for r in refused
        ),
        encoding="utf-8",
    )
