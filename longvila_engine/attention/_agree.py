"""Agreement of sequence-parallel inputs across a group: one tiny all-gather before any big collective.

A rank whose input is bad, or merely different from its peers', must not enter a ring or an
all-to-all alone: the others would block in a send that never matches and the job would hang until
the collective timeout. So every rank first describes its input as a short int64 vector (a flag for
a local error, shape fields, a fingerprint of `cu_seqlens`), the group all-gathers these vectors,
and every rank raises a ValueError when any rank reported an error or the fields disagree.

The check's few bytes are recorded under the axis name 'check', so the ring / Ulysses counters keep
exactly the analytic volume of the attention itself.

Deliberately not here: checks that need no peer (ops/_validate.py), and the attention itself.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_HASH_MOD = (1 << 61) - 1
_HASH_BASE = 1_000_003
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def fingerprint(values) -> int:
    """Polynomial hash of a list of ints (fits in int64): equal lists give equal fingerprints."""
    h = len(values)
    for x in values:
        h = (h * _HASH_BASE + int(x)) % _HASH_MOD
    return h


def agree(groups, axis: str, fields: dict, local_error: str | None, what: str) -> None:
    """Raise the same ValueError on every rank of `axis` unless all ranks agree on `fields`.

    `fields` maps names to ints (identical key order on every rank); `local_error` is this rank's own
    complaint about its input, or None. A rank with a local error raises its own message; its peers
    raise one naming the rank. With one rank in the group only the local error can raise.
    """
    names = list(fields)
    size = groups.size(axis)
    if size == 1:
        if local_error:
            raise ValueError(local_error)
        return
    row = [1 if local_error else 0] + [int(fields[n]) for n in names]
    mine = torch.tensor(row, dtype=torch.int64, device=groups.device)
    rows = [torch.empty_like(mine) for _ in range(size)]
    with groups.stats.waiting("check"):
        dist.all_gather(rows, mine, group=groups.group(axis))
    groups.stats.record("check", mine.numel() * mine.element_size() * (size - 1), groups.is_intra_node(axis))
    table = [r.tolist() for r in rows]
    if local_error:
        raise ValueError(local_error)
    failed = [i for i, r in enumerate(table) if r[0]]
    if failed:
        raise ValueError(f"{what}: {axis} rank(s) {failed} rejected their input (their own error says why); "
                         f"every rank of the group stops here instead of hanging in the exchange")
    diffs = []
    for j, name in enumerate(names, start=1):
        values = [r[j] for r in table]
        if len(set(values)) > 1:
            diffs.append(f"{name}: " + ", ".join(f"rank {i}={v}" for i, v in enumerate(values)))
    if diffs:
        raise ValueError(f"{what}: ranks of the {axis} group disagree on their input ({'; '.join(diffs)}). "
                         f"Every rank must pass shards of one global batch: equal local lengths, head "
                         f"counts and dtype, and the identical global cu_seqlens")


def input_fields(q, k, cu_bounds, *, causal, scheme, **extra) -> dict:
    """Fields every rank of a sequence-parallel group must agree on (zeros where q/k are unusable)."""
    ok = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k))
    B, S, H, D = tuple(q.shape) if ok else (0, 0, 0, 0)
    schemes = ("zigzag", "contiguous")
    fields = {"batch": B, "local_len": S, "num_heads": H, "num_kv_heads": k.shape[2] if ok else 0,
              "head_dim": D, "dtype": DTYPE_CODES.get(q.dtype, 0) if ok else 0, "causal": bool(causal),
              "scheme": schemes.index(scheme) if scheme in schemes else -1,
              "cu_seqlens_len": len(cu_bounds) if cu_bounds else 0,
              "cu_seqlens_hash": fingerprint(cu_bounds) if cu_bounds else 0}
    fields.update({name: int(value) for name, value in extra.items()})
    return fields
