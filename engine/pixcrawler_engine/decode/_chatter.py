"""What decoders say while they work: C libraries' stderr lines and Pillow's warnings, per sample.

libtiff prints its warnings and errors straight to the process's stderr (file descriptor 2:
"TIFFReadDirectory: Unknown field with tag ...", "WEBP compression support is not
configured"), and Pillow emits `UserWarning`s ("Corrupt EXIF data", "Truncated File Read")
that Python shows with a line of Pillow's source. A pass over a folder of damaged files then
buries the user in hundreds of raw lines that name no sample.

`capture` takes both, around one call into a decoder: fd 2 goes to an anonymous file for the
duration (restored before anything else runs), and warnings are recorded instead of shown.
What was said goes to the innermost `collect` (the engine's per-sample loop, which reports it as
one line naming the sample), or, when nothing collects, to the `pixcrawler_engine.decode`
logger as one record. `unsupported` reads it with the decoder's error to tell a valid file in
a feature the decoders lack (a codec libtiff was built without) from a damaged one.

fd 2 is process-wide state: a thread writing to stderr during a capture is captured too. The
engine decodes in processes, one image at a time; `warnings.catch_warnings` has the same limit.

Pointing fd 2 away and back is five system calls (~3 us), as much as decoding a tiny PNG. A
loop over many images therefore holds fd 2 on the sink for the whole loop (`held`); a capture
inside it only notes where the sink's offset was and reads what came after (two `lseek`s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["capture", "collect", "drain", "held", "quietly", "report", "summary", "unsupported"]

logger = logging.getLogger("pixcrawler_engine.decode")

T = TypeVar("T")

_MAX_LINES = 5  # kept per capture: the first few say what happened
_MAX_BYTES = 64 << 10
_UNSUPPORTED = re.compile(
    r"unsupported|not supported|not configured|not implemented|cannot handle", re.IGNORECASE
)
_collectors: list[list[str]] = []
_sink: int | None = None  # the anonymous file fd 2 is pointed at, made once per process
_holding = False  # fd 2 points at the sink already (inside `held`)


def _forget_parents_sink() -> None:
    """In a forked child: the inherited sink shares its offset with the parent's; make another."""
    global _sink, _holding
    if _sink is not None:
        with contextlib.suppress(OSError):
            os.close(_sink)
    _sink, _holding = None, False


os.register_at_fork(after_in_child=_forget_parents_sink)


def _sink_fd() -> int:
    global _sink
    if _sink is None:
        try:
            _sink = os.memfd_create("pxc-stderr", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # not Linux: an unlinked temporary file
            fd, path = tempfile.mkstemp(prefix="pxc-stderr-")
            os.unlink(path)
            _sink = fd
    return _sink


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Points fd 2 at the sink for the whole block, so that each `capture` inside is cheap.

    Whatever writes to fd 2 inside but outside any `capture` stays in the sink until the
    caller takes it with `drain` (a loop over samples drains after each sample).
    """
    global _holding
    if _holding:
        yield
        return
    sink = _sink_fd()
    saved = _point_at(sink)
    _holding = True
    try:
        yield
    finally:
        _holding = False
        _restore(saved)
        os.ftruncate(sink, 0)
        os.lseek(sink, 0, os.SEEK_SET)


@contextlib.contextmanager
def capture(said: list[str], *, python_warnings: bool = True) -> Iterator[None]:
    """Appends to `said` what the code inside writes to fd 2 and the warnings it raises.

    `python_warnings=False` takes fd 2 only, for a library that raises no Python warnings
    (OpenCV): recording warnings costs as much as the redirection.
    """
    taken = _Taken()
    caught: list[warnings.WarningMessage] = []
    try:
        if python_warnings:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield
        else:
            yield
    finally:
        taken.end(said)
        said.extend(str(w.message) for w in caught)


def quietly(call: Callable[..., T], said: list[str], *args: Any) -> T:
    """`call(*args)` with fd 2 taken (as `capture(said, python_warnings=False)`), at less
    cost: inside `held`, two `lseek`s (a decoder's loop over tiny images calls it per image)."""
    taken = _Taken()
    try:
        return call(*args)
    finally:
        taken.end(said)


class _Taken:
    """fd 2 on the sink from here (already there inside `held`) until `end`, which moves what
    was written meanwhile into `said` and points fd 2 back where it was."""

    __slots__ = ("saved", "sink", "start")

    def __init__(self) -> None:
        self.sink = _sink_fd()
        self.saved = None if _holding else _point_at(self.sink)
        self.start = os.lseek(self.sink, 0, os.SEEK_CUR)

    def end(self, said: list[str]) -> None:
        if self.saved is not None:
            _restore(self.saved)
        _take(self.sink, self.start, said)


def drain(said: list[str]) -> None:
    """Inside `held`: moves into `said` what was written to fd 2 outside any capture since
    the last drain (a decoder outside a capture, say); one `lseek` when there is nothing."""
    if _holding and _sink is not None:
        _take(_sink, 0, said)


def _point_at(sink: int) -> int:
    """Points fd 2 at `sink`; returns a duplicate of what it was."""
    with contextlib.suppress(ValueError, OSError):
        sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(sink, 2)
    return saved


def _restore(saved: int) -> None:
    os.dup2(saved, 2)
    os.close(saved)


def _take(sink: int, start: int, said: list[str]) -> None:
    """Moves the lines written to the sink since offset `start` into `said`."""
    end = os.lseek(sink, 0, os.SEEK_CUR)
    if end <= start:
        return
    text = os.pread(sink, min(end - start, _MAX_BYTES), start).decode("utf-8", "replace")
    os.ftruncate(sink, start)
    os.lseek(sink, start, os.SEEK_SET)
    said.extend(line.strip() for line in text.splitlines() if line.strip())


def report(said: list[str], what: str) -> None:
    """Hands what a decoder said on to the innermost `collect`, or logs it as one record."""
    if not said:
        return
    if _collectors:
        _collectors[-1].extend(said)
    else:
        logger.warning("the decoder said, decoding the %s: %s", what, summary(said))


def summary(said: list[str]) -> str:
    """One line for what a decoder said: its first distinct messages and how many in all."""
    distinct = list(dict.fromkeys(said))
    shown = " | ".join(distinct[:_MAX_LINES])
    more = len(said) - min(len(distinct), _MAX_LINES)
    return shown + (f" (and {more} more)" if more > 0 else "")


@contextlib.contextmanager
def collect() -> Iterator[list[str]]:
    """Collects what decoders say inside (instead of logging it): one sample's chatter."""
    said: list[str] = []
    _collectors.append(said)
    try:
        yield said
    finally:
        _collectors.remove(said)


def unsupported(error: BaseException, said: list[str]) -> bool:
    """Whether a decoder's error (and what it said) means a feature it lacks, not damage."""
    return any(_UNSUPPORTED.search(text) for text in (str(error), *said))
