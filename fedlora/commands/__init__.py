"""The top layer: the ``fedlora`` command line and what its commands run
(simulation, compare, report, bench-scale, keys, the Ray worker warm-up)."""
