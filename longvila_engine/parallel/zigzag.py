"""The sequence layouts of the sp group, as pure integer arithmetic: the one home of zigzag and contiguous.

For a padded length L_p, ring size R and Ulysses size U, sp index i = ulysses_rank + U * ring_rank:

- `"zigzag"`: cut the sequence into 2R chunks of L_p/(2R); ring rank r holds chunks r and 2R-1-r
  (equal causal work on every ring rank), in that order; that pair is split contiguously into U
  pieces of L_p/(R*U), piece u for Ulysses rank u (a piece may straddle the two chunks when U is odd).
  After the Ulysses all-to-all a ring rank holds exactly chunk r then chunk 2R-1-r.
- `"contiguous"`: sp index i holds the i-th of R*U equal pieces; ring rank r holds piece r of R.

A "run" is a global (start, length) range; a rank's shard is the concatenation of its runs. Everything
here takes and returns ints (or, for `positions`/`sp_order`, a LongTensor built from them): no process
group, no device work, so it is tested for any R, U without processes and every other module (the
shard/unshard pair, the attention block plans, the all-gather reorder, the multimodal plan, the
reference zigzag permute) imports it instead of re-deriving it.
"""
from __future__ import annotations

import torch

__all__ = ["SCHEMES", "check_scheme", "multiple", "padded_len", "check_padded", "shard_runs", "ring_chunks",
           "global_chunks", "chunk_order", "positions", "sp_order"]

SCHEMES = ("zigzag", "contiguous")


def check_scheme(scheme) -> None:
    """ValueError naming the accepted schemes unless `scheme` is one of them."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; choose one of {SCHEMES}")


def multiple(ring_size: int, ulysses_size: int, scheme: str) -> int:
    """What a padded length must be a multiple of: 2*R*U (zigzag) or R*U (contiguous)."""
    check_scheme(scheme)
    return (2 if scheme == "zigzag" else 1) * ring_size * ulysses_size


def padded_len(seq_len: int, ring_size: int, ulysses_size: int, scheme: str) -> int:
    """Smallest length >= seq_len that R x U ranks can shard in `scheme`."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    m = multiple(ring_size, ulysses_size, scheme)
    return -(-seq_len // m) * m


def check_padded(seq_len_padded, ring_size: int, ulysses_size: int, scheme: str) -> None:
    m = multiple(ring_size, ulysses_size, scheme)
    if isinstance(seq_len_padded, bool) or not isinstance(seq_len_padded, int) or seq_len_padded < 0 \
            or seq_len_padded % m:
        raise ValueError(f"seq_len_padded={seq_len_padded!r} must be a non-negative multiple of {m} "
                         f"(ring={ring_size}, ulysses={ulysses_size}, scheme={scheme!r}); "
                         f"use padded_length(seq_len, groups, scheme)")


def shard_runs(seq_len_padded: int, ring_size: int, ulysses_size: int, ring_rank: int, ulysses_rank: int,
               scheme: str) -> list[tuple[int, int]]:
    """Global runs held by (ring_rank, ulysses_rank), in local order (at most two)."""
    R, U = ring_size, ulysses_size
    n = seq_len_padded // (R * U)
    if scheme == "contiguous":
        return [((ulysses_rank + U * ring_rank) * n, n)]
    check_scheme(scheme)
    c = seq_len_padded // (2 * R)
    lo, hi = ulysses_rank * n, (ulysses_rank + 1) * n  # offsets into the pair (chunk r, chunk 2R-1-r)
    runs = []
    if lo < c:
        runs.append((ring_rank * c + lo, min(hi, c) - lo))
    if hi > c:
        start = max(lo, c)
        runs.append(((2 * R - 1 - ring_rank) * c + start - c, hi - start))
    return [(a, length) for a, length in runs if length > 0]


def ring_chunks(ring_rank: int, ring_size: int, ring_local_len: int, scheme: str) -> list[tuple[int, int]]:
    """Global chunks of ring rank `ring_rank`'s whole local sequence (length `ring_local_len`, the U
    Ulysses shards together), in order: zigzag chunks r then 2R-1-r, or contiguous piece r."""
    if scheme == "zigzag":
        c = ring_local_len // 2
        return [(ring_rank * c, c), ((2 * ring_size - 1 - ring_rank) * c, c)]
    check_scheme(scheme)
    return [(ring_rank * ring_local_len, ring_local_len)]


def global_chunks(ring_size: int, ring_local_len: int, scheme: str) -> list[tuple[int, int]]:
    """The chunks of the whole sequence in global order (2R for zigzag, R for contiguous)."""
    n = 2 * ring_size if scheme == "zigzag" else ring_size
    c = ring_size * ring_local_len // n
    return [(i * c, c) for i in range(n)]


def chunk_order(ring_size: int) -> list[int]:
    """Zigzag chunk held at each position of the rank-ordered sequence: [0, 2R-1, 1, 2R-2, ...]."""
    return [c for r in range(ring_size) for c in (r, 2 * ring_size - 1 - r)]


def positions(runs, device=None) -> torch.Tensor:
    """LongTensor of the global positions covered by `runs`, in order."""
    if not runs:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(a, a + n, dtype=torch.long, device=device) for a, n in runs])


def sp_order(seq_len_padded: int, ring_size: int, ulysses_size: int, scheme: str = "zigzag") -> torch.Tensor:
    """(seq_len_padded,) global positions in sp order: sp index i holds entries [i*n, (i+1)*n),
    n = seq_len_padded/(R*U), in the order of its shard (every rank's shard at once)."""
    check_padded(seq_len_padded, ring_size, ulysses_size, scheme)
    return positions([run for r in range(ring_size) for u in range(ulysses_size)
                      for run in shard_runs(seq_len_padded, ring_size, ulysses_size, r, u, scheme)])
