"""Aggregation strategies by name (the values of the ``strategy`` config key)."""

from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.fedavg import FedAvgLoRA

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls for cls in (FedAvgLoRA,)
}
