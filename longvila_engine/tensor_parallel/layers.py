"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding, and seeded init.

Every parameter made here carries two attributes that the rest of the engine reads:
- `tp_dim`: the dim of the dense tensor split contiguously over the tp group, or None when the
  parameter is replicated on every tp rank;
- `tp_full_shape`: the dense tensor's shape.
Gradient clipping (count replicated parameters once), checkpoints (save the dense tensor as tp shards)
and the TP-vs-dense tests all rely on "the tp rank r holds slice r of the dense tensor along tp_dim".

Initialisation is deterministic and layout-free: `init_from_dense_` draws the whole dense tensor from
a seed and keeps this rank's slice, so a model built at tp=4 holds exactly the slices of the tp=1
model built from the same seed. Drawing the dense tensor costs its memory once per parameter (2 GB for
Llama-3-8B's embedding in float32), at start-up only.

| layer | weight (dense) | local weight | forward collectives | backward collectives |
|---|---|---|---|---|
| ColumnParallelLinear | (out, in) | (out/tp, in) | copy [+ all-gather last dim] | all-reduce dx [+ slice] |
| RowParallelLinear | (out, in) | (out, in/tp) | [slice last dim +] all-reduce | [all-gather +] identity |
| VocabParallelEmbedding | (V, E) | (V/tp, E) | all-reduce | identity |

With `sequence_parallel=True` (Megatron sequence parallelism inside tp), column layers all-gather the
sequence dim (backward reduce-scatter) and row layers / the embedding reduce-scatter it (backward
all-gather); replicated biases then get their partial gradients summed over tp.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .mappings import (
    axis_rank,
    axis_size,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tp_region,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "init_from_dense_",
    "param_seed",
    "mark_tp",
]


def mark_tp(param: nn.Parameter, tp_dim, full_shape, init_std) -> nn.Parameter:
    """Attach the tp metadata (`tp_dim`, `tp_full_shape`) and the init recipe (`init_std`; None = ones)."""
    param.tp_dim = tp_dim
    param.tp_full_shape = tuple(int(s) for s in full_shape)
    param.init_std = init_std
    return param


def param_seed(seed: int, name: str) -> int:
    """A per-parameter seed from the model seed and the parameter's name (stable across runs/layouts)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (1 << 62)


@torch.no_grad()
def init_from_dense_(param: torch.Tensor, groups, seed: int) -> torch.Tensor:
    """Fill `param` with its slice of a dense tensor drawn from `seed`.

    The dense tensor (`param.tp_full_shape`) is N(0, init_std^2) drawn in float32 by a generator on the
    parameter's device (CPU and CUDA generators differ; one run uses one kind), or ones when
    `init_std` is None. Replicated parameters (tp_dim None) take the whole tensor.
    """
    std = getattr(param, "init_std", None)
    shape = getattr(param, "tp_full_shape", tuple(param.shape))
    if std is None:
        return param.fill_(1.0)
    gen = torch.Generator(device=param.device)
    gen.manual_seed(int(seed))
    full = torch.randn(shape, generator=gen, dtype=torch.float32, device=param.device).mul_(std)
    dim = getattr(param, "tp_dim", None)
    if dim is not None and axis_size(groups) > 1:
        n = param.shape[dim]
        full = full.narrow(dim, axis_rank(groups) * n, n)
    assert tuple(full.shape) == tuple(param.shape), (full.shape, param.shape)
    return param.copy_(full)


def _local(n: int, p: int, what: str) -> int:
    if n % p:
        raise ValueError(
            f"{what}={n} is not divisible by the tensor-parallel size tp={p}; choose tp among "
            f"{[d for d in range(1, n + 1) if n % d == 0 and d <= 64]}"
        )
    return n // p


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) split by rows: this tp rank computes out/tp output features.

    | tensor | shape |
    |---|---|
    | x | (..., in) replicated over tp, or (B, S/tp, in) with sequence_parallel |
    | weight | (out/tp, in): rows [r*out/tp, (r+1)*out/tp) of the dense weight |
    | y | (..., out/tp), or (..., out) with gather_output |

    `forward(x, input_in_tp_region=True)` skips the entry collective when the caller already applied
    `enter_tp_region(x)` once for several layers sharing one input (Q, K and V), so the backward
    all-reduces dx once instead of three times.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups,
        *,
        bias: bool = False,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.groups = groups
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        if gather_output and sequence_parallel:
            raise ValueError("gather_output=True is not supported with sequence_parallel=True")
        tp = axis_size(groups)
        local = _local(out_features, tp, "out_features")
        kw = {"dtype": dtype, "device": device}
        self.weight = mark_tp(
            nn.Parameter(torch.empty(local, in_features, **kw)), 0, (out_features, in_features), init_std
        )
        self.bias = None
        if bias:
            self.bias = mark_tp(nn.Parameter(torch.empty(local, **kw)), 0, (out_features,), init_std)

    def enter_tp_region(self, x: torch.Tensor) -> torch.Tensor:
        """Copy (or, with sequence_parallel, all-gather the sequence of) x into the tp region."""
        if self.sequence_parallel:
            return gather_from_sequence_region(x, self.groups, dim=1, grad_is_partial=True)
        return copy_to_tp_region(x, self.groups)

    def forward(self, x: torch.Tensor, input_in_tp_region: bool = False) -> torch.Tensor:
        if not input_in_tp_region:
            x = self.enter_tp_region(x)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_from_tp_region(y, self.groups)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (local {self.weight.shape[0]}), "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W (out, in) split by columns: partial products summed over tp.

    | tensor | shape |
    |---|---|
    | x | (..., in/tp) with input_is_parallel, else (..., in) replicated (sliced here) |
    | weight | (out, in/tp): columns [r*in/tp, (r+1)*in/tp) of the dense weight |
    | bias | (out,) replicated, added once after the reduction |
    | y | (..., out) replicated, or (B, S/tp, out) with sequence_parallel (reduce-scatter) |
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups,
        *,
        bias: bool = False,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.groups = groups
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel=True needs input_is_parallel=True")
        tp = axis_size(groups)
        local = _local(in_features, tp, "in_features")
        kw = {"dtype": dtype, "device": device}
        self.weight = mark_tp(
            nn.Parameter(torch.empty(out_features, local, **kw)), 1, (out_features, in_features), init_std
        )
        self.bias = None
        if bias:
            self.bias = mark_tp(
                nn.Parameter(torch.empty(out_features, **kw)), None, (out_features,), init_std
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.groups)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.groups, dim=1)
            # Each tp rank adds the bias to its own slice only: its gradient is partial, sum it.
            bias = None if self.bias is None else copy_to_tp_region(self.bias, self.groups)
        else:
            y = reduce_from_tp_region(y, self.groups)
            bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (local {self.weight.shape[1]}), out={self.out_features}, "
            f"input_is_parallel={self.input_is_parallel}, sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split contiguously over tp.

    | tensor | shape |
    |---|---|
    | ids | (B, S) int64, global token ids, replicated over tp |
    | weight | (V/tp, E): rows [r*V/tp, (r+1)*V/tp) of the dense table |
    | out | (B, S, E) replicated, or (B, S/tp, E) with sequence_parallel |

    Each rank looks up the ids it owns and writes zeros elsewhere; the all-reduce (or reduce-scatter)
    over tp sums exactly one non-zero row per token. Backward: each rank's weight gets the gradient of
    its own rows only (identity conjugate of the reduction).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        groups,
        *,
        sequence_parallel: bool = False,
        init_std: float = 0.02,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.groups = groups
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        tp = axis_size(groups)
        local = _local(num_embeddings, tp, "vocab_size (num_embeddings)")
        self.vocab_start = axis_rank(groups) * local
        self.vocab_end = self.vocab_start + local
        self.weight = mark_tp(
            nn.Parameter(torch.empty(local, embedding_dim, dtype=dtype, device=device)),
            0,
            (num_embeddings, embedding_dim),
            init_std,
        )

    def _partial(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the lookup (zero for ids outside its vocabulary slice)."""
        if axis_size(self.groups) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        return F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)

    def lookup_replicated(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of `ids` (any shape) replicated over tp, never scattered over the sequence."""
        return reduce_from_tp_region(self._partial(ids), self.groups)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._partial(ids)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(out, self.groups, dim=1)
        return reduce_from_tp_region(out, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, "
            f"local rows [{self.vocab_start}, {self.vocab_end}), "
            f"sequence_parallel={self.sequence_parallel}"
        )
