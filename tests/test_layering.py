"""Imports run one way, down the layers (docs/architecture.md): commands →
federation → node → strategies → learning → wire → runtime → core, and the
library never imports the Flower apps (server/, client/). Read from the
source (every ``import`` statement, function-level ones included), so a
lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "fedlora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py") if "v1" not in p.parts}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. A package's ``__init__`` importing its own
    submodules is how a package exposes them, not a cycle."""
    def edges(name):
        return {m for m in graph[name] if not m.startswith(name + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name):
        state[name] = 1
        stack.append(name)
        for nxt in sorted(edges(name)):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[name] = 2
        stack.pop()
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_library_never_imports_the_flower_apps():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p)
                                                  if m.split(".")[0] in ("server", "client"))
                 for p in LIBRARY.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_library_has_no_import_cycle():
    assert _cycle(_graph()) is None, " → ".join(_cycle(_graph()))


def test_the_cycle_check_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# The layers, bottom first: a module may import its own layer and those below.
LAYERS = ("core", "runtime", "wire", "learning", "strategies", "node", "federation",
          "commands")
# The generated protobuf code sits where protoc puts the ``fedlora.v1`` package:
# part of ``wire``.
PLACED = {"v1": "wire"}


def layer_of(module: str) -> str | None:
    """The layer of ``fedlora.<layer>...``; None for the package's own top
    modules (``fedlora``, ``fedlora.__main__``)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "fedlora":
        return None
    name = PLACED.get(parts[1], parts[1])
    return name if name in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs where a lower layer imports a higher one."""
    found = set()
    for name, imported in graph.items():
        low = layer_of(name)
        for other in imported:
            high = layer_of(other)
            if low and high and LAYERS.index(high) > LAYERS.index(low):
                found.add((name, other))
    return found


def test_every_module_sits_in_a_layer():
    top_level = {"fedlora", "fedlora.__main__"}
    assert not {m for m in _graph() if m not in top_level and layer_of(m) is None}


def test_imports_run_down_the_layers():
    assert not upward_imports(_graph()), sorted(upward_imports(_graph()))


def test_the_layer_check_finds_an_upward_import():
    graph = {"fedlora.core.config": {"fedlora.strategies.base"},
             "fedlora.strategies.base": {"fedlora.core.config"}}
    assert upward_imports(graph) == {("fedlora.core.config", "fedlora.strategies.base")}


@pytest.mark.parametrize("core", ["fedlora.core.config", "fedlora.wire.messages",
                                  "fedlora.wire.codec", "fedlora.wire.basedelta",
                                  "fedlora.core.adapters"])
def test_core_modules_know_no_strategy(core):
    graph = _graph()
    seen, todo = set(), [core]
    while todo:  # everything the core module reaches
        name = todo.pop()
        for nxt in graph[name] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert not {m for m in seen if m.startswith("fedlora.strategies")}, core
