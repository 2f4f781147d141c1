"""FedAvgM server momentum as a fedlora plug-in strategy (``fedavg-momentum``)."""

from fedavg_momentum.strategy import FedAvgMomentum

__all__ = ["FedAvgMomentum"]
