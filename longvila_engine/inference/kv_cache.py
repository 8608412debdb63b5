"""`KVCache`: this rank's preallocated K/V of one sequence, filled by prefill and written in place.

The cache is an argument of the model, not a hook on it: `Transformer.decode(..., kv_cache=cache)`
hands each layer `cache.layer(i)`, and `Attention.forward` either stores its K/V (prefill: the
sequence-parallel shard, after RoPE, padding rows dropped) or, while the cache is decoding, attends the
one new token over the cache. One K and one V buffer of shape (layers, 1, capacity, H_kv, D) are
allocated up front; nothing is concatenated or reallocated while decoding.

Decoding over the sp group (docs/design.md section 8): the new token's K/V is written by one rank only (the
`owner` of the step, round-robin), every rank attends over its own rows, and the partial
(out, lse) of the ranks are all-gathered over sp and merged by log-sum-exp in sp order, so every rank
computes the same result from the same bytes.

| call | when | what |
|---|---|---|
| `start_prefill(keep)` | before the prefill forward | the local rows (real positions) to store |
| `finish_prefill()` | after it | length = rows stored; the cache decodes from now on |
| `begin_step(owner)` / `end_step()` | around each decode forward | whether this rank stores the token |

Not here: the decoding loop and the prefill sharding (`generate.py`), sampling, paged or batched caches.
Legend: H query heads, H_kv key/value heads, D head dim.
"""
from __future__ import annotations

import torch

from ..comm.counted import all_gather
from ..ops import block_attention, merge_attention

__all__ = ["KVCache"]


class KVCache:
    """K/V of `num_layers` layers for up to `capacity` positions of one sequence on this rank."""

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int, groups, *, dtype,
                 device=None, backend: str | None = None):
        for name, value in (("num_layers", num_layers), ("capacity", capacity), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "capacity" else 1):
                raise ValueError(f"KVCache {name}={value!r} must be a positive int")
        shape = (num_layers, 1, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.groups, self.capacity = groups, capacity
        self.backend = backend  # attention backend of the decode steps (None: the layer's)
        self.length = 0  # positions cached here (a host int: the decoding loop runs on the host anyway)
        self.decoding = False
        self.owner = False
        self._keep = None

    def layer(self, index: int) -> _LayerCache:
        return _LayerCache(self, index)

    def start_prefill(self, keep: torch.Tensor) -> None:
        """The prefill forward stores local rows `keep` (LongTensor, ascending) of every layer's K/V."""
        if keep.numel() > self.capacity:
            raise ValueError(f"the prompt keeps {keep.numel()} positions on this rank but the cache holds "
                             f"{self.capacity}; allocate a larger capacity")
        self._keep, self.decoding = keep, False

    def finish_prefill(self) -> None:
        self.length, self._keep, self.decoding = int(self._keep.numel()), None, True

    def begin_step(self, owner: bool) -> None:
        if owner and self.length >= self.capacity:
            raise ValueError(f"the KV cache is full ({self.capacity} positions); allocate a larger capacity")
        self.owner = bool(owner)

    def end_step(self) -> None:
        self.length += int(self.owner)
        self.owner = False

    @property
    def nbytes(self) -> int:
        """Bytes of the cached K and V (the positions in use, every layer)."""
        per_position = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * per_position * self.length


class _LayerCache:
    """One layer's view of a `KVCache`: what `Attention.forward` calls."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def decoding(self) -> bool:
        return self.cache.decoding

    def store_prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (1, S_local, H_kv, D) after RoPE: copy the kept rows into the buffers, in place."""
        keep = self.cache._keep
        n = keep.numel()
        self.cache.k[self.index, :, :n].copy_(k.index_select(1, keep))
        self.cache.v[self.index, :, :n].copy_(v.index_select(1, keep))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """Attention of the new token q (1, 1, H, D) over every cached position of the sp group.

        The owner writes k, v (1, 1, H_kv, D) at its next row first; each rank's partial over its
        rows is merged over sp (one all-gather of (out, lse)). Returns (1, 1, H, D) in q's dtype.
        """
        cache = self.cache
        backend = cache.backend or backend
        n = cache.length
        if cache.owner:
            cache.k[self.index, :, n:n + 1].copy_(k)
            cache.v[self.index, :, n:n + 1].copy_(v)
            n += 1
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, S, H, D = q.shape
        out = torch.zeros((B, S, H, D), dtype=acc, device=q.device)
        lse = torch.full((B, H, S), float("-inf"), dtype=acc, device=q.device)
        if n:  # merged into the empty (out=0, lse=-inf) result: exact, the weights are 0 and 1
            block_attention(q, cache.k[self.index, :, :n], cache.v[self.index, :, :n], causal=False, out=out,
                            lse=lse, backend=backend)
        groups = cache.groups
        if groups.sp_size > 1:
            packed = torch.cat([out.reshape(-1), lse.reshape(-1)])
            pieces = all_gather(packed, groups, "sp")
            out.zero_()
            lse.fill_(float("-inf"))
            for piece in pieces:  # in sp order, identical on every rank
                merge_attention(out, lse, piece[:out.numel()].view_as(out), piece[out.numel():].view_as(lse),
                                backend=backend)
        return out.to(q.dtype)
