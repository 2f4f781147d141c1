"""Aggregation strategies: the contract (``base``), the built-in ones (one
module each) and the registry that also finds other packages' strategies."""

from fedlora.strategies.registry import (
    from_flower,
    from_message,
    resolve,
    strategies,
    strategy_class,
    strategy_keys,
)

__all__ = ["from_flower", "from_message", "resolve", "strategies", "strategy_class",
           "strategy_keys"]
