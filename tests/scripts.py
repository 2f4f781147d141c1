"""The benchmark scripts of ``simulations/``, imported by path for their
tests (the folder is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"


def simulation_script(name: str) -> ModuleType:
    """``simulations/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, SIMULATIONS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
