"""How the workers' arguments travel to the zygote: a file it loads, in plain pickle unless
they hold user code.

The zygote imports no dill for plain pickle (~8 ms before a first batch); a transform defined in
a user's script travels by dill.
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

__all__ = ["dumps_args", "load_args"]


class _Plain(pickle.Pickler):
    """Pickle, refusing what only dill carries: objects of `__main__` (by reference they would
    not load in the zygote, whose `__main__` is not the caller's); lambdas fail by themselves."""

    def reducer_override(self, obj: Any) -> Any:
        if getattr(obj, "__module__", None) == "__main__":
            raise pickle.PicklingError(f"{obj!r} is defined in __main__")
        return NotImplemented


def dumps_args(sys_path: list[str], args: Any) -> bytes:
    """The caller's `sys.path`, then the workers' arguments, which may need it to load: b"P" and
    plain pickle (the zygote imports no dill, ~8 ms before a first batch), or b"D" and dill for
    user code (a transform defined in a script)."""
    path = pickle.dumps(sys_path, protocol=pickle.HIGHEST_PROTOCOL)
    out = io.BytesIO()
    try:
        _Plain(out, protocol=pickle.HIGHEST_PROTOCOL).dump(args)
    except (pickle.PicklingError, AttributeError, TypeError):
        import dill

        return b"D" + path + dill.dumps(args)
    return b"P" + path + out.getvalue()


def load_args(path: Path) -> tuple[Any, ...]:
    """Loads what `dumps_args` wrote, the caller's `sys.path` first."""
    data = io.BytesIO(path.read_bytes())
    kind = data.read(1)
    sys.path[:] = pickle.load(data)
    if kind == b"P":
        return tuple(pickle.load(data))
    import dill

    return tuple(dill.load(data))
