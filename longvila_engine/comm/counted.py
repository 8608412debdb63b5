"""Counted collectives and the input agreement: the one place that calls a torch.distributed collective.

Every wrapper runs one collective on the group of `axis` (a `ParallelGroups` axis: 'tp', 'ring', 'sp',
...), times the blocking call on `groups.stats` and records the bytes that leave this rank, with the
volume formula of the collective:

| wrapper | bytes recorded per rank (p ranks, n bytes of the local input) |
|---|---|
| `all_gather` (list or into one tensor) | (p-1) * n |
| `reduce_scatter` (into one tensor) | (p-1) * n_out |
| `all_reduce` | 2 (p-1)/p * n (ring algorithm) |
| `all_to_all` | the rows that go to other ranks |
| `broadcast` | (p-1) * n (from the source) |

A group of size 1 is the identity and communicates nothing. P2P ring exchanges keep their own object
(`ring.RingExchange`), which records the same way.

`agree` is the input agreement: a rank whose input is bad, or merely different from its peers', must
not enter a ring or an all-to-all alone (its peers would block until the timeout). Every rank
describes its input as a few ints plus an error flag; one all-gather under the counter 'check' shares
them; every rank then raises the same ValueError, or returns the agreed table. It is called once per
batch (when the batch is planned), never inside the step.

Deliberately not here: autograd (the Functions in `all_to_all.py`, `tensor_parallel/mappings.py` and
the attention call these), and group creation (`parallel/groups.py`).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["all_gather", "all_gather_into", "reduce_scatter_into", "all_reduce", "all_to_all", "broadcast",
           "agree", "fingerprint", "DTYPE_CODES"]



def _all_gather_single(out, x, group):
    # torch >= 2.13 names it all_gather_single, older releases all_gather_into_tensor (looked up per
    # call, so tools that wrap torch.distributed see it).
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def _reduce_scatter_single(out, x, group):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_HASH_MOD = (1 << 61) - 1
_HASH_BASE = 1_000_003


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _run(groups, axis: str, nbytes: float, call, *, counter: str | None = None):
    """Run the blocking `call()` timed under `counter` (default: the axis), then record the bytes."""
    name = counter or axis
    with groups.stats.waiting(name):
        out = call()
    groups.stats.record(name, int(nbytes), groups.is_intra_node(axis))
    return out


def all_gather(x: torch.Tensor, groups, axis: str, *, counter: str | None = None) -> list[torch.Tensor]:
    """Every rank's `x` (same shape everywhere), as a list in group order."""
    p = groups.size(axis)
    if p == 1:
        return [x]
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(p)]
    _run(groups, axis, (p - 1) * _nbytes(x), lambda: dist.all_gather(out, x, group=groups.group(axis)),
         counter=counter)
    return out


def _into(out, x, groups, axis: str, nbytes: int, collective) -> torch.Tensor:
    if groups.size(axis) == 1:
        return out.copy_(x)
    _run(groups, axis, nbytes, lambda: collective(out, x, groups.group(axis)))
    return out


def all_gather_into(out: torch.Tensor, x: torch.Tensor, groups, axis: str) -> torch.Tensor:
    """Concatenate the ranks' contiguous `x` along dim 0 into `out` (p * x.shape[0] rows); returns out."""
    return _into(out, x, groups, axis, (groups.size(axis) - 1) * _nbytes(x), _all_gather_single)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, groups, axis: str) -> torch.Tensor:
    """Sum the ranks' contiguous `x` and keep this rank's 1/p of dim 0 in `out`; returns out."""
    return _into(out, x, groups, axis, (groups.size(axis) - 1) * _nbytes(out), _reduce_scatter_single)


def all_reduce(x: torch.Tensor, groups, axis: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of the contiguous `x`; returns x."""
    p = groups.size(axis)
    if p == 1:
        return x
    assert x.is_contiguous(), "all_reduce needs a contiguous tensor"
    _run(groups, axis, 2 * (p - 1) / p * _nbytes(x), lambda: dist.all_reduce(x, op=op, group=groups.group(axis)))
    return x


def all_to_all(send: torch.Tensor, groups, axis: str, send_counts=None, recv_counts=None,
               out_rows: int | None = None) -> torch.Tensor:
    """One all_to_all_single along dim 0: equal splits when the counts are None (block j goes to the
    rank of index j), else `send_counts[j]` rows to rank j and `recv_counts[i]` rows from rank i."""
    ranks = groups.ranks(axis)
    # torch orders a group's members by global rank; our blocks are ordered by index in the axis.
    assert list(ranks) == sorted(ranks), f"{axis} group {ranks} is not in global-rank order"
    send = send.contiguous()
    row_bytes = math.prod(send.shape[1:]) * send.element_size()
    if send_counts is None:
        out = torch.empty_like(send)
        rows_away = send.shape[0] - send.shape[0] // len(ranks)
    else:
        out = send.new_empty((out_rows, *send.shape[1:]))
        rows_away = sum(send_counts) - send_counts[groups.index(axis)]
    _run(groups, axis, rows_away * row_bytes,
         lambda: dist.all_to_all_single(out, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                                        group=groups.group(axis)))
    return out


def broadcast(t: torch.Tensor, groups, axis: str, src_index: int) -> torch.Tensor:
    """In-place broadcast of the contiguous `t` from the rank of index `src_index` in the group."""
    p = groups.size(axis)
    if p == 1:
        return t
    src = groups.ranks(axis)[src_index]
    _run(groups, axis, (p - 1) * _nbytes(t), lambda: dist.broadcast(t, src=src, group=groups.group(axis)))
    return t


# --- agreement ----------------------------------------------------------------------------------------
def fingerprint(values) -> int:
    """Polynomial hash of a list of ints (fits in int64): equal lists give equal fingerprints."""
    h = len(values)
    for x in values:
        h = (h * _HASH_BASE + int(x)) % _HASH_MOD
    return h


def agree(groups, axis: str, fields: dict, local_error: str | None, what: str, *, uncompared=(),
          mismatch_hint: str = "every rank must pass the same global batch") -> list[list[int]]:
    """Raise the same ValueError on every rank of `axis` unless no rank has a local error and all agree
    on `fields`; return the gathered rows (one per rank, in group order, without the error flag).

    `fields` maps names to ints, in the same order on every rank; the names in `uncompared` are gathered
    but not compared (rank-specific values the caller reads from the table). `local_error` is this
    rank's own complaint or None: that rank raises its own message, its peers one naming the rank.
    """
    names = list(fields)
    row = [1 if local_error else 0] + [int(fields[n]) for n in names]
    if groups.size(axis) == 1:
        if local_error:
            raise ValueError(local_error)
        return [row[1:]]
    mine = torch.tensor(row, dtype=torch.int64, device=groups.device)
    table = [r.tolist() for r in all_gather(mine, groups, axis, counter="check")]
    if local_error:
        raise ValueError(local_error)
    failed = [i for i, r in enumerate(table) if r[0]]
    if failed:
        raise ValueError(f"{what}: {axis} rank(s) {failed} rejected their input (their own error says why); "
                         f"every rank of the group stops here instead of hanging in a collective")
    diffs = []
    for j, name in enumerate(names, start=1):
        values = [r[j] for r in table]
        if name not in uncompared and len(set(values)) > 1:
            diffs.append(f"{name}: " + ", ".join(f"rank {i}={v}" for i, v in enumerate(values)))
    if diffs:
        raise ValueError(f"{what}: ranks of the {axis} group disagree on their input ({'; '.join(diffs)}); "
                         f"{mismatch_hint}")
    return [r[1:] for r in table]
