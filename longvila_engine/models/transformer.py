"""`Transformer`: a Llama-class decoder sharded over tensor parallelism and MM-SP sequence parallelism.

One rank holds: its tp shard of every weight (heads and FFN columns split, vocabulary split) and its
sequence shard of every activation (zigzag over ring x Ulysses, docs/design.md section 4). Attention is
`sequence_parallel_attention` on the shard; RoPE uses the GLOBAL positions of the shard's tokens
(restarting per packed sequence), so the result equals one device's.

| module | weights (dense) | tp split |
|---|---|---|
| embed | (V, E) | vocabulary rows (VocabParallelEmbedding) |
| q_proj / k_proj / v_proj | (H*D, E) / (K*D, E) | heads (column); K/V replicated when tp > K |
| o_proj | (E, H*D) | heads (row) |
| gate_proj, up_proj / down_proj | (F, E) / (E, F) | FFN columns (column / row) |
| norms | (E,) | replicated |
| lm_head | (V, E) | vocabulary rows, consumed by the vocab-parallel loss (never gathered) |

K/V heads: with K % tp == 0 each tp rank owns K/tp heads; with tp % K == 0 every rank holds all K
heads (replicated weights, gradient all-reduced over tp) and uses the one its query heads read;
anything else is a ValueError.

`tp_sequence_parallel=True` adds Megatron sequence parallelism inside the tp group: norms and the
residual stream hold 1/tp of the local shard, column layers all-gather it, row layers reduce-scatter.

Not here: batch preparation and the loss normalisation (`loss.py`), gradient reduction and the
optimizer (`train.py`).

Legend: B batch, S local sequence length, E hidden, H/K query/kv heads, D head dim, F FFN width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention.plan import BatchPlan, plan_batch
from ..attention.sequence_parallel import attention_with_plan
from ..parallel.groups import as_groups
from ..tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from ..tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_from_dense_,
    mark_tp,
    param_seed,
)
from ..tensor_parallel.mappings import axis_rank, axis_size, copy_to_tp_region, gather_from_sequence_region
from .config import ModelConfig
from .loss import divide_by_global_count

__all__ = ["Transformer", "RMSNorm", "rope_cos_sin", "apply_rope"]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32):
    """cos, sin of shape (B, S, 1, D) for int positions (B, S); angles computed in float64.

    Float64 angles keep position 1e6 * inv_freq exact to ~1e-10 rad, where float32 would lose ~0.06.
    """
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama / Hugging Face convention) on x (B, S, H, D), in cos's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a replicated weight; under tp sequence parallelism its gradient is summed over tp."""

    def __init__(
        self, dim: int, eps: float, groups, *, sequence_parallel: bool = False, dtype=None, device=None
    ):
        super().__init__()
        self.groups, self.eps, self.sequence_parallel = groups, eps, sequence_parallel
        self.weight = mark_tp(nn.Parameter(torch.empty(dim, dtype=dtype, device=device)), None, (dim,), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = copy_to_tp_region(self.weight, self.groups) if self.sequence_parallel else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class ReplicatedHeadsLinear(nn.Module):
    """K or V projection for tp > num_kv_heads: all heads' weights on every rank, one head used.

    | tensor | shape |
    |---|---|
    | weight | (K*D, E) dense, replicated (tp_dim None) |
    | x | (B, S, E), already in the tp region (copied or gathered) |
    | out | (B, S, D): head `head` of the dense projection |

    | | forward | backward |
    |---|---|---|
    | weight | identity (`copy_to_tp_region`) | all-reduce over tp: the replicas' partial grads summed |
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_dim: int,
        head: int,
        groups,
        *,
        bias: bool,
        init_std: float,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.groups, self.head, self.head_dim = groups, head, head_dim
        shape = (num_heads * head_dim, in_features)
        self.weight = mark_tp(
            nn.Parameter(torch.empty(shape, dtype=dtype, device=device)), None, shape, init_std
        )
        self.bias = None
        if bias:
            self.bias = mark_tp(
                nn.Parameter(torch.empty(shape[0], dtype=dtype, device=device)), None, (shape[0],), init_std
            )

    def forward(self, x: torch.Tensor, input_in_tp_region: bool = True) -> torch.Tensor:
        assert input_in_tp_region
        rows = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
        weight = copy_to_tp_region(self.weight, self.groups)[rows]
        bias = None if self.bias is None else copy_to_tp_region(self.bias, self.groups)[rows]
        return F.linear(x, weight, bias)


class Attention(nn.Module):
    """GQA self-attention: column-parallel Q/K/V, RoPE, sequence-parallel attention, row-parallel output."""

    def __init__(
        self,
        config: ModelConfig,
        groups,
        *,
        sequence_parallel: bool,
        backend: str,
        scheme: str,
        algorithm: str,
        dtype=None,
        device=None,
    ):
        super().__init__()
        tp = axis_size(groups)
        E, H, K, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        if H % tp:
            raise ValueError(
                f"num_heads={H} is not divisible by tp={tp}; tensor parallelism splits query heads"
            )
        self.groups, self.backend, self.scheme, self.algorithm = groups, backend, scheme, algorithm
        self.num_heads_local, self.head_dim = H // tp, D
        std, out_std = config.init_std, config.init_std / math.sqrt(2 * config.num_layers)
        kw = {"dtype": dtype, "device": device}
        self.q_proj = ColumnParallelLinear(
            E, H * D, groups, bias=config.qkv_bias, sequence_parallel=sequence_parallel, init_std=std, **kw
        )
        if K % tp == 0:
            self.num_kv_local = K // tp
            self.k_proj = ColumnParallelLinear(
                E,
                K * D,
                groups,
                bias=config.qkv_bias,
                sequence_parallel=sequence_parallel,
                init_std=std,
                **kw,
            )
            self.v_proj = ColumnParallelLinear(
                E,
                K * D,
                groups,
                bias=config.qkv_bias,
                sequence_parallel=sequence_parallel,
                init_std=std,
                **kw,
            )
        elif tp % K == 0:
            # This rank's query heads [r*H/tp, (r+1)*H/tp) all read kv head r // (tp/K).
            self.num_kv_local = 1
            head = axis_rank(groups) // (tp // K)
            self.k_proj = ReplicatedHeadsLinear(
                E, K, D, head, groups, bias=config.qkv_bias, init_std=std, **kw
            )
            self.v_proj = ReplicatedHeadsLinear(
                E, K, D, head, groups, bias=config.qkv_bias, init_std=std, **kw
            )
        else:
            raise ValueError(
                f"num_kv_heads={K} and tp={tp}: tp must divide the kv head count or be a multiple "
                f"of it (then kv heads are replicated); choose tp in "
                f"{sorted({d for d in range(1, H + 1) if H % d == 0 and (K % d == 0 or d % K == 0)})}"
            )
        self.o_proj = RowParallelLinear(
            H * D,
            E,
            groups,
            input_is_parallel=True,
            sequence_parallel=sequence_parallel,
            init_std=out_std,
            **kw,
        )

    def forward(self, x, cos, sin, plan: BatchPlan | None = None, kv_cache=None):
        """x (B, S, E) -> (B, S, E). Training and prefill: attention of the shard with the batch's
        `plan`. `kv_cache` (a layer of `inference.KVCache`): prefill stores this shard's K/V (after
        RoPE) in the cache, in place; while the cache is decoding, x is the one new token and its
        attention runs over the cache instead (no plan)."""
        x = self.q_proj.enter_tp_region(x)  # one copy / gather shared by Q, K and V
        B, S, D = x.shape[0], x.shape[1], self.head_dim
        q = self.q_proj(x, input_in_tp_region=True).view(B, S, self.num_heads_local, D)
        k = self.k_proj(x, input_in_tp_region=True).view(B, S, self.num_kv_local, D)
        v = self.v_proj(x, input_in_tp_region=True).view(B, S, self.num_kv_local, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None and kv_cache.decoding:
            out = kv_cache.attend(q, k, v, backend=self.backend)
        else:
            if kv_cache is not None:
                kv_cache.store_prefill(k, v)
            if plan is None:  # a layer called on its own: plan its input here (one agreement)
                plan = plan_batch(self.groups, batch=B, local_len=S, scheme=self.scheme, device=q.device)
            out = attention_with_plan(q, k, v, plan, causal=True, backend=self.backend, algorithm=self.algorithm)
        return self.o_proj(out.reshape(B, S, self.num_heads_local * D))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate/up column-parallel, down row-parallel."""

    def __init__(self, config: ModelConfig, groups, *, sequence_parallel: bool, dtype=None, device=None):
        super().__init__()
        E, Fw = config.hidden_size, config.ffn_hidden_size
        kw = {"dtype": dtype, "device": device, "sequence_parallel": sequence_parallel}
        self.gate_proj = ColumnParallelLinear(E, Fw, groups, init_std=config.init_std, **kw)
        self.up_proj = ColumnParallelLinear(E, Fw, groups, init_std=config.init_std, **kw)
        self.down_proj = RowParallelLinear(
            Fw, E, groups, init_std=config.init_std / math.sqrt(2 * config.num_layers), **kw
        )

    def forward(self, x):
        x = self.gate_proj.enter_tp_region(x)
        return self.down_proj(
            F.silu(self.gate_proj(x, input_in_tp_region=True)) * self.up_proj(x, input_in_tp_region=True)
        )


class TransformerBlock(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        groups,
        *,
        sequence_parallel: bool,
        backend: str,
        scheme: str,
        algorithm: str,
        dtype=None,
        device=None,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.attn_norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, groups, sequence_parallel=sequence_parallel, **kw
        )
        self.attn = Attention(
            config,
            groups,
            sequence_parallel=sequence_parallel,
            backend=backend,
            scheme=scheme,
            algorithm=algorithm,
            **kw,
        )
        self.mlp_norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, groups, sequence_parallel=sequence_parallel, **kw
        )
        self.mlp = MLP(config, groups, sequence_parallel=sequence_parallel, **kw)

    def forward(self, h, cos, sin, plan: BatchPlan | None = None, kv_cache=None):
        h = h + self.attn(self.attn_norm(h), cos, sin, plan, kv_cache)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """Llama-class decoder on one rank of a (dp, ring, ulysses, tp) layout; `groups=None` = one process.

    Options: `tp_sequence_parallel` (Megatron SP inside tp), `activation_checkpointing` (per block,
    off by default: the engine trains long contexts without it), `attention_backend` (ops backend),
    `scheme` (the sharding scheme the batch was cut with), `attention_algorithm` ("ring" or
    "allgather"), `ce_chunk_size` (tokens per loss chunk), `seed` (deterministic, layout-free init:
    every tp rank holds exactly its slices of the dense model built from the same seed).
    `device="meta"` builds the shapes only (no storage, no init): materialise with `to_empty` and fill.
    """

    def __init__(
        self,
        config: ModelConfig,
        groups=None,
        *,
        tp_sequence_parallel: bool = False,
        activation_checkpointing: bool = False,
        attention_backend: str = "auto",
        scheme: str = "zigzag",
        attention_algorithm: str = "ring",
        ce_chunk_size: int | None = None,
        ignore_index: int = -100,
        seed: int = 0,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        on_meta = device is not None and torch.device(device).type == "meta"
        groups = as_groups(groups, None if on_meta else device)  # None: one process (ParallelGroups.single)
        self.config, self.groups, self.scheme = config, groups, scheme
        self.attention_backend = attention_backend
        self.tp_sequence_parallel = bool(tp_sequence_parallel) and axis_size(groups) > 1
        self.activation_checkpointing = activation_checkpointing
        self.ce_chunk_size, self.ignore_index = ce_chunk_size, ignore_index
        sp = self.tp_sequence_parallel
        kw = {"dtype": dtype, "device": device}
        self.embed = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            groups,
            sequence_parallel=sp,
            init_std=config.init_std,
            **kw,
        )
        self.layers = nn.ModuleList(
            TransformerBlock(
                config,
                groups,
                sequence_parallel=sp,
                backend=attention_backend,
                scheme=scheme,
                algorithm=attention_algorithm,
                **kw,
            )
            for _ in range(config.num_layers)
        )
        # K/V heads this rank attends with (its tp share; what a KV cache holds per layer).
        self.num_kv_heads_local = self.layers[0].attn.num_kv_local if len(self.layers) else 0
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, groups, sequence_parallel=sp, **kw)
        self.lm_head = ColumnParallelLinear(
            config.hidden_size, config.vocab_size, groups, init_std=config.init_std, **kw
        )
        if not on_meta:  # meta: shapes only, no init cost; the caller materialises (e.g. hf_weights.load_sharded)
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Seeded init: each parameter is its tp slice of a dense tensor drawn from (seed, name)."""
        for name, param in self.named_parameters():
            init_from_dense_(param, self.groups, param_seed(seed, name))

    def forward(
        self,
        input_ids_local: torch.Tensor,
        positions_local: torch.Tensor,
        labels_local: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        *,
        plan: BatchPlan | None = None,
    ):
        """Loss (labels given) or final hidden states (B, S_local, E).

        | arg | shape | meaning |
        |---|---|---|
        | input_ids_local | (B, S_local) int64 | this rank's shard (`loss.local_batch`) |
        | positions_local | (B, S_local) or (S_local,) | GLOBAL positions of those tokens (RoPE) |
        | labels_local | (B, S_local) or None | globally shifted targets of those tokens |
        | cu_seqlens | (N+1,) int32 or None | packed varlen (B=1): global offsets over the padded sequence |
        | plan | `BatchPlan` or None | the batch's plan (`local_batch(...).plan`); None plans here |

        The loss is this shard's summed token loss over the sp group's supervised-token count: the sp
        ranks' losses add up to the sample mean (docs/design.md section 6). With `plan` the step makes no
        agreement and no host copy; without it, one agreement all-gather is made here per forward.
        """
        if input_ids_local.dim() != 2:
            raise ValueError(f"input_ids_local must be (B, S_local), got {tuple(input_ids_local.shape)}")
        B, S = input_ids_local.shape
        positions = positions_local.expand(B, S) if positions_local.dim() == 1 else positions_local
        if tuple(positions.shape) != (B, S):
            raise ValueError(
                f"positions_local shape {tuple(positions_local.shape)} does not match ids {(B, S)}"
            )
        tp = axis_size(self.groups)
        if self.tp_sequence_parallel and S % tp:
            raise ValueError(f"tp_sequence_parallel needs the local length {S} divisible by tp={tp}")
        if plan is None:
            plan = self.plan(B, S, cu_seqlens, device=input_ids_local.device)
        elif (cu_seqlens is None) != (plan.cu_seqlens is None):
            raise ValueError("cu_seqlens and the plan disagree on packing; pass the plan's batch "
                             "(local_batch(...).plan with its own cu_seqlens) or no plan")
        h = self.decode(self.embed(input_ids_local), positions, plan=plan)
        if labels_local is None:
            if self.tp_sequence_parallel:
                h = gather_from_sequence_region(h, self.groups, dim=1, grad_is_partial=False)
            return h
        if tuple(labels_local.shape) != (B, S):
            raise ValueError(f"labels_local shape {tuple(labels_local.shape)} does not match ids {(B, S)}")
        return self.shard_loss(h, labels_local)

    def plan(self, batch: int, local_len: int, cu_seqlens=None, *, device=None) -> BatchPlan:
        """Plan a batch of this model's layout on the fly (one agreement over sp); batch builders
        (`local_batch`, `embed_shard`) do this for you."""
        return plan_batch(self.groups, batch=batch, local_len=local_len, scheme=self.scheme, cu_seqlens=cu_seqlens,
                          device=device, what="Transformer.forward")

    def decode(self, h: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
               plan: BatchPlan | None = None, kv_cache=None):
        """Decoder layers and final norm on embedded tokens (the part after the embedding).

        h is (B, S_local, E), or this tp rank's 1/tp slice of it under tp sequence parallelism;
        positions (B, S_local) are the GLOBAL positions (RoPE). Multimodal models call this with
        their interleaved text+visual embeddings and their plan. `kv_cache` (`inference.KVCache`):
        prefill fills it; while it is decoding, h is one new token attending over the cache.
        """
        decoding = kv_cache is not None and kv_cache.decoding
        if plan is None and not decoding:
            S = h.shape[1] * (axis_size(self.groups) if self.tp_sequence_parallel else 1)
            plan = self.plan(h.shape[0], S, cu_seqlens, device=h.device)
        if plan is not None and plan.groups is not self.groups:
            raise ValueError("the batch plan was made for other ParallelGroups than the model's; plan the batch "
                             "with the groups given to Transformer(config, groups)")
        if plan is not None and plan.ring_size > 1 and plan.scheme != self.scheme:
            raise ValueError(f"the batch was planned with scheme={plan.scheme!r} but the model runs "
                             f"scheme={self.scheme!r}; shard the batch with the model's scheme")
        rope_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, rope_dtype)
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else kv_cache.layer(i)
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, plan, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, plan, cache)
        return self.norm(h)

    def embed_replicated(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (n, E) embeddings replicated over tp (no sequence scatter): what a model that
        places tokens itself (the multimodal one) or a decoding step needs."""
        return self.embed.lookup_replicated(ids)

    def shard_loss(self, hidden: torch.Tensor, labels_local: torch.Tensor) -> torch.Tensor:
        """docs/design.md section 6 loss of this shard from `decode`'s output: the chunked vocab-parallel
        cross-entropy sum over the sp group's supervised-token count."""
        loss_sum, count = vocab_parallel_cross_entropy(
            hidden,
            self.lm_head.weight,
            labels_local,
            self.groups,
            ignore_index=self.ignore_index,
            chunk_size=self.ce_chunk_size,
            sequence_parallel=self.tp_sequence_parallel,
        )
        return divide_by_global_count(loss_sum, count, self.groups)

    @classmethod
    def from_hf(cls, path: str, groups=None, **options) -> Transformer:
        """A model from a Hugging Face Llama / Qwen2 / Mistral directory, each rank reading only its
        tp slices (`models/hf_weights.py`). `options`: this class's keyword arguments, and
        `max_seq_len` (checked against a sliding window). `fsdp=True` (with `reshard_after_forward`,
        `compute_dtype`): built on meta and FSDP2-sharded, each rank reading only its shards' rows."""
        from .hf_weights import from_hf

        return from_hf(cls, path, groups, **options)

    def save_hf(self, path: str, **options) -> None:
        """Write this model as a Hugging Face directory transformers loads (collective; rank 0
        writes; `models/hf_weights.py`). `options`: dtype, max_shard_bytes."""
        from .hf_weights import save_hf

        save_hf(self, path, **options)
