"""Sequence-parallel greedy generation for `VisionLanguageModel` (docs/design.md section 8).

Prefill is the training forward without a loss: the two-stage MM-SP sharding (frames split over the sp
group, visual tokens moved by one all-to-all-v, zigzag token layout) and sequence-parallel attention.
Each rank keeps the K/V it computed there (after RoPE, padding dropped) in a preallocated `KVCache`
that the model's own layers fill (`Transformer.decode(..., kv_cache=)`): the cache stays where it was
made and never moves, and decode steps run the same decoder blocks with the cache in decoding mode.
The logits of the last prompt token come from the rank holding it and are broadcast over sp.

A decode step, on every rank of the sp group:

| step | what | collective |
|---|---|---|
| embed | the new token (the same on every rank: it was broadcast) | none |
| per layer | q, k, v of the one new token; the owner rank writes k, v into its cache in place | none |
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
import torch.nn.functional as F

from ..comm.counted import all_gather, broadcast
from ..models.transformer import Transformer
from ..multimodal.model import VisionLanguageModel
from ..multimodal.sharding import sp_order
from ..tensor_parallel.mappings import axis_size
from .kv_cache import KVCache

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


def _prefill(model, h, plan, max_new_tokens, backend):
    """The language model on the shard, storing each layer's K/V of real positions in a new cache."""
    lm = model.language_model
    keep = torch.nonzero(plan.shard < plan.seq_len).flatten().to(h.device)  # padding rows are not cached
    capacity = keep.numel() + -(-max_new_tokens // model.sp_size)
    cache = KVCache(len(lm.layers), capacity, lm.num_kv_heads_local, lm.config.head_dim, model.groups, dtype=h.dtype,
                    device=h.device, backend=backend)
    cache.start_prefill(keep)
    hidden = model.language_model_hidden(h, plan, kv_cache=cache)
    cache.finish_prefill()
    return hidden, cache


def _decode_step(model, token, position, cache, owner):
    """Logits (V,) after feeding `token` at global `position`; the owner rank caches its K/V."""
    lm = model.language_model
    h = lm.embed_replicated(token.view(1, 1))
    cache.begin_step(model.sp_index == owner)
    hidden = lm.decode(h, torch.full((1, 1), position, device=h.device), kv_cache=cache)
    cache.end_step()
    return F.linear(hidden[0, 0], lm.lm_head.weight)


def _kv_report(cache, groups):
    mine = torch.tensor([cache.length, cache.nbytes], dtype=torch.int64, device=groups.device)
    rows = all_gather(mine, groups, "sp")
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
        backend = lm.attention_backend
    h, plan = model.embed_shard(input_ids.reshape(-1), frames)
    hidden, cache = _prefill(model, h, plan, max_new_tokens, backend)
    # The last prompt token lives on one rank: it computes the first logits and broadcasts them.
    L = plan.seq_len
    sp = model.sp_size
    if sp == 1:
        holder = 0
    else:
        order = sp_order(plan.seq_len_padded, groups.ring_size, groups.ulysses_size, model.scheme)
        holder = int((order == L - 1).nonzero()[0, 0]) // (plan.seq_len_padded // sp)
    vocab = lm.lm_head.weight.shape[0]
    logits = hidden.new_zeros(vocab)
    if model.sp_index == holder:
        row = int((plan.shard == L - 1).nonzero()[0, 0])
        logits = F.linear(hidden[0, row], lm.lm_head.weight)
    logits = broadcast(logits.contiguous(), groups, "sp", holder)
    tokens, scores = [int(logits.argmax())], [logits]
    for t in range(max_new_tokens - 1):
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        token = torch.tensor([tokens[-1]], device=h.device)
        logits = _decode_step(model, token, L + t, cache, t % sp)
        choice = broadcast(logits.argmax().reshape(1), groups, "sp", 0)
        tokens.append(int(choice[0]))
        scores.append(logits)
    kv_tokens, kv_bytes = _kv_report(cache, groups)
    return GenerationOutput(torch.tensor(tokens, dtype=torch.long), torch.stack(scores), kv_tokens, kv_bytes)
