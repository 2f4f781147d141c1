"""The bottom layer: the run config and its key table, adapter state, exact
sums, seeding. Imports nothing else of fedlora."""
