"""The package's shape, read from its source with ``ast``: no import cycles (imports inside
functions and under TYPE_CHECKING count: a lazy import still ties two files), no function over
120 lines, and the data layer's rule that a loader backend imports neither another backend nor
the factory."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 120


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for fasthpa/ and kernels/ (installed as fasthpa.kernels)."""
    found = {}
    for top in ("fasthpa", "kernels"):
        for path in (REPO / top).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if top == "kernels":
                parts = ["fasthpa", *parts]
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (not its own parents)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets |= {f"{base}.{a.name}" for a in node.names} | {base}
    out = set()
    for t in targets:
        while t and t not in known:
            t = t.rpartition(".")[0]
        if t and t != name and not name.startswith(t + ".") and t != "fasthpa":
            out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search, three colours)."""
    colour = dict.fromkeys(g, 0)
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        colour[v] = 1
        stack.append(v)
        for w in sorted(g[v]):
            if colour[w] == 1:
                return stack[stack.index(w) :] + [w]
            if colour[w] == 0 and (cycle := visit(w)):
                return cycle
        stack.pop()
        colour[v] = 2
        return None

    for v in sorted(g):
        if colour[v] == 0 and (cycle := visit(v)):
            return cycle
    return None


def test_no_import_cycle_counting_lazy_imports():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(g) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.name} ({lines} lines)")
    assert not long, long


def test_a_loader_backend_imports_no_other_backend_nor_the_factory():
    g = graph()
    # the backends: fasthpa/data/*_loader.py (loader.py itself is the factory)
    backends = {m for m in g if m.startswith("fasthpa.data.") and m.endswith("_loader")}
    assert {"fasthpa.data.torch_loader", "fasthpa.data.dali_loader"} <= backends
    for backend in sorted(backends):
        forbidden = (backends - {backend}) | {"fasthpa.data.loader"}
        assert not g[backend] & forbidden, (backend, g[backend] & forbidden)
        assert "fasthpa.data.contract" in g[backend], backend
