"""Two-stage MM-SP sharding (multimodal/) on gloo against one process: the loss and EVERY gradient.

Every rank builds the one-process model (groups=None) and the sharded one from the same seeds, and the
same global sample (text ids with one placeholder per frame, frames, labels). The sp ranks' losses add
up to the one-process loss; every gradient (vision tower, projector, text embedding, language model),
summed over sp as the trainer does, equals the one-process gradient (tp-sharded language-model weights
compared slice by slice). float64 to 1e-10 with the small `PatchViT`; float32 to 1e-5 (loss) / 1e-4
(gradients, relative to the tensor's largest entry) with transformers' SiglipVisionModel. The
one-process model itself is checked against plain dense math written out here. Bad samples raise a
ValueError on every rank, with no hang.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.attention.sharding import shard_positions
from longvila_engine.models import Transformer, get_config
from longvila_engine.models.transformer import rope_cos_sin
from longvila_engine.multimodal import (
    MLPProjector,
    PatchViT,
    VisionLanguageModel,
    plan_multimodal_shards,
    sp_order,
    split_frames,
)
from longvila_engine.ops import zigzag_permute

TINY = get_config("tiny")
IMG = 255  # placeholder id; text ids are drawn below 200
F64 = {"rtol": 1e-10, "atol": 1e-10}
LAYOUTS = {
    "sp1": ParallelLayout(dp=4),  # every rank is a one-rank sp group
    "ring2": ParallelLayout(ring=2, dp=2),
    "ulysses2": ParallelLayout(ulysses=2, dp=2),
    "ring4": ParallelLayout(ring=4),
    "ring2_ulysses2": ParallelLayout(ring=2, ulysses=2),
    "ulysses4": ParallelLayout(ulysses=4),  # 2 kv heads: replicated over Ulysses
    "ring2_tp2": ParallelLayout(ring=2, tp=2),
}
# Text runs (ints) and frames ("v" per frame): 7 frames, text before, between and after them.
SEVEN = [3, "vv", 2, "v", 4, "vvv", 1, "v", 2]


# --- models and samples ----------------------------------------------------------------------------------
class _CountingViT(PatchViT):
    """PatchViT that remembers how many frames each call saw, and refuses frames marked with 1e4."""

    def forward(self, frames):
        self.seen = getattr(self, "seen", []) + [frames.shape[0]]
        if frames.numel() and frames.abs().max() > 1e3:
            raise RuntimeError("frame marked bad")
        return super().forward(frames)


def _siglip(dtype):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=8, patch_size=4, num_channels=3, vision_use_head=False,
                                attn_implementation="eager")
    return SiglipVisionModel(config).to(dtype)


def _llama(groups, dtype):
    """A tiny random transformers Llama; sequence-parallel when groups are given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longvila_engine.integrations import enable_sequence_parallel

    config = LlamaConfig(hidden_size=TINY.hidden_size, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=TINY.vocab_size,
                         max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).to(dtype)
    return model if groups is None else enable_sequence_parallel(model, groups, backend="reference")


def _build(groups, dtype=torch.float64, tower="vit", pool=1, lm="engine", split="balanced", **lm_kw):
    torch.manual_seed(11)
    vit = _siglip(dtype) if tower == "siglip" else _CountingViT(8, 4, 3, 16, num_heads=2, dtype=dtype)
    projector = MLPProjector(16, TINY.hidden_size, pool=pool, dtype=dtype)
    if lm == "hf":
        language_model = _llama(groups, dtype)
    else:
        language_model = Transformer(TINY, groups, seed=3, attention_backend="reference", dtype=dtype, **lm_kw)
    tokens = (4 if pool == 1 else 1) if split == "by_position" else None
    return VisionLanguageModel(vit, projector, language_model, groups, image_token_id=IMG, frame_split=split,
                               tokens_per_frame=tokens)


def _sample(seed, pieces, rows=1, dtype=torch.float64, supervise_first=None):
    """ids (S,) or (rows, S), frames (N, 3, 8, 8) and labels from a list of text runs and 'v' frames."""
    gen = torch.Generator().manual_seed(seed)
    row_ids = []
    for _ in range(rows):
        parts = [torch.full((len(p),), IMG) if isinstance(p, str) else torch.randint(0, 200, (p,), generator=gen)
                 for p in pieces]
        row_ids.append(torch.cat(parts))
    ids = torch.stack(row_ids) if rows > 1 else row_ids[0]
    n = int((ids == IMG).sum())
    frames = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64).to(dtype) if n else None
    labels = ids.clone()
    labels[..., 1] = -100  # a few unsupervised text positions
    if supervise_first is not None:
        labels[..., supervise_first:] = -100
    return ids, frames, labels


def _grads(model):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _slice(full, param, groups):
    dim = getattr(param, "tp_dim", None)
    if dim is None or groups.tp_size == 1:
        return full
    n = param.shape[dim]
    return full.narrow(dim, groups.tp_rank * n, n)


def _close(got, want, dtype, what):
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, **F64, msg=lambda m: f"{what}: {m}")
    else:
        # Relative to the tensor's largest entry; the 1e-7 floor covers gradients that are zero in exact
        # arithmetic (SigLIP's key bias: softmax ignores it) and come out as float32 rounding noise.
        scale = float(want.abs().max())
        err = float((got - want).abs().max())
        assert err <= 1e-4 * scale + 1e-7, f"{what}: max error {err:.3g} > 1e-4 * {scale:.3g} + 1e-7"


def _compare(layout, pieces, rows=1, dtype=torch.float64, tower="vit", pool=1, cu=None, supervise_first=None,
             lm="engine", split="balanced", **lm_kw):
    """Loss and every gradient of the sharded model against the one-process model, on this rank."""
    groups = groups_for(layout)
    ids, frames, labels = _sample(5, pieces, rows, dtype, supervise_first)
    cu = None if cu is None else torch.tensor(cu)
    dense = _build(None, dtype, tower, pool, lm)
    want = dense(ids, frames, labels, cu)
    want.backward()
    model = _build(groups, dtype, tower, pool, lm, split, **lm_kw)
    loss = model(ids, frames, labels, cu)
    loss.backward()
    assert torch.isfinite(loss)
    total = loss.detach().reshape(1).clone()
    dist.all_reduce(total, group=groups.sp)
    if dtype == torch.float64:
        torch.testing.assert_close(total[0], want.detach(), **F64)
    else:
        torch.testing.assert_close(total[0], want.detach(), rtol=1e-5, atol=1e-5)
    want_grads = _grads(dense)
    params = dict(model.named_parameters())
    for name, g in _grads(model).items():
        g = g.clone()
        dist.all_reduce(g, group=groups.sp)  # the trainer sums gradients over sp
        _close(g, _slice(want_grads[name], params[name], groups), dtype, name)
    # Stage 1 ran on this rank's frames only; the local shard is 1/sp of the padded expanded sequence.
    n_frames = 0 if frames is None else frames.shape[0]
    P = model.projector(model.vision_tower(frames[:1])).shape[1] if tower == "vit" and n_frames else 4
    plan = plan_multimodal_shards(ids.reshape(-1), labels.reshape(-1), image_token_id=IMG, num_frames=n_frames,
                                  tokens_per_frame=P, sp_index=groups.sp_rank, ring_size=groups.ring_size,
                                  ulysses_size=groups.ulysses_size, frame_split=split,
                                  cu_seqlens=cu if rows == 1 else torch.arange(rows + 1) * ids.shape[-1])
    assert torch.equal(plan.shard, shard_positions(plan.seq_len_padded, groups))
    seen = getattr(model.vision_tower, "seen", None)
    return {"seen": seen, "supervised": int((plan.labels != -100).sum()), "loss": float(loss.detach()),
            "text_here": plan.text_ids.numel(), "local_len": plan.shard.numel(), "padded": plan.seq_len_padded}


# --- one process: the reference itself is plain dense math ------------------------------------------------
def _plain_dense_loss(model, ids, frames, labels):
    """The expanded sequence built token by token, the Transformer's layers, dense cross-entropy."""
    lm = model.language_model
    feats = model.projector(model.vision_tower(frames))
    rows, targets, f = [], [], 0
    for i, t in enumerate(ids.tolist()):
        if t == IMG:
            rows.extend(feats[f])
            targets.extend([-100] * feats.shape[1])
            f += 1
        else:
            rows.append(lm.embed.weight[t])
            targets.append(int(labels[i]))
    h = torch.stack(rows).unsqueeze(0)
    shifted = torch.tensor(targets[1:] + [-100])
    cos, sin = rope_cos_sin(torch.arange(h.shape[1]).unsqueeze(0), TINY.head_dim, TINY.rope_theta, torch.float64)
    for layer in lm.layers:
        h = layer(h, cos, sin)
    logits = lm.lm_head(lm.norm(h))[0]
    return F.cross_entropy(logits, shifted, ignore_index=-100)


def test_one_process_model_is_plain_dense_math():
    ids, frames, labels = _sample(5, SEVEN)
    model = _build(None)
    loss = model(ids, frames, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want = _plain_dense_loss(model, ids, frames, labels)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    torch.testing.assert_close(loss, want, **F64)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(g, w, **F64, msg=lambda m, n=name: f"{n}: {m}")


# --- the integer plan, without processes -------------------------------------------------------------------
def test_split_frames_gives_the_remainder_to_the_lowest_ranks():
    assert split_frames(7, 4) == [2, 2, 2, 1]
    assert split_frames(3, 4) == [1, 1, 1, 0]
    assert split_frames(0, 2) == [0, 0]
    assert split_frames(8, 1) == [8]


@pytest.mark.parametrize("split", ["balanced", "by_position"])
@pytest.mark.parametrize("ring,ulysses", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 3)])
def test_plan_is_a_consistent_exchange(ring, ulysses, split):
    ids, _, labels = _sample(3, SEVEN)
    sp, P = ring * ulysses, 5
    plans = [plan_multimodal_shards(ids, labels, image_token_id=IMG, num_frames=7, tokens_per_frame=P, sp_index=i,
                                    ring_size=ring, ulysses_size=ulysses, frame_split=split) for i in range(sp)]
    frames = torch.cat([p.frame_index for p in plans])
    assert sorted(frames.tolist()) == list(range(7))  # every frame encoded exactly once
    if split == "balanced":
        assert torch.equal(frames, torch.arange(7)) and list(plans[0].frame_counts) == split_frames(7, sp)
    L = int((ids != IMG).sum()) + 7 * P
    order = sp_order(plans[0].seq_len_padded, ring, ulysses)
    assert torch.equal(order, zigzag_permute(torch.arange(plans[0].seq_len_padded).double().unsqueeze(0), ring,
                                             backend="reference")[0].long())
    assert torch.equal(torch.cat([p.shard for p in plans]), order)
    for i, p in enumerate(plans):
        assert p.seq_len == L and p.frame_counts == plans[0].frame_counts and p.frame_counts[i] == len(p.frame_index)
        assert sum(p.send_counts) == p.send_index.numel() == p.frame_index.numel() * P
        for j, q in enumerate(plans):
            assert p.send_counts[j] == q.recv_counts[i]  # the all-to-all-v counts match pairwise
        n_rows = p.text_ids.numel() + sum(p.recv_counts)
        real = p.shard < L
        assert sorted(p.assemble_index[real].tolist()) == list(range(n_rows))  # every row used once
        assert bool((p.assemble_index[~real] == n_rows).all())  # pads read the zero row
    assert sum(p.text_ids.numel() for p in plans) == int((ids != IMG).sum())  # each text token embedded once
    assert sum(int((p.labels != -100).sum()) for p in plans) == int((labels[1:] != -100).sum() - (ids[1:] == IMG).sum())


def test_plan_rejects_a_bad_sample():
    ids, _, _ = _sample(3, SEVEN)
    with pytest.raises(ValueError, match="placeholder"):
        plan_multimodal_shards(ids, image_token_id=IMG, num_frames=6, tokens_per_frame=4)
    with pytest.raises(ValueError, match="empty"):
        plan_multimodal_shards(ids[:0], image_token_id=IMG, num_frames=0, tokens_per_frame=4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        plan_multimodal_shards(ids, image_token_id=IMG, num_frames=7, tokens_per_frame=4,
                               cu_seqlens=torch.tensor([0, 5]))


def test_projector_pooling_merges_2x2_patches():
    proj = MLPProjector(4, 8, pool=2, dtype=torch.float64)
    assert proj(torch.randn(3, 16, 4, dtype=torch.float64)).shape == (3, 4, 8)
    assert proj(torch.randn(3, 9, 4, dtype=torch.float64)).shape == (3, 4, 8)  # 3x3 grid padded to 4x4
    with pytest.raises(ValueError, match="square"):
        proj(torch.randn(3, 8, 4, dtype=torch.float64))


def test_constructor_and_tokens_per_frame_checks():
    torch.manual_seed(0)
    vit, proj = PatchViT(8, 4, 3, 16, dtype=torch.float64), MLPProjector(16, TINY.hidden_size, dtype=torch.float64)
    lm = Transformer(TINY, None, attention_backend="reference", dtype=torch.float64)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        VisionLanguageModel(vit, proj, lm, None, image_token_id=IMG, frame_split="by_position")
    with pytest.raises(ValueError, match="frame_split"):
        VisionLanguageModel(vit, proj, lm, None, image_token_id=IMG, frame_split="random")
    with pytest.raises(ValueError, match="ParallelGroups"):
        VisionLanguageModel(vit, proj, lm, object(), image_token_id=IMG)
    with pytest.raises(ValueError, match="language_model"):
        VisionLanguageModel(vit, proj, torch.nn.Linear(2, 2), None, image_token_id=IMG)
    model = VisionLanguageModel(vit, proj, lm, None, image_token_id=IMG, frame_split="by_position", tokens_per_frame=3)
    ids, frames, labels = _sample(5, SEVEN)
    with pytest.raises(ValueError, match="tokens_per_frame=3"):  # the projector makes 4
        model(ids, frames, labels)


# --- sharded against one process -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sp1", "ring2", "ulysses2", "ring2_ulysses2", "ulysses4"])
def test_seven_frames_match_one_process(pool, name):
    results = pool.run(_compare, LAYOUTS[name], SEVEN)
    sp = LAYOUTS[name].sp_size
    seen = [r["seen"][0] for r in results[:sp]]  # the first sp ranks form one sp group
    assert seen == split_frames(7, sp)
    assert all(r["local_len"] == r["padded"] // sp for r in results)


def test_fewer_frames_than_ranks(pool):
    results = pool.run(_compare, LAYOUTS["ring4"], [2, "v", 6, "vv", 3])
    assert [r["seen"][0] for r in results] == [1, 1, 1, 0]  # rank 3 runs the tower on an empty batch


def test_text_only_sample(pool):
    results = pool.run(_compare, LAYOUTS["ring2_ulysses2"], [23])
    assert all(r["seen"] is None for r in results)  # no frame: no tower call at all


def test_video_only_sample_has_no_target(pool):
    results = pool.run(_compare, LAYOUTS["ring4"], ["vvvvv"])
    assert all(r["loss"] == 0.0 and r["supervised"] == 0 for r in results)


def test_rank_without_supervised_token(pool):
    results = pool.run(_compare, LAYOUTS["ring4"], SEVEN, supervise_first=4)
    assert any(r["supervised"] == 0 for r in results), results
    assert all(r["loss"] == 0.0 for r in results if r["supervised"] == 0)


def test_packed_rows_keep_their_boundaries(pool):
    pool.run(_compare, LAYOUTS["ring2_ulysses2"], [2, "v", 3, "vv", 1], rows=3)


def test_packed_cu_seqlens(pool):
    pool.run(_compare, LAYOUTS["ring4"], SEVEN, cu=[0, 4, 9, 19])


def test_pooled_projector(pool):
    pool.run(_compare, LAYOUTS["ring2_ulysses2"], SEVEN, pool=2)


def test_frames_split_by_position_baseline(pool):
    results = pool.run(_compare, LAYOUTS["ring2_ulysses2"], SEVEN, split="by_position")
    assert sum(r["seen"][0] for r in results) == 7


def test_tensor_parallel_language_model(pool):
    pool.run(_compare, LAYOUTS["ring2_tp2"], SEVEN)
    pool.run(_compare, LAYOUTS["ring2_tp2"], SEVEN, tp_sequence_parallel=True)


def test_siglip_vision_tower_float32(pool):
    # 3 frames on 4 ranks: SigLIP refuses an empty batch, so rank 3 takes P from its peers.
    pool.run(_compare, LAYOUTS["ring2_ulysses2"], [2, "v", 5, "vv", 3], dtype=torch.float32, tower="siglip")
    pool.run(_compare, LAYOUTS["ring2_ulysses2"], SEVEN, dtype=torch.float32, tower="siglip")


def test_transformers_language_model(pool):
    pool.run(_compare, LAYOUTS["ring2_ulysses2"], SEVEN, dtype=torch.float32, lm="hf")


# --- bad input: the same ValueError on every rank, no hang ------------------------------------------------
def _bad_case(layout, case):
    groups = groups_for(layout)
    ids, frames, labels = _sample(5, SEVEN)
    model = _build(groups)
    if case == "too_few_frames":
        frames = frames[:6]
    elif case == "mismatched_frames":
        frames = list(frames)
        frames[4] = torch.randn(3, 8, 6, dtype=torch.float64)
    elif case == "empty":
        ids, frames, labels = ids[:0], None, None
    elif case == "tower_fails_on_one_rank":
        frames[5] = 1e4  # frame 5 lives on sp rank 2
    try:
        model(ids, frames, labels)
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("case,match", [("too_few_frames", "placeholder"), ("mismatched_frames", "mismatched"),
                                        ("empty", "empty"), ("tower_fails_on_one_rank", "failed")])
def test_bad_sample_raises_on_every_rank(pool, case, match):
    messages = pool.run(_bad_case, LAYOUTS["ring2_ulysses2"], case)
    assert all(m is not None and match in m for m in messages), messages
    pool.run(_compare, LAYOUTS["ring2_ulysses2"], [3, "v", 2])  # the pool still works: nobody hung
