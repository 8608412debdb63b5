"""Sequence sharding (zigzag and contiguous, with padding) and Ulysses attention on real gloo ranks.

Layout arithmetic is checked without processes against an independent spelling of docs/design.md
section 4. On 4 gloo ranks, every rank builds the same global tensors from one seed and checks its own
shard, the round trip, the gradients of shard/unshard, and Ulysses attention (ring=1, inner
`flash_attention(backend='reference')`) against plain single-process attention on the whole tensors.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.attention.sharding import (
    pad_cu_seqlens,
    padded_length,
    ring_positions,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from longvila_engine.attention.ulysses import ulysses_attention, ulysses_sizes_for
from longvila_engine.ops import flash_attention, zigzag_permute

SCHEMES = ["zigzag", "contiguous"]


def _fake_groups(R, U, r=0, u=0):
    return SimpleNamespace(ring_size=R, ulysses_size=U, ring_rank=r, ulysses_rank=u)


def expected_positions(L_p, R, U, r, u, scheme):
    """docs/design.md section 4 spelled out with lists."""
    if scheme == "contiguous":
        n = L_p // (R * U)
        i = u + U * r
        return list(range(i * n, (i + 1) * n))
    c = L_p // (2 * R)
    pair = list(range(r * c, (r + 1) * c)) + list(range((2 * R - 1 - r) * c, (2 * R - r) * c))
    n = len(pair) // U
    return pair[u * n:(u + 1) * n]


# --- pure layout arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("R,U", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (2, 3), (3, 4)])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_positions_partition_the_padded_sequence(R, U, scheme):
    for seq_len in (1, 13, 48, 50):
        L_p = padded_length(seq_len, _fake_groups(R, U), scheme)
        m = (2 if scheme == "zigzag" else 1) * R * U
        assert L_p % m == 0 and seq_len <= L_p < seq_len + m
        seen = []
        for r in range(R):
            per_ring = []
            for u in range(U):
                pos = shard_positions(L_p, _fake_groups(R, U, r, u), scheme)
                assert pos.dtype == torch.long and pos.tolist() == expected_positions(L_p, R, U, r, u, scheme)
                per_ring += pos.tolist()
            assert ring_positions(L_p, _fake_groups(R, U, r, 0), scheme).tolist() == per_ring
            seen += per_ring
        assert sorted(seen) == list(range(L_p))
        if scheme == "zigzag":
            # Shards in sp order (ulysses fastest) are the zigzag permutation of the sequence.
            ref = zigzag_permute(torch.arange(L_p).view(1, L_p), R, dim=1, backend="reference")
            assert seen == ref.view(-1).tolist()


def test_zigzag_ring_rank_holds_chunks_r_and_mirror():
    # 2R = 8 chunks of 4: ring rank 1 holds chunks 1 and 6, then split over U=2.
    g = _fake_groups(4, 2, r=1, u=0)
    assert ring_positions(32, g).tolist() == [4, 5, 6, 7, 24, 25, 26, 27]
    assert shard_positions(32, g).tolist() == [4, 5, 6, 7]
    assert shard_positions(32, _fake_groups(4, 2, r=1, u=1)).tolist() == [24, 25, 26, 27]
    # U=3 over a pair of 6: the middle piece straddles the two chunks.
    assert shard_positions(24, _fake_groups(2, 3, r=0, u=1)).tolist() == [4, 5, 18, 19]


def test_layout_errors():
    g = _fake_groups(2, 2)
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_positions(12, g, "zigzag")
    with pytest.raises(ValueError, match="scheme='spiral' is unknown"):
        padded_length(12, g, "spiral")
    with pytest.raises(ValueError, match="non-negative int"):
        padded_length(-1, g)


def test_pad_cu_seqlens():
    cu = torch.tensor([0, 5, 13], dtype=torch.int32)
    padded = pad_cu_seqlens(cu, 16)
    assert padded.tolist() == [0, 5, 13, 16] and padded.dtype == torch.int32
    assert pad_cu_seqlens(cu, 13) is cu
    with pytest.raises(ValueError, match="more than padded_len=8"):
        pad_cu_seqlens(cu, 8)


# --- shard / unshard on gloo ----------------------------------------------------------------------

SHARD_LAYOUTS = {(2, 1): ParallelLayout(dp=2, ring=2), (1, 2): ParallelLayout(dp=2, ulysses=2),
                 (2, 2): ParallelLayout(ring=2, ulysses=2), (4, 1): ParallelLayout(ring=4)}


def _shard_case(layout, seq_len, scheme, dim):
    groups = groups_for(layout)
    R, U, r, u = groups.ring_size, groups.ulysses_size, groups.ring_rank, groups.ulysses_rank
    L_p = padded_length(seq_len, groups, scheme)
    assert L_p >= seq_len
    # Global (B=2, L, F=3) with the sequence moved to `dim`; values encode (batch, position, feature).
    base = (torch.arange(2).view(2, 1, 1) * 1000 + torch.arange(seq_len).view(1, -1, 1)
            + torch.arange(3).view(1, 1, 3) / 10).double()
    X = base.movedim(1, dim)
    pos = expected_positions(L_p, R, U, r, u, scheme)
    assert shard_positions(L_p, groups, scheme).tolist() == pos

    groups.stats.reset()
    x = X.clone().requires_grad_()
    x_local = shard_sequence(x, groups, dim=dim, scheme=scheme)
    assert groups.stats.bytes_sent["sp"] == 0, "shard forward is local"
    X_pad = torch.cat([base, base.new_zeros(2, L_p - seq_len, 3)], 1)
    expected_local = X_pad[:, pos].movedim(1, dim)
    assert x_local.shape == expected_local.shape and torch.equal(x_local, expected_local)

    # Round trip, with and without the true length.
    assert torch.equal(unshard_sequence(x_local.detach(), groups, dim=dim, scheme=scheme, seq_len=seq_len), X)
    full = unshard_sequence(x_local.detach(), groups, dim=dim, scheme=scheme)
    assert torch.equal(full, X_pad.movedim(1, dim))
    sp = R * U
    local_bytes = x_local.numel() * x_local.element_size()
    assert groups.stats.bytes_sent["sp"] == 2 * (sp - 1) * local_bytes

    # shard backward = all-gather: the complete gradient of sum over ranks of (x_local * W_local).
    W = torch.randn(2, L_p, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (x_local * W[:, pos].movedim(1, dim)).sum().backward()
    assert torch.equal(x.grad, W[:, :seq_len].movedim(1, dim))

    # unshard backward = split: a loss computed alike on every rank gives this rank's slice.
    V = torch.randn(2, seq_len, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    leaf = x_local.detach().clone().requires_grad_()
    y = unshard_sequence(leaf, groups, dim=dim, scheme=scheme, seq_len=seq_len)
    (y * V.movedim(1, dim)).sum().backward()
    V_pad = torch.cat([V, V.new_zeros(2, L_p - seq_len, 3)], 1)
    assert torch.equal(leaf.grad, V_pad[:, pos].movedim(1, dim)), "pads take no gradient"
    return L_p


@pytest.mark.parametrize("RU", list(SHARD_LAYOUTS), ids=lambda ru: f"R{ru[0]}U{ru[1]}")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seq_len", [16, 13])
def test_shard_unshard_round_trip_and_grads(pool, RU, scheme, seq_len):
    lengths = pool.run(_shard_case, SHARD_LAYOUTS[RU], seq_len, scheme, 1)
    R, U = RU
    m = (2 if scheme == "zigzag" else 1) * R * U
    assert lengths == [math.ceil(seq_len / m) * m] * 4


def test_shard_other_dims(pool):
    pool.run(_shard_case, SHARD_LAYOUTS[(2, 2)], 21, "zigzag", 0)
    pool.run(_shard_case, SHARD_LAYOUTS[(2, 2)], 9, "contiguous", -1)


def _unshard_bad_length(layout):
    groups = groups_for(layout)
    with pytest.raises(ValueError, match="seq_len=3 does not match"):
        unshard_sequence(torch.zeros(1, 4, 2), groups, seq_len=3)


def test_unshard_rejects_wrong_length(pool):
    pool.run(_unshard_bad_length, SHARD_LAYOUTS[(2, 2)])


# --- Ulysses attention ------------------------------------------------------------------------------


def reference_attention(q, k, v, causal):
    """Plain softmax attention on whole tensors; GQA by repeating K/V heads (head h reads h // g)."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _ulysses_case(layout, H, H_kv, causal, dtype, via_shard):
    groups = groups_for(layout)
    U, u = groups.ulysses_size, groups.ulysses_rank
    B, S, D = 2, 16, 8
    gen = torch.Generator().manual_seed(1234)
    Q, dO = (torch.randn(B, S, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    K, V = (torch.randn(B, S, H_kv, D, generator=gen, dtype=torch.float64) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (Q, K, V)]
    ref = reference_attention(*leaves, causal)
    ref.backward(dO)
    ref_grads = [t.grad for t in leaves]

    inner = lambda q, k, v: flash_attention(q, k, v, causal=causal, backend="reference")
    tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=0, atol=1e-5)
    gtol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=0, atol=1e-4)
    groups.stats.reset()
    if via_shard:
        # End to end: replicated inputs -> shard -> Ulysses -> unshard; every rank then holds the
        # complete output and the complete gradients of the one (replicated) loss.
        ins = [t.to(dtype).clone().requires_grad_() for t in (Q, K, V)]
        local = [shard_sequence(t, groups) for t in ins]
        out = unshard_sequence(ulysses_attention(*local, groups, inner=inner), groups, seq_len=S)
        torch.testing.assert_close(out.double(), ref.detach(), **tol)
        out.backward(dO.to(dtype))
        for name, t, g in zip("qkv", ins, ref_grads):
            torch.testing.assert_close(t.grad.double(), g, **gtol, msg=lambda m, n=name: f"d{n}: {m}")
        return
    s_loc = S // U
    mine = slice(u * s_loc, (u + 1) * s_loc)
    q, k, v = (t[:, mine].to(dtype).requires_grad_() for t in (Q, K, V))
    out = ulysses_attention(q, k, v, groups, inner=inner)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref.detach()[:, mine], **tol)
    out.backward(dO[:, mine].to(dtype))
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        torch.testing.assert_close(t.grad.double(), g[:, mine], **gtol, msg=lambda m, n=name: f"d{n}: {m}")
    # Bytes: q, stacked k+v (replicated up to U heads when U > H_kv) and out, forward and backward;
    # each rank keeps 1/U of every buffer.
    item = torch.empty((), dtype=dtype).element_size()
    kv_heads = max(H_kv, U)
    per_pass = B * s_loc * D * (2 * H + 2 * kv_heads) * item * (U - 1) // U
    assert groups.stats.bytes_sent["ulysses"] == 2 * per_pass
    assert groups.stats.calls["ulysses"] == 6


ULYSSES_LAYOUTS = {2: ParallelLayout(dp=2, ulysses=2), 4: ParallelLayout(ulysses=4)}
# (H, H_kv, U): MHA, GQA, MQA; the last ones have U > H_kv, so K/V heads are replicated.
HEADS = [(4, 4, 2), (4, 2, 2), (8, 8, 4), (8, 4, 4), (4, 1, 2), (4, 1, 4), (4, 2, 4), (8, 2, 4)]


@pytest.mark.parametrize("H,H_kv,U", HEADS, ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ulysses_attention_float64(pool, H, H_kv, U, causal):
    pool.run(_ulysses_case, ULYSSES_LAYOUTS[U], H, H_kv, causal, torch.float64, False)


@pytest.mark.parametrize("H,H_kv,U,causal", [(4, 1, 4, True), (8, 2, 4, False), (4, 4, 2, True)])
def test_ulysses_attention_float32(pool, H, H_kv, U, causal):
    pool.run(_ulysses_case, ULYSSES_LAYOUTS[U], H, H_kv, causal, torch.float32, False)


@pytest.mark.parametrize("H,H_kv,U", [(4, 1, 4), (8, 4, 2)])
def test_ulysses_attention_through_shard_and_unshard(pool, H, H_kv, U):
    pool.run(_ulysses_case, ULYSSES_LAYOUTS[U], H, H_kv, True, torch.float64, True)


def test_ulysses_head_errors_name_the_fix():
    groups = SimpleNamespace(ulysses_size=4)
    inner = lambda q, k, v: q
    z = lambda h: torch.zeros(1, 4, h, 8)
    with pytest.raises(ValueError, match=r"num_heads=6 .*U=4.*work: \[1, 2, 3, 6\]"):
        ulysses_attention(z(6), z(6), z(6), groups, inner=inner)
    with pytest.raises(ValueError, match=r"num_kv_heads=3 .*U=4.*work: \[1, 3, 6, 12\]"):
        ulysses_attention(z(12), z(3), z(3), groups, inner=inner)
    with pytest.raises(ValueError, match="multiple of num_kv_heads=3"):
        ulysses_attention(z(8), z(3), z(3), groups, inner=inner)
    with pytest.raises(ValueError, match="num_heads=2 .*U=4"):
        ulysses_attention(z(2), z(1), z(1), groups, inner=inner)
    assert ulysses_sizes_for(8, 2) == [1, 2, 4, 8]
    one = SimpleNamespace(ulysses_size=1)
    q = torch.randn(1, 4, 2, 8)
    assert ulysses_attention(q, z(1), z(1), one, inner=inner) is q
