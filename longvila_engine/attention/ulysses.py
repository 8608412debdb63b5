"""Ulysses (all-to-all) sequence-parallel attention over `groups.ulysses` (docs/design.md section 5).

Each Ulysses rank starts with its sequence shard and all of its H_local query heads. One all-to-all
gives every rank the Ulysses group's whole sequence (the U shards in Ulysses-rank order, i.e. the
ring rank's local sequence) for H_local/U heads; an `inner` attention runs on that; the inverse
all-to-all brings the output back to the sequence shard. `inner` is where the ring over
`groups.ring` plugs in (or single-device `flash_attention` when ring=1).

Heads are split contiguously: Ulysses rank u gets query heads [u*H/U, (u+1)*H/U). Under GQA with
g = H/H_kv query heads per K/V head (query head h reads K/V head h // g), those heads need K/V heads
[u*H_kv/U, (u+1)*H_kv/U), so:
- H_kv % U == 0: K/V travel at their own head count, H_kv/U heads to each rank;
- U % H_kv == 0 (U > H_kv): each rank needs exactly one K/V head, u // (U/H_kv); every K/V head is
  replicated U/H_kv times before the all-to-all (the least that gives each rank its head), and in
  backward the replicas' gradients are summed (`_ReplicateHeads`);
- anything else is a ValueError naming the head counts and the U values that would work.
K and V share one all-to-all (stacked along the batch), so a step costs three all-to-alls forward
(q, k+v, out) and three backward.

Not here: the ring, the sharding of the sequence (`sharding.py`), the collectives (`comm/all_to_all.py`).

Legend: B batch, S_local shard length, H/H_kv query/key-value heads on this rank, D head dim, U Ulysses size.
"""
from __future__ import annotations

import torch

from ..comm.all_to_all import head_to_seq_all_to_all, seq_to_head_all_to_all

__all__ = ["ulysses_attention", "ulysses_sizes_for"]


class _ReplicateHeads(torch.autograd.Function):
    """Repeat every head `replicas` times in place: (B, S, H_kv, D) -> (B, S, H_kv*replicas, D).

    | | forward | backward |
    |---|---|---|
    | op (local, no comm) | head j -> heads j*r .. j*r+r-1 (r = replicas) | sum of the r grads -> head j |

    The replicas of K/V head j land on the `replicas` Ulysses ranks whose query heads read head j;
    each computes its partial dK/dV from its own query heads only, the inverse all-to-all brings the
    partials home, and this sum adds them: the same terms as single-device attention, which sums over
    all g query heads of the group. Exact up to the order of additions.
    """

    @staticmethod
    def forward(ctx, x, replicas):
        B, S, H_kv, D = x.shape
        ctx.replicas = replicas
        return x.unsqueeze(3).expand(B, S, H_kv, replicas, D).reshape(B, S, H_kv * replicas, D)

    @staticmethod
    def backward(ctx, grad):
        B, S, H, D = grad.shape
        return grad.reshape(B, S, H // ctx.replicas, ctx.replicas, D).sum(3), None


def ulysses_sizes_for(num_heads: int, num_kv_heads: int) -> list[int]:
    """Ulysses sizes U that these head counts allow: U divides num_heads, and U divides num_kv_heads
    or is a multiple of it (K/V heads then replicated)."""
    return [u for u in range(1, num_heads + 1)
            if num_heads % u == 0 and (num_kv_heads % u == 0 or u % num_kv_heads == 0)]


def _kv_replicas(num_heads: int, num_kv_heads: int, U: int) -> int:
    """How many copies of each K/V head the all-to-all needs (1: none); ValueError if U cannot work."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} (q.shape[2]) must be a multiple of num_kv_heads="
                         f"{num_kv_heads} (k.shape[2]) for GQA/MQA")
    works = ulysses_sizes_for(num_heads, num_kv_heads)
    if num_heads % U:
        raise ValueError(f"num_heads={num_heads} (q.shape[2]) is not divisible by the Ulysses size U={U}; "
                         f"with num_kv_heads={num_kv_heads}, U values that work: {works}")
    if num_kv_heads % U == 0:
        return 1
    if U % num_kv_heads == 0:
        return U // num_kv_heads
    raise ValueError(f"num_kv_heads={num_kv_heads} (k.shape[2]) neither divides nor is divided by the "
                     f"Ulysses size U={U}, so K/V heads cannot be split or replicated evenly; with num_heads="
                     f"{num_heads}, U values that work: {works}")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups, *, inner) -> torch.Tensor:
    """Attention of sequence shards through the Ulysses all-to-all; differentiable.

    | tensor | this rank (in and out) | inside `inner` |
    |---|---|---|
    | q, out | (B, S_local, H, D): shard u, all heads | (B, U*S_local, H/U, D): heads [u*H/U, (u+1)*H/U) |
    | k, v | (B, S_local, H_kv, D) | (B, U*S_local, max(H_kv/U, 1), D) |

    Inside `inner` the sequence is the whole one of the Ulysses group (U shards in Ulysses-rank order).

    `inner(q_full, k_full, v_full) -> out_full` (same shape as q_full) is the attention over the
    gathered sequence: ring attention over `groups.ring`, or `flash_attention` when ring=1. Causality,
    scale and packed `cu_seqlens` are the inner function's business: it sees the sequence in the order
    of the U shards (for the zigzag layout: chunk r then chunk 2R-1-r, see `sharding.ring_positions`).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, S_local, H, D), got {got}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, sequence shard "
                         f"length and head_dim")
    if not callable(inner):
        raise ValueError(f"inner must be a callable inner(q, k, v) -> out, got {type(inner).__name__}")
    U = groups.ulysses_size
    replicas = _kv_replicas(q.shape[2], k.shape[2], U)
    if U == 1:
        return inner(q, k, v)
    B = q.shape[0]
    q_full = seq_to_head_all_to_all(q, groups)
    kv = torch.stack((k, v)).flatten(0, 1)  # (2B, S_local, H_kv, D): one all-to-all for both
    if replicas > 1:
        kv = _ReplicateHeads.apply(kv, replicas)
    k_full, v_full = seq_to_head_all_to_all(kv, groups).unflatten(0, (2, B)).unbind(0)
    out_full = inner(q_full, k_full, v_full)
    if not isinstance(out_full, torch.Tensor) or out_full.shape != q_full.shape:
        raise ValueError(f"inner must return a tensor shaped like its q {tuple(q_full.shape)}, got "
                         f"{getattr(out_full, 'shape', type(out_full))}")
    return head_to_seq_all_to_all(out_full, groups)
