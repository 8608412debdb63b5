"""Sequence-parallel attention: sharding, ring (zigzag), Ulysses, 2D and all-gather-KV, with autograd.

Submodules are imported on use; `longvila_engine.sequence_parallel_attention` is the entry point.
"""
