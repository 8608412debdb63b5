"""`flash_attention`: the differentiable single-device op built on the block kernels.

Forward keeps only (out, lse), never the score matrix; backward recomputes scores block-wise through
`block_attention_backward`. Gradients come back in the inputs' dtype.
"""
from __future__ import annotations

import torch

from . import block_attention, block_attention_backward


class _FlashAttention(torch.autograd.Function):
    """q (B,S_q,H,D), k/v (B,S_k,H_kv,D) -> out (B,S_q,H,D); saves q, k, v, out, lse (B,H,S_q)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, backend):
        out, lse = block_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, backend=backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, cu_q, cu_k, backend = ctx.args
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale,
                                              cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def flash_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    backend="auto"):
    """Memory-efficient attention with autograd: (B,S_q,H,D) x (B,S_k,H_kv,D) -> (B,S_q,H,D)."""
    return _FlashAttention.apply(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, backend)
