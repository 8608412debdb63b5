"""Sequence-parallel greedy generation (inference/generate.py) against one-process greedy decoding.

The reference recomputes the whole prompt plus the tokens so far at every step in one process
(no cache at all); the sharded run keeps each rank's KV cache where prefill made it, attends per
rank and merges by log-sum-exp. float64: the same tokens, logits equal to 1e-10, every rank the
same output, and the KV cache spread over the ranks (round-robin appends).
"""
import pytest
import torch
import torch.nn.functional as F
from dist_pool import groups_for
from test_multimodal import IMG, LAYOUTS, SEVEN, _build, _sample

from longvila_engine.inference import generate

F64 = {"rtol": 1e-10, "atol": 1e-10}
NEW = 6


def _greedy_reference(model, ids, frames, n):
    """One process, no cache: the full sequence recomputed for every new token."""
    tokens, scores = [], []
    current = ids
    for _ in range(n):
        h, plan = model.embed_shard(current, frames)
        hidden = model.language_model_hidden(h, plan)
        logits = F.linear(hidden[0, -1], model.language_model.lm_head.weight)
        tokens.append(int(logits.argmax()))
        scores.append(logits)
        assert tokens[-1] != IMG, "the reference cannot feed a generated placeholder back"
        current = torch.cat([current, torch.tensor(tokens[-1:])])
    return torch.tensor(tokens), torch.stack(scores)


def _generate_case(layout, pieces, eos_at=None):
    groups = groups_for(layout)
    ids, frames, _ = _sample(7, pieces)
    with torch.no_grad():
        want_tokens, want_logits = _greedy_reference(_build(None), ids, frames, NEW)
    eos = None if eos_at is None else int(want_tokens[eos_at])
    out = generate(_build(groups), ids, frames, groups, NEW, eos_token_id=eos)
    n = NEW if eos is None else int((want_tokens == eos).nonzero()[0, 0]) + 1
    assert torch.equal(out.tokens, want_tokens[:n]), (out.tokens, want_tokens)
    torch.testing.assert_close(out.logits, want_logits[:n], **F64)
    return {"tokens": out.tokens.tolist(), "kv_tokens": out.kv_tokens, "kv_bytes": out.kv_bytes,
            "prompt_len": int((ids != IMG).sum()) + 4 * int((ids == IMG).sum())}


@pytest.mark.parametrize("name", ["sp1", "ring2", "ulysses2", "ring4", "ring2_ulysses2"])
def test_greedy_matches_one_process(pool, name):
    results = pool.run(_generate_case, LAYOUTS[name], SEVEN)
    sp = LAYOUTS[name].sp_size
    assert all(r["tokens"] == results[0]["tokens"] for r in results)  # every rank agrees
    kv = results[0]["kv_tokens"]
    assert len(kv) == sp and sum(kv) == results[0]["prompt_len"] + NEW - 1  # every position cached once
    assert all(b == kv_i * 2 * 2 * 2 * 16 * 8 for kv_i, b in zip(kv, results[0]["kv_bytes"]))  # K,V x layers


def test_fewer_frames_than_ranks_and_eos(pool):
    results = pool.run(_generate_case, LAYOUTS["ring4"], [2, "v", 6, "vv", 3], eos_at=2)
    assert all(len(r["tokens"]) <= 3 for r in results)
    assert all(r["tokens"] == results[0]["tokens"] for r in results)


def _bad_generate(layout):
    groups = groups_for(layout)
    ids, frames, _ = _sample(7, SEVEN)
    try:
        generate(_build(groups), ids, frames, groups, 0)
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_arguments_raise_everywhere(pool):
    messages = pool.run(_bad_generate, LAYOUTS["ring2_ulysses2"])
    assert all(m and "max_new_tokens" in m for m in messages)


def test_cache_is_preallocated_written_in_place_and_no_hooks(monkeypatch):
    import importlib

    gen = importlib.import_module("longvila_engine.inference.generate")  # the module, not the function
    made = []

    class RecordingCache(gen.KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self, self.k.data_ptr(), self.v.data_ptr()))

    def no_hooks(*args, **kwargs):
        raise AssertionError("generate must not install forward hooks")

    monkeypatch.setattr(gen, "KVCache", RecordingCache)
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", no_hooks)
    ids, frames, _ = _sample(7, SEVEN)
    out = generate(_build(None), ids, frames, None, NEW)
    (cache, k_ptr, v_ptr), = made
    prompt_len = int((ids != IMG).sum()) + 4 * int((ids == IMG).sum())
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == (k_ptr, v_ptr)  # never reallocated
    assert cache.length == out.kv_tokens[0] == prompt_len + NEW - 1 <= cache.capacity
