"""Fake (meta) implementations of the five `longvila_engine::*` operators (csrc/ops.cpp).

They let `torch.compile` and FakeTensor tracing see output shapes and dtypes without running a kernel:
the in-place operators (attn_fwd, attn_bwd, merge_attn) return nothing and touch nothing; zigzag_permute
returns a tensor like its input; varlen_index returns two int32 vectors of `total` elements. They check
nothing either: arguments were validated by `longvila_engine.ops` and the kernels `TORCH_CHECK` again.
Imported once by `longvila_engine._extension` right after the compiled extension loads, because the
operator schemas must exist before a fake can be registered for them.
"""
from __future__ import annotations

import torch


@torch.library.register_fake("longvila_engine::attn_fwd")
def _attn_fwd_fake(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    return None


@torch.library.register_fake("longvila_engine::attn_bwd")
def _attn_bwd_fake(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                   accumulate):
    return None


@torch.library.register_fake("longvila_engine::merge_attn")
def _merge_attn_fake(out, lse, out_block, lse_block):
    return None


@torch.library.register_fake("longvila_engine::zigzag_permute")
def _zigzag_permute_fake(x, ring_size, dim, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("longvila_engine::varlen_index")
def _varlen_index_fake(cu_seqlens, total):
    seq_id = cu_seqlens.new_empty((total,), dtype=torch.int32)
    position = cu_seqlens.new_empty((total,), dtype=torch.int32)
    return seq_id, position
