"""What a CLI user reads: the library's Python wording turned into flags, per-sample lines.

The engine and the SDK say how to fix a problem in Python terms (`on_error='skip'`,
`JobClient.list_jobs()`, `verify_ssl=...`): right for the API, wrong for someone who typed a
command. `cli_words` rewrites those hints into the flag or command of the CLI command that
failed, and `sample_lines` prints the per-sample reports of a run (bad samples under
`--on-error warn`, decoder chatter) as one `warning: ...` line each on stderr, instead of
Python warnings with a library's source line.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import TextIO

import click

__all__ = ["PYTHON_ONLY", "cli_words", "sample_lines"]

_Rule = tuple["re.Pattern[str]", str]


def _rules(*pairs: tuple[str, str]) -> list[_Rule]:
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


# Most specific first: later rules see the text earlier ones produced.
_COMMON = _rules(
    (r"image_size=\((\d+), (\d+)\)", r"--image-size \1x\2"),
    (r"image_size=None", "no --image-size"),
    (r"decode=None", "the files as stored (no --image-size, no --color)"),
    (r"\b(resize|color|format)='(\w+)'", r"--\1 \2"),
    (r"max_pixels=(\d+)", r"--max-pixels \1"),
    (r"shuffle_seed=None", "no --shuffle"),
    (r"shuffle_seed=(\d+)", r"--shuffle --seed \1"),
    (r"max_samples=None", "no --max-samples"),
    (r"max_samples=(\d+)", r"--max-samples \1"),
    (r"pass image_size= to", "pass --image-size to"),
    (r"lower num_slots, batch_rows or image_size", "pass a smaller --image-size or --num-workers"),
    (r"on_error='(\w+)'", r"--on-error \1"),
    (r"JobClient\.list_jobs\(\)", "`pixcrawler list`"),
    (r"the api_key argument or the PIXCRAWLER_API_KEY variable", "--api-key or PIXCRAWLER_API_KEY"),
    (r"pass api_key='\.\.\.' to load_dataset", "pass --api-key"),
    (r"verify_ssl='/path/to/ca\.pem' for a private CA \(or False to skip checks\)",
     "--ca-bundle /path/to/ca.pem for a private CA"),
    (r"\(DecodePolicy\.max_pixels\)", "(--max-pixels)"),
    (r"lower DecodePolicy\.max_pixels", "lower --max-pixels"),
    (r"Raise max_pixels", "Raise --max-pixels"),
    (r"a larger slot_bytes", "a larger slot_bytes in configs/engine.toml"),
    (r"force=True", "--force"),
    (r"\bbase_url\b", "--base-url"),
    (r"\bapi_key\b", "--api-key"),
    (r"\bverify_ssl\b", "--ca-bundle"),
)  # fmt: skip
# What differs by command: pack skips bad files with --skip-bad; export-images sizes with
# --max-side.
_BY_COMMAND: dict[str, list[_Rule]] = {
    "pack": _rules((r"on_error='skip'", "--skip-bad")),
    "export-images": _rules(
        (r"pass image_size= to shrink images", "pass a smaller --max-side"),
        (r"(?:pass )?a smaller --image-size", "a smaller --max-side"),
    ),
}
PYTHON_ONLY = re.compile(
    r"on_error=|image_size=|api_key|verify_ssl|base_url|JobClient|load_dataset|force=True"
    r"|DecodePolicy|max_pixels\b"
)
"""Wording a CLI message must not contain once `cli_words` has rewritten it."""


def cli_words(message: str, command: str | None) -> str:
    """`message` with its Python hints rewritten into the flags of `command`."""
    for pattern, replacement in _BY_COMMAND.get(command or "", []) + _COMMON:
        message = pattern.sub(replacement, message)
    return message


class _Echo(logging.Handler):
    """Prints each engine log record of WARNING and above as one line on stderr."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _line(record.getMessage(), self.command)
        except Exception:  # a handler must not raise into the code that logs
            self.handleError(record)


def _line(message: str, command: str) -> None:
    text = " ".join(cli_words(message, command).split())  # one line, whatever it held
    click.echo(f"warning: {text}", err=True)


@contextlib.contextmanager
def sample_lines(command: str) -> Iterator[None]:
    """Per-sample warnings and the engine's log records as `warning: ...` lines on stderr.

    `SampleWarning`s (a bad sample left out under `on_error="warn"`) and records of the
    `pixcrawler_engine` and `pixcrawler` loggers (decoder chatter, see
    `pixcrawler_engine.decode._chatter`) each become one line; other warnings go on as
    Python shows them.
    """
    from pixcrawler_engine.runtime._stream import SampleWarning

    handler = _Echo(command)
    loggers = [logging.getLogger(name) for name in ("pixcrawler_engine", "pixcrawler")]
    saved = [(lg.propagate, lg.level) for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("always", SampleWarning)
        shown = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, SampleWarning):
                _line(str(message), command)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        for lg in loggers:
            lg.addHandler(handler)
            lg.propagate = False
            if lg.level == logging.NOTSET or lg.level > logging.WARNING:
                lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, (propagate, level) in zip(loggers, saved, strict=True):
                lg.removeHandler(handler)
                lg.propagate = propagate
                lg.setLevel(level)
