"""`pack`: image folders and JSONL lists become a job of the local store, atomically.

`pack` checks every input file with the engine's decoder before it writes anything
(`_pack_check`: one list of formats for both), and gathers every refused file with its reason:
it then stops with the list (`on_error="raise"`), or packs the others and writes the list to
`<store>/jobs/<job_id>/refused.jsonl` (`on_error="skip"`). It builds the job in a hidden
temporary folder inside `<store>/jobs/` and renames it into place when it is complete, so a
reader never sees a half-written job (the layout is in `_store`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pixcrawler_engine.sources._pack_check import (
    Refused,
    Verify,
    check_file,
    refusal_message,
    write_report,
)
from pixcrawler_engine.sources._store import JOB_STATUSES, validate_job_id

__all__ = ["REPORT", "pack"]

logger = logging.getLogger(__name__)

REPORT = "refused.jsonl"


# A fixed member timestamp (the zip epoch) makes packing the same input twice byte-identical.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


_COPY_BLOCK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """One validated input image, in dataset order."""

    path: Path
    source: str  # the path as the user gave it (relative to SRC or to the JSONL's folder)
    label: str | int | dict[str, Any]
    metadata: dict[str, Any]
    where: str  # how to name it in an error message
    ext: str = ""  # the member extension of its format, once checked


def pack(
    src: str | os.PathLike[str],
    store: str | os.PathLike[str],
    job_id: str,
    *,
    chunk_size: int = 500,
    status: str = "completed",
    progress: float = 100,
    created_at: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    verify: Verify = "decode",
) -> Path:
    """Packs an image folder or a JSONL list into a job of the store.

    Args:
        src: a folder with one subfolder per class (the folder name is the label), or a JSONL
            file of `{"file": <path relative to the JSONL's folder>, "label": ..., ...}` lines.
        store: the store root; `<store>/jobs/` is created if needed.
        job_id: the job id; an existing job with this id is replaced atomically.
        chunk_size: images per chunk zip.
        status: `completed`, `processing` or `failed`.
        progress: the job's progress in percent (0-100).
        created_at: an ISO 8601 timestamp; now (UTC) by default.
        on_error: an input file the decoder cannot read (missing, unreadable, corrupt,
            unsupported) stops the pack, listing every such file (`raise`); or is left out,
            listed in `<job>/refused.jsonl` with its reason (`skip`).
        verify: `decode` each file at a small size (finds damaged pixel data), or read its
            `header` only (faster).

    Returns:
        The job's folder.

    Raises:
        ValueError: bad arguments, a malformed listing, files the decoder cannot read (with
            `on_error="raise"`: every one of them, up to 20, with its reason), or no file
            left to pack. Nothing is written to the store in that case.
    """
    validate_job_id(job_id)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if status not in JOB_STATUSES:
        raise ValueError(f"status must be one of {JOB_STATUSES}, got {status!r}")
    if isinstance(progress, bool) or not isinstance(progress, (int, float)):
        raise ValueError(f"progress must be a number from 0 to 100, got {progress!r}")
    if not 0 <= progress <= 100:
        raise ValueError(f"progress must be a number from 0 to 100, got {progress!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if verify not in ("decode", "header"):
        raise ValueError(f"verify must be 'decode' or 'header', got {verify!r}")
    found = _collect(Path(src))
    entries, refused = _check(found, verify)  # every file is checked before anything is written
    if refused and (on_error == "raise" or not entries):
        message = refusal_message(refused, len(found))
        if entries:
            raise ValueError(message)
        raise ValueError(f"none of the files can be packed. {message}")

    jobs = Path(store) / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{job_id}-", dir=jobs))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a served store is read by others
        chunks = _write_chunks(entries, tmp / "chunks", chunk_size)
        labels = sorted({e.label for e in entries if isinstance(e.label, str)})
        job = {
            "job_id": job_id,
            "status": status,
            "progress": progress,
            "created_at": created_at or _now(),
            "num_images": len(entries),
            "chunk_size": chunk_size,
            "size_bytes": sum(c["size_bytes"] for c in chunks),
            "labels": labels,
            "version": hashlib.sha256("\n".join(c["sha256"] for c in chunks).encode()).hexdigest()[
                :16
            ],
            "chunks": chunks,
        }
        (tmp / "job.json").write_text(json.dumps(job, indent=1) + "\n", encoding="utf-8")
        if refused:
            write_report(tmp / REPORT, refused)
        _install(tmp, jobs / job_id)
    finally:
        # After a successful install `tmp` holds the replaced job (or nothing at all).
        shutil.rmtree(tmp, ignore_errors=True)
    return jobs / job_id


def _check(entries: list[_Entry], verify: Verify) -> tuple[list[_Entry], list[Refused]]:
    """The entries the decoder reads (their extension set), and the refused files."""
    good: list[_Entry] = []
    refused: list[Refused] = []
    for entry in entries:
        outcome = check_file(entry.path, entry.where, verify)
        if isinstance(outcome, Refused):
            refused.append(outcome)
            continue
        ext, said = outcome
        if said:  # one line naming the file, instead of the decoder's own output
            logger.warning("%s: the decoder said: %s", entry.where, said)
        good.append(dataclasses.replace(entry, ext=ext))
    return good, refused


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _collect(src: Path) -> list[_Entry]:
    if src.is_dir():
        return _collect_folder(src)
    if src.is_file():
        return _collect_jsonl(src)
    raise ValueError(
        f"{src} does not exist: pass an image folder (one subfolder per class) or a JSONL file"
    )


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _collect_folder(src: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    stray = sorted(p.name for p in src.iterdir() if _visible(p) and not p.is_dir())
    if stray:
        raise ValueError(
            f"{src / stray[0]} is not inside a class folder: put every image in a subfolder "
            "of SRC named after its class (or describe the images in a JSONL file)"
        )
    for class_dir in sorted(p for p in src.iterdir() if _visible(p)):
        files = sorted(_walk(class_dir), key=lambda p: p.relative_to(class_dir).as_posix())
        if not files:
            raise ValueError(
                f"class folder {class_dir} holds no files: add images to it or remove it"
            )
        for path in files:
            rel = path.relative_to(src).as_posix()
            entries.append(
                _Entry(
                    path=path,
                    source=rel,
                    label=class_dir.name,
                    metadata={},
                    where=rel,
                )
            )
    if not entries:
        raise ValueError(
            f"{src} holds no images: create one subfolder per class with the images inside"
        )
    return entries


def _walk(folder: Path) -> Iterable[Path]:
    """Every visible file under `folder`, dot-named files and folders skipped."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield Path(root) / name


def _collect_jsonl(src: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {src} as UTF-8 JSONL: {exc}") from exc
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{src}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{where}: not valid JSON ({exc.msg}); fix or remove the line"
            ) from exc
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            raise ValueError(
                f'{where}: each line must be an object like {{"file": "cats/1.jpg", '
                f'"label": "cat"}}, got {line.strip()[:80]!r}'
            )
        if "label" not in record:
            raise ValueError(f"{where}: no 'label'; give each line a str, int or dict label")
        label = record["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int, dict)):
            raise ValueError(f"{where}: 'label' must be a str, int or dict, got {label!r}")
        if "source" in record:
            raise ValueError(
                f"{where}: 'source' is reserved (pack records the original path under it); "
                "rename that key"
            )
        metadata = {k: v for k, v in record.items() if k not in ("file", "label")}
        path = src.parent / record["file"]
        entries.append(
            _Entry(
                path=path,
                source=record["file"],
                label=label,
                metadata=metadata,
                where=f"{record['file']} (line {lineno} of {src})",
            )
        )
    if not entries:
        raise ValueError(f"{src} lists no images: add one JSON object per image, one a line")
    return entries


def _write_chunks(entries: list[_Entry], folder: Path, chunk_size: int) -> list[dict[str, Any]]:
    folder.mkdir()
    chunks = []
    for index, start in enumerate(range(0, len(entries), chunk_size)):
        path = folder / f"{index}.zip"
        batch = entries[start : start + chunk_size]
        _write_zip(path, batch, start)
        chunks.append(
            {
                "index": index,
                "url": f"chunks/{index}.zip",
                "num_images": len(batch),
                "size_bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        )
    return chunks


def _member(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED  # images are compressed already
    info.create_system = 3  # unix, whatever the packing platform: byte-identical output
    info.external_attr = 0o644 << 16
    info.file_size = size  # lets zipfile pick zip64 up front for huge members
    return info


def _write_zip(path: Path, batch: list[_Entry], start: int) -> None:
    names = [f"{start + i:06d}{e.ext}" for i, e in enumerate(batch)]
    manifest = "".join(
        json.dumps({"file": name, "label": e.label, **e.metadata, "source": e.source}) + "\n"
        for name, e in zip(names, batch, strict=True)
    ).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        # The manifest goes first so that a streaming reader knows the labels up front.
        zf.writestr(_member("manifest.jsonl", len(manifest)), manifest)
        for name, entry in zip(names, batch, strict=True):
            try:
                with open(entry.path, "rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    with zf.open(_member(name, size), "w") as dst:
                        shutil.copyfileobj(src, dst, _COPY_BLOCK)
            except OSError as exc:
                raise ValueError(f"{entry.where}: cannot read {entry.path} ({exc})") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _install(tmp: Path, target: Path) -> None:
    """Moves the finished job `tmp` to `target`; an existing job ends up in `tmp`.

    A plain rename cannot replace a non-empty folder, so an existing job is swapped with
    `renameat2(RENAME_EXCHANGE)`, one atomic step on Linux. Where that call is missing, the
    old job is renamed away first, which leaves a moment when the job does not exist.
    """
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.is_dir():
            raise
    if _exchange(tmp, target):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
    os.rename(target, aside / "job")
    os.rename(tmp, target)
    os.rename(aside, tmp)


_RENAME_EXCHANGE = 2


_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with Linux `renameat2`; False where it is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    return rc == 0
