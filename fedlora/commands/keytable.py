"""The run-config keys as ``fedlora keys`` prints them: plain lines, or the
markdown table docs/cli.md carries (``--markdown``), so that the two cannot
drift (a test compares them).

The table is made from the key definitions themselves: the core keys
(``fedlora.core.config.KEYS``) and each built-in strategy's own. A key whose
values are a fixed set (``fedlora.core.config.one_of``) lists them, and
``strategy`` lists the strategies installed. Plug-in strategies appear in
the plain listing (and among ``strategy``'s choices there); they document
their keys in their own package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.core.config import KEYS, Key
from fedlora.strategies import strategy_keys
from fedlora.strategies.registry import BUILT_IN, strategies


def choices(name: str, spec: Key, strategy_names: tuple[str, ...]) -> tuple[str, ...]:
    """The values ``name`` accepts when they are a fixed set, else ()."""
    if name == "strategy":
        return strategy_names
    return tuple(getattr(spec.check, "choices", ()))


def _default(value: Any) -> str:
    if value == "":
        return "empty"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(keys: Mapping[str, Key], names: tuple[str, ...],
          prefix: list[str] | None = None) -> list[str]:
    rows = []
    for name, spec in keys.items():
        options = ", ".join(f"`{c}`" for c in choices(name, spec, names))
        cells = [f"`{name}`", *(prefix or []), spec.type.__name__, _default(spec.default),
                 options, _cell(spec.help)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _built_in_names() -> tuple[str, ...]:
    names = {cls.__module__ + ":" + cls.__qualname__: name for name, cls in strategies().items()}
    return tuple(names[reference] for reference in BUILT_IN if reference in names)


def markdown() -> str:
    """The core keys' table, then the built-in strategies' own keys (the
    same wherever fedlora is installed, whatever plug-ins are)."""
    built_in = _built_in_names()
    lines = ["| key | type | default | choices | meaning |", "|---|---|---|---|---|",
             *_rows(KEYS, built_in), "",
             "Each strategy's own keys (read only when that strategy runs):", "",
             "| key | strategy | type | default | choices | meaning |",
             "|---|---|---|---|---|---|"]
    own = strategy_keys()
    for strategy in built_in:
        lines += _rows(own[strategy], built_in, [f"`{strategy}`"])
    return "\n".join(lines) + "\n"


def plain() -> str:
    """One line per key (a key several strategies share is listed under each)."""
    installed = tuple(strategies())

    def line(name: str, spec: Key, indent: str = "") -> str:
        options = choices(name, spec, installed)
        listed = f" (one of: {', '.join(options)})" if options else ""
        return (f"{indent}{name:22} {spec.type.__name__:5} default {spec.default!r:40} "
                f"{spec.help}{listed}")

    lines = [line(name, spec) for name, spec in KEYS.items()]
    for strategy, keys in strategy_keys().items():
        lines.append(f"\nstrategy {strategy}:" + ("" if keys else " (no keys of its own)"))
        lines += [line(name, spec, "  ") for name, spec in keys.items()]
    return "\n".join(lines) + "\n"
