"""Flower Datasets' partitioners, without its plotting helpers.

``flwr_datasets/__init__.py`` imports ``flwr_datasets.visualization``, which
imports seaborn and matplotlib: about 0.4 s in every process that partitions
data (the driver and each Ray worker), for plots fedlora never draws from
there. Before the package is first imported, that one submodule is
registered as a stand-in whose first attribute lookup loads the real module
(and puts it in its place), so Flower Datasets behaves exactly as before for
code that does plot. (The standard library's ``LazyLoader`` cannot do this on
Python 3.11: the import system reads the lazy module's ``__spec__`` when the
package imports it, and that read loads it.)

Import the partitioners from here, not from ``flwr_datasets`` directly.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

PLOTTING_MODULE = "flwr_datasets.visualization"


class _PlottingOnFirstUse(types.ModuleType):
    """Stands in for ``flwr_datasets.visualization`` until it is used."""

    def __init__(self, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(PLOTTING_MODULE)
        self._real_spec = spec
        self.__file__ = spec.origin
        self.__path__ = list(spec.submodule_search_locations or [])

    def __getattr__(self, name: str):
        if name.startswith("__"):  # a scan of sys.modules (torch does one), not a use
            raise AttributeError(name)
        module = importlib.util.module_from_spec(self._real_spec)
        sys.modules[PLOTTING_MODULE] = module
        self._real_spec.loader.exec_module(module)
        setattr(sys.modules["flwr_datasets"], "visualization", module)
        return getattr(module, name)


def _defer_plotting() -> None:
    """Register the stand-in unless the package is already imported (then
    there is nothing left to save)."""
    if "flwr_datasets" in sys.modules or PLOTTING_MODULE in sys.modules:
        return
    package = importlib.util.find_spec("flwr_datasets")  # locates, imports nothing
    if package is None or not package.submodule_search_locations:
        return  # not installed: the import below says so
    spec = importlib.machinery.PathFinder.find_spec(
        PLOTTING_MODULE, list(package.submodule_search_locations))
    if spec is not None and spec.loader is not None:
        sys.modules[PLOTTING_MODULE] = _PlottingOnFirstUse(spec)


_defer_plotting()

from flwr_datasets.partitioner import (  # noqa: E402  (after the deferral, on purpose)
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

__all__ = ["DirichletPartitioner", "IidPartitioner", "NaturalIdPartitioner", "Partitioner",
           "PathologicalPartitioner"]
