"""Layout of the four parallel axes (dp x ring x ulysses x tp), the sequence layouts over them
(`zigzag`), and the process groups built from them (`groups`, loaded on first use so that the pure
arithmetic imports without torch.distributed)."""
from __future__ import annotations

import importlib

from .layout import AXES, ParallelLayout

__all__ = ["AXES", "ParallelLayout", "ParallelGroups", "init_parallel"]


def __getattr__(name):
    if name in ("ParallelGroups", "init_parallel"):
        return getattr(importlib.import_module("longvila_engine.parallel.groups"), name)
    raise AttributeError(f"module 'longvila_engine.parallel' has no attribute {name!r}")
