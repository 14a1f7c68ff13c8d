"""The layout holds: folders are import paths, imports point one way, the facade stays light.

Every import of the two packages is read from the source (`ast`), wherever it stands: at the
top, inside a function, or under `if TYPE_CHECKING:` (a static tool follows those too). An
import `from a.b import c` is an edge to the module `a.b.c` if there is one, else to `a.b`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pixcrawler": ROOT / "sdk", "pixcrawler_engine": ROOT / "engine"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Every module of both packages, by its dotted name (a package by its own name)."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield sub if sub in MODULES else node.module


def _graph() -> dict[str, set[str]]:
    return {
        name: {target for target in _imports(path) if target in MODULES and target != name}
        for name, path in MODULES.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path of modules, or None (iterative three-colour DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_walk_sees_the_packages_and_their_imports() -> None:
    graph = _graph()
    assert {"pixcrawler", "pixcrawler.cli", "pixcrawler_engine.runtime._supervisor"} <= set(graph)
    assert "pixcrawler_engine.runtime._shm" in graph["pixcrawler_engine.runtime._supervisor"]
    assert "pixcrawler_engine.runtime._stream" in graph["pixcrawler._dataset"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _package(module: str) -> str:
    """The folder of a module: `pixcrawler_engine.runtime._shm` -> `pixcrawler_engine.runtime`."""
    return (
        module
        if module not in MODULES or MODULES[module].name == "__init__.py"
        else (module.rpartition(".")[0])
    )


def test_no_cycle_between_folders() -> None:
    # runtime -> decode and sources, export -> runtime: never back. A package's own __init__
    # re-exports its children (lazily), so edges into a folder from its __init__ don't count;
    # nor do `__main__` entry points (`python -m pixcrawler` runs the CLI, which sits on top).
    folders: dict[str, set[str]] = {}
    for name, targets in _graph().items():
        if name.endswith(".__main__"):
            continue
        here = _package(name)
        folders.setdefault(here, set()).update(
            there
            for there in map(_package, targets)
            if there != here
            and not (MODULES[name].name == "__init__.py" and there.startswith(here))
        )
    for targets in list(folders.values()):
        for target in targets:
            folders.setdefault(target, set())
    assert "pixcrawler_engine.decode" in folders["pixcrawler_engine.runtime"]
    cycle = _find_cycle(folders)
    assert cycle is None, "folders import each other: " + " -> ".join(cycle or [])


def test_the_engine_never_imports_the_sdk() -> None:
    offenders = [
        f"{name} imports {target}"
        for name, path in MODULES.items()
        if name.startswith("pixcrawler_engine")
        for target in _imports(path)
        if target == "pixcrawler" or target.startswith("pixcrawler.")
    ]
    assert not offenders


def test_every_module_is_short() -> None:
    long = {
        name: n
        for name, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("package", ["pixcrawler", "pixcrawler_engine"])
def test_importing_a_package_stays_light(package: str) -> None:
    heavy = ("torch", "tensorflow", "ray", "pandas", "pyarrow", "PIL", "httpx", "multiprocess")
    code = (
        f"import sys, {package}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_package_ships_py_typed() -> None:
    for package, root in PACKAGES.items():
        assert (root / package / "py.typed").is_file()
