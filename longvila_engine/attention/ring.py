"""Ring attention over `groups.ring`, zigzag load-balanced, with packed varlen (docs/design.md sections 4, 5).

Every ring rank holds the queries of its local sequence and, at step s, the K/V block that started on
ring rank r-s. While that block is computed (block_attention resuming into float32 accumulators), the
next one is already in flight to the next rank; after R steps every query has met every key. Which
(query chunk, key chunk) pairs each step computes, and each pair's varlen cu_seqlens, is decided once
per batch in the `BatchPlan` (plan.py), so the loop has no host synchronisation and no barrier.

With the zigzag layout (ring rank r holds chunks r and 2R-1-r of 2R) and a causal mask, step 0 computes
the rank's own causal diagonal and every later step exactly half of a full block, so every ring rank
does the same causal work; the contiguous layout (`scheme="contiguous"`) is kept for comparison, and
its last rank does about 2R-1 times the causal work of its first.

Deliberately not here: the Ulysses all-to-all (ulysses.py wraps this as its inner attention), the
all-gather variant (allgather.py), padding and sharding (sharding.py).

Legend: B batch, S this ring rank's local length, H query heads, H_kv key/value heads, D head dim,
R ring size, r ring rank.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..comm.ring import RingExchange
from ..ops import acc_dtype
from ..parallel.zigzag import check_scheme
from ._blocks import (
    backward_blocks,
    backward_parts,
    finish_forward,
    forward_blocks,
    new_accumulators,
    split_chunks,
)
from .plan import check_qkv_local, plan_batch, qkv_fields, ring_steps

__all__ = ["ring_attention", "ring_plan"]

# P2P tag ranges of the two concurrent streams (disjoint, so gloo never pairs a K/V send with a
# dK/dV receive).
_KV_TAG, _DKV_TAG = 0, 16


def ring_plan(ring_rank: int, ring_size: int, local_len: int, *, causal: bool, scheme: str = "zigzag",
              cu_seqlens=None, device=None) -> list[list]:
    """Per ring step, the kernel calls ring rank `ring_rank` makes (`plan.ring_steps`, checked).

    `cu_seqlens`: global offsets (host list or CPU tensor) or None.
    """
    check_scheme(scheme)
    if scheme == "zigzag" and local_len % 2:
        raise ValueError(f"zigzag needs an even local length (two chunks), got {local_len}; pad the sequence "
                         f"to a multiple of 2 x ring size x Ulysses size (shard_sequence does)")
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
    return ring_steps(ring_rank, ring_size, local_len, causal=causal, scheme=scheme, cu_bounds=bounds,
                      device=device)


class _RingAttention(torch.autograd.Function):
    """Ring attention of this ring rank's queries against the whole (ring-sharded) sequence.

    | tensor | shape | layout |
    |---|---|---|
    | q | (B, S, H, D) | ring rank r's local sequence: zigzag chunks [r, 2R-1-r], or contiguous piece r |
    | k, v | (B, S, H_kv, D) | same positions as q |
    | out | (B, S, H, D) | as q; lse (B, H, S) float32 is saved for backward |

    Collectives, all point-to-point on the ring group (send to r+1, receive from r-1):

    | forward | backward |
    |---|---|
    | R-1 K/V shifts, each overlapped with one step's blocks | R-1 K/V shifts again (blocks are recomputed) |
    | -- | R dK/dV shifts: the float32 accumulators travel with their K/V; the R-th lands home |

    Gradients come back in the inputs' dtype, dK/dV at H_kv heads; dq accumulates locally in float32.
    `q_chunks` are the global (start, length) of q's chunks, `plan` the per-step blocks (`ring_plan`).
    """

    @staticmethod
    def forward(ctx, q, k, v, groups, q_chunks, plan, softmax_scale, backend):
        q_parts = split_chunks(q, q_chunks)
        outs, lses = new_accumulators(q_parts)
        exchange = RingExchange(groups, tag=_KV_TAG, double_buffer=True)
        k_cur, v_cur = k, v
        last = len(plan) - 1
        for step, blocks in enumerate(plan):
            if step < last:
                exchange.start([k_cur, v_cur])  # next block in flight ...
            forward_blocks(q_parts, k_cur, v_cur, blocks, outs, lses, softmax_scale=softmax_scale,
                           backend=backend)  # ... while this one is computed
            if step < last:
                k_cur, v_cur = exchange.wait()
        ctx.args = (groups, q_chunks, plan, softmax_scale, backend)
        return finish_forward(ctx, q, k, v, outs, lses)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        groups, q_chunks, plan, softmax_scale, backend = ctx.args
        acc = acc_dtype(q.dtype)
        q_parts, out_parts, dout_parts, lse_parts, dqs = backward_parts(q, out, dout, lse, q_chunks)
        # Receive buffers: two sets per stream for the whole call, not one per step (comm/ring.py).
        kv_exchange = RingExchange(groups, tag=_KV_TAG, double_buffer=True)
        dkv_exchange = RingExchange(groups, tag=_DKV_TAG, double_buffer=True)
        k_cur, v_cur = k, v
        # Step 0 computes into a fresh accumulator pair, which is sent on; later steps compute into one
        # reused pair, zeroed per step, and add it into the accumulator received from r-1.
        dk_step, dv_step = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))
        last = len(plan) - 1
        for step, blocks in enumerate(plan):
            if step < last:
                kv_exchange.start([k_cur, v_cur])
            if step == 1:  # step 0's pair is in flight
                dk_step, dv_step = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))
            elif step > 1:
                dk_step.zero_()
                dv_step.zero_()
            backward_blocks(dout_parts, q_parts, k_cur, v_cur, out_parts, lse_parts, blocks, dqs, dk_step,
                            dv_step, softmax_scale=softmax_scale, backend=backend)
            if step > 0:  # the accumulator of the K/V block held now, sent by r-1 one step ago
                dk_acc, dv_acc = dkv_exchange.wait()
                dk_acc.add_(dk_step)
                dv_acc.add_(dv_step)
            else:
                dk_acc, dv_acc = dk_step, dv_step
            if last > 0:
                dkv_exchange.start([dk_acc, dv_acc])  # travels with its K/V; after step R-1 it lands home
            if step < last:
                k_cur, v_cur = kv_exchange.wait()
        dk, dv = dkv_exchange.wait() if last > 0 else (dk_acc, dv_acc)
        dq = torch.cat(dqs, dim=1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_attention_with_plan(q, k, v, plan, causal, softmax_scale, backend):
    """Ring attention of a ring rank's sequence (B, ring_local_len, H, D) with the plan's block plans."""
    return _RingAttention.apply(q, k, v, plan.groups, plan.q_chunks, plan.blocks("ring", causal), softmax_scale,
                                backend)


def ring_attention(q, k, v, groups, *, causal=True, softmax_scale=None, cu_seqlens=None, scheme="zigzag",
                   backend="auto"):
    """Ring attention over `groups.ring`; differentiable.

    | arg | shape | meaning |
    |---|---|---|
    | q | (B, S, H, D) | this ring rank's whole local sequence (a Ulysses rank's after the all-to-all) |
    | k, v | (B, S, H_kv, D) | same positions; H_kv divides H |
    | cu_seqlens | (N+1,) int32 | GLOBAL offsets over the padded sequence (R x S), same on every rank |

    Returns out (B, S, H, D) in q's dtype. Packed varlen (cu_seqlens given) needs B = 1. `scheme`:
    "zigzag" (ring rank r holds chunks r and 2R-1-r of 2R) or "contiguous" (piece r of R). Before any
    exchange, one tiny all-gather over the ring checks that every ring rank passed the same shapes,
    dtype, flags and cu_seqlens (a plan made on the fly); otherwise every rank raises ValueError.
    """
    err = check_qkv_local(q, k, v)
    ok = err is None
    plan = plan_batch(groups, batch=q.shape[0] if ok else 0, local_len=q.shape[1] if ok else 0, scheme=scheme,
                      cu_seqlens=cu_seqlens, device=q.device if ok else None, axis="ring", local_error=err,
                      extra_fields=qkv_fields(q, k, causal) if ok else qkv_fields(None, None, causal),
                      what="ring_attention")
    return ring_attention_with_plan(q, k, v, plan, causal, softmax_scale, backend)

