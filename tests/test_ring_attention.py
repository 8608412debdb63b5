"""Ring and all-gather-K/V attention on real gloo ranks against single-process reference attention.

Every rank builds the same global q, k, v, dout from one seed, computes the reference (flash_attention
with backend='reference' on the unpadded, unsharded tensors), pads and shards them itself (zigzag or
contiguous, from global positions), runs the distributed op forward and backward, and reports its own
shard's worst error and its byte counters; the test process holds those against the tolerances and the
analytic volume. Also: zigzag balances causal work and contiguous does not, the exchange is posted
before a step's compute and waited after, and ranks that disagree on their input all raise ValueError.
"""
from functools import partial

import pytest
import torch
import torch.distributed as dist
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.ops import available_backends, flash_attention, visible_pairs

WORLD = 4
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}  # (forward, gradients)


POOL_WORLD_SIZE = WORLD  # the session pool of this size (tests/conftest.py)


# --- helpers that run inside the ranks ---------------------------------------------------------------


def positions(seq_len_padded, ring_size, ulysses_size, ring_rank, ulysses_rank, scheme):
    """Global positions held by (ring_rank, ulysses_rank), in shard order (docs/design.md section 4)."""
    if scheme == "contiguous":
        n = seq_len_padded // (ring_size * ulysses_size)
        start = (ring_rank * ulysses_size + ulysses_rank) * n
        return list(range(start, start + n))
    c = seq_len_padded // (2 * ring_size)
    pair = list(range(ring_rank * c, ring_rank * c + c))
    pair += list(range((2 * ring_size - 1 - ring_rank) * c, (2 * ring_size - ring_rank) * c))
    n = len(pair) // ulysses_size
    return pair[ulysses_rank * n:(ulysses_rank + 1) * n]


def make_case(case, multiple):
    """Global tensors, the reference out/grads (padded with zeros), and the padded global cu_seqlens."""
    B, S, H, H_kv, D, dtype = (case[n] for n in ("B", "S", "H", "H_kv", "D", "dtype"))
    causal, segs = case["causal"], case["segs"]
    g = torch.Generator().manual_seed(case["seed"])
    q, k, v, dout = (torch.randn(B, S, h, D, generator=g, dtype=torch.float64).to(dtype)
                     for h in (H, H_kv, H_kv, H))
    cu = None
    if segs is not None:
        cu = torch.tensor([0] + torch.tensor(segs).cumsum(0).tolist(), dtype=torch.int32)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = flash_attention(qr, kr, vr, causal=causal, softmax_scale=case.get("scale"), cu_seqlens_q=cu,
                          cu_seqlens_k=cu, backend="reference")
    out.backward(dout)
    S_pad = -(-S // multiple) * multiple
    pad = lambda t: torch.cat([t, t.new_zeros(B, S_pad - S, *t.shape[2:])], dim=1)
    cu_pad = cu
    if cu is not None and S_pad > S:
        cu_pad = torch.cat([cu, torch.tensor([S_pad], dtype=torch.int32)])
    inputs = [pad(t) for t in (q, k, v, dout)]
    refs = [pad(t.detach()) for t in (out, qr.grad, kr.grad, vr.grad)]
    return inputs, refs, cu_pad, S_pad


def run_case(fn, groups, case, multiple, pos_fn):
    """Run `fn(q, k, v, cu_seqlens)` on this rank's shard (global positions `pos_fn(S_pad)` of the
    sequence padded to `multiple`); worst errors and 'ring' bytes sent forward / backward."""
    (q, k, v, dout), refs, cu, S_pad = make_case(case, multiple)
    pos = list(pos_fn(S_pad))
    ql, kl, vl = (t[:, pos].clone().requires_grad_() for t in (q, k, v))
    groups.stats.reset()
    out = fn(ql, kl, vl, cu)
    fwd = dict(groups.stats.bytes_sent)
    out.backward(dout[:, pos])
    total = dict(groups.stats.bytes_sent)
    real = torch.tensor(pos) < case["S"]  # pads' outputs are discarded; their gradients must be zero
    # A shard may hold nothing but pads (zigzag puts the padded tail on ring rank 0).
    err = lambda a, b: (a.double() - b.double()).abs().amax().item() if a.numel() else 0.0
    errs = {"out": err(out[:, real], refs[0][:, pos][:, real])}
    for name, t, ref in (("dq", ql, refs[1]), ("dk", kl, refs[2]), ("dv", vl, refs[3])):
        assert t.grad.dtype == t.dtype
        errs[name] = err(t.grad, ref[:, pos])
    ring_fwd = fwd.get("ring", 0)
    return {"errs": errs, "fwd_ring": ring_fwd, "bwd_ring": total.get("ring", 0) - ring_fwd,
            "kv_local": kl.numel(), "elem": kl.element_size()}


def _call(op, q, k, v, cu, **kwargs):
    return op(q, k, v, cu_seqlens=cu, **kwargs)


def _ring_cases(algorithm, ring_size, cases, backend):
    from longvila_engine.attention.allgather import allgather_kv_attention
    from longvila_engine.attention.ring import ring_attention

    groups = groups_for(ParallelLayout(ring=ring_size, dp=WORLD // ring_size))
    op = ring_attention if algorithm == "ring" else allgather_kv_attention
    results = []
    for case in cases:
        causal, scheme = case["causal"], case["scheme"]
        fn = partial(_call, op, groups=groups, causal=causal, scheme=scheme, backend=backend,
                     softmax_scale=case.get("scale"))
        pos_fn = lambda S_pad, scheme=scheme: positions(S_pad, ring_size, 1, groups.ring_rank, 0, scheme)
        multiple = (2 if scheme == "zigzag" else 1) * ring_size
        results.append(run_case(fn, groups, case, multiple, pos_fn))
    return results


# --- the cases ---------------------------------------------------------------------------------------


def case_list(dtypes=(torch.float64, torch.float32)):
    f64, f32, zz, ct = torch.float64, torch.float32, "zigzag", "contiguous"
    # (B, S, H, H_kv, D, causal, segs, dtype, scheme): MHA/GQA/MQA, odd lengths (padding; without a
    # causal mask the pad is masked by its own segment), packed segments crossing shard boundaries.
    rows = [(2, 32, 4, 4, 8, True, None, f64, zz), (2, 27, 4, 1, 8, True, None, f64, zz),
            (1, 29, 4, 2, 8, False, [29], f64, zz), (1, 32, 4, 2, 16, False, None, f64, zz),
            (1, 35, 4, 2, 8, True, [5, 1, 20, 9], f64, zz), (1, 35, 4, 4, 8, False, [5, 1, 20, 9], f64, zz),
            (1, 40, 4, 1, 8, True, [3, 30, 2, 1, 4], f64, zz), (1, 33, 4, 2, 8, True, None, f64, ct),
            (1, 35, 4, 2, 8, True, [5, 1, 20, 9], f64, ct), (2, 48, 8, 2, 8, True, None, f32, zz),
            (1, 45, 4, 4, 8, False, [7, 13, 25], f32, zz)]
    names = ("B", "S", "H", "H_kv", "D", "causal", "segs", "dtype", "scheme")
    cases = [dict(zip(names, row), seed=i) for i, row in enumerate(rows)]
    cases[3]["scale"] = 0.3  # an explicit softmax_scale
    return [c for c in cases if c["dtype"] in dtypes]


def check_results(cases, results, algorithm, ring_size, kv_scale=None):
    """Tolerances per dtype, and the exact ring volume; `kv_scale` turns this rank's K/V shard size into
    the ring-local K/V size (Ulysses gathers the sequence and splits or replicates K/V heads)."""
    for rank, per_rank in enumerate(results):
        for case, res in zip(cases, per_rank):
            tol_fwd, tol_bwd = TOL[case["dtype"]]
            what = f"rank {rank} {algorithm} R={ring_size} case {case}"
            errs = res["errs"]
            assert errs["out"] <= tol_fwd, f"{what}: out error {errs['out']:.3g}"
            for name in ("dq", "dk", "dv"):
                assert errs[name] <= tol_bwd, f"{what}: {name} error {errs[name]:.3g}"
            # Analytic volume: local K/V blocks forward; backward the ring resends them and rings
            # R float32 (float64) dK/dV accumulators home, the all-gather reduce-scatters of them.
            kv = 2 * res["kv_local"] * (kv_scale(case) if kv_scale else 1)
            acc = 8 if case["dtype"] == torch.float64 else 4
            assert res["fwd_ring"] == (ring_size - 1) * kv * res["elem"], what
            if algorithm == "ring":
                want = (ring_size - 1) * kv * res["elem"] + (ring_size * kv * acc if ring_size > 1 else 0)
            else:
                want = (ring_size - 1) * kv * acc
            assert res["bwd_ring"] == want, what


@pytest.mark.parametrize("ring_size", [4, 2, 1])
@pytest.mark.parametrize("algorithm", ["ring", "allgather"])
def test_matches_reference(pool, algorithm, ring_size):
    cases = case_list() if ring_size > 1 else case_list((torch.float64,))[:5]
    results = pool.run(_ring_cases, algorithm, ring_size, cases, "reference")
    check_results(cases, results, algorithm, ring_size)


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="C++ cpu backend not built")
@pytest.mark.parametrize("algorithm", ["ring", "allgather"])
def test_cpu_backend(pool, algorithm):
    cases = [case_list()[i] for i in (0, 4, 7, 9, 10)]
    results = pool.run(_ring_cases, algorithm, 4, cases, "cpu")
    check_results(cases, results, algorithm, 4)


# --- work balance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring_size", [2, 4, 8])
def test_zigzag_balances_causal_work(ring_size):
    from longvila_engine.attention.ring import ring_plan

    S_local = 12
    work = {}
    for scheme in ("zigzag", "contiguous"):
        work[scheme] = [sum(b.pairs for step in ring_plan(r, ring_size, S_local, causal=True, scheme=scheme)
                            for b in step) for r in range(ring_size)]
        # Every visible pair of the global causal mask is computed exactly once.
        assert sum(work[scheme]) == visible_pairs(ring_size * S_local, ring_size * S_local, True)
    assert len(set(work["zigzag"])) == 1, work
    assert work["contiguous"] == sorted(work["contiguous"]) and work["contiguous"][0] < work["contiguous"][-1]
    # Zigzag: every step but the first is exactly half a full block.
    plan = ring_plan(1, ring_size, S_local, causal=True)
    assert [sum(b.pairs for b in step) for step in plan[1:]] == [S_local * S_local // 2] * (ring_size - 1)


def test_varlen_plan_covers_every_segment_pair_once():
    from longvila_engine.attention.ring import ring_plan

    bounds = [0, 5, 6, 26, 35, 40]
    for causal in (True, False):
        want = sum(visible_pairs(b - a, b - a, causal) for a, b in zip(bounds, bounds[1:]))
        for scheme in ("zigzag", "contiguous"):
            got = sum(b.pairs for r in range(4)
                      for step in ring_plan(r, 4, 10, causal=causal, scheme=scheme, cu_seqlens=bounds)
                      for b in step)
            assert got == want, (causal, scheme)


# --- ordering: the next block is posted before a step's compute and waited after ---------------------


def _ordering_case():
    import longvila_engine.attention.ring as ring_mod

    groups = groups_for(ParallelLayout(ring=WORLD))
    events = []
    original = (ring_mod.RingExchange, ring_mod.forward_blocks, ring_mod.backward_blocks)

    class LoggedExchange(original[0]):
        def start(self, tensors):
            events.append(("start", self.tag))
            super().start(tensors)

        def wait(self):
            events.append(("wait", self.tag))
            return super().wait()

    def logged(kernel, name):
        def wrapper(*args, **kwargs):
            blocks = args[3] if name == "fwd" else args[6]
            events.append((name, sum(b.pairs for b in blocks)))
            return kernel(*args, **kwargs)
        return wrapper

    ring_mod.RingExchange = LoggedExchange
    ring_mod.forward_blocks = logged(original[1], "fwd")
    ring_mod.backward_blocks = logged(original[2], "bwd")
    try:
        q, k, v = (torch.randn(1, 16, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = ring_mod.ring_attention(q, k, v, groups, causal=True, backend="reference")
        n_fwd = len(events)
        out.sum().backward()
    finally:
        ring_mod.RingExchange, ring_mod.forward_blocks, ring_mod.backward_blocks = original
    return events[:n_fwd], events[n_fwd:]


def test_exchange_posted_before_compute_and_waited_after(pool):
    from longvila_engine.attention.ring import _DKV_TAG, _KV_TAG

    R = WORLD
    work = set()
    for fwd, bwd in pool.run(_ordering_case):
        names = [(e[0], e[1]) if e[0] in ("start", "wait") else (e[0],) for e in fwd]
        assert names == [("start", _KV_TAG), ("fwd",), ("wait", _KV_TAG)] * (R - 1) + [("fwd",)], fwd
        work.add(sum(e[1] for e in fwd if e[0] == "fwd"))
        # Backward: per step the K/V shift is in flight during the compute; the dK/dV accumulator of
        # step s-1 is waited after step s's compute; R dK/dV sends, the last one bringing them home.
        step = [("start", _KV_TAG), ("bwd",), ("wait", _DKV_TAG), ("start", _DKV_TAG), ("wait", _KV_TAG)]
        want = step[:2] + step[3:] + step * (R - 2) + [("bwd",), ("wait", _DKV_TAG), ("start", _DKV_TAG),
                                                       ("wait", _DKV_TAG)]
        assert [(e[0], e[1]) if e[0] in ("start", "wait") else (e[0],) for e in bwd] == want, bwd
    assert len(work) == 1, f"zigzag ranks executed different causal work: {work}"


# --- bad input: every rank raises, none hangs --------------------------------------------------------


def _bad_input_case(kind, algorithm):
    from longvila_engine.attention.allgather import allgather_kv_attention
    from longvila_engine.attention.ring import ring_attention

    groups = groups_for(ParallelLayout(ring=WORLD))
    rank = dist.get_rank()
    S_local = 8
    cu = torch.tensor([0, 5, 6, 26, 32], dtype=torch.int32)
    if kind == "cu_seqlens" and rank == 1:
        cu = torch.tensor([0, 5, 7, 26, 32], dtype=torch.int32)
    if kind == "length":
        cu = None
        S_local = 10 if rank == 0 else 8
    if kind == "local" and rank == 2:
        cu = cu.to(torch.int64)
    q, k, v = (torch.randn(1, S_local, 4, 8) for _ in range(3))
    op = ring_attention if algorithm == "ring" else allgather_kv_attention
    try:
        op(q, k, v, groups, causal=True, cu_seqlens=cu, backend="reference")
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("algorithm", ["ring", "allgather"])
def test_disagreeing_ranks_all_raise(pool, algorithm):
    msgs = pool.run(_bad_input_case, "cu_seqlens", algorithm)
    assert all(m and "disagree" in m and "cu_seqlens_hash" in m for m in msgs), msgs
    msgs = pool.run(_bad_input_case, "length", algorithm)
    assert all(m and "local_len: rank 0=10, rank 1=8" in m for m in msgs), msgs
    msgs = pool.run(_bad_input_case, "local", algorithm)
    assert "int32" in msgs[2], msgs
    assert all(m and "rank(s) [2] rejected" in m for i, m in enumerate(msgs) if i != 2), msgs
