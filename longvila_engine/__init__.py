"""longvila_engine: long-context multimodal training and serving with MM-SP sequence parallelism.

Importing the package is cheap: it never touches CUDA, never loads the compiled extension and never
prints. Public names are resolved lazily.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ParallelLayout": "longvila_engine.parallel.layout",
    "ParallelGroups": "longvila_engine.parallel.groups",
    "init_parallel": "longvila_engine.parallel.groups",
    "shard_sequence": "longvila_engine.attention.sharding",
    "unshard_sequence": "longvila_engine.attention.sharding",
    "sequence_parallel_attention": "longvila_engine.attention.sequence_parallel",
}

__all__ = ["ops", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("ops", "parallel", "comm", "attention", "kernels", "models", "tensor_parallel", "multimodal",
                "inference", "integrations", "train", "checkpoint"):
        return importlib.import_module(f"longvila_engine.{name}")
    raise AttributeError(f"module 'longvila_engine' has no attribute {name!r}")
