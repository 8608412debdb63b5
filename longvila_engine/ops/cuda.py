"""`cuda` backend: the memory-bound CUDA kernels (csrc/cuda) under the same operator names as the
CPU ones; the PyTorch dispatcher routes CUDA tensors to them. Attention itself on GPU is `triton`."""
from .cpu import merge, varlen_index, zigzag_permute

__all__ = ["merge", "zigzag_permute", "varlen_index"]
