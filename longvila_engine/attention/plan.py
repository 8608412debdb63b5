"""`BatchPlan`: everything sequence-parallel attention needs that depends only on the batch, made once.

The functions that shard a batch (`models.local_batch`, `integrations.hf.shard_batch`,
`VisionLanguageModel.embed_shard`) call `plan_batch` once per step. It

- checks this rank's batch description (scheme, lengths, packed `cu_seqlens`) and agrees on it with the
  sp group in ONE tiny all-gather (`comm.counted.agree`), so a bad or mismatched batch raises the same
  ValueError on every rank before any ring or all-to-all;
- copies the global `cu_seqlens` to the host once (`cu_bounds`);
- lays out this ring rank's chunks (`parallel.zigzag`) and builds, for causal attention, the per-ring-step
  block plans (ring) and the block list (all-gather-K/V), with their varlen device tensors and the
  chunk-reorder index of the all-gather, created here and only read afterwards.

Every layer's attention then reads the plan (`sequence_parallel.attention_with_plan`): no host copy,
no `.item()`/`.tolist()`, no agreement and no collective other than the layer's own ring P2P and
Ulysses all-to-alls, forward and backward. The only checks left in the layer are local shape checks
against the plan; they depend on the agreed batch and the model's head counts, identical on every
rank, so they raise alike everywhere.

Deliberately not here: the kernels and the loop (`_blocks.py`, `ring.py`, `allgather.py`), sharding
(`sharding.py`), the layout arithmetic (`parallel/zigzag.py`).

Legend: B batch, S_local this sp rank's shard length, R ring size, U Ulysses size.
"""
from __future__ import annotations

import torch

from ..comm.counted import DTYPE_CODES, agree, fingerprint
from ..parallel.groups import as_groups
from ..parallel.zigzag import SCHEMES, chunk_order, global_chunks, ring_chunks
from ._blocks import plan_blocks

__all__ = ["BatchPlan", "plan_batch", "ring_steps", "ALGORITHMS"]

ALGORITHMS = ("ring", "allgather")


def ring_steps(ring_rank: int, ring_size: int, ring_local_len: int, *, causal: bool, scheme: str = "zigzag",
               cu_bounds=None, device=None) -> list[list]:
    """Per ring step, the kernel calls (`_blocks.Block`) ring rank `ring_rank` makes.

    Step s holds the K/V of ring rank (ring_rank - s) mod R. `cu_bounds`: host list of the global
    offsets, or None. `sum(b.pairs for step in plan for b in step)` is this rank's visible (query, key)
    pairs per batch row and head: the causal work the zigzag layout balances.
    """
    q_chunks = ring_chunks(ring_rank, ring_size, ring_local_len, scheme)
    return [plan_blocks(q_chunks, ring_chunks((ring_rank - step) % ring_size, ring_size, ring_local_len, scheme),
                        causal=causal, cu_seqlens=cu_bounds, device=device)
            for step in range(ring_size)]


class BatchPlan:
    """What every attention layer of one step reads; built by `plan_batch`, never changed afterwards.

    | attribute | meaning |
    |---|---|
    | groups, axis | the `ParallelGroups` and the axis agreed over ('sp'; 'ring' for a bare ring call) |
    | ring_size, ring_rank, ulysses_size | the layout the attention runs on |
    | batch, local_len | B and this rank's shard length S_local (as q arrives at the attention) |
    | ring_local_len, seq_len_padded | S_local * U (a ring rank's sequence) and R * that |
    | scheme | "zigzag" or "contiguous" |
    | cu_seqlens, cu_bounds | global padded int32 offsets on the device, and the same on the host |
    | positions | this rank's RoPE positions (B, S_local) when the batch builder gave them |
    | fields | the agreed description of the batch |
    | q_chunks | global (start, length) chunks of the ring rank's sequence |
    """

    def __init__(self, groups, *, axis, batch, local_len, scheme, cu_seqlens, cu_bounds, positions, fields,
                 device):
        self.groups, self.axis = groups, axis
        self.ring_size, self.ring_rank = groups.ring_size, groups.ring_rank
        self.ulysses_size = groups.ulysses_size if axis == "sp" else 1
        self.batch, self.local_len, self.scheme = batch, local_len, scheme
        self.ring_local_len = local_len * self.ulysses_size
        self.seq_len_padded = self.ring_local_len * self.ring_size
        self.cu_seqlens, self.cu_bounds, self.positions = cu_seqlens, cu_bounds, positions
        self.fields, self.device = dict(fields), device
        # One ring rank holds the sequence in order whatever the scheme (zigzag of R=1 is contiguous).
        self._chunk_scheme = scheme if self.ring_size > 1 else "contiguous"
        self.q_chunks = ring_chunks(self.ring_rank, self.ring_size, self.ring_local_len, self._chunk_scheme)
        self._blocks = {}
        self.to_chunk_order = self.to_rank_order = None
        if self.ring_size > 1:
            for algorithm in ALGORITHMS:  # causal is what the models run; others are made on first use
                self.blocks(algorithm, True)
            if scheme == "zigzag":  # the all-gather's reorder between rank order and chunk order
                order = chunk_order(self.ring_size)
                self.to_rank_order = torch.tensor(order, dtype=torch.long, device=device)
                self.to_chunk_order = torch.tensor(sorted(range(len(order)), key=order.__getitem__),
                                                   dtype=torch.long, device=device)

    def blocks(self, algorithm: str, causal: bool):
        """Ring: the per-step block lists; all-gather: the block list against the global K/V."""
        key = (algorithm, bool(causal))
        if key not in self._blocks:
            if algorithm == "ring":
                self._blocks[key] = ring_steps(self.ring_rank, self.ring_size, self.ring_local_len,
                                               causal=causal, scheme=self._chunk_scheme, cu_bounds=self.cu_bounds,
                                               device=self.device)
            else:
                k_chunks = global_chunks(self.ring_size, self.ring_local_len, self._chunk_scheme)
                self._blocks[key] = plan_blocks(self.q_chunks, k_chunks, causal=causal, cu_seqlens=self.cu_bounds,
                                                device=self.device)
        return self._blocks[key]

    def check(self, q, k, v) -> None:
        """Local shape checks of one layer's q/k/v against the plan (no collective, see module doc)."""
        err = check_qkv_local(q, k, v)
        if err is None and (q.shape[0] != self.batch or q.shape[1] != self.local_len):
            err = (f"q {tuple(q.shape)} does not match the batch plan (batch {self.batch}, local length "
                   f"{self.local_len}): pass the plan made for this batch")
        if err is None and self.cu_seqlens is not None and self.cu_seqlens.device != q.device:
            err = f"the plan's cu_seqlens are on {self.cu_seqlens.device} but q is on {q.device}"
        if err:
            raise ValueError(err)

    def __repr__(self) -> str:
        return (f"BatchPlan(ring={self.ring_size}, ulysses={self.ulysses_size}, batch={self.batch}, "
                f"local_len={self.local_len}, scheme={self.scheme!r}, packed={self.cu_bounds is not None})")


def check_qkv_local(q, k, v) -> str | None:
    """This rank's own complaint about q/k/v (shapes, dtypes), or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{name} must be a 4-D tensor (B, S_local, H, D), got {got}"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, local length and head_dim"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return f"num_heads={q.shape[2]} must be a multiple of num_kv_heads={k.shape[2]} (GQA/MQA)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32,
                                                             torch.float64):
        return f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[1] == 0:
        return "the local sequence is empty; pad the sequence so every rank holds at least one token"
    return None


def qkv_fields(q, k, causal) -> dict:
    """The q/k description every rank of an on-the-fly plan agrees on (zeros when unusable)."""
    if q is None:
        return {"num_heads": 0, "num_kv_heads": 0, "head_dim": 0, "dtype": 0, "causal": int(bool(causal))}
    return {"num_heads": q.shape[2], "num_kv_heads": k.shape[2], "head_dim": q.shape[3],
            "dtype": DTYPE_CODES.get(q.dtype, 0), "causal": int(bool(causal))}


def _check_cu_seqlens(cu_seqlens, batch: int, global_len: int, device) -> tuple[list[int] | None, str | None]:
    """Host list of a global cu_seqlens and an error message (None when fine); never raises."""
    if cu_seqlens is None:
        return None, None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return None, "cu_seqlens must be a 1-D tensor of N+1 >= 2 global offsets"
    if cu_seqlens.dtype != torch.int32:
        return None, f"cu_seqlens must be int32, got {cu_seqlens.dtype}; pass cu_seqlens.to(torch.int32)"
    if batch != 1:
        return None, f"packed varlen input (cu_seqlens given) needs batch size 1, got {batch}"
    if device is not None and cu_seqlens.device != torch.device(device):
        return None, f"cu_seqlens is on {cu_seqlens.device} but the tensors are on {device}"
    bounds = cu_seqlens.tolist()  # the one host copy of the step, made while planning
    if bounds[0] != 0 or bounds[-1] != global_len or any(b < a for a, b in zip(bounds, bounds[1:])):
        return None, (f"cu_seqlens={bounds} must be the GLOBAL offsets over the padded sequence: start at 0, "
                      f"never decrease and end at the padded global length {global_len} (local length x "
                      f"sequence-parallel size); pad_cu_seqlens adds the padding segment")
    return bounds, None


def plan_batch(groups, *, batch: int, local_len: int, scheme: str = "zigzag", cu_seqlens=None, positions=None,
               device=None, axis: str = "sp", local_error: str | None = None, extra_fields: dict | None = None,
               check_peers: bool = True, what: str = "plan_batch") -> BatchPlan:
    """The `BatchPlan` of one batch on this rank: checks, one agreement over `axis`, block plans.

    | arg | meaning |
    |---|---|
    | groups | `ParallelGroups` (None: one process) |
    | batch, local_len | B and the shard length S_local each sp rank holds (as q reaches attention) |
    | scheme | the layout the shards were cut with |
    | cu_seqlens | (N+1,) int32 GLOBAL offsets over the padded sequence (B=1), or None |
    | positions | this rank's RoPE positions, carried for the model (optional) |
    | device | where the plan's tensors go (default: cu_seqlens's device, else groups.device) |
    | axis | 'sp' (q is the sp shard); 'ring' for a bare ring over the Ulysses-gathered sequence |
    | local_error, extra_fields | a caller's own complaint and fields, agreed in the same all-gather |
    | check_peers | False skips the all-gather (the caller agreed on the same fields already) |

    Raises ValueError on every rank of `axis` when any rank's batch is bad or the ranks disagree.
    """
    groups = as_groups(groups, device)
    if device is None:
        device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else groups.device
    U = groups.ulysses_size if axis == "sp" else 1
    R = groups.ring_size
    err, bounds = local_error, None
    if err is None and scheme not in SCHEMES:
        err = f"scheme={scheme!r} is unknown; choose one of {SCHEMES}"
    ring_local = local_len * U
    if err is None and scheme == "zigzag" and R > 1 and ring_local % 2:
        err = (f"zigzag needs an even length per ring rank (chunks r and 2R-1-r), got {ring_local}; pad the "
               f"sequence to a multiple of 2 x ring size x Ulysses size (shard_sequence does)")
    if err is None:
        bounds, err = _check_cu_seqlens(cu_seqlens, batch, ring_local * R, device)
    fields = {"batch": batch, "local_len": local_len, "ring": R, "ulysses": U,
              "scheme": SCHEMES.index(scheme) if scheme in SCHEMES else -1,
              "cu_seqlens_len": len(bounds) if bounds else 0,
              "cu_seqlens_hash": fingerprint(bounds) if bounds else 0}
    fields.update({name: int(value) for name, value in (extra_fields or {}).items()})
    if check_peers:
        agree(groups, axis, fields, err, what)
    elif err:
        raise ValueError(err)
    return BatchPlan(groups, axis=axis, batch=batch, local_len=local_len, scheme=scheme, cu_seqlens=cu_seqlens,
                     cu_bounds=bounds, positions=positions, fields=fields, device=device)
