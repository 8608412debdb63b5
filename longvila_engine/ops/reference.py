"""Reference backend: plain PyTorch, any dtype, the test oracle.

It materialises the (S_q, S_k) score matrix of one block (and loops over packed sequences on the
host), so it is for checking and for tiny shapes, not for speed. Math runs in the accumulator dtype
(float64 for float64 inputs, float32 otherwise).

Legend: B batch, S sequence, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import torch

from ..parallel.zigzag import chunk_order
from ._validate import acc_dtype


def _segments(cu_q, cu_k, sq, sk):
    if cu_q is None:
        return [(0, sq, 0, sk)]
    a, b = cu_q.tolist(), cu_k.tolist()
    return [(a[i], a[i + 1], b[i], b[i + 1]) for i in range(len(a) - 1)]


def _expand_kv(x_BSKD, num_heads):
    group = num_heads // x_BSKD.shape[2]
    return x_BSKD.repeat_interleave(group, dim=2) if group > 1 else x_BSKD


def _scores(q_BSHD, k_BSHD, scale, causal):
    s_BHQK = torch.einsum("bqhd,bkhd->bhqk", q_BSHD, k_BSHD) * scale
    if causal:
        sq, sk = s_BHQK.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=s_BHQK.device).tril()  # top-left aligned
        s_BHQK = s_BHQK.masked_fill(~keep, float("-inf"))
    return s_BHQK


def _probs(s_BHQK, lse_BHQ):
    finite = torch.isfinite(lse_BHQ)
    p = torch.exp(s_BHQK - torch.where(finite, lse_BHQ, torch.zeros_like(lse_BHQ)).unsqueeze(-1))
    return torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))


def merge(out, lse, out_block, lse_block):
    """In place: (out, lse) <- logaddexp-merge with (out_block, lse_block). Empty rows stay empty."""
    new = torch.logaddexp(lse, lse_block.to(lse.dtype))
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, torch.zeros_like(new))
    w_old = torch.where(finite, torch.exp(lse - safe), torch.zeros_like(new))
    w_blk = torch.where(finite, torch.exp(lse_block.to(lse.dtype) - safe), torch.zeros_like(new))
    out.copy_(out * w_old.transpose(1, 2).unsqueeze(-1) + out_block.to(out.dtype) * w_blk.transpose(1, 2).unsqueeze(-1))
    lse.copy_(new)


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    acc = acc_dtype(q.dtype)
    block_out = torch.zeros(out.shape, dtype=acc, device=q.device)
    block_lse = torch.full(lse.shape, float("-inf"), dtype=acc, device=q.device)
    num_heads = q.shape[2]
    for q0, q1, k0, k1 in _segments(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1]):
        if q1 == q0 or k1 == k0:
            continue
        qs = q[:, q0:q1].to(acc)
        ks = _expand_kv(k[:, k0:k1].to(acc), num_heads)
        vs = _expand_kv(v[:, k0:k1].to(acc), num_heads)
        s = _scores(qs, ks, softmax_scale, causal)
        seg_lse = torch.logsumexp(s, dim=-1)
        p = _probs(s, seg_lse)
        block_out[:, q0:q1] = torch.einsum("bhqk,bkhd->bqhd", p, vs)
        block_lse[:, :, q0:q1] = seg_lse
    if resume:
        merge(out, lse, block_out, block_lse)
    else:
        out.copy_(block_out)
        lse.copy_(block_lse)


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, accumulate):
    acc = acc_dtype(q.dtype)
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    group = num_heads // num_kv_heads
    gq = torch.zeros(dq.shape, dtype=acc, device=q.device)
    gk = torch.zeros(dk.shape, dtype=acc, device=q.device)
    gv = torch.zeros(dv.shape, dtype=acc, device=q.device)
    delta_BHS = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)
    for q0, q1, k0, k1 in _segments(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1]):
        if q1 == q0 or k1 == k0:
            continue
        qs = q[:, q0:q1].to(acc)
        ks = _expand_kv(k[:, k0:k1].to(acc), num_heads)
        vs = _expand_kv(v[:, k0:k1].to(acc), num_heads)
        do = dout[:, q0:q1].to(acc)
        p = _probs(_scores(qs, ks, softmax_scale, causal), lse[:, :, q0:q1].to(acc))
        dp = torch.einsum("bqhd,bkhd->bhqk", do, vs)
        ds = p * (dp - delta_BHS[:, :, q0:q1].unsqueeze(-1))
        gq[:, q0:q1] = torch.einsum("bhqk,bkhd->bqhd", ds, ks) * softmax_scale
        dk_full = torch.einsum("bhqk,bqhd->bkhd", ds, qs) * softmax_scale
        dv_full = torch.einsum("bhqk,bqhd->bkhd", p, do)
        b, s = dk_full.shape[:2]
        gk[:, k0:k1] = dk_full.reshape(b, s, num_kv_heads, group, -1).sum(3)
        gv[:, k0:k1] = dv_full.reshape(b, s, num_kv_heads, group, -1).sum(3)
    for dst, src in ((dq, gq), (dk, gk), (dv, gv)):
        if accumulate:
            dst.add_(src)
        else:
            dst.copy_(src)


def zigzag_permute(x, ring_size, dim, inverse):
    n = 2 * ring_size
    if x.shape[dim] % n:
        raise ValueError(f"zigzag needs the length along dim {dim} ({x.shape[dim]}) divisible by 2*ring_size={n}")
    order = chunk_order(ring_size)
    chunks = x.chunk(n, dim=dim)
    if not inverse:
        return torch.cat([chunks[c] for c in order], dim=dim)
    inv = [0] * n
    for pos, c in enumerate(order):
        inv[c] = pos
    return torch.cat([chunks[inv[c]] for c in range(n)], dim=dim)


def varlen_index(cu_seqlens, total):
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(total, device=cu_seqlens.device)
    seq_id = torch.searchsorted(cu, tokens, right=True) - 1
    position = tokens - cu[seq_id]
    return seq_id.to(torch.int32), position.to(torch.int32)
