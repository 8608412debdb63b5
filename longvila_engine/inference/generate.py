"""Sequence-parallel greedy generation for `VisionLanguageModel` (DESIGN.md section 8).

Prefill is the training forward without a loss: the two-stage MM-SP sharding (frames split over the sp
group, visual tokens moved by one all-to-all-v, zigzag token layout) and sequence-parallel attention.
Each rank keeps the K/V it computed there (after RoPE, padding dropped): the KV cache stays where it
was made and never moves. The logits of the last prompt token come from the rank holding it and are
broadcast over sp.

A decode step, on every rank of the sp group:

| step | what | collective |
|---|---|---|
| embed | the new token (the same on every rank: it was broadcast) | none |
| per layer | q, k, v of the one new token; the owner rank appends k, v to its cache | none |
| per layer | attention of q over this rank's KV shard: (out, lse) partial | all-gather (out, lse) over sp |
| per layer | merge the partials by log-sum-exp (`ops.merge_attention`), in sp order | none |
| head | logits, greedy token; rank 0's choice is broadcast | broadcast over sp |

New K/V go to the sp ranks round-robin (decode step t to sp rank t mod sp), so memory stays balanced.
Every rank runs the same merge on the same gathered bytes, and the token is broadcast, so all ranks
agree on every token and on termination (`eos_token_id` or `max_new_tokens`). The output equals
single-process greedy decoding with the full prompt recomputed at every step.

Limits, all refused with ValueError: the engine `models.Transformer` only (not a transformers model),
tp=1, one sample (no packing). Generated tokens are always text (never expanded as placeholders).
Not here: sampling, beam search, batching of several requests, paged caches.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.transformer import Transformer, apply_rope, rope_cos_sin
from ..multimodal.model import VisionLanguageModel
from ..multimodal.sharding import sp_order
from ..ops import block_attention, merge_attention
from ..tensor_parallel.mappings import axis_size

__all__ = ["GenerationOutput", "generate"]


class GenerationOutput(NamedTuple):
    """tokens (n,) int64 the generated ids; logits (n, V) the scores each was chosen from; per sp
    rank (in sp order) the KV cache it ended with: kv_tokens (cached positions) and kv_bytes (K and V
    of every layer)."""

    tokens: torch.Tensor
    logits: torch.Tensor
    kv_tokens: tuple
    kv_bytes: tuple


def _check(model, groups, input_ids, max_new_tokens):
    if not isinstance(model, VisionLanguageModel):
        raise ValueError(f"model must be a VisionLanguageModel, got {type(model).__name__}")
    if groups is not None and groups is not model.groups:
        raise ValueError("groups differ from the model's ParallelGroups; pass model.groups (or None)")
    if not isinstance(model.language_model, Transformer):
        raise ValueError("sequence-parallel generation needs the engine models.Transformer as language model")
    if axis_size(model.groups) != 1:
        raise ValueError(f"generation supports tp=1 only, got tp={model.groups.tp_size}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or not (input_ids.dim() == 1 or (input_ids.dim() == 2
                                                                                  and input_ids.shape[0] == 1)):
        raise ValueError(f"input_ids must be one sample, (S,) or (1, S), got {getattr(input_ids, 'shape', input_ids)}")


def _prefill(model, h, plan):
    """Run the language model on the shard, keeping each layer's K/V (after RoPE) of real positions."""
    lm = model.language_model
    captured = {}
    handles = []
    for i, layer in enumerate(lm.layers):
        for name in ("k_proj", "v_proj"):
            def hook(module, args, output, key=(i, name)):
                captured[key] = output
            handles.append(getattr(layer.attn, name).register_forward_hook(hook))
    try:
        hidden = model.language_model_hidden(h, plan)
    finally:
        for handle in handles:
            handle.remove()
    positions = plan.positions.to(h.device).unsqueeze(0)
    rope_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(positions, lm.config.head_dim, lm.config.rope_theta, rope_dtype)
    real = (plan.shard < plan.seq_len).to(h.device)
    cache = []
    for i, layer in enumerate(lm.layers):
        S, K, D = h.shape[1], layer.attn.num_kv_local, layer.attn.head_dim
        k = apply_rope(captured[(i, "k_proj")].view(1, S, K, D), cos, sin)[:, real]
        v = captured[(i, "v_proj")].view(1, S, K, D)[:, real]
        cache.append([k.contiguous(), v.contiguous()])
    return hidden, cache


def _partial_attention(q, k, v, backend):
    """(out, lse) of q over this rank's KV shard; out=0, lse=-inf when the shard is empty."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k.shape[1] == 0:
        B, S, H, D = q.shape
        return q.new_zeros((B, S, H, D), dtype=acc), torch.full((B, H, S), float("-inf"), dtype=acc, device=q.device)
    out, lse = block_attention(q, k, v, causal=False, backend=backend)
    return out.to(acc), lse.to(acc)


def _merge_over_sp(out, lse, groups, backend):
    """All-gather the partials over sp and merge them by log-sum-exp in sp order (identical everywhere)."""
    if groups is None or groups.sp_size == 1:
        return out
    packed = torch.cat([out.reshape(-1), lse.reshape(-1)])
    pieces = [torch.empty_like(packed) for _ in range(groups.sp_size)]
    with groups.stats.waiting("sp"):
        dist.all_gather(pieces, packed, group=groups.sp)
    groups.stats.record("sp", (groups.sp_size - 1) * packed.numel() * packed.element_size(), groups.is_intra_node("sp"))
    acc_out = acc_lse = None
    for piece in pieces:
        out_i = piece[:out.numel()].view_as(out)
        lse_i = piece[out.numel():].view_as(lse)
        if bool(torch.isneginf(lse_i).all()):  # a rank without cached keys contributes nothing
            continue
        if acc_out is None:
            acc_out, acc_lse = out_i.clone(), lse_i.clone()
        else:
            merge_attention(acc_out, acc_lse, out_i, lse_i, backend=backend)
    return acc_out


def _decode_step(model, token, position, cache, owner, backend):
    """Logits (V,) after feeding `token` at global `position`; the owner rank caches its K/V."""
    lm, groups = model.language_model, model.groups
    weight = lm.embed.weight
    h = F.embedding(token.view(1, 1), weight)
    rope_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(torch.full((1, 1), position, device=h.device), lm.config.head_dim, lm.config.rope_theta,
                            rope_dtype)
    for i, layer in enumerate(lm.layers):
        attn = layer.attn
        a = layer.attn_norm(h)
        H, K, D = attn.num_heads_local, attn.num_kv_local, attn.head_dim
        q = apply_rope(attn.q_proj(a).view(1, 1, H, D), cos, sin)
        k = apply_rope(attn.k_proj(a).view(1, 1, K, D), cos, sin)
        v = attn.v_proj(a).view(1, 1, K, D)
        if model.sp_index == owner:
            cache[i][0] = torch.cat([cache[i][0], k], dim=1)
            cache[i][1] = torch.cat([cache[i][1], v], dim=1)
        out, lse = _partial_attention(q, cache[i][0], cache[i][1], backend)
        merged = _merge_over_sp(out, lse, groups, backend)
        h = h + attn.o_proj(merged.to(h.dtype).reshape(1, 1, H * D))
        h = h + layer.mlp(layer.mlp_norm(h))
    return F.linear(lm.norm(h)[0, 0], lm.lm_head.weight)


def _broadcast(t: torch.Tensor, groups, src_index: int) -> torch.Tensor:
    if groups is None or groups.sp_size == 1:
        return t
    t = t.contiguous()
    with groups.stats.waiting("sp"):
        dist.broadcast(t, src=groups.sp_ranks[src_index], group=groups.sp)
    groups.stats.record("sp", t.numel() * t.element_size() * (groups.sp_size - 1), groups.is_intra_node("sp"))
    return t


def _kv_report(cache, groups):
    tokens = cache[0][0].shape[1] if cache else 0
    nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
    mine = torch.tensor([tokens, nbytes], dtype=torch.int64)
    if groups is None or groups.sp_size == 1:
        return (tokens,), (nbytes,)
    mine = mine.to(groups.device)
    rows = [torch.empty_like(mine) for _ in range(groups.sp_size)]
    dist.all_gather(rows, mine, group=groups.sp)
    return tuple(int(r[0]) for r in rows), tuple(int(r[1]) for r in rows)


@torch.no_grad()
def generate(model: VisionLanguageModel, input_ids: torch.Tensor, frames=None, groups=None, max_new_tokens: int = 16,
             *, eos_token_id: int | None = None, backend: str | None = None) -> GenerationOutput:
    """Greedy decoding of one multimodal prompt over the sp group; the same call on every sp rank.

    | arg | meaning |
    |---|---|
    | model | `VisionLanguageModel` over the engine Transformer (tp=1) |
    | input_ids | (S,) or (1, S): the prompt, one `image_token_id` per frame |
    | frames | as `VisionLanguageModel.forward` |
    | groups | `model.groups` (or None for the same) |
    | eos_token_id | stop after generating it (included in the output) |
    | backend | attention backend of the decode steps (default: the model's) |

    Returns the same `GenerationOutput` on every rank.
    """
    _check(model, groups, input_ids, max_new_tokens)
    groups = model.groups
    lm = model.language_model
    if backend is None:
        backend = lm.layers[0].attn.backend if len(lm.layers) else "auto"
    h, plan = model.embed_shard(input_ids.reshape(-1), frames)
    hidden, cache = _prefill(model, h, plan)
    # The last prompt token lives on one rank: it computes the first logits and broadcasts them.
    L = plan.seq_len
    sp = model.sp_size
    if groups is None:
        holder = 0
    else:
        order = sp_order(plan.seq_len_padded, groups.ring_size, groups.ulysses_size, model.scheme)
        holder = int((order == L - 1).nonzero()[0, 0]) // (plan.seq_len_padded // sp)
    vocab = lm.lm_head.weight.shape[0]
    logits = hidden.new_zeros(vocab)
    if model.sp_index == holder:
        row = int((plan.shard == L - 1).nonzero()[0, 0])
        logits = F.linear(hidden[0, row], lm.lm_head.weight)
    logits = _broadcast(logits, groups, holder)
    tokens, scores = [int(logits.argmax())], [logits]
    for t in range(max_new_tokens - 1):
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        token = torch.tensor([tokens[-1]], device=h.device)
        logits = _decode_step(model, token, L + t, cache, t % sp, backend)
        choice = _broadcast(logits.argmax().reshape(1), groups, 0)
        tokens.append(int(choice[0]))
        scores.append(logits)
    kv_tokens, kv_bytes = _kv_report(cache, groups)
    return GenerationOutput(torch.tensor(tokens, dtype=torch.long), torch.stack(scores), kv_tokens, kv_bytes)
