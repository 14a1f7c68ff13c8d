"""The work folder of one export to disk: its state file, lock, committed parts and safe names.

An export of job J into `<target>` keeps its bookkeeping in `<target>/.pixcrawler/`:

    state.json     job id, job version, format and options (the export's identity), and phase
    lock           held (`flock`) by the process writing the export; dropped by the kernel
                   when that process dies, even by SIGKILL
    parts/         one committed part per finished chunk, named `<chunk:06d>.<kind>`; work in
                   progress is a dot-named temporary next to it, renamed when complete
    download/      chunk files fetched for this export (kept across runs, so that a download cut
                   short resumes with `Range`); each goes once its chunk's part is committed

Phases: `writing` (parts are being committed) -> `finalizing` (every part is there; the
format moves them into their final place, idempotently) -> `complete`. Only the last step,
a rename of state.json, makes an export complete, so an interrupted one never looks finished.

`Workspace` owns everything under `.pixcrawler/`; the format writers own what they put in
`<target>` itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import unicodedata
import uuid
from pathlib import Path
from typing import Any

from pixcrawler_engine._errors import PixCrawlerError

__all__ = ["STATE_VERSION", "Workspace", "safe_name"]

STATE_VERSION = 1
META = ".pixcrawler"
_PART = re.compile(r"([0-9]{6,})\.[a-z]+")
_NOT_SAFE = re.compile(r"[^\w.\- ]+")
# Names Windows refuses whatever the extension; a dataset may well be copied there.
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}


def safe_name(text: str, *, reserved: frozenset[str] = frozenset(), max_len: int = 100) -> str:
    """A file or folder name made from untrusted text (a label, a zip member name).

    The result is one path component: no separator, no `..`, no leading dot, no control
    character, at most `max_len` characters before the suffix. When the text had to change, a
    short hash of the original is appended, so that two different labels ("a/b" and "a_b")
    never share a folder.

    Args:
        text: the untrusted text.
        reserved: lowercase names that must not be returned as they are (files the export
            writes next to the label folders).
        max_len: the longest kept prefix of the cleaned text.
    """
    cleaned = _NOT_SAFE.sub("_", unicodedata.normalize("NFC", text)).strip(" .")
    lowered = cleaned.lower()
    changed = (
        cleaned != text
        or not cleaned
        or len(cleaned) > max_len
        or lowered.split(".")[0] in _RESERVED
        or lowered in reserved
    )
    if not changed:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned[:max_len] or '_'}-{digest}"


class Workspace:
    """The `.pixcrawler/` folder of one export target.

    Args:
        target: the export's folder (`<output-dir>/<job_id>`).
    """

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.meta = self.target / META
        self.parts = self.meta / "parts"
        self.downloads = self.meta / "download"
        self.state_path = self.meta / "state.json"
        self.state: dict[str, Any] = {}
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------ life cycle

    def open(self, identity: dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        """Creates or reopens the work folder for an export with this identity.

        Args:
            identity: JSON-able fields that must match for an export to be resumed (job id,
                job version, format, options).
            force: when the folder holds an export of another identity, delete it and start
                over (the chunk downloads stay: they are verified before any reuse).

        Returns:
            The state (`phase` is `writing`, `finalizing` or `complete`).

        Raises:
            PixCrawlerError: the target cannot be created, holds something else (another
                job, other options, a folder that is not an export), or another process is
                writing this export.
            OSError: the work folder cannot be written.
        """
        if self.target.exists() and not self.target.is_dir():
            raise PixCrawlerError(f"{self.target} exists and is not a folder; choose another path")
        if (
            self.target.is_dir()
            and not self.state_path.is_file()
            and any(p.name != META for p in self.target.iterdir())
        ):
            raise PixCrawlerError(
                f"{self.target} already exists and is not a PixCrawler export; choose another "
                "--output-dir, or move that folder away"
            )
        try:
            self.meta.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PixCrawlerError(
                f"cannot create the export folder {self.target}: {exc.strerror or exc}; "
                "choose a writable --output-dir"
            ) from exc
        self._take_lock()
        if self.state_path.is_file():
            try:
                state = self._read_state()
                self._check_identity(state, identity)
            except PixCrawlerError:
                if not force:
                    raise
                self._start_over()
                state = {"state_version": STATE_VERSION, **identity, "phase": "writing"}
        else:
            state = {"state_version": STATE_VERSION, **identity, "phase": "writing"}
        self.state = state
        self.save()
        self.parts.mkdir(exist_ok=True)
        self.downloads.mkdir(exist_ok=True)
        return state

    def close(self) -> None:
        """Releases the lock; idempotent."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def save(self) -> None:
        """Writes the state atomically (temporary file, then rename)."""
        self.write_text(self.state_path, json.dumps(self.state, indent=1, sort_keys=True) + "\n")

    def forget(self) -> None:
        """Drops the state of an export that wrote nothing yet: the next run starts afresh.

        The downloads stay, for that run to reuse.
        """
        self.state_path.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    def _start_over(self) -> None:
        """Deletes everything of an earlier export in the target except its downloads."""
        for entry in self.target.iterdir():
            if entry.name == META:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for entry in self.meta.iterdir():
            if entry.name in ("lock", self.downloads.name):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def cleanup(self) -> None:
        """Removes the parts and downloads of a complete export; the state file stays."""
        shutil.rmtree(self.parts, ignore_errors=True)
        shutil.rmtree(self.downloads, ignore_errors=True)

    # ----------------------------------------------------------------------------- parts

    def done_chunks(self) -> set[int]:
        """Chunks whose part is committed."""
        try:
            names = os.listdir(self.parts)
        except FileNotFoundError:
            return set()
        return {int(m.group(1)) for n in names if (m := _PART.fullmatch(n))}

    def part(self, chunk: int, kind: str) -> Path:
        """The committed name of a chunk's part."""
        return self.parts / f"{chunk:06d}.{kind}"

    def temp(self, chunk: int, kind: str) -> Path:
        """A fresh temporary name for a part being written (dot-named: never a part)."""
        return self.parts / f".{chunk:06d}.{kind}.{uuid.uuid4().hex[:8]}.tmp"

    def sweep_temps(self) -> None:
        """Removes temporaries a killed run left in `parts/`."""
        with contextlib.suppress(FileNotFoundError):
            for entry in self.parts.iterdir():
                if entry.name.startswith("."):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)

    @staticmethod
    def write_text(path: Path, text: str) -> None:
        """Writes a small file atomically: a reader sees the old content or the new."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------------- internals

    def _take_lock(self) -> None:
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PixCrawlerError(
                f"another process is writing an export into {self.target}; wait for it to "
                "finish (or stop it), then run the command again"
            ) from None
        self._lock_fd = fd

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PixCrawlerError(
                f"{self.state_path} is unreadable ({exc}); delete {self.target} to start over"
            ) from exc
        if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
            raise PixCrawlerError(
                f"{self.target} holds an export written by another version of PixCrawler; "
                "delete it (or choose another --output-dir) to start over"
            )
        return state

    def _check_identity(self, state: dict[str, Any], identity: dict[str, Any]) -> None:
        if state.get("job_id") != identity.get("job_id"):
            raise PixCrawlerError(
                f"{self.target} holds an export of job {state.get('job_id')!r}, not "
                f"{identity.get('job_id')!r}; choose another --output-dir (or replace it "
                "with force=True)"
            )
        if state.get("job_version") != identity.get("job_version"):
            raise PixCrawlerError(
                f"{self.target} holds an export of job {state.get('job_id')!r} version "
                f"{state.get('job_version')!r}, but the job is now version "
                f"{identity.get('job_version')!r} (it was re-packed); start over with "
                "force=True, or choose another --output-dir"
            )
        old, new = _options(state), _options(identity)
        differ = [k for k in {**old, **new} if old.get(k, _MISSING) != new.get(k, _MISSING)]
        if "decode" in differ:  # one decodes and the other not: its size and colour say enough
            differ = [k for k in differ if k in _NOT_DECODE or k in _DECODE_NAMED]
        if differ:
            was = ", ".join(f"{k}={_show(old[k])}" for k in differ if k in old)
            now = ", ".join(f"{k}={_show(new[k])}" for k in differ if k in new)
            raise PixCrawlerError(
                f"{self.target} holds an export of job {state.get('job_id')!r} with {was}, not "
                f"{now}; rerun with the same options to resume it, start over with the new "
                "ones with force=True, or choose another --output-dir"
            )


_MISSING = object()
# The decode options worth naming when the other export did not decode at all.
_DECODE_NAMED = ("image_size", "color")
_NOT_DECODE = ("format", "decode", "shuffle_seed", "max_samples")


def _options(identity: dict[str, Any]) -> dict[str, Any]:
    """An export's options as flat `name: value` pairs, the way a caller passes them.

    `decode=None` (the files as stored) stands alone; a decoding export lists its policy.
    """
    flat: dict[str, Any] = {}
    for key, value in identity.items():
        if key in ("job_id", "job_version", "state_version", "phase", "common_size"):
            continue
        if key == "decode" and isinstance(value, dict):
            flat.update(value)
        elif key not in ("label_kind",):
            flat[key] = value
    return flat


def _show(value: Any) -> str:
    if isinstance(value, list):
        return repr(tuple(value))
    return repr(value)
