"""Tensor-parallel collectives as autograd pairs (Megatron `tensor_parallel/mappings.py` style).

Every forward collective is paired with its conjugate in backward, so a layer written with these
functions is differentiable end to end with exact gradients:

| function | forward | backward |
|---|---|---|
| `copy_to_tp_region` | identity | all-reduce (sum) over tp |
| `reduce_from_tp_region` | all-reduce (sum) over tp | identity |
| `scatter_to_tp_region` | keep this rank's slice of the last dim | all-gather the last dim |
| `gather_from_tp_region` | all-gather the last dim | keep this rank's slice of the last dim |
| `scatter_to_sequence_region` | keep this rank's slice of the sequence dim | all-gather the sequence dim |
| `gather_from_sequence_region` | all-gather the sequence dim | reduce-scatter (or slice) the sequence dim |
| `reduce_scatter_to_sequence_region` | reduce-scatter the sequence dim | all-gather the sequence dim |

The sequence-dim pairs implement Megatron-style sequence parallelism *inside* the tp group: norms and
residuals hold 1/tp of the (already sp-sharded) sequence, and column/row-parallel layers enter and
leave the tp region by all-gather / reduce-scatter instead of copy / all-reduce.

`groups` is a `ParallelGroups` (or None: one process, every mapping is the identity). A tp group of
size 1 is the identity too and communicates nothing. Bytes sent per rank are recorded on
`groups.stats` under the axis, with the ring-algorithm volumes: all-reduce 2(p-1)/p * n, all-gather
and reduce-scatter (p-1)/p * n, n the full (unsharded) tensor bytes.

Not here: the layers (`layers.py`) and the vocab-parallel loss (`cross_entropy.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import counted
from ..parallel.groups import as_groups

__all__ = [
    "copy_to_tp_region",
    "reduce_from_tp_region",
    "scatter_to_tp_region",
    "gather_from_tp_region",
    "scatter_to_sequence_region",
    "gather_from_sequence_region",
    "reduce_scatter_to_sequence_region",
    "axis_size",
    "axis_rank",
    "all_reduce",
]


def axis_size(groups, axis: str = "tp") -> int:
    """Size of `axis` in `groups`; 1 when `groups` is None (single process)."""
    return as_groups(groups).size(axis)


def axis_rank(groups, axis: str = "tp") -> int:
    """This rank's index along `axis`; 0 when `groups` is None."""
    return as_groups(groups).index(axis)


# --- raw collectives (no autograd), counted on groups.stats by comm/counted.py --------------------------
def all_reduce(x: torch.Tensor, groups, axis: str = "tp", op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of `x` over `axis`; returns x. Identity for a group of size 1."""
    return counted.all_reduce(x, as_groups(groups), axis, op)


def _all_gather(x: torch.Tensor, groups, axis: str, dim: int) -> torch.Tensor:
    """Concatenate the ranks' `x` along `dim`, in rank order."""
    p = axis_size(groups, axis)
    if p == 1:
        return x
    dim = dim % x.dim()
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((p * moved.shape[0], *moved.shape[1:]))
    return counted.all_gather_into(out, moved, groups, axis).movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, groups, axis: str, dim: int) -> torch.Tensor:
    """Sum the ranks' `x` and keep this rank's 1/p slice of `dim`."""
    p = axis_size(groups, axis)
    if p == 1:
        return x
    dim = dim % x.dim()
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // p, *moved.shape[1:]))
    return counted.reduce_scatter_into(out, moved, groups, axis).movedim(0, dim)


def _split(x: torch.Tensor, groups, axis: str, dim: int) -> torch.Tensor:
    """This rank's contiguous 1/p slice of `dim` (a copy, so later in-place ops are safe)."""
    p = axis_size(groups, axis)
    if p == 1:
        return x
    n = x.shape[dim] // p
    return x.narrow(dim, axis_rank(groups, axis) * n, n).contiguous()


def _check_divisible(x: torch.Tensor, dim: int, p: int, what: str) -> None:
    if x.shape[dim] % p:
        raise ValueError(f"{what}: dim {dim} of size {x.shape[dim]} is not divisible by the tp size {p}")


# --- autograd pairs ------------------------------------------------------------------------------------
class _CopyToTP(torch.autograd.Function):
    """Enter the tp region with a replicated tensor.

    | | forward | backward |
    |---|---|---|
    | collective | none (identity) | all-reduce (sum) over tp |
    | shape | x (...) replicated on every tp rank | grad (...): each rank's partial -> the full sum |
    """

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Clone: autograd may hand the same grad tensor to several inputs (e.g. through an add).
        return all_reduce(grad.contiguous().clone(), ctx.groups), None


class _ReduceFromTP(torch.autograd.Function):
    """Leave the tp region by summing partial results.

    | | forward | backward |
    |---|---|---|
    | collective | all-reduce (sum) over tp | none (identity) |
    | shape | x (...) partial sum on each rank -> full sum, replicated | grad (...) replicated |
    """

    @staticmethod
    def forward(ctx, x, groups):
        return all_reduce(x.contiguous().clone(), groups)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """Split the last dim over tp.

    | | forward | backward |
    |---|---|---|
    | collective | none: keep slice tp_rank of the last dim | all-gather of the last dim |
    | shape | (..., F) -> (..., F/tp) | (..., F/tp) -> (..., F) |
    """

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return _split(x, groups, "tp", -1)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.groups, "tp", -1), None


class _GatherFromTP(torch.autograd.Function):
    """Gather the last dim over tp.

    | | forward | backward |
    |---|---|---|
    | collective | all-gather of the last dim | none: keep slice tp_rank of the last dim |
    | shape | (..., F/tp) -> (..., F) | (..., F) -> (..., F/tp) |
    """

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return _all_gather(x, groups, "tp", -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.groups, "tp", -1), None


class _ScatterToSequence(torch.autograd.Function):
    """Split the sequence dim over tp (enter a Megatron sequence-parallel region from replicated data).

    | | forward | backward |
    |---|---|---|
    | collective | none: keep slice tp_rank of `dim` | all-gather of `dim` |
    | shape | (B, S, ...) -> (B, S/tp, ...) | (B, S/tp, ...) -> (B, S, ...) |
    """

    @staticmethod
    def forward(ctx, x, groups, dim):
        ctx.groups, ctx.dim = groups, dim
        return _split(x, groups, "tp", dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.groups, "tp", ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather the sequence dim over tp (enter the tp region from a sequence-parallel region).

    | | forward | backward |
    |---|---|---|
    | collective | all-gather of `dim` | reduce-scatter of `dim` (grad_is_partial) or keep slice tp_rank |
    | shape | (B, S/tp, ...) -> (B, S, ...) | (B, S, ...) -> (B, S/tp, ...) |

    The output usually feeds tp-partial computations (column-parallel layers), so each rank's gradient
    is a partial sum: the backward reduce-scatters. With `grad_is_partial=False` (the consumer is
    replicated and its gradient identical on every rank) the backward only slices.
    """

    @staticmethod
    def forward(ctx, x, groups, dim, grad_is_partial):
        ctx.groups, ctx.dim, ctx.partial = groups, dim, grad_is_partial
        return _all_gather(x, groups, "tp", dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter(grad, ctx.groups, "tp", ctx.dim), None, None, None
        return _split(grad, ctx.groups, "tp", ctx.dim), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Leave the tp region into a sequence-parallel region: sum partials, keep this rank's slice.

    | | forward | backward |
    |---|---|---|
    | collective | reduce-scatter (sum) of `dim` | all-gather of `dim` |
    | shape | (B, S, ...) partial -> (B, S/tp, ...) full sum | (B, S/tp, ...) -> (B, S, ...) |
    """

    @staticmethod
    def forward(ctx, x, groups, dim):
        ctx.groups, ctx.dim = groups, dim
        return _reduce_scatter(x, groups, "tp", dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.groups, "tp", ctx.dim), None, None


# --- public functions --------------------------------------------------------------------------------
def copy_to_tp_region(x: torch.Tensor, groups) -> torch.Tensor:
    """Identity forward, all-reduce backward. Conjugate: `reduce_from_tp_region`.

    Applied to a replicated input of column-parallel layers (each rank's dx is a partial sum), or to a
    replicated parameter whose gradient is partial on each tp rank.
    """
    if axis_size(groups) == 1:
        return x
    return _CopyToTP.apply(x, groups)


def reduce_from_tp_region(x: torch.Tensor, groups) -> torch.Tensor:
    """All-reduce forward, identity backward. Conjugate: `copy_to_tp_region`."""
    if axis_size(groups) == 1:
        return x
    return _ReduceFromTP.apply(x, groups)


def scatter_to_tp_region(x: torch.Tensor, groups) -> torch.Tensor:
    """Keep this tp rank's slice of the last dim; backward all-gathers. Conjugate: `gather_from_tp_region`."""
    p = axis_size(groups)
    if p == 1:
        return x
    _check_divisible(x, x.dim() - 1, p, "scatter_to_tp_region")
    return _ScatterToTP.apply(x, groups)


def gather_from_tp_region(x: torch.Tensor, groups) -> torch.Tensor:
    """All-gather the last dim over tp; backward keeps this rank's slice.

    Conjugate: `scatter_to_tp_region`.
    """
    if axis_size(groups) == 1:
        return x
    return _GatherFromTP.apply(x, groups)


def scatter_to_sequence_region(x: torch.Tensor, groups, dim: int = 1) -> torch.Tensor:
    """Keep this tp rank's slice of `dim`; backward all-gathers. Conjugate: `gather_from_sequence_region`
    with grad_is_partial=False."""
    p = axis_size(groups)
    if p == 1:
        return x
    _check_divisible(x, dim, p, "scatter_to_sequence_region")
    return _ScatterToSequence.apply(x, groups, dim)


def gather_from_sequence_region(
    x: torch.Tensor, groups, dim: int = 1, grad_is_partial: bool = True
) -> torch.Tensor:
    """All-gather `dim` over tp; backward reduce-scatters (or slices when grad_is_partial=False).
    Conjugate: `reduce_scatter_to_sequence_region`."""
    if axis_size(groups) == 1:
        return x
    return _GatherFromSequence.apply(x, groups, dim, bool(grad_is_partial))


def reduce_scatter_to_sequence_region(x: torch.Tensor, groups, dim: int = 1) -> torch.Tensor:
    """Reduce-scatter `dim` over tp; backward all-gathers. Conjugate: `gather_from_sequence_region`."""
    p = axis_size(groups)
    if p == 1:
        return x
    _check_divisible(x, dim, p, "reduce_scatter_to_sequence_region")
    return _ReduceScatterToSequence.apply(x, groups, dim)
