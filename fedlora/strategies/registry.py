"""Which strategies exist: the built-in ones and those other packages register.

A package adds a strategy by naming its ``LoraStrategy`` subclass under the
entry-point group ``fedlora.strategies`` (examples/custom-strategy), the way
Opacus keeps an open registry of accountants: nothing in ``fedlora`` changes.
Each strategy declares its own config keys (``LoraStrategy.keys``); the run
config is resolved against the core table plus every strategy's keys, and
``check_config`` then lets the chosen strategy refuse what it cannot run.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from fedlora.core.config import ConfigError, Key, RunConfig
from fedlora.core.config import resolve as resolve_keys
from fedlora.strategies.base import LoraStrategy

ENTRY_POINT_GROUP = "fedlora.strategies"
BUILT_IN = (  # module:class, imported on first use
    "fedlora.strategies.fedavg:FedAvgLoRA",
    "fedlora.strategies.ffa:FfaLoRA",
    "fedlora.strategies.lora_fair:LoraFair",
    "fedlora.strategies.cellm:Cellm",
    "fedlora.strategies.fedsa:FedSA",
    "fedlora.strategies.hetlora:HetLoRA",
    "fedlora.strategies.flexlora:FlexLoRA",
    "fedlora.strategies.flora:FLoRA",
    "fedlora.strategies.fedex:FedExLoRA",
)


def _load(reference: str, origin: str) -> type[LoraStrategy]:
    module, _, attribute = reference.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"strategy {reference!r} ({origin}) cannot be loaded: {err}"
                          ) from None
    if not (isinstance(cls, type) and issubclass(cls, LoraStrategy)):
        raise ConfigError(f"strategy {reference!r} ({origin}) is not a LoraStrategy subclass")
    return cls


@functools.cache
def strategies() -> Mapping[str, type[LoraStrategy]]:
    """Every available strategy by name (built-in first, then entry points)."""
    found: dict[str, type[LoraStrategy]] = {}
    sources = [(ref, "built in") for ref in BUILT_IN]
    sources += [(ep.value, f"entry point {ep.name!r} of {ep.dist.name if ep.dist else '?'}")
                for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for reference, origin in sources:
        cls = _load(reference, origin)
        if cls.name in found and found[cls.name] is not cls:
            raise ConfigError(f"strategy name {cls.name!r} ({origin}) is taken by "
                              f"{found[cls.name].__module__}")
        found[cls.name] = cls
    return found


def strategy_class(name: str) -> type[LoraStrategy]:
    try:
        return strategies()[name]
    except KeyError:
        raise ConfigError(f"config key 'strategy': unknown strategy {name!r} "
                          f"(available: {', '.join(sorted(strategies()))})") from None


def strategy_keys() -> dict[str, Mapping[str, Key]]:
    """Each strategy's own keys, by strategy name."""
    return {name: cls.keys for name, cls in strategies().items()}


def resolve(overrides: Mapping[str, Any], check_scope: bool = True) -> RunConfig:
    """The validated run config: core keys, the strategies' keys, and the
    chosen strategy's own cross-checks (``LoraStrategy.check_config``)."""
    config = resolve_keys(overrides, strategy_keys(), check_scope)
    problem = strategy_class(config.strategy).check_config(config)
    if problem:
        raise ConfigError(problem)
    return config


def from_message(sent: Mapping[str, Any]) -> RunConfig:
    """The RunConfig a client receives from the server (resolved there)."""
    return resolve(dict(sent), check_scope=False)


def from_flower(run_config: Mapping[str, Any]) -> RunConfig:
    """The RunConfig for a Flower ``context.run_config`` (pyproject defaults fused
    with ``--run-config`` overrides by Flower)."""
    return resolve(dict(run_config))
