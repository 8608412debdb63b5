"""`cpu` backend: thin calls into the C++/OpenMP operators (csrc/cpu) registered as
torch.ops.longvila_engine.*. Arguments were validated by longvila_engine.ops."""
from __future__ import annotations

import torch


def _ops():
    from .._extension import require_extension

    require_extension()
    return torch.ops.longvila_engine


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    _ops().attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), out, lse, cu_seqlens_q, cu_seqlens_k,
                    softmax_scale, causal, resume)


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, accumulate):
    _ops().attn_bwd(dout, q.contiguous(), k.contiguous(), v.contiguous(), out, lse, dq, dk, dv, cu_seqlens_q,
                    cu_seqlens_k, softmax_scale, causal, accumulate)


def merge(out, lse, out_block, lse_block):
    _ops().merge_attn(out, lse, out_block, lse_block)


def zigzag_permute(x, ring_size, dim, inverse):
    return _ops().zigzag_permute(x, ring_size, dim, inverse)


def varlen_index(cu_seqlens, total):
    return _ops().varlen_index(cu_seqlens, total)
