"""Sequence sharding over the sequence-parallel group: layout, padding and the shard/unshard pair.

Layout (docs/design.md section 4), for a padded length L_p, ring size R, Ulysses size U and
sp index i = ulysses_rank + U * ring_rank (the order of `layout.group_ranks('sp', ...)`):

- `scheme="zigzag"`: cut the sequence into 2R chunks of L_p/(2R); ring rank r holds chunks r and
  2R-1-r (equal causal work on every ring rank); that pair, in that order, is split contiguously into
  U pieces of L_p/(R*U), piece u for Ulysses rank u. A piece may straddle the two chunks when U is odd.
  After the Ulysses all-to-all (shards concatenated in Ulysses-rank order) a ring rank holds exactly
  chunks r then 2R-1-r. Concatenating all shards in sp order gives `ops.zigzag_permute(x, R)`.
- `scheme="contiguous"`: sp index i holds the i-th of R*U equal pieces.

A length that does not divide 2*R*U (zigzag) or R*U (contiguous) is padded with zeros at the end,
never truncated; `pad_cu_seqlens` makes the padding its own packed segment so no real token attends to
a pad. Packed varlen batches (B=1, global `cu_seqlens`) are sharded along the packed token axis like
any sequence; `cu_seqlens` stay global and replicated, and the batch plan (`plan.py`) maps them onto
the attention chunks. The layout arithmetic itself lives in `parallel/zigzag.py`.

Not here: the attention itself, the masking of pads inside attention, the label shift (the loss code
shifts globally before sharding), and the token-balanced multimodal redistribution (all-to-all-v).
"""
from __future__ import annotations

import torch

from ..comm.counted import all_gather
from ..parallel import zigzag
from ..parallel.groups import as_groups

__all__ = ["padded_length", "shard_positions", "ring_positions", "pad_cu_seqlens", "shard_sequence",
           "unshard_sequence"]


def padded_length(seq_len: int, groups, scheme: str = "zigzag") -> int:
    """Smallest length >= seq_len that the sp group can shard: a multiple of 2*R*U (zigzag) or R*U."""
    groups = as_groups(groups)
    return zigzag.padded_len(seq_len, groups.ring_size, groups.ulysses_size, scheme)


def shard_positions(seq_len_padded: int, groups, scheme: str = "zigzag", *, device=None) -> torch.Tensor:
    """Global positions (LongTensor, length seq_len_padded/(R*U)) of the tokens this rank holds, in the
    order of its shard. Positions >= the true length are padding. Used for RoPE and by attention code."""
    groups = as_groups(groups)
    R, U = groups.ring_size, groups.ulysses_size
    zigzag.check_padded(seq_len_padded, R, U, scheme)
    return zigzag.positions(zigzag.shard_runs(seq_len_padded, R, U, groups.ring_rank, groups.ulysses_rank, scheme),
                            device)


def ring_positions(seq_len_padded: int, groups, scheme: str = "zigzag", *, device=None) -> torch.Tensor:
    """Global positions of this ring rank's whole local sequence, as it is laid out after the Ulysses
    all-to-all (the U shards concatenated in Ulysses-rank order): for zigzag, chunk r then chunk
    2R-1-r. Length seq_len_padded/R."""
    groups = as_groups(groups)
    R, U = groups.ring_size, groups.ulysses_size
    zigzag.check_padded(seq_len_padded, R, U, scheme)
    runs = [run for u in range(U) for run in zigzag.shard_runs(seq_len_padded, R, U, groups.ring_rank, u, scheme)]
    return zigzag.positions(runs, device)


def pad_cu_seqlens(cu_seqlens: torch.Tensor, padded_len: int) -> torch.Tensor:
    """Append the padding [cu_seqlens[-1], padded_len) as its own trailing packed segment.

    Pads then attend only to pads (their outputs are discarded), and no real token attends to a pad.
    Returns `cu_seqlens` itself when there is no padding. Reads the last offset on the host, so call it
    when preparing the batch, not inside the attention step.
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor of offsets starting at 0")
    total = int(cu_seqlens[-1])
    if total > padded_len:
        raise ValueError(f"cu_seqlens end at {total} tokens, more than padded_len={padded_len}; "
                         f"padded_len must come from padded_length(total, groups, scheme)")
    if total == padded_len:
        return cu_seqlens
    tail = torch.tensor([padded_len], dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return torch.cat([cu_seqlens, tail])


# --- the shard / unshard pair ------------------------------------------------------------------------


def _take_local(x, dim, seq_len, runs):
    """This rank's shard of x (seq_len along dim) for `runs` of the padded sequence; zero for pads."""
    pieces = []
    for a, n in runs:
        real = max(0, min(a + n, seq_len) - a)
        if real:
            pieces.append(x.narrow(dim, a, real))
        if n - real:
            shape = list(x.shape)
            shape[dim] = n - real
            pieces.append(x.new_zeros(shape))
    if not pieces:
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_zeros(shape)
    return torch.cat(pieces, dim)  # always a fresh tensor


def _gather_full(x_local, groups, dim, seq_len, seq_len_padded, scheme):
    """All-gather the shards over `groups.sp` and reassemble the first seq_len positions in order."""
    R, U = groups.ring_size, groups.ulysses_size
    ranks = groups.sp_ranks
    assert list(ranks) == sorted(ranks), f"sp group {ranks} is not in global-rank order"
    pieces = all_gather(x_local.contiguous(), groups, "sp")
    shape = list(x_local.shape)
    shape[dim] = seq_len
    out = x_local.new_empty(shape)
    for i, piece in enumerate(pieces):  # i = ulysses_rank + U * ring_rank
        offset = 0
        for a, n in zigzag.shard_runs(seq_len_padded, R, U, i // U, i % U, scheme):
            real = max(0, min(a + n, seq_len) - a)
            if real:
                out.narrow(dim, a, real).copy_(piece.narrow(dim, offset, real))
            offset += n
    return out


class _ShardSequence(torch.autograd.Function):
    """Split a replicated sequence into this rank's shard (Megatron's "scatter/split" mapping).

    | | forward | backward |
    |---|---|---|
    | collective | none: pad, then take this rank's runs | all-gather over sp, reassemble, drop pads |
    | in | x: seq_len along dim, the same on every sp rank | grad: L_p/(R*U) along dim |
    | out | x_local: L_p/(R*U) along dim, runs of `shard_positions` | grad: seq_len along dim, complete |

    Why all-gather, not zero-fill: the loss of a sequence-parallel step is the sum of the per-shard
    losses, and shard i's loss depends only on rows i of x, so d(sum)/dx is the concatenation of the
    shards' gradients. Each rank thus gets the complete gradient of the total loss with respect to the
    replicated x, as one device would, and the (replicated) producer of x must not sum its gradients
    over sp again. Padding rows take no gradient.
    """

    @staticmethod
    def forward(ctx, x, groups, dim, scheme, seq_len_padded):
        seq_len = x.shape[dim]
        ctx.args = (groups, dim, scheme, seq_len, seq_len_padded)
        runs = zigzag.shard_runs(seq_len_padded, groups.ring_size, groups.ulysses_size, groups.ring_rank,
                                 groups.ulysses_rank, scheme)
        return _take_local(x, dim, seq_len, runs)

    @staticmethod
    def backward(ctx, grad):
        groups, dim, scheme, seq_len, _ = ctx.args
        return _UnshardSequence.apply(grad, groups, dim, scheme, seq_len), None, None, None, None


class _UnshardSequence(torch.autograd.Function):
    """Gather the shards of the sp group into the whole sequence (Megatron's "gather" mapping).

    | | forward | backward |
    |---|---|---|
    | collective | all-gather over sp, reassemble, drop pads | none: pad with zeros, take this rank's runs |
    | in | x_local: L_p/(R*U) along dim | grad: seq_len along dim, the same on every sp rank |
    | out | x: seq_len along dim, the same on every rank | grad: L_p/(R*U) along dim |

    Why split, not reduce-scatter: the gathered x is replicated and is assumed to be consumed
    identically on every sp rank (one logical loss, computed everywhere), so every rank already holds
    the complete gradient and this rank's slice of it is exact. If ranks consumed x differently
    (each rank's loss on different rows), the conjugate would be a reduce-scatter of the partial
    gradients; that is not this function.
    """

    @staticmethod
    def forward(ctx, x_local, groups, dim, scheme, seq_len):
        seq_len_padded = x_local.shape[dim] * groups.ring_size * groups.ulysses_size
        ctx.args = (groups, dim, scheme, seq_len, seq_len_padded)
        return _gather_full(x_local, groups, dim, seq_len, seq_len_padded, scheme)

    @staticmethod
    def backward(ctx, grad):
        groups, dim, scheme, _, seq_len_padded = ctx.args
        return _ShardSequence.apply(grad, groups, dim, scheme, seq_len_padded), None, None, None, None


def _check_dim(x, dim: int) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"expected a tensor with a sequence dimension, got {getattr(x, 'shape', type(x))}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, groups, dim: int = 1, scheme: str = "zigzag") -> torch.Tensor:
    """This rank's shard of the replicated sequence `x` along `dim` (padded at the end to
    `padded_length`); differentiable, backward an all-gather over sp (see `_ShardSequence`)."""
    groups = as_groups(groups)
    dim = _check_dim(x, dim)
    seq_len = x.shape[dim]
    seq_len_padded = padded_length(seq_len, groups, scheme)
    if seq_len_padded == seq_len and groups.ring_size * groups.ulysses_size == 1:
        return x
    return _ShardSequence.apply(x, groups, dim, scheme, seq_len_padded)


def unshard_sequence(x_local: torch.Tensor, groups, dim: int = 1, scheme: str = "zigzag", *,
                     seq_len: int | None = None) -> torch.Tensor:
    """The whole sequence from every sp rank's shard (inverse of `shard_sequence`); differentiable
    all-gather whose backward takes this rank's slice (see `_UnshardSequence`).

    `seq_len` is the true length to return (padding dropped); by default the padded length.
    """
    groups = as_groups(groups)
    zigzag.check_scheme(scheme)
    dim = _check_dim(x_local, dim)
    sp_size = groups.ring_size * groups.ulysses_size
    seq_len_padded = x_local.shape[dim] * sp_size
    zigzag.check_padded(seq_len_padded, groups.ring_size, groups.ulysses_size, scheme)
    if seq_len is None:
        seq_len = seq_len_padded
    elif isinstance(seq_len, bool) or not isinstance(seq_len, int) or \
            padded_length(seq_len, groups, scheme) != seq_len_padded:
        raise ValueError(f"seq_len={seq_len!r} does not match shards of {x_local.shape[dim]} on {sp_size} "
                         f"ranks (padded length {seq_len_padded}): pass the length given to shard_sequence")
    if sp_size == 1 and seq_len == seq_len_padded:
        return x_local
    return _UnshardSequence.apply(x_local, groups, dim, scheme, seq_len)
