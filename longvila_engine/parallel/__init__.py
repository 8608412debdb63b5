"""Layout of the four parallel axes (dp x ring x ulysses x tp) and the process groups built from it."""
from .groups import ParallelGroups, init_parallel
from .layout import AXES, ParallelLayout

__all__ = ["AXES", "ParallelLayout", "ParallelGroups", "init_parallel"]
