"""Local learning on one machine: models and tokenisers, datasets and
partitions, the tasks (what an example is, its loss and metrics: ``tasks/``),
encoded features, local training, DP-SGD, and the attack harness. Knows
nothing of rounds or strategies."""
