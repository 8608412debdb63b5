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
from torch.autograd.function import once_differentiable

from ..comm.counted import all_gather_into, reduce_scatter_into
from ..ops import acc_dtype
from ._blocks import (
    backward_blocks,
    backward_parts,
    finish_forward,
    forward_blocks,
    new_accumulators,
    split_chunks,
)
from .plan import check_qkv_local, plan_batch, qkv_fields

__all__ = ["allgather_kv_attention"]


def _reorder_chunks(x, index):
    """x (n*C, ...) -> its n chunks along dim 0 taken in the order of the device LongTensor `index`."""
    return x.unflatten(0, (index.numel(), -1))[index].flatten(0, 1)


def _gather_kv(k, v, plan):
    """(B, S, H_kv, D) x 2 local -> (B, R*S, H_kv, D) x 2 in global sequence order."""
    R = plan.ring_size
    kv_local = torch.stack([k, v]).movedim(2, 0).contiguous()  # (S, 2, B, H_kv, D): gather along dim 0
    kv_all = kv_local.new_empty((R * kv_local.shape[0], *kv_local.shape[1:]))
    all_gather_into(kv_all, kv_local, plan.groups, "ring")
    if plan.to_chunk_order is not None:  # zigzag: rank order [0, 2R-1, 1, 2R-2, ...] -> chunk order
        kv_all = _reorder_chunks(kv_all, plan.to_chunk_order)
    kv_all = kv_all.movedim(0, 2)
    return kv_all[0].contiguous(), kv_all[1].contiguous()


def _reduce_scatter_kv(dk_all, dv_all, plan):
    """Sum (B, R*S, H_kv, D) x 2 global-order grads over the ring and keep this rank's shard of each."""
    d_all = torch.stack([dk_all, dv_all]).movedim(2, 0).contiguous()  # (R*S, 2, B, H_kv, D)
    if plan.to_rank_order is not None:
        d_all = _reorder_chunks(d_all, plan.to_rank_order).contiguous()  # chunk order -> rank order
    d_local = d_all.new_empty((d_all.shape[0] // plan.ring_size, *d_all.shape[1:]))
    reduce_scatter_into(d_local, d_all, plan.groups, "ring")
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
    def forward(ctx, q, k, v, plan, blocks, softmax_scale, backend):
        if plan.ring_size > 1:
            k_all, v_all = _gather_kv(k, v, plan)
        else:
            k_all, v_all = k, v
        q_parts = split_chunks(q, plan.q_chunks)
        outs, lses = new_accumulators(q_parts)
        forward_blocks(q_parts, k_all, v_all, blocks, outs, lses, softmax_scale=softmax_scale,
                       backend=backend)
        ctx.args = (plan, blocks, softmax_scale, backend, k.dtype)
        return finish_forward(ctx, q, k_all, v_all, outs, lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k_all, v_all, out, lse = ctx.saved_tensors
        plan, blocks, softmax_scale, backend, kv_dtype = ctx.args
        acc = acc_dtype(q.dtype)
        q_parts, out_parts, dout_parts, lse_parts, dqs = backward_parts(q, out, dout, lse, plan.q_chunks)
        dk_all, dv_all = (torch.zeros(k_all.shape, dtype=acc, device=k_all.device) for _ in range(2))
        backward_blocks(dout_parts, q_parts, k_all, v_all, out_parts, lse_parts, blocks, dqs, dk_all, dv_all,
                        softmax_scale=softmax_scale, backend=backend)
        if plan.ring_size > 1:
            dk, dv = _reduce_scatter_kv(dk_all, dv_all, plan)
        else:
            dk, dv = dk_all, dv_all
        dq = torch.cat(dqs, dim=1)
        return dq.to(q.dtype), dk.to(kv_dtype), dv.to(kv_dtype), None, None, None, None


def allgather_kv_attention_with_plan(q, k, v, plan, causal, softmax_scale, backend):
    """All-gather-K/V attention of a ring rank's sequence with the plan's block list."""
    return _AllGatherKVAttention.apply(q, k, v, plan, plan.blocks("allgather", causal), softmax_scale, backend)


def allgather_kv_attention(q, k, v, groups, *, causal=True, softmax_scale=None, cu_seqlens=None,
                           scheme="zigzag", backend="auto"):
    """All-gather-K/V attention over `groups.ring`; differentiable. Same contract as `ring_attention`:

    | arg | shape | meaning |
    |---|---|---|
    | q | (B, S, H, D) | this ring rank's whole local sequence (a Ulysses rank's after the all-to-all) |
    | k, v | (B, S, H_kv, D) | same positions; H_kv divides H |
    | cu_seqlens | (N+1,) int32 | GLOBAL offsets over the padded sequence (R x S), same on every rank |

    Returns out (B, S, H, D) in q's dtype. Before the all-gather, one tiny all-gather of the input's
    description (a plan made on the fly) checks that the ring ranks agree; otherwise every rank raises
    ValueError.
    """
    err = check_qkv_local(q, k, v)
    ok = err is None
    plan = plan_batch(groups, batch=q.shape[0] if ok else 0, local_len=q.shape[1] if ok else 0, scheme=scheme,
                      cu_seqlens=cu_seqlens, device=q.device if ok else None, axis="ring", local_error=err,
                      extra_fields=qkv_fields(q, k, causal) if ok else qkv_fields(None, None, causal),
                      what="allgather_kv_attention")
    return allgather_kv_attention_with_plan(q, k, v, plan, causal, softmax_scale, backend)
