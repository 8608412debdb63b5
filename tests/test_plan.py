"""Plan once per batch: one training step's collectives and host syncs, counted on 4 gloo ranks.

`local_batch` plans the batch (one agreement all-gather over sp, the one host copy of cu_seqlens);
forward and backward then run on the plan. For a 2-layer and a 4-layer model on ring 2 x ulysses 2 the
test wraps every torch.distributed collective and every host-sync Tensor method and checks:
- inside the step: no all-gather, no agreement ('check' counter), no host sync;
- the 4-layer step minus the 2-layer step is exactly two layers' ring P2P and Ulysses all-to-alls;
- planning makes exactly one agreement, whatever the depth.
Also the layout arithmetic of `parallel/zigzag.py` against the shard positions, the single-process
`ParallelGroups`, the device binding of `init_parallel` under NCCL, and a step under FakeTensorMode.
"""
import traceback
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.models import ModelConfig, Transformer, local_batch

POOL_WORLD_SIZE = 4
LAYOUT = ParallelLayout(ring=2, ulysses=2)
# Collectives the engine may call; P2P ring steps go through batch_isend_irecv.
COLLECTIVES = ("all_gather", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
               "reduce_scatter_tensor", "all_reduce", "all_to_all_single", "broadcast", "batch_isend_irecv",
               "barrier")
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def _config(num_layers):
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                       head_dim=8, ffn_hidden_size=64)


class _Counting:
    """Counts calls of torch.distributed collectives and host-sync Tensor methods while active."""

    def __init__(self):
        self.calls = Counter()
        self.sync_sites = Counter()  # engine file of each host sync
        self._saved = []

    def __enter__(self):
        def wrap(owner, name, key):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                self.calls[key] += 1
                if key.startswith("sync:"):
                    frames = [f.filename for f in traceback.extract_stack() if "longvila_engine" in f.filename]
                    self.sync_sites[frames[-1].split("longvila_engine")[-1] if frames else "outside"] += 1
                return original(*args, **kwargs)
            self._saved.append((owner, name, original))
            setattr(owner, name, counted)

        for name in COLLECTIVES:
            if hasattr(dist, name):
                wrap(dist, name, name)
        for name in HOST_SYNCS:
            wrap(torch.Tensor, name, "sync:" + name)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


def _count_step(num_layers, packed):
    """(collectives of planning, collectives and syncs of forward+backward, stats calls in the step)."""
    groups = groups_for(LAYOUT)
    torch.manual_seed(0)
    model = Transformer(_config(num_layers), groups, attention_backend="auto")
    ids = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 17, 40, 60], dtype=torch.int32) if packed else None
    groups.stats.reset()
    with _Counting() as planning:
        batch = local_batch(ids, groups, cu_seqlens=cu)
    plan_checks = groups.stats.calls["check"]
    groups.stats.reset()
    with _Counting() as step:
        loss = model(batch.input_ids, batch.positions, batch.labels, batch.cu_seqlens, plan=batch.plan)
        loss.backward()
    return dict(planning.calls), dict(step.calls), dict(groups.stats.calls), plan_checks, dict(step.sync_sites)


@pytest.mark.parametrize("packed", [False, True])
def test_step_traffic_is_per_layer_ring_and_ulysses_only(pool, packed):
    two = pool.run(_count_step, 2, packed)
    four = pool.run(_count_step, 4, packed)
    # One layer on ring 2 x ulysses 2: forward 3 all-to-alls (q, k+v, out) and R-1 = 1 K/V shift;
    # backward 3 all-to-alls, R-1 = 1 K/V shift and R = 2 dK/dV shifts.
    per_layer = Counter({"all_to_all_single": 6, "batch_isend_irecv": 4})
    for rank, ((plan2, step2, stats2, checks2, _), (plan4, step4, stats4, checks4, sites)) in enumerate(zip(two, four)):
        assert checks2 == checks4 == 1, (rank, checks2, checks4)  # planning: one agreement
        assert plan2.get("all_gather", 0) == plan4.get("all_gather", 0) == 1, (plan2, plan4)
        if packed:  # the counter sees host syncs: planning copies cu_seqlens to the host
            assert plan4.get("sync:tolist", 0) >= 1, plan4
        collectives2 = Counter({k: v for k, v in step2.items() if not k.startswith("sync:")})
        collectives4 = Counter({k: v for k, v in step4.items() if not k.startswith("sync:")})
        assert collectives4 - collectives2 == per_layer + per_layer, (rank, collectives2, collectives4)
        assert collectives2 - collectives4 == Counter(), (rank, collectives2, collectives4)
        for name in ("all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast", "barrier"):
            assert collectives2.get(name, 0) == collectives4.get(name, 0) == 0, (rank, name, collectives4)
        # The loss's count all-reduce over sp, once per step whatever the depth.
        assert collectives2["all_reduce"] == collectives4["all_reduce"] == 1, (rank, collectives4)
        assert "check" not in stats2 and "check" not in stats4, (rank, stats4)
        assert stats4["ring"] - stats2["ring"] == 2 * 4 * 2, (rank, stats2, stats4)  # 2 tensors per shift
        assert stats4["ulysses"] - stats2["ulysses"] == 2 * 6, (rank, stats2, stats4)
        syncs = {k: v for k, v in step4.items() if k.startswith("sync:")}
        if packed:  # only the CPU kernels' own check of cu_seqlens values (skipped for GPU tensors)
            assert set(sites) == {"/ops/_validate.py"}, (rank, sites)
        else:
            assert syncs == {}, (rank, syncs, sites)


def _mismatched_batch_case():
    groups = groups_for(LAYOUT)
    length = 60 if dist.get_rank() != 3 else 64
    ids = torch.zeros(1, length, dtype=torch.long)
    try:
        local_batch(ids, groups)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_batches_fail_at_planning_on_every_rank(pool):
    messages = pool.run(_mismatched_batch_case)
    assert all(m is not None and "seq_len" in m and "disagree" in m for m in messages), messages


# --- pure layout arithmetic, single-process groups, device binding, fake tensors ---------------------------


@pytest.mark.parametrize("R,U", [(1, 1), (2, 1), (1, 3), (2, 2), (3, 2), (4, 2)])
@pytest.mark.parametrize("scheme", ["zigzag", "contiguous"])
def test_zigzag_runs_partition_and_match_ring_chunks(R, U, scheme):
    from longvila_engine.parallel import zigzag

    L = zigzag.padded_len(37, R, U, scheme)
    order = zigzag.sp_order(L, R, U, scheme)
    assert sorted(order.tolist()) == list(range(L))  # every position held exactly once
    n = L // (R * U)
    for r in range(R):
        # A ring rank's U shards, concatenated, are its ring chunks (what the attention plans).
        ring_seq = order[r * U * n:(r + 1) * U * n]
        want = zigzag.positions(zigzag.ring_chunks(r, R, U * n, scheme))
        assert torch.equal(ring_seq, want), (r, ring_seq, want)
    if scheme == "zigzag":
        chunks = torch.arange(L).view(2 * R, -1)
        assert torch.equal(order, chunks[zigzag.chunk_order(R)].reshape(-1))


def test_single_process_groups_and_none():
    from longvila_engine.parallel.groups import ParallelGroups, as_groups

    single = ParallelGroups.single()
    assert as_groups(None) is single and ParallelGroups.single("cpu") is single
    assert (single.ring_size, single.ulysses_size, single.sp_size, single.tp_size, single.dp_sp_size) == (1,) * 5
    assert single.ring is None and single.sp_rank == 0 and single.sp_ranks == [0]
    assert "ring_rank" in dir(ParallelGroups)  # explicit, visible attributes
    with pytest.raises(AttributeError):
        single.ring_size = 2
    model = Transformer(_config(1), None, attention_backend="reference", dtype=torch.float64)
    assert model.groups is single


def test_init_parallel_binds_local_rank_under_nccl(monkeypatch):
    from longvila_engine.parallel import groups as groups_mod

    current = {"device": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(device=d))
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert groups_mod._bind_cuda_device() == torch.device("cuda", 3) and current["device"] == 3
    current["device"] = 5  # the user chose another device: refuse, naming both and the fix
    with pytest.raises(ValueError, match=r"cuda:5 but LOCAL_RANK=3.*set_device\(3\)"):
        groups_mod._bind_cuda_device()
    monkeypatch.delenv("LOCAL_RANK")
    assert groups_mod._bind_cuda_device() == torch.device("cuda", 5)


def test_planned_step_runs_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = Transformer(_config(2), None, attention_backend="reference", dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(2))
    batch = local_batch(ids, None)  # planned outside: the step needs no data
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_ids = mode.from_tensor(batch.input_ids)
        loss = model(fake_ids, mode.from_tensor(batch.positions), mode.from_tensor(batch.labels), plan=batch.plan)
        loss.backward()
    assert loss.shape == () and type(loss).__name__ == "FakeTensor"


def _hf_step_checks(num_layers, keep_plan):
    """Agreement calls inside one HF forward+backward on shard_batch's batch (with or without its plan)."""
    import transformers

    from longvila_engine.integrations import enable_sequence_parallel, sequence_parallel_loss, shard_batch

    groups = groups_for(LAYOUT)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=64, attn_implementation="eager")
    model = enable_sequence_parallel(transformers.LlamaForCausalLM(config).float(), groups, backend="reference")
    ids = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(3))
    batch = shard_batch({"input_ids": ids, "labels": ids}, groups)
    labels = batch.pop("shift_labels")
    if not keep_plan:
        batch.pop("sp_plan")
    groups.stats.reset()
    sequence_parallel_loss(model(**batch), labels, groups).backward()
    return groups.stats.calls.get("check", 0)


def test_hf_step_reads_the_plan_of_shard_batch(pool):
    assert pool.run(_hf_step_checks, 2, True) == [0] * POOL_WORLD_SIZE
    # Without the plan every layer agrees again (the fallback the plan removes).
    assert pool.run(_hf_step_checks, 2, False) == [2] * POOL_WORLD_SIZE


def _vlm_step_checks():
    from test_multimodal import LAYOUTS, SEVEN, _build, _sample

    groups = groups_for(LAYOUTS["ring2_ulysses2"])
    model = _build(groups)
    ids, frames, labels = _sample(5, SEVEN)
    groups.stats.reset()
    model(ids, frames, labels).backward()
    return groups.stats.calls.get("check", 0)


def test_vlm_step_agrees_once_in_embed_shard(pool):
    # embed_shard's one agreement (sample fingerprint, tokens per frame) also plans the language model.
    assert pool.run(_vlm_step_checks) == [1] * POOL_WORLD_SIZE
