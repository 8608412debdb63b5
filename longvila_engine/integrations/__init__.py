"""Integrations with third-party model code. `hf`: Hugging Face transformers causal LMs (imports transformers
only when used)."""
from __future__ import annotations

import importlib

_LAZY = {
    "enable_sequence_parallel": "longvila_engine.integrations.hf",
    "shard_batch": "longvila_engine.integrations.hf",
    "sequence_parallel_loss": "longvila_engine.integrations.hf",
}

__all__ = list(_LAZY)


def __getattr__(name):
    # Lazy, so that importing longvila_engine.integrations does not import transformers.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'longvila_engine.integrations' has no attribute {name!r}")
