"""Process plumbing that any layer may use: progress display, stop requests and
the process-tree stopper, and the patches that make Flower, Flower Datasets
and Ray quicker or quieter. Imports only ``core``."""
