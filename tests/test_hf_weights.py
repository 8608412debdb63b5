"""Hugging Face weights in and out (models/hf_weights.py) against transformers itself.

Tiny random Llama / Qwen2 / Mistral models are saved by transformers with `save_pretrained(
max_shard_size=...)` into several safetensors shards with an index. `Transformer.from_hf` must give
transformers' loss and logits (eager attention, float32): on one process, and on 4 gloo ranks as
tp2 x ring2 with FSDP2 (each rank's logits are its vocabulary slice of its sequence shard). The
4-rank model's `save_hf` output must load in transformers' `from_pretrained` with the same logits.
`from_hf(..., fsdp=True)` (meta-device build, FSDP2 shards filled from `get_slice` rows) must give the
same logits on tp2 x ring2 and dp2 x ring2, shards bit-equal to the replicated load's rows, and each
rank must read from the files only the bytes its shards hold (1/(dp*sp) of its tp slice).

Tolerances: float32 on both sides, same weights; the sums differ in order (blocked attention with
online softmax, vocab-parallel log-sum-exp, per-shard loss sums). Measured on one process: logits
<= 1e-7 absolute (logits up to 0.5), loss <= 1e-7 relative. 1e-5 / 1e-5 relative leave margin while
a missing RoPE, a transposed slice, a wrong tp slice or a dropped bias are O(1e-2) or more off. A
save/reload round trip copies float32 tensors, so its logits are compared with 1e-6 (transformers
recomputes them identically).
"""

import os

import pytest
import torch
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.models import Transformer, local_batch
from longvila_engine.models.hf_weights import config_from_hf

VOCAB = 128
SEQ_LEN = 37  # pads to 40 on tp2 x ring2 (zigzag over 2 ring ranks needs a multiple of 4)
KINDS = ("llama", "qwen2", "mistral")


def _classes(kind):
    # Imported here, not at module level: the pool's ranks import this module and need no transformers.
    import transformers  # (pinned test dependency, see Makefile)

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]


def _hf_model(kind, seed=0, **overrides):
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                  tie_word_embeddings=False, attn_implementation="eager", rope_theta=5000.0)  # fmt: skip
    kwargs.update(overrides)
    config_cls, model_cls = _classes(kind)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (directory, transformers model)} saved in several shards."""
    out = {}
    for kind in KINDS:
        path = str(tmp_path_factory.mktemp(kind))
        model = _hf_model(kind)
        model.save_pretrained(path, max_shard_size="20KB")
        out[kind] = (path, model)
    return out


def _batch():
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _reference(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.loss.item(), out.logits


@pytest.mark.parametrize("kind", KINDS)
def test_from_hf_matches_transformers_one_process(saved, kind):
    path, hf = saved[kind]
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ids = _batch()
    loss_ref, logits_ref = _reference(hf, ids)
    model = Transformer.from_hf(path, None, attention_backend="reference", max_seq_len=64)
    assert model.config.qkv_bias == (kind == "qwen2") and model.config.rope_theta == 5000.0
    b = local_batch(ids, None)
    with torch.no_grad():
        loss = model(b.input_ids, b.positions, b.labels).item()
        logits = model(b.input_ids, b.positions) @ model.lm_head.weight.t()
    # float32 tolerance, see the module docstring.
    assert abs(loss - loss_ref) <= 1e-5 * loss_ref, (loss, loss_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_load_as_an_untied_copy(tmp_path):
    hf = _hf_model("llama", seed=2, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path))
    ids = _batch()
    _, logits_ref = _reference(hf, ids)
    model = Transformer.from_hf(str(tmp_path), None, attention_backend="reference")
    assert torch.equal(model.lm_head.weight, model.embed.weight)
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    b = local_batch(ids, None)
    with torch.no_grad():
        logits = model(b.input_ids, b.positions) @ model.lm_head.weight.t()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 16}, "sliding_window"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_field(change, field):
    base = _hf_model("llama").config.to_dict()
    base["architectures"] = ["LlamaForCausalLM"]
    base.update(change)
    with pytest.raises(ValueError, match=field):
        config_from_hf(base, max_seq_len=64)


# --- 4 ranks (the session pool): tp2 x ring2 with FSDP2 ---------------------------------------------
def _sharded(path, ids, logits_ref, out):
    import torch.distributed as dist

    from longvila_engine.fsdp import shard_model
    from longvila_engine.tensor_parallel.mappings import all_reduce

    groups = groups_for(ParallelLayout(tp=2, ring=2, gpus_per_node=4))
    model = Transformer.from_hf(path, groups, attention_backend="reference", max_seq_len=64)
    shard_model(model, groups)
    b = local_batch(ids, groups)
    loss = model(b.input_ids, b.positions, b.labels, plan=b.plan).detach().reshape(1).clone()
    all_reduce(loss, groups, "sp")  # the sp ranks' losses add up to the sample mean
    with torch.no_grad():
        hidden = model(b.input_ids, b.positions, plan=b.plan)
    weight = model.lm_head.weight
    weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
    logits = hidden @ weight.t()  # this tp rank's vocabulary rows
    rows = slice(groups.tp_rank * VOCAB // 2, (groups.tp_rank + 1) * VOCAB // 2)
    worst = 0.0
    for i in range(ids.shape[0]):
        for j, pos in enumerate(b.positions[i].tolist()):
            if pos < ids.shape[1]:  # not padding
                ref = logits_ref[i, pos, rows]
                worst = max(worst, (logits[i, j] - ref).abs().max().item())
    model.save_hf(out)
    dist.barrier()
    return loss.item(), worst


def test_from_hf_on_tp2_ring2_fsdp_and_save_hf_round_trip(saved, pool, tmp_path):
    path, hf = saved["llama"]
    ids = _batch()
    loss_ref, logits_ref = _reference(hf, ids)
    out = str(tmp_path / "exported")
    results = pool.run(_sharded, path, ids, logits_ref, out)
    for loss, worst in results:
        assert abs(loss - loss_ref) <= 1e-5 * loss_ref, (loss, loss_ref)
        assert worst <= 1e-5, worst  # float32 tolerance, see the module docstring
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert type(back) is type(hf)
    for (name, a), (_, b) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    _, logits_back = _reference(back, ids)
    torch.testing.assert_close(logits_back, logits_ref, rtol=0, atol=1e-6)


def test_damaged_directories_name_the_file(saved, tmp_path):
    import json
    import shutil

    path, _ = saved["llama"]
    # A shard missing: the error names it.
    broken = str(tmp_path / "missing")
    shutil.copytree(path, broken)
    victim = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(broken, victim))
    with pytest.raises(ValueError, match=victim):
        Transformer.from_hf(broken, None)
    # config.json disagreeing with the tensors: the tensor and its file are named.
    wrong = str(tmp_path / "wrong")
    shutil.copytree(path, wrong)
    with open(os.path.join(wrong, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 48
    with open(os.path.join(wrong, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \(64, 32\), the config implies \(48, 32\)"):
        Transformer.from_hf(wrong, None)
    with pytest.raises(ValueError, match="no config.json"):
        Transformer.from_hf(str(tmp_path), None)


# --- 4 ranks: loaded straight into FSDP2 shards (from_hf(..., fsdp=True) = hf_weights.load_sharded) ---
SHARDED_LAYOUTS = {
    "tp2_ring2": dict(tp=2, ring=2, gpus_per_node=4),
    "dp2_ring2": dict(dp=2, ring=2, gpus_per_node=4),
}
# Uneven: vocab 50 is 13/13/13/11 rows over 4 dp_sp ranks (13/12 of each tp half over 2), and one kv
# head replicated over tp2 (tp_dim None, ReplicatedHeadsLinear).
UNEVEN = dict(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1, vocab_size=50)


@pytest.fixture(scope="module")
def saved_uneven(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("uneven"))
    model = _hf_model("llama", seed=3, **UNEVEN)
    model.save_pretrained(path, max_shard_size="20KB")
    return path, model


def _loaded_into_shards(path, layout, ids, logits_ref):
    """This rank's (loss, worst logit error vs transformers, load stats, shards equal the replicated load)."""
    from longvila_engine.fsdp import shard_rows
    from longvila_engine.tensor_parallel.mappings import all_reduce

    groups = groups_for(ParallelLayout(**layout))
    model = Transformer.from_hf(path, groups, fsdp=True, attention_backend="reference", max_seq_len=64)
    replicated = Transformer.from_hf(path, groups, attention_backend="reference", max_seq_len=64)
    differ = []  # parameters whose shard is not bit-equal to its rows of the replicated load
    for (name, p), (name_r, r) in zip(model.named_parameters(), replicated.named_parameters()):
        r0, r1 = shard_rows(p)
        if name != name_r or p.tp_dim != r.tp_dim or not torch.equal(p.to_local(), r.detach()[r0:r1]):
            differ.append(name)
    b = local_batch(ids, groups)
    loss = model(b.input_ids, b.positions, b.labels, plan=b.plan).detach().reshape(1).clone()
    all_reduce(loss, groups, "sp")
    with torch.no_grad():
        hidden = model(b.input_ids, b.positions, plan=b.plan)
    weight = model.lm_head.weight  # the root is not resharded after forward: gathered (plain) now
    logits = hidden @ (weight.full_tensor() if hasattr(weight, "full_tensor") else weight).t()  # tp rank's vocab rows
    vocab, tp = model.config.vocab_size, groups.tp_size
    rows = slice(groups.tp_rank * vocab // tp, (groups.tp_rank + 1) * vocab // tp)
    worst = 0.0
    for i in range(ids.shape[0]):
        for j, pos in enumerate(b.positions[i].tolist()):
            if pos < ids.shape[1]:  # not padding
                worst = max(worst, (logits[i, j] - logits_ref[i, pos, rows]).abs().max().item())
    stats = dict(model.hf_load_stats, replicated_bytes_read=replicated.hf_load_stats["bytes_read"],
                 dp_sp=groups.dp_size * groups.sp_size)  # fmt: skip
    return loss.item(), worst, stats, differ


@pytest.mark.parametrize("layout, uneven", [("tp2_ring2", False), ("dp2_ring2", False), ("tp2_ring2", True),
                                            ("dp2_ring2", True)])  # fmt: skip
def test_from_hf_loads_straight_into_fsdp_shards(saved, saved_uneven, pool, layout, uneven):
    """Logits/loss equal transformers' (and each shard equals its rows of the replicated load), and each
    rank reads from the files exactly the bytes its shards hold: 1/(dp*sp) of its tp slice (+-2% on
    the even model; on the uneven one the ranks' reads add up to the tp slices, nothing read twice)."""
    path, hf = saved_uneven if uneven else saved["llama"]
    ids = _batch() % hf.config.vocab_size
    loss_ref, logits_ref = _reference(hf, ids)
    results = pool.run(_loaded_into_shards, path, SHARDED_LAYOUTS[layout], ids, logits_ref)
    for loss, worst, stats, differ in results:
        assert differ == []  # bit-equal to the replicated from_hf's rows
        assert abs(loss - loss_ref) <= 1e-5 * loss_ref, (loss, loss_ref)
        assert worst <= 1e-5, worst  # float32 tolerance, see the module docstring
        # The replicated load reads the whole tp slice; the sharded one only this rank's rows of it.
        assert stats["replicated_bytes_read"] == stats["tp_slice_bytes"], stats
        assert stats["bytes_read"] == stats["shard_bytes"], stats
        ratio = stats["bytes_read"] * stats["dp_sp"] / stats["tp_slice_bytes"]
        assert ratio <= (1.15 if uneven else 1.02) and (uneven or ratio >= 0.98), (ratio, stats)
    dp_sp = results[0][2]["dp_sp"]
    assert sum(r[2]["bytes_read"] for r in results) * dp_sp == sum(r[2]["tp_slice_bytes"] for r in results)
