"""FLOP accounting for attention blocks: one function every benchmark and cost model uses.

Counts multiply-adds as 2 FLOPs over the (query, key) pairs a mask leaves visible. Forward is
QK^T and PV: 4*D per pair and head. Backward (flash style, recomputing QK^T) is 2.5x forward; the
`model` convention (3x forward total) is what MFU figures use (docs/design.md section 13).
"""
from __future__ import annotations


def visible_pairs(seq_len_q: int, seq_len_k: int, causal: bool) -> int:
    """Number of (i, j) pairs attended: top-left aligned causal sees j <= i."""
    if not causal:
        return seq_len_q * seq_len_k
    full = min(seq_len_q, seq_len_k)
    pairs = full * (full + 1) // 2
    if seq_len_q > seq_len_k:
        pairs += (seq_len_q - seq_len_k) * seq_len_k
    return pairs


def attention_flops(seq_len_q, seq_len_k, num_heads, head_dim, *, causal, batch=1, cu_seqlens_q=None,
                    cu_seqlens_k=None, mode="fwd") -> int:
    """FLOPs of one block. mode: 'fwd' (4*D per pair), 'bwd' (10*D, recompute included),
    'fwd_bwd' (14*D)."""
    factor = {"fwd": 4, "bwd": 10, "fwd_bwd": 14}[mode]
    if cu_seqlens_q is not None:
        a = [int(x) for x in cu_seqlens_q]
        b = [int(x) for x in cu_seqlens_k]
        pairs = sum(visible_pairs(a[i + 1] - a[i], b[i + 1] - b[i], causal) for i in range(len(a) - 1))
    else:
        pairs = batch * visible_pairs(seq_len_q, seq_len_k, causal)
    return factor * head_dim * num_heads * pairs
