"""Ulysses all-to-all and all-to-all-v as autograd pairs (docs/design.md sections 5, 7 and 9).

Each collective is a `torch.autograd.Function` whose backward is the conjugate collective, in the
manner of Megatron's `tensor_parallel/mappings.py`:

| forward | backward |
|---|---|
| `seq_to_head_all_to_all`: scatter heads, gather sequence | `head_to_seq_all_to_all` of the gradient |
| `head_to_seq_all_to_all`: scatter sequence, gather heads | `seq_to_head_all_to_all` of the gradient |
| `all_to_all_v(send_counts, recv_counts)` | `all_to_all_v(recv_counts, send_counts)` of the gradient |

All of them are permutations of data across ranks, so the backward is exact (no arithmetic). Each
backward calls the conjugate Function itself, so double backward works too.
Every call records on `groups.stats` the bytes that leave this rank (the block a rank keeps for itself
is a local copy and is not counted) and the time blocked in the collective. A group of size 1 is the
identity and communicates nothing.

Not here: K/V head replication for U > H_kv and the attention itself (`attention/ulysses.py`), and
the ring exchange.

Legend: B batch, S_local this rank's sequence shard, H heads on this rank, D head dim, U Ulysses size.
"""
from __future__ import annotations

import torch

from .counted import all_to_all as _exchange

__all__ = ["seq_to_head_all_to_all", "head_to_seq_all_to_all", "all_to_all_v"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_4d(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor (B, S, H, D), got {shape}")


def _seq_to_head(x: torch.Tensor, groups) -> torch.Tensor:
    """(B, S_local, H, D) -> (B, U*S_local, H/U, D); no checks (callers validate)."""
    U = groups.ulysses_size
    B, S, H, D = x.shape
    # Block j of dim 0 = head group j, destined for Ulysses rank j.
    send = x.reshape(B, S, U, H // U, D).permute(2, 0, 1, 3, 4)
    recv = _exchange(send, groups, "ulysses")
    # recv[j] = Ulysses rank j's sequence shard of my head group: concatenate in rank order.
    return recv.permute(1, 0, 2, 3, 4).reshape(B, U * S, H // U, D)


def _head_to_seq(x: torch.Tensor, groups) -> torch.Tensor:
    """(B, U*S_local, H/U, D) -> (B, S_local, H, D); no checks (callers validate)."""
    U = groups.ulysses_size
    B, SU, Hl, D = x.shape
    S = SU // U
    # Block j of dim 0 = sequence shard j, going home to Ulysses rank j.
    send = x.reshape(B, U, S, Hl, D).permute(1, 0, 2, 3, 4)
    recv = _exchange(send, groups, "ulysses")
    # recv[j] = my sequence shard of head group j: heads concatenate in rank order.
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S, U * Hl, D)


class _SeqToHead(torch.autograd.Function):
    """Ulysses all-to-all, heads scattered and sequence gathered, over `groups.ulysses`.

    | | forward | backward |
    |---|---|---|
    | collective | all-to-all: scatter heads, gather sequence | all-to-all: scatter sequence, gather heads |
    | in | x (B, S_local, H, D): sequence shard u, all H heads | grad (B, U*S_local, H/U, D) |
    | out | (B, U*S_local, H/U, D): heads [u*H/U, (u+1)*H/U) | grad (B, S_local, H, D) |

    The output's sequence is the U shards concatenated in Ulysses-rank order.
    """

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return _seq_to_head(x, groups)

    @staticmethod
    def backward(ctx, grad):
        return _HeadToSeq.apply(grad, ctx.groups), None


class _HeadToSeq(torch.autograd.Function):
    """Inverse Ulysses all-to-all, sequence scattered and heads gathered, over `groups.ulysses`.

    | | forward | backward |
    |---|---|---|
    | collective | all-to-all: scatter sequence, gather heads | all-to-all: scatter heads, gather sequence |
    | in | x (B, U*S_local, H/U, D): full local sequence, head group u | grad (B, S_local, H, D) |
    | out | (B, S_local, H, D): sequence shard u, all heads | grad (B, U*S_local, H/U, D) |

    The output's heads are the U head groups concatenated in Ulysses-rank order.
    """

    @staticmethod
    def forward(ctx, x, groups):
        ctx.groups = groups
        return _head_to_seq(x, groups)

    @staticmethod
    def backward(ctx, grad):
        return _SeqToHead.apply(grad, ctx.groups), None


def seq_to_head_all_to_all(x: torch.Tensor, groups) -> torch.Tensor:
    """(B, S_local, H, D) -> (B, S_local*U, H/U, D) over the Ulysses group; differentiable.

    Ulysses rank u ends with head group [u*H/U, (u+1)*H/U) of the whole sequence held by its Ulysses
    group, the U sequence shards concatenated in Ulysses-rank order. Backward: `head_to_seq_all_to_all`.
    """
    _check_4d("x", x)
    U = groups.ulysses_size
    H = x.shape[2]
    if H % U:
        raise ValueError(f"num_heads={H} (x.shape[2]) is not divisible by the Ulysses size U={U}; "
                         f"U values that divide {H} heads: {_divisors(H)}")
    if U == 1:
        return x
    return _SeqToHead.apply(x, groups)


def head_to_seq_all_to_all(x: torch.Tensor, groups) -> torch.Tensor:
    """(B, S_local*U, H/U, D) -> (B, S_local, H, D) over the Ulysses group; inverse of
    `seq_to_head_all_to_all`, and its backward is `seq_to_head_all_to_all`."""
    _check_4d("x", x)
    U = groups.ulysses_size
    S = x.shape[1]
    if S % U:
        raise ValueError(f"sequence length {S} (x.shape[1]) is not divisible by the Ulysses size U={U}: "
                         f"it must be U times the local shard length")
    if U == 1:
        return x
    return _HeadToSeq.apply(x, groups)


def _all_to_all_v(x, send_counts, recv_counts, groups, axis, dim):
    moved = x.movedim(dim, 0)
    out = _exchange(moved, groups, axis, send_counts, recv_counts, out_rows=sum(recv_counts))
    return out.movedim(0, dim)


class _AllToAllV(torch.autograd.Function):
    """All-to-all with uneven splits along `dim` over the `axis` group.

    | | forward | backward |
    |---|---|---|
    | collective | all-to-all-v (send_counts, recv_counts) | all-to-all-v (recv_counts, send_counts) |
    | in | x: sum(send_counts) along dim | grad: sum(recv_counts) along dim |
    | out | sum(recv_counts) along dim | grad: sum(send_counts) along dim |

    Rows [sum(send_counts[:j]), +send_counts[j]) of x go to rank j; the output holds rank i's rows
    for i in rank order.

    Every row of the output is one row of some rank's input, so in backward each row's gradient goes
    back to the rank (and position) that sent it: the inverse exchange, exact.
    """

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, groups, axis, dim):
        ctx.args = (send_counts, recv_counts, groups, axis, dim)
        return _all_to_all_v(x, send_counts, recv_counts, groups, axis, dim)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts, groups, axis, dim = ctx.args
        grad_x = _AllToAllV.apply(grad, recv_counts, send_counts, groups, axis, dim)
        return grad_x, None, None, None, None, None


def _counts(name: str, counts, size: int, axis: str) -> list[int]:
    try:
        values = [int(c) for c in counts]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of ints, one per rank of {axis!r}, "
                         f"got {counts!r}") from None
    if len(values) != size or any(c < 0 for c in values):
        raise ValueError(f"{name}={values} must hold {size} non-negative counts, one per rank of the "
                         f"{axis!r} group")
    return values


def all_to_all_v(x: torch.Tensor, send_counts, recv_counts, groups, axis: str, dim: int = 0) -> torch.Tensor:
    """Uneven all-to-all along `dim` over the `axis` group ('ulysses', 'ring', 'sp', ...); differentiable.

    `send_counts[j]` consecutive slices of `x` along `dim` go to the rank of index j in the group (in
    order); `recv_counts[i]` slices arrive from rank i and are concatenated in rank order. The counts
    must agree across ranks (`recv_counts[i]` here equals `send_counts[me]` on rank i); that cannot be
    checked without an extra collective, so it is the caller's contract. Zero counts are allowed.
    The result is a view with `dim` moved back into place (contiguous when dim is 0).
    Backward: the inverse all-to-all-v, each gradient row returned to the rank that sent the row.
    """
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor with at least one dimension, got {got}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D tensor")
    dim = dim % x.dim()
    size = groups.size(axis)
    send_counts = _counts("send_counts", send_counts, size, axis)
    recv_counts = _counts("recv_counts", recv_counts, size, axis)
    if sum(send_counts) != x.shape[dim]:
        raise ValueError(f"send_counts={send_counts} sum to {sum(send_counts)} but x.shape[{dim}]="
                         f"{x.shape[dim]}; they must cover x exactly")
    if size == 1:
        if recv_counts != send_counts:
            raise ValueError(f"a group of one rank receives what it sends: recv_counts={recv_counts} "
                             f"must equal send_counts={send_counts}")
        return x
    return _AllToAllV.apply(x, tuple(send_counts), tuple(recv_counts), groups, axis, dim)
