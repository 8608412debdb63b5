"""All-gather-K/V attention over `groups.ring` (Llama 3 style context parallelism).

Instead of passing K/V blocks around a ring, every ring rank all-gathers the whole sequence's K and V
once, reorders them into global order, and attends its own query chunks against them with masks
built from global positions: under a causal mask a query chunk sees every earlier chunk in full and
its own chunk causally, nothing later; packed varlen segments of any length, including segments that
span several ranks or are shorter than a chunk, are cut per block by their global bounds. Backward
recomputes the same blocks and reduce-scatters the float32 dK/dV back to the ranks that own them.

It moves the same bytes as the ring in forward ((R-1) local K/V) but holds the whole K/V at once, and
the communication does not overlap the compute; it is the simpler baseline (and it is what a small
K/V with GQA, where the gather is cheap, makes attractive).

Deliberately not here: the ring (ring.py), the Ulysses all-to-all (ulysses.py), padding (sharding.py).

Legend: B batch, S this ring rank's local length, H query heads, H_kv key/value heads, D head dim,
R ring size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..ops import acc_dtype
from ._agree import agree, input_fields
from ._blocks import (
    backward_blocks,
    check_inputs,
    chunk_ranges,
    forward_blocks,
    global_chunks,
    new_accumulators,
    plan_blocks,
    split_chunks,
)

__all__ = ["allgather_kv_attention"]

# torch >= 2.13 names them *_single; older releases *_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _zigzag_order(ring_size: int) -> list[int]:
    """Chunk held at each position of the rank-ordered sequence: [0, 2R-1, 1, 2R-2, ...]."""
    return [c for r in range(ring_size) for c in (r, 2 * ring_size - 1 - r)]


def _reorder_chunks(x, order):
    """x (n*C, ...) -> its chunks along dim 0 taken in `order` (one gather copy)."""
    return x.unflatten(0, (len(order), -1))[torch.tensor(order, device=x.device)].flatten(0, 1)


def _gather_kv(k, v, groups, scheme):
    """(B, S, H_kv, D) x 2 local -> (B, R*S, H_kv, D) x 2 in global sequence order."""
    R = groups.ring_size
    kv_local = torch.stack([k, v]).movedim(2, 0).contiguous()  # (S, 2, B, H_kv, D): gather along dim 0
    kv_all = kv_local.new_empty((R * kv_local.shape[0], *kv_local.shape[1:]))
    with groups.stats.waiting("ring"):
        _all_gather(kv_all, kv_local, group=groups.ring)
    nbytes = (R - 1) * kv_local.numel() * kv_local.element_size()
    groups.stats.record("ring", nbytes, groups.is_intra_node("ring"))
    if scheme == "zigzag":  # rank order [0, 2R-1, 1, 2R-2, ...] -> chunk order
        order = _zigzag_order(R)
        kv_all = _reorder_chunks(kv_all, sorted(range(2 * R), key=order.__getitem__))
    kv_all = kv_all.movedim(0, 2)
    return kv_all[0].contiguous(), kv_all[1].contiguous()


def _reduce_scatter_kv(dk_all, dv_all, groups, scheme):
    """Sum (B, R*S, H_kv, D) x 2 global-order grads over the ring and keep this rank's shard of each."""
    R = groups.ring_size
    d_all = torch.stack([dk_all, dv_all]).movedim(2, 0).contiguous()  # (R*S, 2, B, H_kv, D)
    if scheme == "zigzag":
        d_all = _reorder_chunks(d_all, _zigzag_order(R))  # chunk order -> rank order
    d_local = d_all.new_empty((d_all.shape[0] // R, *d_all.shape[1:]))
    with groups.stats.waiting("ring"):
        _reduce_scatter(d_local, d_all, group=groups.ring)
    nbytes = (R - 1) * d_local.numel() * d_local.element_size()
    groups.stats.record("ring", nbytes, groups.is_intra_node("ring"))
    d_local = d_local.movedim(0, 2)
    return d_local[0], d_local[1]


class _AllGatherKVAttention(torch.autograd.Function):
    """This ring rank's queries against the all-gathered K/V of the whole sequence.

    | tensor | shape | layout |
    |---|---|---|
    | q | (B, S, H, D) | ring rank r's local sequence: zigzag chunks [r, 2R-1-r], or contiguous piece r |
    | k, v | (B, S, H_kv, D) | same positions as q |
    | gathered K/V | (B, R*S, H_kv, D) | global order (saved for backward) |
    | out | (B, S, H, D) | as q |

    | forward | backward |
    |---|---|
    | all-gather of the stacked local (K, V), ring group | reduce-scatter of float32 (dK, dV), ring group |

    Both move (R-1) local K/V blocks per rank (the reduce-scatter in float32).
    """

    @staticmethod
    def forward(ctx, q, k, v, groups, q_chunks, blocks, scheme, softmax_scale, backend):
        if groups.ring_size > 1:
            k_all, v_all = _gather_kv(k, v, groups, scheme)
        else:
            k_all, v_all = k, v
        q_parts = split_chunks(q, q_chunks)
        outs, lses = new_accumulators(q_parts)
        forward_blocks(q_parts, k_all, v_all, blocks, outs, lses, softmax_scale=softmax_scale,
                       backend=backend)
        out = torch.cat(outs, dim=1).to(q.dtype)
        ctx.save_for_backward(q, k_all, v_all, out, torch.cat(lses, dim=2))
        ctx.args = (groups, q_chunks, blocks, scheme, softmax_scale, backend, k.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k_all, v_all, out, lse = ctx.saved_tensors
        groups, q_chunks, blocks, scheme, softmax_scale, backend, kv_dtype = ctx.args
        acc = acc_dtype(q.dtype)
        q_parts, out_parts, dout_parts = (split_chunks(t, q_chunks) for t in (q, out, dout))
        lse_parts = split_chunks(lse, q_chunks, dim=2)
        dqs = [torch.zeros(p.shape, dtype=acc, device=q.device) for p in q_parts]
        dk_all, dv_all = (torch.zeros(k_all.shape, dtype=acc, device=k_all.device) for _ in range(2))
        backward_blocks(dout_parts, q_parts, k_all, v_all, out_parts, lse_parts, blocks, dqs, dk_all, dv_all,
                        softmax_scale=softmax_scale, backend=backend)
        if groups.ring_size > 1:
            dk, dv = _reduce_scatter_kv(dk_all, dv_all, groups, scheme)
        else:
            dk, dv = dk_all, dv_all
        dq = torch.cat(dqs, dim=1)
        return dq.to(q.dtype), dk.to(kv_dtype), dv.to(kv_dtype), None, None, None, None, None, None


def _allgather_kv_attention(q, k, v, groups, causal, softmax_scale, bounds, scheme, backend):
    """allgather_kv_attention on inputs already checked (bounds: host list of global cu_seqlens or None)."""
    ring_size, local_len = groups.ring_size, q.shape[1]
    q_chunks = chunk_ranges(groups.ring_rank, ring_size, local_len, scheme)
    k_chunks = global_chunks(ring_size, local_len, scheme)
    blocks = plan_blocks(q_chunks, k_chunks, causal=causal, cu_seqlens=bounds, device=q.device)
    return _AllGatherKVAttention.apply(q, k, v, groups, q_chunks, blocks, scheme, softmax_scale, backend)


def allgather_kv_attention(q, k, v, groups, *, causal=True, softmax_scale=None, cu_seqlens=None,
                           scheme="zigzag", backend="auto"):
    """All-gather-K/V attention over `groups.ring`; differentiable. Same contract as `ring_attention`:

    | arg | shape | meaning |
    |---|---|---|
    | q | (B, S, H, D) | this ring rank's whole local sequence (a Ulysses rank's after the all-to-all) |
    | k, v | (B, S, H_kv, D) | same positions; H_kv divides H |
    | cu_seqlens | (N+1,) int32 | GLOBAL offsets over the padded sequence (R x S), same on every rank |

    Returns out (B, S, H, D) in q's dtype. Before the all-gather, one tiny all-gather of the input's
    description checks that the ring ranks agree; otherwise every rank raises ValueError.
    """
    bounds, err = check_inputs(q, k, v, scheme, cu_seqlens, ring_size=groups.ring_size)
    fields = input_fields(q, k, bounds, causal=causal, scheme=scheme)
    agree(groups, "ring", fields, err, "allgather_kv_attention")
    return _allgather_kv_attention(q, k, v, groups, causal, softmax_scale, bounds, scheme, backend)
