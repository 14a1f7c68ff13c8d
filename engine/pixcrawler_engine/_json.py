"""`json.dumps` for parsed JSON values, without its per-call set-up.

`json.dumps` builds a `JSONEncoder` on every call (~1.5 us): per sample, that is as much as the
rest of reading its manifest line, or of adding it to a batch. `dumps` here is CPython's C
encoder made once, with `json.dumps`' defaults, so its output is the same byte for byte. It has
no circular-reference check: parsed data has no cycles (a cycle still ends in RecursionError).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["dumps"]


def _encoder() -> Callable[[Any], str]:
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # another Python: the plain function
        return json.dumps
    default = json.JSONEncoder().default
    ascii_ = json.encoder.encode_basestring_ascii
    encode = make(None, default, ascii_, None, ": ", ", ", False, False, True)
    return lambda value: "".join(encode(value, 0))


dumps = _encoder()
