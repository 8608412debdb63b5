"""Sequence-parallel inference: prefill keeps each rank's KV cache in place, decoding merges the ranks'
partial attention by log-sum-exp (docs/design.md section 8). `generate` is the greedy entry point."""
from .generate import GenerationOutput, generate
from .kv_cache import KVCache

__all__ = ["generate", "GenerationOutput", "KVCache"]
