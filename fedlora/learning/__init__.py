"""Local learning on one machine: models and tokenisers, datasets and
partitions, encoded features, local training and evaluation, DP-SGD, and the
attack harness. Knows nothing of rounds or strategies."""
