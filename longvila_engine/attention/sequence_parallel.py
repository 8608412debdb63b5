"""`sequence_parallel_attention`: the one entry point of MM-SP 2D attention (docs/design.md section 5).

Inputs are this rank's sequence shard (as `shard_sequence` cuts it) with this tensor-parallel rank's
heads. The layout decides the algorithm:

| ring | ulysses | what runs |
|---|---|---|
| 1 | 1 | single-device `flash_attention` |
| 1 | U | Ulysses all-to-all around `flash_attention` on the whole sequence |
| R | 1 | ring (or all-gather-K/V) attention over `groups.ring` on the shard |
| R | U | Ulysses all-to-all (in the node), ring over `groups.ring` (across nodes), inverse all-to-all |

Before any large collective, one tiny all-gather over the sp group checks that every rank passed the
same shapes, dtype, flags and global cu_seqlens, so a bad input raises ValueError on every rank
instead of leaving some of them blocked in a collective. That agreement belongs to the batch, not to
the layer: `plan.plan_batch` makes it once per step and `attention_with_plan` runs every layer on the
plan; `sequence_parallel_attention` is the checked one-call form that plans on the fly.

Deliberately not here: sharding and padding (sharding.py), the collectives (comm/), the algorithms
(ring.py, allgather.py, ulysses.py).

Legend: B batch, S_local this rank's shard length, H_local = H/tp query heads, H_kv key/value heads,
D head dim, R ring size, U Ulysses size.
"""
from __future__ import annotations

import torch.distributed as dist

from ..ops.flash import flash_attention
from ..parallel.groups import as_groups
from .allgather import allgather_kv_attention_with_plan
from .plan import ALGORITHMS, BatchPlan, check_qkv_local, plan_batch, qkv_fields
from .ring import ring_attention_with_plan
from .ulysses import ulysses_attention, ulysses_sizes_for

__all__ = ["sequence_parallel_attention", "attention_with_plan", "ALGORITHMS"]


def _local_error(q, k, v, groups, algorithm):
    if algorithm not in ALGORITHMS:
        return f"algorithm={algorithm!r} is unknown; choose one of {ALGORITHMS}"
    if groups.world_size > 1 and dist.is_initialized() and dist.get_world_size() != groups.layout.world_size:
        return (f"torch.distributed has {dist.get_world_size()} ranks but the layout {groups.layout} "
                f"needs {groups.layout.world_size}")
    err = check_qkv_local(q, k, v)
    if err:
        return err
    return _heads_error(q, k, groups.ulysses_size)


def _heads_error(q, k, U):
    works = ulysses_sizes_for(q.shape[2], k.shape[2])
    if U > 1 and U not in works:
        return (f"num_heads={q.shape[2]} and num_kv_heads={k.shape[2]} on this rank cannot be split "
                f"over Ulysses size U={U}: U must divide num_heads, and divide num_kv_heads or be a "
                f"multiple of it; Ulysses sizes that work: {works}")
    return None


def attention_with_plan(q, k, v, plan: BatchPlan, *, causal=True, softmax_scale=None, backend="auto",
                        algorithm="ring"):
    """`sequence_parallel_attention` of one layer with the batch's plan: no agreement, no host sync.

    Shapes as `sequence_parallel_attention`; the only checks are local ones against the plan (they
    depend on the agreed batch and the model's head counts, so every rank raises alike).
    """
    if not isinstance(plan, BatchPlan):
        raise ValueError(f"plan must be the BatchPlan of this batch (plan_batch / local_batch), got "
                         f"{type(plan).__name__}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is unknown; choose one of {ALGORITHMS}")
    plan.check(q, k, v)
    err = _heads_error(q, k, plan.ulysses_size)
    if err:
        raise ValueError(err)
    if plan.ring_size == 1:
        cu = plan.cu_seqlens

        def inner(q_, k_, v_):
            return flash_attention(q_, k_, v_, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu,
                                   cu_seqlens_k=cu, backend=backend)
    else:
        algo = ring_attention_with_plan if algorithm == "ring" else allgather_kv_attention_with_plan

        def inner(q_, k_, v_):
            return algo(q_, k_, v_, plan, causal, softmax_scale, backend)
    if plan.ulysses_size == 1:
        return inner(q, k, v)
    return ulysses_attention(q, k, v, plan.groups, inner=inner)


def sequence_parallel_attention(q, k, v, groups, *, causal=True, softmax_scale=None, cu_seqlens=None,
                                backend="auto", scheme="zigzag", algorithm="ring"):
    """Attention of sequence shards over the sp group (ring x ulysses); differentiable.

    | arg | shape | meaning |
    |---|---|---|
    | q | (B, S_local, H_local, D) | this rank's shard (`shard_sequence(x, groups, scheme=scheme)`) |
    | k, v | (B, S_local, H_kv, D) | same positions; H_kv divides H_local |
    | cu_seqlens | (N+1,) int32 | packed varlen (B=1): GLOBAL offsets over the padded sequence |
    | out | (B, S_local, H_local, D) | q's dtype, same positions as q |

    `scheme`: "zigzag" (balanced causal work) or "contiguous"; it must be the one the shards were cut
    with. `algorithm`: "ring" (K/V passed around the ring, overlapped with compute) or "allgather"
    (Llama 3 style: K/V all-gathered over the ring, dK/dV reduce-scattered). Padding added by
    `shard_sequence` is masked by giving it its own segment (`pad_cu_seqlens`); under a causal mask
    without cu_seqlens, trailing pads are never seen by real tokens anyway.

    This checked entry point plans the batch on the fly (one agreement all-gather over sp, covering
    q/k shapes, dtype and flags too); models plan once per step and call `attention_with_plan`.
    """
    groups = as_groups(groups)
    err = _local_error(q, k, v, groups, algorithm)
    ok = err is None or check_qkv_local(q, k, v) is None
    fields = qkv_fields(q, k, causal) if ok else qkv_fields(None, None, causal)
    fields["algorithm"] = ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else -1
    plan = plan_batch(groups, batch=q.shape[0] if ok else 0, local_len=q.shape[1] if ok else 0, scheme=scheme,
                      cu_seqlens=cu_seqlens, device=q.device if ok else None, local_error=err,
                      extra_fields=fields, what="sequence_parallel_attention")
    return attention_with_plan(q, k, v, plan, causal=causal, softmax_scale=softmax_scale, backend=backend,
                               algorithm=algorithm)
