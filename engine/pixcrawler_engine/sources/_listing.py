"""A chunk's `manifest.jsonl`: checked once, in the supervisor; its records built by workers.

NOTE [manifest lines]: the supervisor needs a chunk's manifest only to check it (every line an
object with a string "file", no file listed twice, as many lines as the job says) and to cut
it into tasks. Building the `Record` of a line costs more than checking it (its `metadata` is
the JSON of the line's other fields, encoded again): ~1.3 us of ~2 per line, a fifth of the
supervisor's CPU per image on small images, on the one thread that feeds every worker. So a
zip chunk's records are `ManifestRecords`: its checked lines, built into records only when
somebody reads them (exports, the SDK's random access), and a task carries its records as
`RecordLines`, the lines themselves in one string, which the worker builds. The manifest is
parsed twice in all (once to check it, once in the workers that build it), and only once on
the serial path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, NoReturn, overload

from pixcrawler_engine._errors import DecompressionError
from pixcrawler_engine._json import dumps
from pixcrawler_engine.sources._record import Record

__all__ = [
    "ManifestRecords",
    "RecordLines",
    "build_records",
    "check_lines",
    "slice_records",
    "task_records",
]


def check_lines(text: str, chunk: int) -> list[str]:
    """The non-blank lines of a chunk's manifest text, once they are checked.

    Raises:
        DecompressionError: a line is not JSON, or not an object with a string "file", or a
            file is listed twice; the message names the first such line.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    entries = _parse(lines)
    if entries is not None:
        names = [e.get("file") if type(e) is dict else None for e in entries]
        if all(type(n) is str for n in names) and len(set(names)) == len(names):
            return lines
    _explain(text, chunk)


def build_records(lines: Sequence[str], indices: Iterable[int], chunk: int) -> list[Record]:
    """The records of checked manifest lines, with their dataset `indices`.

    Raises:
        DecompressionError: the lines do not parse one object each, as they did when checked
            (only a manifest built to parse differently in parts, i.e. a hostile one).
    """
    entries = _parse(lines)
    if entries is None or not all(type(e) is dict and "file" in e for e in entries):
        raise DecompressionError(
            f"chunk {chunk}: manifest.jsonl reads differently line by line than as a whole; "
            "the chunk is malformed or hostile, re-pack it with `pixcrawler pack`",
            chunk_id=chunk,
        )
    records = []
    make = tuple.__new__  # Record(...) is a Python-level __new__: twice the cost per line
    for entry, index in zip(entries, indices, strict=True):
        name = entry.pop("file")
        label = entry.pop("label", None)
        metadata = dumps(entry) if entry else "{}"
        source = entry.get("source")  # the file `pack` made it from: what its owner knows
        known = source[:200] if isinstance(source, str) and source else None
        records.append(make(Record, (name, name, label, index, metadata, None, known)))
    return records


class RecordLines(NamedTuple):
    """Records as a task carries them: their manifest lines joined by newlines (no line holds
    one), and their dataset indices."""

    text: str
    indices: tuple[int, ...]
    chunk: int  # for errors: the first chunk the lines come from

    def build(self) -> list[Record]:
        return build_records(self.text.split("\n"), self.indices, self.chunk)


class ManifestRecords(Sequence[Record]):
    """A zip chunk's records: its checked manifest lines, built into records on first read."""

    def __init__(self, lines: list[str], chunk: int, first_index: int) -> None:
        self.lines = lines
        self.chunk = chunk
        self.first_index = first_index
        self._built: list[Record] | None = None

    def built(self) -> list[Record]:
        if self._built is None:
            first = self.first_index
            self._built = build_records(self.lines, range(first, first + len(self)), self.chunk)
        return self._built

    def __len__(self) -> int:
        return len(self.lines)

    @overload
    def __getitem__(self, i: int) -> Record: ...
    @overload
    def __getitem__(self, i: slice) -> list[Record]: ...
    def __getitem__(self, i: int | slice) -> Record | list[Record]:
        return self.built()[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.built())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return self.built() == list(other)

    __hash__ = None  # type: ignore[assignment]  # like a list

    def __repr__(self) -> str:
        return f"ManifestRecords(chunk={self.chunk}, {len(self)} records)"


def task_records(
    listed: Sequence[Sequence[Record]], rows: Iterable[tuple[int, int]]
) -> RecordLines | tuple[tuple[Any, ...], ...]:
    """The records at `rows`, (part, position) pairs into the chunks `listed`, as a task carries
    them: their manifest lines when the chunks have them, else plain tuples (NOTE [manifest
    lines]; a named tuple would pickle through a Python call each)."""
    if all(isinstance(records, ManifestRecords) for records in listed):
        manifests: Sequence[ManifestRecords] = listed  # type: ignore[assignment]
        lines, indices = [], []
        for part, at in rows:
            manifest = manifests[part]
            lines.append(manifest.lines[at])
            indices.append(manifest.first_index + at)
        return RecordLines("\n".join(lines), tuple(indices), manifests[0].chunk)
    return tuple(tuple(listed[part][at]) for part, at in rows)


def slice_records(
    records: Sequence[Record], start: int, end: int
) -> RecordLines | tuple[tuple[Any, ...], ...]:
    """Records [start, end) of one chunk, as a task carries them (see `task_records`)."""
    if isinstance(records, ManifestRecords):
        first = records.first_index
        lines = "\n".join(records.lines[start:end])
        return RecordLines(lines, tuple(range(first + start, first + end)), records.chunk)
    return tuple(map(tuple, records[start:end]))


def _parse(lines: Sequence[str]) -> list[Any] | None:
    """The JSON values of `lines` in one parse, or None unless there is one value a line."""
    try:
        entries = json.loads("[" + ",".join(lines) + "]")
    except json.JSONDecodeError:
        return None
    return entries if isinstance(entries, list) and len(entries) == len(lines) else None


def _explain(text: str, chunk: int) -> NoReturn:
    """Raises the error of the first bad line of a manifest that failed `check_lines`."""
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DecompressionError(
                f"chunk {chunk}: manifest.jsonl line {lineno} is not JSON: {exc}", chunk_id=chunk
            ) from exc
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DecompressionError(
                f"chunk {chunk}: manifest.jsonl line {lineno} must be an object with a string "
                f'"file", got {line[:80]!r}',
                chunk_id=chunk,
            )
        if entry["file"] in seen:
            raise DecompressionError(
                f"chunk {chunk}: manifest.jsonl lists {entry['file']!r} twice (line {lineno}); "
                "every sample must appear once",
                chunk_id=chunk,
            )
        seen.add(entry["file"])
    # Not reached: lines that each parse alone parse together, one value each.
    raise DecompressionError(
        f"chunk {chunk}: manifest.jsonl does not read as one JSON object a line; re-pack the "
        "chunk with `pixcrawler pack`",
        chunk_id=chunk,
    )
