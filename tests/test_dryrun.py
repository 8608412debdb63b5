"""The scale dry run (longvila_engine/dryrun/): the trainer's step as one rank of a fake world.

- tiny model at world 8 and 64 (what `make test` runs): the step completes without data, every
  attention call goes to one backend, attention FLOPs equal the ops.flops rule exactly, the sharded
  parameter and optimizer bytes equal FSDP2's shard sizes computed from the shapes, the engine's
  counters carry the ring / Ulysses bytes of every layer;
- accuracy against a REAL run of the same step on 4 gloo ranks (ring 2 x ulysses 2, FSDP2, fp32):
  the fake peak (above the memory held before the step) within 10% of the real run's allocator peak
  (profiler memory events), every tracker category of the fake run equal to the real run's, FLOPs
  identical (same counter, same formulas, same code);
- depth extrapolation (1 and 2 layers -> the preset's depth) against a full-depth fake run;
- bad input raises ValueError naming the argument.
"""
import os
import sys

import pytest
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.dryrun import DryRunConfig, dry_run, dry_run_extrapolated, parse_tokens

POOL_WORLD_SIZE = 4
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _param_shapes(cfg):
    """Parameter shapes of the dense single-process model (what every dp_sp rank shards at tp=1)."""
    from longvila_engine.dryrun import model_config
    from longvila_engine.models import Transformer

    return [tuple(p.shape) for p in Transformer(model_config(cfg), None).parameters()]


def _fsdp_shard_bytes(shapes, world):
    """Bytes of rank 0's FSDP2 shards: dim 0 cut in chunks of ceil(d0 / world), float32."""
    total = 0
    for shape in shapes:
        rest = 1
        for d in shape[1:]:
            rest *= d
        total += min(-(-shape[0] // world), shape[0]) * rest * 4
    return total


@pytest.mark.parametrize("world", [8, 64])
def test_tiny_dry_run_world(world):
    ring, ulysses = world // 2, 2
    cfg = DryRunConfig(model="tiny", seq_len=8 * world * 8, world=world, ring=ring, ulysses=ulysses,
                       gpus_per_node=8, precision="cpu")
    r = dry_run(cfg)
    mem = r["memory"]
    assert r["fsdp"] and r["fits"]
    assert r["tokens_local"] == cfg.seq_len // world
    # The step ran on shapes alone: host syncs only in the trainer's own optimizer step / logging.
    assert all(s.startswith("longvila_engine/train.py") for s in r["host_syncs"]), r["host_syncs"]
    assert r["agreement_calls_answered_locally"] == 0
    # One backend for every attention call, forward and backward (tiny: 2 layers).
    assert set(r["attention"]) == {"cpu: longvila_engine::attn_fwd", "cpu: longvila_engine::attn_bwd"}
    # Counted attention FLOPs follow the ops.flops rule exactly (zigzag: S(S+1)/(2R) pairs per rank).
    assert r["flops"]["attention_counted"] == r["flops"]["attention_rule"] > 0
    assert r["flops"]["inexact_attention_calls"] == 0
    # FSDP2 shards: params exactly rank 0's chunks; AdamW state = 2 x those + one step scalar each.
    shapes = _param_shapes(cfg)
    shard = _fsdp_shard_bytes(shapes, world)
    assert mem["params"] == shard
    assert mem["optimizer"] == 2 * shard + 4 * len(shapes)
    assert mem["activations"] > 0 and mem["temporaries"] >= 0
    # Ring and Ulysses traffic of both layers was counted by the engine's own counters.
    stats = r["bytes"]["groups_stats"]
    assert stats["ring"] > 0 and stats["ulysses"] > 0


def _real_step(cfg_kwargs):
    """On every gloo rank: the dry run's own build / plan / step functions on real tensors, measured by
    the profiler (allocator peak above the start), FSDPMemTracker and FlopCounterMode."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.utils.flop_counter import FlopCounterMode

    from longvila_engine.dryrun import _regroup, attention_flop_formulas, build_state, plan_batch, run_step

    sys.path.insert(0, BENCH)
    import harness

    cfg = DryRunConfig(**cfg_kwargs)
    groups = groups_for(ParallelLayout(ring=cfg.ring, ulysses=cfg.ulysses, gpus_per_node=cfg.gpus_per_node))
    torch.manual_seed(0)
    model, optimizer = build_state(cfg, groups)
    batch = plan_batch(cfg, groups)
    memory, _ = harness.measure_memory(lambda: run_step(model, optimizer, batch, groups))
    tracker = FSDPMemTracker(model, optimizer)
    with tracker:
        start = _regroup(next(iter(tracker.get_tracker_snapshot("current").values())))["total"]
        run_step(model, optimizer, batch, groups)
    peak = _regroup(next(iter(tracker.get_tracker_snapshot("peak").values())))
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
    with counter:
        run_step(model, optimizer, batch, groups)
    return {"profiler_peak": memory["peak_alloc_mb"] * 2**20, "tracker_peak": peak, "tracker_start": start,
            "flops": counter.get_total_flops()}


def test_dry_run_matches_real_gloo_run(pool):
    kwargs = dict(model="tiny", seq_len=4096, world=4, ring=2, ulysses=2, gpus_per_node=4, precision="cpu",
                  attention_backend="cpu")
    real = pool.run(_real_step, kwargs)[0]
    fake = dry_run(DryRunConfig(**kwargs))
    fake_delta = fake["memory"]["total"] - fake["memory_at_start"]
    # Same tracker on real and fake tensors: the same storages, byte for byte, in every category.
    for key in ("params", "grads", "optimizer", "activations", "temporaries", "total"):
        assert fake["memory"][key] == real["tracker_peak"][key], key
    # Against the allocator itself (profiler memory events, an independent measurement): within 10%.
    # The allocator also sees what no tensor holds (gloo staging, Python-side temporaries).
    print(f"fake peak above start {fake_delta} B, real allocator peak {real['profiler_peak']:.0f} B")
    assert abs(fake_delta / real["profiler_peak"] - 1) < 0.10, (fake_delta, real["profiler_peak"])
    # FLOPs: same counter, same formulas, same ops -> identical.
    assert fake["flops"]["total"] == real["flops"]


def test_depth_extrapolation_matches_full_depth():
    cfg = DryRunConfig(model="tiny", seq_len=4096, world=8, ring=4, ulysses=2, precision="cpu")
    full_depth = 6
    import longvila_engine.models.config as config_module

    preset = config_module.PRESETS["tiny"]
    config_module.PRESETS["tiny"] = preset.replace(num_layers=full_depth)
    try:
        full = dry_run(cfg)
        extrapolated = dry_run_extrapolated(cfg, depths=(2, 3))
    finally:
        config_module.PRESETS["tiny"] = preset
    assert extrapolated.get("extrapolated_from_layers") == [2, 3], extrapolated.get("extrapolation_refused")
    assert full["config"]["num_layers"] == extrapolated["config"]["num_layers"] == full_depth
    # Per-layer state and activations are identical in every layer: linear in depth to within FSDP's
    # padding of uneven shards (a few hundred bytes of a tiny model) -> 1%.
    for key in ("params", "optimizer", "activations", "total"):
        assert extrapolated["memory"][key] == pytest.approx(full["memory"][key], rel=0.01), key
    assert extrapolated["flops"]["total"] == full["flops"]["total"]


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="world=12 is not a multiple"):
        DryRunConfig(model="tiny", world=12, ring=4, ulysses=2)
    with pytest.raises(ValueError, match="model='gpt5'"):
        DryRunConfig(model="gpt5")
    with pytest.raises(ValueError, match="seq_len='2Q'"):
        parse_tokens("2Q")
    assert parse_tokens("2M") == 2 * 2**20 and parse_tokens("256K") == 262144 and parse_tokens("4096") == 4096


def test_cuda_style_rms_norm_matches_torch():
    """The dry run's RMSNorm (precision='gpu': keeps the input and a float32 rstd, as CUDA's fused kernel
    does) computes what F.rms_norm computes, forward and backward (float64: 1e-12)."""
    import torch
    import torch.nn.functional as F

    from longvila_engine.dryrun import _rms_norm_saving_input

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, generator=gen, requires_grad=True)
    dy = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen)
    ours = _rms_norm_saving_input(x, (16,), w, 1e-6)
    gx, gw = torch.autograd.grad(ours, (x, w), dy)
    ref = F.rms_norm(x, (16,), w, 1e-6)
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-12)


def test_activation_checkpointing_recomputes_forward_traffic_and_flops():
    """With per-block checkpointing the forward runs twice: its attention FLOPs (the ops.flops rule with
    the recompute) and its ring / Ulysses bytes (the cost model with activation_checkpointing=True) are
    counted again, exactly; the activations kept are smaller than without checkpointing."""
    from longvila_engine.dryrun import cost_model_view

    base = dict(model="tiny", seq_len=4096, world=8, ring=4, ulysses=2)
    plain = dry_run(DryRunConfig(**base))
    ckpt = dry_run(DryRunConfig(**base, activation_checkpointing=True))
    assert ckpt["flops"]["attention_counted"] == ckpt["flops"]["attention_rule"]
    assert ckpt["flops"]["attention_counted"] > plain["flops"]["attention_counted"]
    predicted = cost_model_view(ckpt)["bytes"]
    for axis in ("ring", "ulysses"):
        assert ckpt["bytes"]["groups_stats"][axis] == predicted[axis], axis
    assert ckpt["memory"]["activations"] < plain["memory"]["activations"]


@pytest.mark.parametrize("op", ["attn_fwd", "triton_attn_fwd", "attn_bwd", "triton_attn_bwd"])
def test_attention_flop_formulas_follow_ops_flops(op):
    """FlopCounterMode counts the engine's attention ops (C++ and Triton, run on fake tensors through their
    registered fakes) by the ops.flops rule, causal and not, with GQA."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from longvila_engine.dryrun import attention_flop_formulas
    from longvila_engine.ops.flops import attention_flops

    formulas = attention_flop_formulas()
    packet = getattr(torch.ops.longvila_engine, op, None)
    if packet is None or packet not in formulas:
        pytest.skip(f"torch.ops.longvila_engine.{op} is not registered in this build")
    B, S_q, S_k, H, H_kv, D = 2, 48, 80, 4, 2, 16
    for causal in (True, False):
        with FakeTensorMode():
            q, out = torch.empty(B, S_q, H, D), torch.empty(B, S_q, H, D)
            k, v = torch.empty(B, S_k, H_kv, D), torch.empty(B, S_k, H_kv, D)
            lse = torch.empty(B, H, S_q)
            counter = FlopCounterMode(display=False, custom_mapping=formulas)
            with counter:
                if "bwd" in op:
                    packet(out, q, k, v, out, lse, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                           None, None, 0.25, causal, False)
                else:
                    packet(q, k, v, out, lse, None, None, 0.25, causal, False)
        mode = "bwd" if "bwd" in op else "fwd"
        assert counter.get_total_flops() == attention_flops(S_q, S_k, H, D, causal=causal, batch=B, mode=mode)
