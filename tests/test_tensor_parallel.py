"""Tensor-parallel layers and the vocab-parallel cross-entropy against dense single-process PyTorch.

Every rank builds the same dense weights and inputs from one seed (the layers' seeded init makes a
tp=1 layer and the tp shards agree by construction), runs its tp shard, and checks its outputs and
gradients against the dense result: float64, 1e-10.
"""

import pytest
import torch
import torch.nn.functional as F
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
    vocab_parallel_cross_entropy,
)
from longvila_engine.tensor_parallel.layers import init_from_dense_

TOL = {"rtol": 1e-10, "atol": 1e-10}
DT = torch.float64


def _layout(tp):
    return ParallelLayout(tp=tp, dp=4 // tp)


def _seeded(layer, groups, seed):
    for i, p in enumerate(layer.parameters()):
        init_from_dense_(p, groups, seed + i)
    return layer


def _slice(x, dim, groups):
    n = x.shape[dim] // groups.tp_size
    return x.narrow(dim, groups.tp_rank * n, n)


def _close(a, b):
    torch.testing.assert_close(a, b, **TOL)


def _column_case(tp, gather_output, bias, sequence_parallel):
    groups = groups_for(_layout(tp))
    torch.manual_seed(1)
    x = torch.randn(2, 8, 12, dtype=DT)
    kw = {"bias": bias, "gather_output": gather_output, "sequence_parallel": sequence_parallel, "dtype": DT}
    dense = _seeded(ColumnParallelLinear(12, 16, None, **kw), None, 7)
    par = _seeded(ColumnParallelLinear(12, 16, groups, **kw), groups, 7)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd = dense(xd)
    dy = torch.randn_like(yd)
    yd.backward(dy)
    xin = _slice(xp, 1, groups) if sequence_parallel else xp
    yp = par(xin)
    _close(yp, yd if gather_output else _slice(yd, -1, groups))
    yp.backward(dy if gather_output else _slice(dy, -1, groups))
    if sequence_parallel:
        _close(_slice(xp.grad, 1, groups), _slice(xd.grad, 1, groups))
    else:
        _close(xp.grad, xd.grad)
    _close(par.weight.grad, _slice(dense.weight.grad, 0, groups))
    if bias:
        _close(par.bias.grad, _slice(dense.bias.grad, 0, groups))
    return groups.stats.summary().get("tp", {}).get("bytes", 0)


def _row_case(tp, input_is_parallel, bias, sequence_parallel):
    groups = groups_for(_layout(tp))
    torch.manual_seed(2)
    x = torch.randn(2, 8, 16, dtype=DT)
    kw = {
        "bias": bias,
        "input_is_parallel": input_is_parallel,
        "sequence_parallel": sequence_parallel,
        "dtype": DT,
    }
    dense = _seeded(RowParallelLinear(16, 12, None, **kw), None, 11)
    par = _seeded(RowParallelLinear(16, 12, groups, **kw), groups, 11)
    xd, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yd = dense(xd)
    dy = torch.randn_like(yd)
    yd.backward(dy)
    yp = par(_slice(xp, -1, groups) if input_is_parallel else xp)
    if sequence_parallel:
        _close(yp, _slice(yd, 1, groups))
        yp.backward(_slice(dy, 1, groups))
    else:
        _close(yp, yd)
        yp.backward(dy)
    want_dx = _slice(xd.grad, -1, groups) if input_is_parallel else xd.grad
    got_dx = _slice(xp.grad, -1, groups) if input_is_parallel else xp.grad
    _close(got_dx, want_dx)
    _close(par.weight.grad, _slice(dense.weight.grad, 1, groups))
    if bias:
        _close(par.bias.grad, dense.bias.grad)


def _embedding_case(tp, sequence_parallel):
    groups = groups_for(_layout(tp))
    torch.manual_seed(3)
    ids = torch.randint(0, 32, (2, 8))
    dense = _seeded(VocabParallelEmbedding(32, 6, None, dtype=DT), None, 5)
    par = _seeded(
        VocabParallelEmbedding(32, 6, groups, sequence_parallel=sequence_parallel, dtype=DT), groups, 5
    )
    yd = dense(ids)
    dy = torch.randn_like(yd)
    yd.backward(dy)
    yp = par(ids)
    if sequence_parallel:
        _close(yp, _slice(yd, 1, groups))
        yp.backward(_slice(dy, 1, groups))
    else:
        _close(yp, yd)
        yp.backward(dy)
    _close(par.weight.grad, _slice(dense.weight.grad, 0, groups))


def _mlp_block_case(tp):
    """Column(seq-parallel) -> gelu -> Row(seq-parallel): a Megatron SP region, forward and grads."""
    groups = groups_for(_layout(tp))
    torch.manual_seed(4)
    x = torch.randn(2, 8, 12, dtype=DT)
    d1 = _seeded(ColumnParallelLinear(12, 16, None, bias=True, dtype=DT), None, 20)
    d2 = _seeded(RowParallelLinear(16, 12, None, bias=True, dtype=DT), None, 30)
    p1 = _seeded(
        ColumnParallelLinear(12, 16, groups, bias=True, sequence_parallel=True, dtype=DT), groups, 20
    )
    p2 = _seeded(RowParallelLinear(16, 12, groups, bias=True, sequence_parallel=True, dtype=DT), groups, 30)
    xd = x.clone().requires_grad_()
    (d2(F.gelu(d1(xd))) ** 2).sum().backward()
    xp = x.clone().requires_grad_()
    xs = scatter_to_sequence_region(xp, groups)
    loss = (p2(F.gelu(p1(xs))) ** 2).sum()
    # Each tp rank's loss covers its own sequence slice: the total is their sum.
    total = reduce_from_tp_region(loss.reshape(1), groups)
    _close(total, (d2(F.gelu(d1(x))) ** 2).sum().reshape(1))
    loss.backward()
    _close(xp.grad, xd.grad)  # the scatter's backward all-gathered the slices
    _close(p1.weight.grad, _slice(d1.weight.grad, 0, groups))
    _close(p2.weight.grad, _slice(d2.weight.grad, 1, groups))
    _close(p2.bias.grad, d2.bias.grad)


def _mappings_case(tp):
    """Each pair's backward is the conjugate of its forward (checked on explicit gradients)."""
    groups = groups_for(_layout(tp))
    r, p = groups.tp_rank, groups.tp_size
    full = torch.arange(2 * 4 * p, dtype=DT).reshape(2, 4 * p) + 100 * r  # differs per rank
    g = torch.ones(2, 4 * p, dtype=DT) * (r + 1)
    checks = {}
    x = full.clone().requires_grad_()
    copy_to_tp_region(x, groups).backward(g)
    checks["copy"] = torch.equal(x.grad, torch.full_like(g, p * (p + 1) / 2))
    x = full.clone().requires_grad_()
    y = reduce_from_tp_region(x, groups)
    y.backward(g)
    base = torch.arange(2 * 4 * p, dtype=DT).reshape(2, 4 * p)
    checks["reduce"] = torch.equal(x.grad, g) and torch.equal(
        y.detach(), sum(base + 100 * i for i in range(p))
    )
    x = full.clone().requires_grad_()
    y = scatter_to_tp_region(x, groups)
    gathered = gather_from_tp_region(y.detach(), groups)
    y.backward(torch.ones_like(y) * (r + 1))
    checks["scatter/gather"] = y.shape[-1] == 4 and torch.equal(
        x.grad, torch.cat([torch.full((2, 4), i + 1.0, dtype=DT) for i in range(p)], -1)
    )
    want = torch.cat([(base + 100 * i)[:, 4 * i : 4 * i + 4] for i in range(p)], -1)
    checks["gather_values"] = torch.equal(gathered, want)
    x = full.clone().reshape(2, 4 * p, 1).requires_grad_()
    y = reduce_scatter_to_sequence_region(x, groups)
    y.backward(torch.ones_like(y))
    checks["rs/ag"] = y.shape[1] == 4 and torch.equal(x.grad, torch.ones_like(x))
    x = full[:, :4].clone().reshape(2, 4, 1).requires_grad_()
    y = gather_from_sequence_region(x, groups)
    y.backward(torch.ones_like(y))
    checks["ag/rs"] = y.shape[1] == 4 * p and torch.equal(x.grad, torch.full_like(x, float(p)))
    return checks


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize(
    "gather_output,bias,sequence_parallel", [(False, False, False), (True, True, False), (False, True, True)]
)
def test_column_parallel_linear(pool, tp, gather_output, bias, sequence_parallel):
    sent = pool.run(_column_case, tp, gather_output, bias, sequence_parallel)
    assert all(b > 0 for b in sent)  # tp traffic was counted


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize(
    "input_is_parallel,bias,sequence_parallel",
    [(True, False, False), (False, True, False), (True, True, True)],
)
def test_row_parallel_linear(pool, tp, input_is_parallel, bias, sequence_parallel):
    pool.run(_row_case, tp, input_is_parallel, bias, sequence_parallel)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_vocab_parallel_embedding(pool, tp, sequence_parallel):
    pool.run(_embedding_case, tp, sequence_parallel)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_region(pool, tp):
    pool.run(_mlp_block_case, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_mapping_pairs(pool, tp):
    for checks in pool.run(_mappings_case, tp):
        assert all(checks.values()), checks


def _ce_case(tp, chunk_size, dtype, sequence_parallel):
    groups = groups_for(_layout(tp))
    torch.manual_seed(5)
    B, S, E, V = 2, 12, 8, 40
    hidden = torch.randn(B, S, E, dtype=torch.float64)
    weight = torch.randn(V, E, dtype=torch.float64)
    labels = torch.randint(0, V, (B, S))
    labels[0, :5] = -100
    labels[1, -1] = -100
    hd, wd = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = F.cross_entropy(
        (hd @ wd.t()).reshape(-1, V), labels.reshape(-1), reduction="sum", ignore_index=-100
    )
    want.backward()
    hp = hidden.to(dtype).requires_grad_()
    wp = _slice(weight, 0, groups).to(dtype).requires_grad_()
    h_in = _slice(hp, 1, groups) if sequence_parallel else hp
    loss_sum, count = vocab_parallel_cross_entropy(
        h_in, wp, labels, groups, chunk_size=chunk_size, sequence_parallel=sequence_parallel
    )
    loss_sum.backward()
    tol = TOL if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert int(count) == int((labels != -100).sum())
    assert loss_sum.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss_sum.double(), want.detach(), **tol)
    grad_h = hp.grad
    if sequence_parallel:  # each tp rank holds the gradient of its own sequence slice
        grad_h = _slice(grad_h, 1, groups)
        torch.testing.assert_close(grad_h.double(), _slice(hd.grad, 1, groups), **tol)
    else:
        torch.testing.assert_close(grad_h.double(), hd.grad, **tol)
    torch.testing.assert_close(wp.grad.double(), _slice(wd.grad, 0, groups), **tol)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize(
    "chunk_size,dtype,sequence_parallel",
    [
        (5, torch.float64, False),
        (None, torch.float64, False),
        (7, torch.float32, False),
        (3, torch.float64, True),
    ],
)
def test_vocab_parallel_cross_entropy(pool, tp, chunk_size, dtype, sequence_parallel):
    pool.run(_ce_case, tp, chunk_size, dtype, sequence_parallel)


def test_cross_entropy_single_process_and_all_ignored():
    torch.manual_seed(6)
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.full((3, 5), -100)
    loss_sum, count = vocab_parallel_cross_entropy(h, w, labels, None, chunk_size=4)
    loss_sum.backward()
    assert int(count) == 0 and float(loss_sum.detach()) == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


def test_layers_reject_indivisible_shapes(pool):
    with pytest.raises(AssertionError, match="not divisible by the tensor-parallel size"):
        pool.run(_indivisible_case)


def _indivisible_case():
    ColumnParallelLinear(8, 6, groups_for(_layout(4)))
