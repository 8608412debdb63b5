"""transformers causal LMs on sequence parallelism (integrations/hf.py) against single-process transformers.

Every rank builds the same tiny random model from a seed, shards the same global batch, runs forward
and backward through `sequence_parallel_attention`; the loss shares and parameter gradients are summed
over the sp group and compared with transformers' own eager attention on the whole batch in the test
process. Tolerances are float32: the sharded run adds the same numbers in a different order (online
softmax over blocks, per-shard sums, one all-reduce); measured, the loss agrees to <= 5e-7 and every
gradient to <= 1e-6 of its largest entry. 1e-5 (loss) and 1e-4 (gradients, relative to the tensor's
max) leave ~100x margin without hiding a lost seam target, a wrong position or a per-shard mean,
which are O(1e-1) off.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers  # (pinned test dependency: transformers==5.23.0, see Makefile)
from dist_pool import groups_for

from longvila_engine import ParallelLayout

WORLD = 4
LAYOUTS = {
    "ring4": ParallelLayout(ring=4),
    "ring2_ulysses2": ParallelLayout(ring=2, ulysses=2),
    "ulysses4": ParallelLayout(ulysses=4),
}
SEQ_LEN = 37  # pads to 40 on every layout
# The kernels' own backends are tested against `reference` elsewhere; here the integration is under test,
# so it runs on the oracle whatever extension happens to be built.
BACKEND = "reference"
VOCAB = 128


POOL_WORLD_SIZE = WORLD  # the session pool of this size (tests/conftest.py)


def _model(name, seed=0, **overrides):
    """A tiny random causal LM; `attn_implementation='eager'` is the single-process reference."""
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                  tie_word_embeddings=False, attn_implementation="eager")
    kwargs.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[name]
    torch.manual_seed(seed)
    return model_cls(config_cls(**kwargs)).float()


def _global_batch(seed, batch_size=2, seq_len=SEQ_LEN, cu_seqlens=None):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
    labels = input_ids.clone()
    labels[:, :5] = -100  # an unsupervised prompt
    labels[0, 20:23] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if cu_seqlens is not None:
        batch["cu_seqlens"] = torch.tensor(cu_seqlens, dtype=torch.int32)
    return batch


def _reference(name, batch, **overrides):
    """Mean CE over the shifted supervised targets and every parameter gradient, one process, eager."""
    model = _model(name, **overrides)
    cu = batch.get("cu_seqlens")
    if cu is None:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        loss, logits = out.loss, out.logits
    else:  # independent sequences: each one its own forward, targets never cross a boundary
        bounds = cu.tolist()
        total, count, logits = 0.0, 0, []
        for a, b in zip(bounds[:-1], bounds[1:]):
            seg_logits = model(input_ids=batch["input_ids"][:, a:b], use_cache=False).logits
            target = batch["labels"][:, a + 1:b]
            total = total + F.cross_entropy(seg_logits[0, :-1], target[0], ignore_index=-100, reduction="sum")
            count += int((target != -100).sum())
            logits.append(seg_logits)
        loss, logits = total / count, torch.cat(logits, dim=1)
    loss.backward()
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --- rank functions ------------------------------------------------------------------------------


def _sp_train_step(name, layout, batch, overrides):
    from longvila_engine.attention.sharding import padded_length, shard_positions
    from longvila_engine.integrations import enable_sequence_parallel, sequence_parallel_loss, shard_batch

    groups = groups_for(layout)
    model = enable_sequence_parallel(_model(name, **overrides), groups, backend=BACKEND)
    shard = shard_batch(batch, groups)
    out = model(**shard)
    loss = sequence_parallel_loss(out, shard["shift_labels"], groups)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total, group=groups.sp)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g, group=groups.sp)
        grads[n] = g
    positions = shard_positions(padded_length(batch["input_ids"].shape[1], groups), groups)
    return {"loss": total, "local_loss": loss.detach(), "grads": grads, "logits": out.logits.detach(),
            "positions": positions}


def _check_against_reference(results, ref):
    ref_loss, ref_logits, ref_grads = ref
    seq_len = ref_logits.shape[1]
    for rank, res in enumerate(results):
        real = res["positions"] < seq_len
        torch.testing.assert_close(res["logits"][:, real], ref_logits[:, res["positions"][real]], rtol=1e-4,
                                   atol=1e-5, msg=lambda m, r=rank: f"rank {r} logits: {m}")
        assert abs(float(res["loss"]) - float(ref_loss)) < 1e-5, (rank, float(res["loss"]), float(ref_loss))
        assert set(res["grads"]) == set(ref_grads)
        for n, g_ref in ref_grads.items():
            scale = float(g_ref.abs().max())
            torch.testing.assert_close(res["grads"][n], g_ref, rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m, r=rank, n=n: f"rank {r} grad {n}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_matches_single_process_transformers(pool, name, layout):
    batch = _global_batch(seed=1)
    results = pool.run(_sp_train_step, name, LAYOUTS[layout], batch, {})
    _check_against_reference(results, _reference(name, batch))


def test_packed_sequences(pool):
    batch = _global_batch(seed=2, batch_size=1, cu_seqlens=[0, 11, 25, SEQ_LEN])
    results = pool.run(_sp_train_step, "llama", LAYOUTS["ring2_ulysses2"], batch, {})
    _check_against_reference(results, _reference("llama", batch))


def _shards(layout, batch, scheme):
    from longvila_engine.attention.sharding import padded_length, shard_positions
    from longvila_engine.integrations import shard_batch

    groups = groups_for(layout)
    shard = shard_batch(batch, groups, scheme=scheme)
    plan = shard.pop("sp_plan")  # rank-local (holds the process groups): checked here, not returned
    assert plan.local_len == shard["input_ids"].shape[1] and plan.scheme == scheme
    return shard, shard_positions(padded_length(batch["input_ids"].shape[1], groups, scheme), groups, scheme)


@pytest.mark.parametrize("scheme, given", [("zigzag", False), ("contiguous", False), ("zigzag", True)])
def test_shard_batch_reassembles_the_global_batch(pool, scheme, given):
    batch = _global_batch(seed=3, batch_size=1, cu_seqlens=[0, 9, 9, 30, SEQ_LEN])
    expected_pos = list(range(9)) + list(range(21)) + list(range(7)) + list(range(3))
    if given:  # the caller's own position ids and an all-ones mask are taken as they are
        batch["position_ids"] = torch.tensor([expected_pos[:SEQ_LEN]])
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    results = pool.run(_shards, LAYOUTS["ring2_ulysses2"], batch, scheme)
    padded = 40
    ids = torch.full((1, padded), -1)
    pos = torch.full((1, padded), -1)
    lab = torch.full((1, padded), -7)
    for shard, positions in results:
        assert shard["use_cache"] is False and shard["sp_scheme"] == scheme
        assert shard["sp_cu_seqlens"].tolist() == [0, 9, 9, 30, SEQ_LEN, padded]
        ids[:, positions] = shard["input_ids"]
        pos[:, positions] = shard["position_ids"]
        lab[:, positions] = shard["shift_labels"]
    assert torch.equal(ids[:, :SEQ_LEN], batch["input_ids"]) and bool((ids[:, SEQ_LEN:] == 0).all())
    assert pos[0].tolist() == expected_pos
    expected = torch.full((padded,), -100)
    expected[:SEQ_LEN - 1] = batch["labels"][0, 1:]
    expected[[8, 29, 36]] = -100  # last token of each packed sequence: its next token is another sequence's
    assert lab[0].tolist() == expected.tolist()


def _loss_shares(layout, logits, labels):
    from longvila_engine.attention.sharding import padded_length, shard_positions
    from longvila_engine.integrations import sequence_parallel_loss, shard_batch

    groups = groups_for(layout)
    shard = shard_batch({"input_ids": torch.zeros_like(labels), "labels": labels}, groups)
    seq_len_padded = padded_length(labels.shape[1], groups)
    full = F.pad(logits, (0, 0, 0, seq_len_padded - logits.shape[1]))
    local = full[:, shard_positions(seq_len_padded, groups)].clone().requires_grad_(True)
    loss = sequence_parallel_loss(local, shard["shift_labels"], groups)
    loss.backward()
    return float(loss), bool(torch.isfinite(local.grad).all()), float(local.grad.abs().sum())


def test_loss_of_empty_shards_is_zero(pool):
    torch.manual_seed(4)
    logits = torch.randn(1, SEQ_LEN, VOCAB)
    labels = torch.full((1, SEQ_LEN), -100)
    labels[0, 1:4] = 7  # targets of positions 0..2 (zigzag chunk 0: ring rank 0) ...
    labels[0, 30] = 3  # ... and of position 29 (chunk 5: ring rank 2); ranks 1 and 3 have none
    shares = pool.run(_loss_shares, LAYOUTS["ring4"], logits, labels)
    ref = F.cross_entropy(logits[0, :-1], labels[0, 1:])
    assert abs(sum(s for s, _, _ in shares) - float(ref)) < 1e-5
    assert [s == 0.0 for s, _, _ in shares] == [False, True, False, True]
    assert all(finite for _, finite, _ in shares)
    none = pool.run(_loss_shares, LAYOUTS["ring4"], logits, torch.full((1, SEQ_LEN), -100))
    assert none == [(0.0, True, 0.0)] * WORLD


# --- refusals ------------------------------------------------------------------------------------


def _refusal(case):
    from longvila_engine.integrations import enable_sequence_parallel, shard_batch

    groups = groups_for(LAYOUTS["ring2_ulysses2"])
    batch = _global_batch(seed=5)
    try:
        if case == "unsupported_class":
            model = transformers.LlamaForSequenceClassification(_model("llama").config)
            enable_sequence_parallel(model, groups)
        elif case == "tensor_parallel":
            enable_sequence_parallel(_model("llama"), groups_for(ParallelLayout(tp=2, ring=2)))
        elif case == "labels_to_model":
            model = enable_sequence_parallel(_model("llama"), groups, backend=BACKEND)
            shard = shard_batch(batch, groups)
            model(**shard, labels=shard["shift_labels"])
        elif case == "implementation_changed":
            model = enable_sequence_parallel(_model("llama"), groups, backend=BACKEND)
            model.set_attn_implementation("sdpa")
            model(**shard_batch(batch, groups))
        elif case == "sliding_window":
            model = enable_sequence_parallel(_model("mistral", sliding_window=16), groups, backend=BACKEND)
            model(**shard_batch(batch, groups))
        elif case == "dropout":
            model = _model("qwen2", attention_dropout=0.1).train()
            model = enable_sequence_parallel(model, groups, backend=BACKEND)
            model(**shard_batch(batch, groups))
        elif case == "padding_mask":
            mask = torch.ones_like(batch["input_ids"])
            mask[1, -4:] = 0
            shard_batch(dict(batch, attention_mask=mask), groups)
        elif case == "heads_not_divisible":
            model = _model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
            model = enable_sequence_parallel(model, groups_for(LAYOUTS["ulysses4"]), backend=BACKEND)
            model(**shard_batch(batch, groups_for(LAYOUTS["ulysses4"])))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("case, pattern", [
    ("unsupported_class", "does not support .*LlamaForSequenceClassification.*LlamaForCausalLM"),
    ("tensor_parallel", "tensor parallelism"),
    ("labels_to_model", "do not pass labels"),
    ("implementation_changed", "instead of 'longvila_sp'"),
    ("sliding_window", "sliding_window=16"),
    ("dropout", "dropout=0.1"),
    ("padding_mask", "attention_mask with zeros"),
    ("heads_not_divisible", "num_heads=6 .*cannot be split over Ulysses size U=4"),
])
def test_refuses_loudly(pool, case, pattern):
    import re

    messages = pool.run(_refusal, case)
    for rank, msg in enumerate(messages):
        assert msg is not None, f"rank {rank}: {case} was accepted"
        assert re.search(pattern, msg, re.S), f"rank {rank}: {msg}"
