"""Ulysses all-to-all and all-to-all-v on real gloo ranks: values, gradients and byte counters.

Every rank builds the same global tensors from one seed, runs the collective on its own part and
checks the result (and, after backward, its input gradient) against single-process indexing of the
global tensors. The collectives only move data, so the comparisons are exact.
"""
from types import SimpleNamespace

import pytest
import torch
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.comm.all_to_all import all_to_all_v, head_to_seq_all_to_all, seq_to_head_all_to_all

# Ulysses groups of 4, of 2 inside dp=2, and of 2 inside a 2x2 sp group.
A2A_LAYOUTS = [ParallelLayout(ulysses=4), ParallelLayout(dp=2, ulysses=2), ParallelLayout(ring=2, ulysses=2)]


def _randn(seed, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _seq_to_head_case(layout, B, S, H, D, dtype):
    groups = groups_for(layout)
    U, u = groups.ulysses_size, groups.ulysses_rank
    s_loc, h_loc = S // U, H // U
    X = _randn(0, B, S, H, D, dtype=dtype)
    G = _randn(1, B, S, H, D, dtype=dtype)
    mine_seq, mine_heads = slice(u * s_loc, (u + 1) * s_loc), slice(u * h_loc, (u + 1) * h_loc)

    groups.stats.reset()
    x = X[:, mine_seq].clone().requires_grad_()
    y = seq_to_head_all_to_all(x, groups)
    assert y.shape == (B, S, h_loc, D)
    assert torch.equal(y, X[:, :, mine_heads]), "forward: sequence gathered in rank order, heads scattered"
    y.backward(G[:, :, mine_heads])
    assert torch.equal(x.grad, G[:, mine_seq]), "backward: the inverse all-to-all"
    # Each rank keeps 1/U of its buffer and sends the rest, once forward and once backward.
    sent = 2 * (U - 1) * B * s_loc * h_loc * D * X.element_size()
    stats = (groups.stats.bytes_sent["ulysses"], groups.stats.calls["ulysses"])
    assert stats == (sent, 2), stats
    assert groups.stats.intra_node["ulysses"]

    z = X[:, :, mine_heads].clone().requires_grad_()
    w = head_to_seq_all_to_all(z, groups)
    assert torch.equal(w, X[:, mine_seq])
    w.backward(G[:, mine_seq])
    assert torch.equal(z.grad, G[:, :, mine_heads])
    # Double backward: in global coordinates loss = sum(G * X**2), so dX = 2 G X, d(dX . Z)/dX = 2 G Z.
    Z = _randn(2, B, S, H, D, dtype=dtype)
    x2 = X[:, mine_seq].clone().requires_grad_()
    loss = (seq_to_head_all_to_all(x2, groups) ** 2 * G[:, :, mine_heads]).sum()
    (dx,) = torch.autograd.grad(loss, x2, create_graph=True)
    torch.testing.assert_close(dx, (2 * G * X)[:, mine_seq])
    (dx * Z[:, mine_seq]).sum().backward()
    torch.testing.assert_close(x2.grad, (2 * G * Z)[:, mine_seq])
    # Round trip from a non-contiguous input.
    xt = X.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)[:, mine_seq]
    assert not xt.is_contiguous()
    assert torch.equal(head_to_seq_all_to_all(seq_to_head_all_to_all(xt, groups), groups), X[:, mine_seq])


@pytest.mark.parametrize("layout", A2A_LAYOUTS, ids=lambda l: f"r{l.ring}u{l.ulysses}dp{l.dp}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ulysses_all_to_all_forward_backward_bytes(pool, layout, dtype):
    pool.run(_seq_to_head_case, layout, 2, 16, 8, 4, dtype)


def test_ulysses_all_to_all_odd_shapes(pool):
    pool.run(_seq_to_head_case, ParallelLayout(ulysses=4), 1, 12, 4, 3, torch.float64)


def test_all_to_all_errors_name_the_fix():
    groups = SimpleNamespace(ulysses_size=4)
    with pytest.raises(ValueError, match=r"num_heads=6 .*U=4.*\[1, 2, 3, 6\]"):
        seq_to_head_all_to_all(torch.zeros(1, 2, 6, 4), groups)
    with pytest.raises(ValueError, match="sequence length 6 .* U=4"):
        head_to_seq_all_to_all(torch.zeros(1, 6, 1, 4), groups)
    with pytest.raises(ValueError, match="4-D"):
        seq_to_head_all_to_all(torch.zeros(2, 8, 4), groups)
    one = SimpleNamespace(ulysses_size=1)
    x = torch.zeros(1, 3, 5, 2)
    assert seq_to_head_all_to_all(x, one) is x and head_to_seq_all_to_all(x, one) is x


# counts[i][j]: rows rank i sends to rank j.
UNEVEN = [[0, 1, 2, 3], [2, 0, 0, 1], [3, 3, 1, 0], [1, 0, 4, 0]]
# Rank 1 sends nothing at all and rank 2 receives nothing at all.
EMPTY = [[1, 2, 0, 3], [0, 0, 0, 0], [2, 1, 0, 1], [0, 3, 0, 2]]


def _all_to_all_v_case(layout, axis, counts, dim):
    groups = groups_for(layout)
    n, me = groups.size(axis), groups.index(axis)
    assert len(counts) == n
    feat = (2, 3)  # the other dims; `dim` is inserted among them

    def rows(seed, count):
        t = _randn(seed, *feat, count)  # (2, 3, count)
        return t.movedim(-1, dim)

    inputs = [rows(100 + i, sum(counts[i])) for i in range(n)]
    grads = [rows(200 + j, sum(counts[i][j] for i in range(n))) for j in range(n)]

    def block(t, sizes, k):
        return t.narrow(dim, sum(sizes[:k]), sizes[k])

    send = counts[me]
    recv = [counts[i][me] for i in range(n)]
    expected = torch.cat([block(inputs[i], counts[i], me) for i in range(n)], dim)
    expected_grad = torch.cat([block(grads[j], [counts[i][j] for i in range(n)], me) for j in range(n)], dim)

    groups.stats.reset()
    x = inputs[me].clone().requires_grad_()
    y = all_to_all_v(x, send, recv, groups, axis, dim=dim)
    assert y.shape == expected.shape and torch.equal(y, expected)
    y.backward(grads[me])
    assert torch.equal(x.grad, expected_grad)
    row_bytes = 6 * x.element_size()
    sent = (sum(send) - send[me] + sum(recv) - recv[me]) * row_bytes
    assert groups.stats.bytes_sent[axis] == sent and groups.stats.calls[axis] == 2
    return groups.stats.intra_node[axis]


@pytest.mark.parametrize("counts", [UNEVEN, EMPTY], ids=["uneven", "empty-rank"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_to_all_v_uneven_forward_backward_bytes(pool, counts, dim):
    pool.run(_all_to_all_v_case, ParallelLayout(ulysses=4), "ulysses", counts, dim)


def test_all_to_all_v_on_sp_across_nodes(pool):
    # sp = 2 ring x 2 Ulysses on "nodes" of 2 ranks: the sp traffic is labelled inter-node.
    layout = ParallelLayout(ring=2, ulysses=2, gpus_per_node=2)
    intra = pool.run(_all_to_all_v_case, layout, "sp", UNEVEN, 0)
    assert intra == [False] * 4
    intra = pool.run(_all_to_all_v_case, layout, "ulysses", [[0, 3], [2, 1]], 1)
    assert intra == [True] * 4


def test_all_to_all_v_errors():
    groups = SimpleNamespace(size=lambda axis: 2, index=lambda axis: 0)
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"sum to 4 but x.shape\[0\]=5"):
        all_to_all_v(x, [1, 3], [2, 2], groups, "sp")
    with pytest.raises(ValueError, match="must hold 2 non-negative counts"):
        all_to_all_v(x, [5], [2, 2], groups, "sp")
    with pytest.raises(ValueError, match="must hold 2 non-negative counts"):
        all_to_all_v(x, [6, -1], [2, 2], groups, "sp")
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        all_to_all_v(x, [1, 4], [2, 2], groups, "sp", dim=2)
    one = SimpleNamespace(size=lambda axis: 1, index=lambda axis: 0)
    assert all_to_all_v(x, [5], [5], one, "sp") is x
