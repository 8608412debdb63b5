"""`sequence_parallel_attention`: the one entry point of MM-SP 2D attention (DESIGN.md section 5).

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
instead of leaving some of them blocked in a collective.

Deliberately not here: sharding and padding (sharding.py), the collectives (comm/), the algorithms
(ring.py, allgather.py, ulysses.py).

Legend: B batch, S_local this rank's shard length, H_local = H/tp query heads, H_kv key/value heads,
D head dim, R ring size, U Ulysses size.
"""
from __future__ import annotations

import torch.distributed as dist

from ..ops import flash_attention
from ._agree import agree, input_fields
from ._blocks import check_inputs
from .allgather import _allgather_kv_attention
from .ring import _ring_attention
from .ulysses import ulysses_attention, ulysses_sizes_for

__all__ = ["sequence_parallel_attention", "ALGORITHMS"]

ALGORITHMS = ("ring", "allgather")


def _local_error(q, k, v, groups, scheme, cu_seqlens, algorithm):
    if algorithm not in ALGORITHMS:
        return None, f"algorithm={algorithm!r} is unknown; choose one of {ALGORITHMS}"
    if dist.is_initialized() and dist.get_world_size() != groups.layout.world_size:
        return None, (f"torch.distributed has {dist.get_world_size()} ranks but the layout {groups.layout} "
                      f"needs {groups.layout.world_size}")
    bounds, err = check_inputs(q, k, v, scheme, cu_seqlens, ring_size=groups.ring_size,
                               ulysses_size=groups.ulysses_size)
    if err:
        return None, err
    U = groups.ulysses_size
    works = ulysses_sizes_for(q.shape[2], k.shape[2])
    if U > 1 and U not in works:
        return None, (f"num_heads={q.shape[2]} and num_kv_heads={k.shape[2]} on this rank cannot be split "
                      f"over Ulysses size U={U}: U must divide num_heads, and divide num_kv_heads or be a "
                      f"multiple of it; Ulysses sizes that work: {works}")
    return bounds, None


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
    """
    R, U = groups.ring_size, groups.ulysses_size
    bounds, err = _local_error(q, k, v, groups, scheme, cu_seqlens, algorithm)
    algo_code = ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else -1
    fields = input_fields(q, k, bounds, causal=causal, scheme=scheme, algorithm=algo_code, ring=R, ulysses=U)
    agree(groups, "sp", fields, err, "sequence_parallel_attention")

    if R == 1:
        def inner(q_, k_, v_):
            return flash_attention(q_, k_, v_, causal=causal, softmax_scale=softmax_scale,
                                   cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, backend=backend)
    else:
        algo = _ring_attention if algorithm == "ring" else _allgather_kv_attention

        def inner(q_, k_, v_):
            return algo(q_, k_, v_, groups, causal, softmax_scale, bounds, scheme, backend)
    if U == 1:
        return inner(q, k, v)
    return ulysses_attention(q, k, v, groups, inner=inner)
