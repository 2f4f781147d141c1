"""Aggregation strategies by name (the values of the ``strategy`` config key)."""

from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.cellm import Cellm
from fedlora.strategies.fedavg import FedAvgLoRA
from fedlora.strategies.ffa import FfaLoRA
from fedlora.strategies.lora_fair import LoraFair

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls for cls in (FedAvgLoRA, FfaLoRA, LoraFair, Cellm)
}
