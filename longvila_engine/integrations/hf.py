"""Hugging Face transformers causal LMs (Llama, Qwen2, Mistral) on MM-SP sequence parallelism.

Three steps, every rank of the sp group doing the same:

    model = enable_sequence_parallel(model, groups)            # attention -> sequence_parallel_attention
    batch = shard_batch(global_batch, groups)                  # this rank's tokens, global positions
    loss = sequence_parallel_loss(model(**batch), batch["shift_labels"], groups)

How the pieces reach the attention. transformers 5.x looks every attention call up by name in
`AttentionInterface` (`config._attn_implementation`) and calls it as
`fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)` with q/k/v in
(B, H, S, D), expecting `(out (B, S, H, D), weights)`. We register `longvila_sp` there; it reads the
groups from an attribute `enable_sequence_parallel` put on each attention module. The model forward
passes unknown keyword arguments down to that call unchanged, so `shard_batch` adds three of them:
`sp_plan` (the batch's `BatchPlan`, made once by `local_batch`), `sp_cu_seqlens` (global padded int32
offsets of packed sequences, B=1) and `sp_scheme` (the shard layout). Nothing is global: two models
with different groups can coexist in one process.

Labels. HF's own loss shifts labels inside each shard, which drops the target at every shard seam and
divides by a per-shard count. So `shard_batch` shifts globally before sharding (the target of the
last token of each packed sequence is ignored), returns the result as `shift_labels`, and the model
must not get `labels` (refused). `sequence_parallel_loss` divides this rank's CE sum by the global
count of supervised tokens (docs/design.md section 6).

Refused loudly (ValueError) rather than computed differently from transformers: other model classes,
tensor parallelism, attention dropout, a sliding window shorter than the sequence, attention masks,
KV caches, `output_attentions`, non-causal attention, HF's own varlen kwargs (`cu_seq_lens_q`, ...),
and switching the model to another attention implementation after enabling (checked on every
forward).

Deliberately not here: sequence-parallel decoding (longvila_engine.inference), multimodal sharding
(longvila_engine.multimodal), chunked or vocab-parallel cross-entropy, gradient reduction (the caller
sums parameter gradients over `groups.sp`, see `sequence_parallel_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..parallel.groups import ParallelGroups
from ..parallel.zigzag import check_scheme

__all__ = ["enable_sequence_parallel", "shard_batch", "sequence_parallel_loss", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "longvila_sp"
CU_SEQLENS_KWARG = "sp_cu_seqlens"
SCHEME_KWARG = "sp_scheme"
PLAN_KWARG = "sp_plan"
_STATE_ATTR = "longvila_sp_state"
_HOOK_ATTR = "_longvila_sp_hook"
# model class -> (modeling module, attention class) in transformers.
_SUPPORTED = {
    "LlamaForCausalLM": ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "Qwen2ForCausalLM": ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
    "MistralForCausalLM": ("transformers.models.mistral.modeling_mistral", "MistralAttention"),
}
# transformers' own packed-sequence kwargs describe the local flash-attention call, not the global
# sequence; taking them for ours would attend across the wrong boundaries.
_HF_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seqlens")


@dataclass(frozen=True)
class _SPState:
    """What the registered attention function needs, attached to each attention module."""

    groups: ParallelGroups
    backend: str


# --- the attention function ------------------------------------------------------------------------


def _refuse(module, what: str) -> None:
    raise ValueError(f"{type(module).__name__} with attn_implementation={ATTN_IMPLEMENTATION!r}: {what}")


def _sp_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The `AttentionInterface` entry: q (B, H, S_local, D), k/v (B, H_kv, S_local, D) in, this rank's
    shard of the global causal attention (B, S_local, H, D) out, and no weights."""
    from ..attention.sequence_parallel import attention_with_plan, sequence_parallel_attention

    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        _refuse(module, "the module was not prepared; call longvila_engine.integrations."
                        "enable_sequence_parallel(model, groups) rather than setting the implementation")
    if attention_mask is not None:
        _refuse(module, "attention masks are not supported (shard_batch expresses padding and packing: "
                        "pads sit after every real token, packed sequences travel as sp_cu_seqlens)")
    if dropout:
        _refuse(module, f"attention dropout={dropout} is not supported; set config.attention_dropout=0 or "
                        f"use model.eval()")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        _refuse(module, "only causal attention is supported")
    for name in _HF_VARLEN_KWARGS:
        if kwargs.get(name) is not None:
            _refuse(module, f"transformers' varlen kwarg {name!r} is not supported; pass the GLOBAL batch "
                            f"with 'cu_seqlens' to shard_batch, which forwards it as {CU_SEQLENS_KWARG!r}")
    if kwargs.get("output_attentions"):
        _refuse(module, "output_attentions is not supported: no rank holds the attention matrix")
    if kwargs.get("use_cache") or key.shape[2] != query.shape[2]:
        _refuse(module, "KV caches are not supported in training; pass use_cache=False (shard_batch does). "
                        "Sequence-parallel decoding lives in longvila_engine.inference")
    groups = state.groups
    seq_len_padded = query.shape[2] * groups.ring_size * groups.ulysses_size
    window = kwargs.get("sliding_window")
    # HF's window lets query i see key j iff i - j < window: a no-op while the sequence fits in it.
    if window is not None and window < seq_len_padded:
        _refuse(module, f"sliding_window={window} is shorter than the (padded) global sequence of "
                        f"{seq_len_padded} tokens; sliding-window attention is not implemented. Use "
                        f"sequences of at most {window} tokens or a model without a sliding window")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    plan = kwargs.get(PLAN_KWARG)
    if plan is None:  # a batch not from shard_batch: plan it here (one agreement per layer)
        out = sequence_parallel_attention(q, k, v, groups, causal=True, softmax_scale=scaling,
                                          cu_seqlens=kwargs.get(CU_SEQLENS_KWARG),
                                          scheme=kwargs.get(SCHEME_KWARG, "zigzag"), backend=state.backend)
        return out, None
    if plan.groups is not groups:
        _refuse(module, f"the batch's {PLAN_KWARG} was made for other ParallelGroups than the model's; "
                        f"shard the batch with the groups given to enable_sequence_parallel")
    return attention_with_plan(q, k, v, plan, causal=True, softmax_scale=scaling, backend=state.backend), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    # Class-level registration: every AttentionInterface (and so every model) sees the name. Idempotent.
    AttentionInterface.register(ATTN_IMPLEMENTATION, _sp_attention_forward)


# --- enabling ----------------------------------------------------------------------------------------


def _supported_attention_class(model):
    import importlib

    import transformers

    name = type(model).__name__
    supported = sorted(_SUPPORTED)
    if name not in _SUPPORTED or getattr(transformers, name, None) is not type(model):
        raise ValueError(f"enable_sequence_parallel does not support {type(model).__module__}.{name}; "
                         f"supported (exact transformers classes): {supported}")
    module_name, attn_name = _SUPPORTED[name]
    return getattr(importlib.import_module(module_name), attn_name)


def _attention_modules(model, attn_cls) -> list:
    """The model's attention modules; refuses any other attention-like module (it would bypass ours)."""
    found, others = [], []
    for qual, mod in model.named_modules():
        if type(mod) is attn_cls:
            found.append(mod)
        elif type(mod).__name__.endswith("Attention"):
            others.append(f"{qual} ({type(mod).__name__})")
    if others:
        raise ValueError(f"{type(model).__name__} holds attention modules that would bypass "
                         f"{ATTN_IMPLEMENTATION!r}: {others}")
    layers = model.config.num_hidden_layers
    if len(found) != layers:
        raise ValueError(f"{type(model).__name__} has {len(found)} {attn_cls.__name__} modules for "
                         f"num_hidden_layers={layers}; refusing a model whose layers are not all ours")
    return found


def _check_enabled(model, attn_modules) -> None:
    """Every attention module resolves to our function (sub-configs included)."""
    seen = {model.config._attn_implementation}
    seen.update(getattr(m.config, "_attn_implementation", None) for m in attn_modules)
    wrong = sorted(seen - {ATTN_IMPLEMENTATION}, key=str)
    if wrong:
        raise ValueError(f"{type(model).__name__} would run attention implementation(s) {wrong} instead of "
                         f"{ATTN_IMPLEMENTATION!r}; call enable_sequence_parallel(model, groups) again after "
                         f"changing the implementation")


def _forward_pre_hook(attn_modules):
    def hook(model, args, kwargs):
        if kwargs.get("labels") is not None:
            raise ValueError("do not pass labels to a sequence-parallel model: transformers would shift "
                             "them inside each shard (losing the targets at shard seams) and average per "
                             "shard. Use shard_batch(...)['shift_labels'] with sequence_parallel_loss")
        _check_enabled(model, attn_modules)
        return None

    return hook


def enable_sequence_parallel(model, groups: ParallelGroups, *, backend: str = "auto"):
    """Run every attention layer of `model` as `sequence_parallel_attention` over `groups.sp`; returns
    `model` (changed in place).

    Supported: transformers' LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM (exact classes),
    any dp/ring/ulysses layout with tp=1. Head counts are checked by the attention on first use
    (Ulysses needs num_attention_heads divisible by groups.ulysses_size). Sets `config.use_cache=False`
    and installs a forward pre-hook that refuses `labels` and any later change of the attention
    implementation. Inputs must then be shards from `shard_batch`.
    """
    attn_cls = _supported_attention_class(model)
    if not isinstance(groups, ParallelGroups):
        raise ValueError(f"groups must be the ParallelGroups from init_parallel, got {type(groups).__name__}")
    if groups.tp_size != 1:
        raise ValueError(f"tensor parallelism (tp={groups.tp_size}) is not supported for transformers "
                         f"models: their projections are not split; use a layout with tp=1")
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string such as 'auto', got {backend!r}")
    config = model.config
    if not getattr(config, "is_causal", True):
        raise ValueError(f"{type(model).__name__} is configured non-causal (config.is_causal=False); only "
                         f"causal attention is supported")
    attn_modules = _attention_modules(model, attn_cls)
    _register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _check_enabled(model, attn_modules)
    state = _SPState(groups=groups, backend=backend)
    for mod in attn_modules:
        setattr(mod, _STATE_ATTR, state)
    config.use_cache = False
    old = getattr(model, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
    handle = model.register_forward_pre_hook(_forward_pre_hook(attn_modules), with_kwargs=True)
    setattr(model, _HOOK_ATTR, handle)
    return model


# --- batches -------------------------------------------------------------------------------------


def _batch_tensor(batch: dict, name: str, shape: tuple[int, int], allow_broadcast: bool = False):
    t = batch.get(name)
    if t is None:
        return None
    B, S = shape
    if not (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == S
            and (t.shape[0] == B or (allow_broadcast and t.shape[0] == 1))):
        raise ValueError(f"batch[{name!r}] must be a tensor of shape {shape}, got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    return t


def shard_batch(batch: dict, groups: ParallelGroups, *, scheme: str = "zigzag",
                ignore_index: int = -100) -> dict:
    """This rank's shard of a GLOBAL batch, ready for `model(**shard)`.

    `batch` (the same on every rank of the sp group): `input_ids` (B, S); optional `labels` (B, S),
    unshifted HF style; optional `position_ids` (B, S) or (1, S); optional `attention_mask`, which must
    be all ones (express padding and packing otherwise); optional `cu_seqlens` (N+1 offsets of packed
    sequences, B=1).

    The batch goes through `models.loss.local_batch`: labels are shifted globally (no target crosses a
    packed-sequence boundary), everything is padded at the end to `padded_length(S, groups, scheme)`
    (pads: token 0, label `ignore_index`; packed pads form their own trailing sequence) and cut to this
    rank's positions. Position ids stay global (restarting per packed sequence) so RoPE sees the true
    positions; given `position_ids` are padded and cut the same way.

    Returns {'input_ids', 'position_ids' (B, S_local), 'use_cache': False, 'sp_scheme', 'sp_plan' (the
    batch's `BatchPlan`: every attention layer reads it, so the step makes no agreement and no host
    copy); 'sp_cu_seqlens' (global padded int32 offsets) when packed; 'shift_labels' (B, S_local) when
    labels were given}.
    The model ignores `shift_labels`; pass it to `sequence_parallel_loss`.
    """
    from ..attention.sharding import padded_length, shard_sequence
    from ..models.loss import local_batch

    if not isinstance(batch, dict):
        raise ValueError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(_BATCH_KEYS))
    if unknown:
        raise ValueError(f"shard_batch does not know batch keys {unknown}; it takes {list(_BATCH_KEYS)}")
    check_scheme(scheme)
    input_ids = batch.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"batch['input_ids'] must be an integer tensor (B, S), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    B, S = input_ids.shape
    mask = _batch_tensor(batch, "attention_mask", (B, S))
    if mask is not None and not bool((mask != 0).all()):
        raise ValueError("attention_mask with zeros is not supported: put padding at the end of the global "
                         "batch with label ignore_index, or pack sequences with cu_seqlens (B=1)")
    labels = _batch_tensor(batch, "labels", (B, S))
    positions = _batch_tensor(batch, "position_ids", (B, S), allow_broadcast=True)
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is not None and (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.numel() < 2):
        raise ValueError("cu_seqlens must be a 1-D integer tensor of N+1 offsets (N >= 1 packed sequences)")

    local = local_batch(input_ids, groups, labels=None if labels is None else labels.to(input_ids.device),
                        cu_seqlens=cu_seqlens, scheme=scheme, ignore_index=ignore_index)
    if positions is None:
        local_positions = local.positions
    else:  # the caller's global positions, with local_batch's positions for the pads
        seq_len_padded = padded_length(S, groups, scheme)
        pad_positions = torch.arange(S, seq_len_padded, device=input_ids.device)
        if cu_seqlens is not None:
            pad_positions = pad_positions - S  # the pads' own packed sequence
        positions = positions.to(device=input_ids.device, dtype=torch.long)
        positions = torch.cat([positions, pad_positions.expand(positions.shape[0], -1)], dim=1)
        local_positions = shard_sequence(positions, groups, dim=1, scheme=scheme)
    shard = {"input_ids": local.input_ids, "position_ids": local_positions, "use_cache": False,
             SCHEME_KWARG: scheme, PLAN_KWARG: local.plan}
    if local.cu_seqlens is not None:
        shard[CU_SEQLENS_KWARG] = local.cu_seqlens
    if labels is not None:
        shard["shift_labels"] = local.labels
    return shard


# --- loss ----------------------------------------------------------------------------------------


def sequence_parallel_loss(logits_or_model_output, labels_local: torch.Tensor, groups: ParallelGroups,
                           ignore_index: int = -100) -> torch.Tensor:
    """This rank's share of the mean next-token cross-entropy of the global batch (docs/design.md section 6).

    `logits_or_model_output`: logits (B, S_local, V) or a model output with `.logits`;
    `labels_local` (B, S_local): already shifted (`shard_batch(...)['shift_labels']`).

    Returns sum(CE over this rank's supervised tokens, in float32) / (supervised tokens of the whole sp
    group, one all-reduce of an int64 count, `models.loss.divide_by_global_count`). The global loss is
    the SUM of these values over `groups.sp`; a rank with no supervised token returns exactly 0, and
    an all-ignored batch gives 0, never NaN. Backpropagate each rank's own value, then SUM parameter
    gradients over `groups.sp` (the attention backward already sends cross-shard gradients home); to
    average over `groups.dp_sp` instead, multiply this loss by `groups.sp_size` first.
    """
    from ..models.loss import divide_by_global_count

    logits = getattr(logits_or_model_output, "logits", logits_or_model_output)
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"expected float logits (B, S_local, V) or a model output with .logits, got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if not isinstance(labels_local, torch.Tensor) or tuple(labels_local.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels_local must have shape {tuple(logits.shape[:-1])} (logits without the vocab "
                         f"dim), got {getattr(labels_local, 'shape', type(labels_local).__name__)}")
    labels = labels_local.reshape(-1).to(logits.device)
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels,
                               ignore_index=ignore_index, reduction="sum")
    return divide_by_global_count(loss_sum, (labels != ignore_index).sum(), groups)
