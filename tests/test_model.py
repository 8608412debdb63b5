"""The tiny Transformer on parallel layouts against one process: the loss and every parameter gradient.

Every rank builds the dense model (groups=None) and the same global sample from one seed, computes
the single-process loss and gradients, then runs its own shard of the parallel model. The sp ranks'
losses add up to the dense loss; gradients summed over sp (the trainer's reduction) equal the dense
gradients, sliced along `tp_dim` for tp-sharded parameters. float64, 1e-10.
"""

import pytest
import torch
import torch.distributed as dist
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.models import PRESETS, Transformer, get_config, local_batch, shift_labels
from longvila_engine.models.loss import global_positions

TINY = get_config("tiny")
DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
KW = {"attention_backend": "reference", "dtype": DT}


def _sample(seed, S, B=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (B, S), generator=gen)


def _dense(ids, labels=None, cu=None, seed=0, config=TINY):
    model = Transformer(config, None, seed=seed, **KW)
    b = local_batch(ids, None, labels=labels, cu_seqlens=cu)
    loss = model(b.input_ids, b.positions, b.labels, b.cu_seqlens)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _slice(full, param, groups):
    dim = getattr(param, "tp_dim", None)
    if dim is None or groups.tp_size == 1:
        return full
    n = param.shape[dim]
    return full.narrow(dim, groups.tp_rank * n, n)


def _parallel(layout, ids, labels=None, cu=None, seed=0, config=TINY, **model_kw):
    groups = groups_for(layout)
    model = Transformer(config, groups, seed=seed, **KW, **model_kw)
    b = local_batch(ids, groups, labels=labels, cu_seqlens=cu)
    loss = model(b.input_ids, b.positions, b.labels, b.cu_seqlens)
    loss.backward()
    return groups, model, b, loss


def _compare_case(layout, S, B, packed, mask, tp_sp):
    ids = _sample(1, S, B)
    labels, cu = None, None
    if packed:
        cu = torch.tensor([0, S // 3, S // 3 + 5, S], dtype=torch.int32)
    if mask == "first_quarter":  # later shards get no supervised token at all
        labels = ids.clone()
        labels[:, S // 4 + 1 :] = -100
    want_loss, want_grads = _dense(ids, labels, cu)
    groups, model, b, loss = _parallel(layout, ids, labels, cu, tp_sequence_parallel=tp_sp)
    local_supervised = int((b.labels != -100).sum())
    total = loss.detach().reshape(1).clone()
    dist.all_reduce(total, group=groups.sp)
    torch.testing.assert_close(total[0], want_loss, **TOL)
    assert torch.isfinite(loss).all()
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=groups.sp)  # the trainer sums gradients over sp (and averages over dp)
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(
            g, _slice(want_grads[name], p, groups), **TOL, msg=lambda m, n=name: f"{n}: {m}"
        )
    return {"local_supervised": local_supervised, "loss": float(loss.detach())}


LAYOUTS = {
    "tp2": ParallelLayout(tp=2, dp=2),
    "tp4": ParallelLayout(tp=4),  # tiny has 2 kv heads: replicated K/V
    "dp4": ParallelLayout(dp=4),
    "ring2": ParallelLayout(ring=2, dp=2),
    "ulysses2": ParallelLayout(ulysses=2, dp=2),
    "ring2_ulysses2": ParallelLayout(ring=2, ulysses=2),
    "ring4": ParallelLayout(ring=4),
    "ring2_tp2": ParallelLayout(ring=2, tp=2),
    "ulysses2_tp2": ParallelLayout(ulysses=2, tp=2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(pool, name):
    pool.run(_compare_case, LAYOUTS[name], 30, 2, False, None, False)


@pytest.mark.parametrize("name", ["ring2_ulysses2", "ring2_tp2", "tp4"])
def test_packed_varlen_matches_one_process(pool, name):
    pool.run(_compare_case, LAYOUTS[name], 27, 1, True, None, False)


@pytest.mark.parametrize("name", ["tp2", "ring2_tp2", "tp4"])
def test_tp_sequence_parallel_matches_one_process(pool, name):
    pool.run(_compare_case, LAYOUTS[name], 32, 2, False, None, True)


def test_shard_without_supervised_tokens_is_zero_not_nan(pool):
    results = pool.run(_compare_case, LAYOUTS["ring4"], 32, 1, False, "first_quarter", False)
    empty = [r for r in results if r["local_supervised"] == 0]
    assert empty, results  # the case really has shards without a target
    assert all(r["loss"] == 0.0 for r in empty)


def _seam_case(layout):
    """Only the target that crosses a shard seam is supervised: it must be trained (dense loss > 0)."""
    from longvila_engine.attention.sharding import shard_positions

    S = 32
    ids = _sample(2, S)
    groups = groups_for(layout)
    seam = S // (2 * groups.ring_size) - 1  # last token of zigzag chunk 0; its target opens chunk 1
    pos = shard_positions(S, groups).tolist()
    assert not (seam in pos and seam + 1 in pos)  # token and target sit on different ranks
    labels = torch.full_like(ids, -100)
    labels[:, seam + 1] = ids[:, seam + 1]  # the target of token `seam` only
    want_loss, want_grads = _dense(ids, labels)
    groups, model, b, loss = _parallel(layout, ids, labels)
    total = loss.detach().reshape(1).clone()
    dist.all_reduce(total, group=groups.sp)
    assert float(want_loss) > 0
    torch.testing.assert_close(total[0], want_loss, **TOL)
    g = model.embed.weight.grad.clone()
    dist.all_reduce(g, group=groups.sp)
    torch.testing.assert_close(g, _slice(want_grads["embed.weight"], model.embed.weight, groups), **TOL)
    return int((b.labels != -100).sum())


def test_target_at_shard_seam_is_trained(pool):
    counts = pool.run(_seam_case, LAYOUTS["ring4"])
    assert sum(counts) == 1  # exactly one rank holds the seam token's target


def _reduction_case(name):
    """The trainer's gradient reduction and clipping norm against one process.

    dp replicas see different samples: after `average_gradients` (sum over dp_sp, / dp) every rank
    holds the dense gradient of the mean loss over the replicas' samples, sliced along tp_dim; the
    global norm from `clip_grad_norm_` (tp shards summed, replicated tensors once) is the dense norm.
    """
    from longvila_engine.train import average_gradients, clip_grad_norm_

    layout = LAYOUTS[name]
    groups = groups_for(layout)
    samples = [_sample(10 + i, 24) for i in range(layout.dp)]
    dense = [_dense(s)[1] for s in samples]
    _, model, _, _ = _parallel(layout, samples[groups.dp_rank])
    average_gradients(model, groups)
    want_sq = 0.0
    for pname, p in model.named_parameters():
        want = sum(d[pname] for d in dense) / layout.dp
        want_sq += float(want.pow(2).sum())
        torch.testing.assert_close(p.grad, _slice(want, p, groups), **TOL, msg=lambda m, n=pname: f"{n}: {m}")
    norm = clip_grad_norm_(model, 0.5, groups)
    torch.testing.assert_close(float(norm), want_sq**0.5, rtol=1e-6, atol=0)  # float32 norm
    clipped = clip_grad_norm_(model, None, groups)
    torch.testing.assert_close(float(clipped), 0.5, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", ["ring2", "ulysses2_tp2", "tp4", "tp2"])
def test_gradient_reduction_and_clip_norm(pool, name):
    pool.run(_reduction_case, name)


def test_tp_init_holds_dense_slices(pool):
    pool.run(_init_case)


def _init_case():
    groups = groups_for(LAYOUTS["tp4"])
    dense = Transformer(TINY, None, seed=3, **KW)
    par = Transformer(TINY, groups, seed=3, **KW)
    full = dict(dense.named_parameters())
    for name, p in par.named_parameters():
        assert torch.equal(p.detach(), _slice(full[name].detach(), p, groups)), name


def test_activation_checkpointing_same_gradients():
    ids = _sample(4, 20, 2)
    grads = []
    for ckpt in (False, True):
        model = Transformer(TINY, None, activation_checkpointing=ckpt, **KW)
        b = local_batch(ids, None)
        model(b.input_ids, b.positions, b.labels).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_labels_and_positions_helpers():
    ids = torch.arange(10).reshape(1, 10)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert shift_labels(ids).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, -100]]
    assert shift_labels(ids, cu_seqlens=cu).tolist() == [[1, 2, 3, -100, 5, 6, 7, 8, 9, -100]]
    assert global_positions(10, cu).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="must rise from 0"):
        shift_labels(ids, cu_seqlens=torch.tensor([0, 4, 9]))


def test_presets_have_published_shapes():
    want = {
        "llama2_7b": (32, 4096, 32, 32, 128, 11008, 32000, 1e4),
        "llama3_8b": (32, 4096, 32, 8, 128, 14336, 128256, 5e5),
        "qwen2_7b": (28, 3584, 28, 4, 128, 18944, 152064, 1e6),
    }
    for name, shape in want.items():
        c = PRESETS[name]
        assert (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.ffn_hidden_size,
            c.vocab_size,
            c.rope_theta,
        ) == shape
    assert 6.5e9 < PRESETS["llama2_7b"].num_params() < 6.9e9
    assert 7.9e9 < PRESETS["llama3_8b"].num_params() < 8.1e9
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("gpt5")


def _kv_mismatch_case():
    config = TINY.replace(num_heads=12, num_kv_heads=3, hidden_size=96, head_dim=8)
    Transformer(config, groups_for(LAYOUTS["tp4"]), **KW)


def test_kv_heads_must_fit_tp(pool):
    with pytest.raises(AssertionError, match="tp must divide the kv head count or be a multiple"):
        pool.run(_kv_mismatch_case)
