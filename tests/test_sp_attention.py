"""`sequence_parallel_attention` over composite layouts on real gloo ranks, against reference attention.

Layouts on a 4-rank pool: Ulysses-only (U=4; U=2 x dp=2), ring-only (R=4), 2D (ring=2 x ulysses=2),
with the ring and the all-gather-K/V algorithm; and one 8-rank 2D case (ring=4 x ulysses=2) in its own
small pool. Shards are cut at `sharding.shard_positions`, so the test also pins that the attention's
idea of the layout is the sharding module's. Bad input raises ValueError on every rank.
"""
from functools import partial

import pytest
import torch
import torch.distributed as dist
from dist_pool import groups_for
from test_ring_attention import check_results, run_case

from longvila_engine import ParallelLayout
from longvila_engine.ops import available_backends

f64, f32 = torch.float64, torch.float32
NAMES = ("B", "S", "H", "H_kv", "D", "causal", "segs", "dtype", "scheme")


def cases_for(rows):
    cases = [dict(zip(NAMES, row), seed=100 + i) for i, row in enumerate(rows)]
    cases[0]["scale"] = 0.25  # an explicit softmax_scale
    return cases


# H=8 so that U=4 splits heads; H_kv 8 (MHA), 4 (split), 2 and 1 (replicated when U > H_kv).
ROWS_U4 = [(2, 32, 8, 8, 8, True, None, f64, "zigzag"), (1, 37, 8, 2, 8, True, [5, 1, 20, 11], f64, "zigzag"),
           (1, 29, 8, 1, 8, False, [29], f64, "zigzag"), (2, 30, 8, 4, 16, True, None, f32, "zigzag"),
           (1, 35, 8, 2, 8, False, [5, 1, 20, 9], f64, "contiguous")]
ROWS_2D = [(2, 32, 4, 4, 8, True, None, f64, "zigzag"), (1, 35, 4, 2, 8, True, [5, 1, 20, 9], f64, "zigzag"),
           (1, 27, 4, 1, 8, False, [27], f64, "zigzag"), (1, 44, 4, 2, 8, False, [9, 30, 5], f32, "zigzag"),
           (2, 29, 4, 2, 8, True, None, f64, "contiguous"),
           (1, 35, 4, 1, 8, True, [5, 1, 20, 9], f64, "contiguous")]


def _call(q, k, v, cu, *, groups, **kwargs):
    from longvila_engine.attention.sequence_parallel import sequence_parallel_attention

    return sequence_parallel_attention(q, k, v, groups, cu_seqlens=cu, **kwargs)


def _sp_cases(layout, algorithm, cases, backend="reference"):
    from longvila_engine.attention.sharding import padded_length, shard_positions

    groups = groups_for(layout)
    results = []
    for case in cases:
        scheme = case["scheme"]
        fn = partial(_call, groups=groups, causal=case["causal"], scheme=scheme, algorithm=algorithm,
                     backend=backend, softmax_scale=case.get("scale"))
        multiple = padded_length(1, groups, scheme)
        pos_fn = partial(lambda S_pad, scheme: shard_positions(S_pad, groups, scheme).tolist(), scheme=scheme)
        results.append(run_case(fn, groups, case, multiple, pos_fn))
    return results


def ring_kv_scale(ulysses_size):
    """Ring-local K/V numel over this rank's K/V shard numel: U x the sequence, H_kv/U heads or one."""
    return lambda case: ulysses_size * max(case["H_kv"] // ulysses_size, 1) // case["H_kv"]


LAYOUTS = {
    "ulysses4": (ParallelLayout(ulysses=4), ROWS_U4),
    "ulysses2_dp2": (ParallelLayout(ulysses=2, dp=2), ROWS_2D),
    "ring4": (ParallelLayout(ring=4), ROWS_2D),
    "ring2_ulysses2": (ParallelLayout(ring=2, ulysses=2), ROWS_2D),
}


# With ring=1 both algorithms are single-device flash_attention inside the Ulysses all-to-all, so
# the all-gather variant is run only on layouts with a ring.
@pytest.mark.parametrize(
    "name, algorithm",
    [(name, "ring") for name in LAYOUTS]
    + [(name, "allgather") for name, (layout, _) in LAYOUTS.items() if layout.ring > 1],
)
def test_layouts_match_reference(pool, name, algorithm):
    layout, rows = LAYOUTS[name]
    cases = cases_for(rows)
    results = pool.run(_sp_cases, layout, algorithm, cases)
    check_results(cases, results, algorithm, layout.ring, kv_scale=ring_kv_scale(layout.ulysses))


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="C++ cpu backend not built")
def test_cpu_backend_2d(pool):
    cases = cases_for([ROWS_2D[1], ROWS_2D[3]])
    results = pool.run(_sp_cases, ParallelLayout(ring=2, ulysses=2), "ring", cases, "cpu")
    check_results(cases, results, "ring", 2, kv_scale=ring_kv_scale(2))


def test_ring4_ulysses2_on_8_ranks(dist_pools):
    pool8 = dist_pools.get(8)
    try:
        layout = ParallelLayout(ring=4, ulysses=2)
        cases = cases_for([ROWS_2D[0], ROWS_2D[1], ROWS_2D[2]])
        for algorithm in ("ring", "allgather"):
            results = pool8.run(_sp_cases, layout, algorithm, cases)
            check_results(cases, results, algorithm, 4, kv_scale=ring_kv_scale(2))
    finally:
        pool8.close()  # 8 idle ranks would hold memory for the rest of the session


def _sp_bad_input(kind):
    from longvila_engine.attention.sequence_parallel import sequence_parallel_attention

    groups = groups_for(ParallelLayout(ring=2, ulysses=2))
    rank = dist.get_rank()
    S_local, H, cu = 8, 4, None
    if kind == "length":
        S_local = 6 if rank == 3 else 8
    if kind == "heads":
        H = 6  # 6 heads over U=2 is fine; H_kv=3 neither divides nor is divided by U=2
    if kind == "cu_seqlens":
        cu = torch.tensor([0, 5, 30 if rank == 0 else 31, 32], dtype=torch.int32)
    q = torch.randn(1, S_local, H, 8)
    k = torch.randn(1, S_local, H // 2, 8)
    try:
        sequence_parallel_attention(q, k, k.clone(), groups, cu_seqlens=cu, backend="reference")
    except ValueError as e:
        return str(e)
    return None


def test_bad_input_raises_on_every_rank(pool):
    msgs = pool.run(_sp_bad_input, "length")
    assert all(m and "local_len: rank 0=8, rank 1=8, rank 2=8, rank 3=6" in m for m in msgs), msgs
    msgs = pool.run(_sp_bad_input, "cu_seqlens")
    assert all(m and "cu_seqlens_hash" in m for m in msgs), msgs
    msgs = pool.run(_sp_bad_input, "heads")
    assert all(m and "num_kv_heads=3" in m and "Ulysses size U=2" in m for m in msgs), msgs
