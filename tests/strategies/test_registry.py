"""The registry: the built-in strategies, each strategy's own keys (listed
by ``fedlora keys`` and validated by name)."""

from __future__ import annotations

import re

import pytest

from fedlora.commands.cli import main
from fedlora.core.config import ConfigError
from fedlora.strategies import resolve, strategies
from fedlora.strategies.fedex import FedExLoRA
from fedlora.strategies.fedsa import FedSA
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.flora import FLoRA
from fedlora.strategies.hetlora import HetLoRA

NINE = {"fedavg", "ffa", "lora-fair", "cellm", "fedsa", "hetlora", "flexlora", "flora",
        "fedex"}


def test_registry_has_the_built_in_strategies():
    built_in = {name for name, cls in strategies().items()
                if cls.__module__.startswith("fedlora.strategies.")}
    assert built_in == {"fedavg", "ffa", "lora-fair", "cellm", "fedsa", "hetlora",
                        "flexlora", "flora", "fedex"}


def test_registry_has_the_nine_strategies():
    found = strategies()
    assert NINE <= set(found)
    assert {n: found[n] for n in ("fedsa", "hetlora", "flexlora", "flora", "fedex")} == {
        "fedsa": FedSA, "hetlora": HetLoRA, "flexlora": FlexLoRA, "flora": FLoRA,
        "fedex": FedExLoRA}
    assert all(cls.name == name for name, cls in found.items())


@pytest.mark.parametrize("overrides, needle", [
    ({"strategy": "cellm", "cellm-up-density": 0.0}, "cellm-up-density"),
    ({"strategy": "cellm", "cellm-down-density": 1.5}, "cellm-down-density"),
    ({"strategy": "lora-fair", "fair-lambda": -0.1}, "fair-lambda"),
    ({"strategy": "fedavg", "fair-lambda": 0.5}, "applies to strategy lora-fair"),
    ({"strategy": "ffa", "cellm-up-density": 0.1}, "applies to strategy cellm"),
    ({"strategy": "cellm", "ffa-a-init": "gaussian"}, "applies to strategy ffa"),
])
def test_strategy_keys_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(overrides)


def test_keys_lists_each_strategys_own_keys(capsys):
    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    sections: dict[str, set[str]] = {}
    current = None
    for line in out.splitlines():
        if (header := re.match(r"strategy (\S+):", line)) is not None:
            current = header.group(1)
            sections[current] = set()
        elif current is not None and line.startswith("  ") and line.strip():
            sections[current].add(line.split()[0])
    assert set(sections) == set(strategies())
    for name, cls in strategies().items():
        assert sections[name] == set(cls.keys), name
    for name in ("hetlora", "flexlora", "flora"):
        assert "client-ranks" in sections[name]
    assert sections["fedsa"] == sections["fedex"] == set()
    assert "strategy fedex: (no keys of its own)" in out
