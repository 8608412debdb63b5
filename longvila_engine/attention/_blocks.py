"""Block plans for sequence-parallel attention: which (query chunk, key chunk) pairs to compute, and how.

Ring and all-gather attention both see the global (padded) sequence as chunks with known global
positions: zigzag cuts it into 2R chunks and ring rank r holds chunks r and 2R-1-r, in that order;
contiguous cuts it into R pieces and ring rank r holds piece r. Given the query chunks a rank holds
and the key chunks of a K/V buffer, `plan_blocks` decides per pair

| pair | block |
|---|---|
| key chunk is the query chunk | causal (top-left aligned is right: same positions) |
| key chunk entirely earlier | full (non-causal) |
| key chunk entirely later | skipped |

(everything is full when not causal), merges neighbouring full key chunks of one query chunk into one
call, and for packed varlen input intersects the global segments with each block's query and key
position ranges to get the block's own cu_seqlens (empty segments allowed). Plans are built on the
host before any step loop, so the loop never synchronises.

Accumulators are kept per query chunk (out (B, C, H, D) and lse (B, H, C) must be contiguous to be
merged into in place, which a slice of one (B, H, S) tensor is not).

Deliberately not here: communication, and the autograd Functions (ring.py, allgather.py).

Legend: B batch, C chunk length, H query heads, H_kv key/value heads, D head dim, R ring size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import acc_dtype, block_attention, block_attention_backward, visible_pairs

SCHEMES = ("zigzag", "contiguous")


class Block(NamedTuple):
    """One kernel call: local query chunk `q_index` against rows [k_start, k_end) of the K/V buffer."""

    q_index: int
    k_start: int
    k_end: int
    causal: bool
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    pairs: int  # visible (query, key) pairs per batch row and head


def chunk_ranges(ring_rank: int, ring_size: int, local_len: int, scheme: str) -> list[tuple[int, int]]:
    """Global (start, length) of the chunks making up ring rank `ring_rank`'s local sequence, in order."""
    if scheme == "zigzag":
        c = local_len // 2
        return [(ring_rank * c, c), ((2 * ring_size - 1 - ring_rank) * c, c)]
    if scheme == "contiguous":
        return [(ring_rank * local_len, local_len)]
    raise ValueError(f"scheme={scheme!r} is unknown; choose one of {SCHEMES}")


def global_chunks(ring_size: int, local_len: int, scheme: str) -> list[tuple[int, int]]:
    """The chunks of the whole sequence in global order (the K/V buffer of all-gather attention)."""
    n = 2 * ring_size if scheme == "zigzag" else ring_size
    c = ring_size * local_len // n
    return [(i * c, c) for i in range(n)]


def _clip(bounds: list[int], start: int, end: int) -> list[int]:
    return [min(max(b, start), end) - start for b in bounds]


def _make_block(q_index, k_start, k_end, q_range, k_range, causal, bounds, device) -> Block | None:
    (qa, qb), (ka, kb) = q_range, k_range
    if bounds is None:
        # A merged run may join chunks that are not neighbours globally: count its local rows.
        pairs = visible_pairs(qb - qa, k_end - k_start, causal)
        return Block(q_index, k_start, k_end, causal, None, None, pairs)
    cu_q, cu_k = _clip(bounds, qa, qb), _clip(bounds, ka, kb)
    pairs = sum(visible_pairs(cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i], causal)
                for i in range(len(cu_q) - 1))
    if pairs == 0:  # no segment spans both ranges: nothing to attend
        return None
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)
    return Block(q_index, k_start, k_end, causal, as_tensor(cu_q), as_tensor(cu_k), pairs)


def plan_blocks(q_chunks, k_chunks, *, causal: bool, cu_seqlens=None, device=None) -> list[Block]:
    """Kernel calls for local query chunks `q_chunks` against a K/V buffer made of `k_chunks`.

    Both are lists of global (start, length), in buffer order. `cu_seqlens`: host list of the global
    segment bounds (packed varlen), or None. Chunks either coincide or do not overlap (both layouts
    cut the sequence on one grid).
    """
    blocks = []
    for qi, (qa, ql) in enumerate(q_chunks):
        run = None  # [k_start, k_end, global_start, global_end] of a run of full key chunks
        offset = 0
        for ka, kl in k_chunks:
            kind = "full"
            if causal:
                if ka == qa:
                    kind = "diag"
                elif ka >= qa + ql:
                    kind = "skip"
                assert kind != "full" or ka + kl <= qa, "chunks overlap without coinciding"
            # Merging keeps local K rows contiguous; with varlen the global range must be too, or a
            # segment could appear twice in one block's cu_seqlens_k.
            mergeable = run is not None and run[1] == offset and (cu_seqlens is None or run[3] == ka)
            if kind == "full" and mergeable:
                run[1], run[3] = offset + kl, ka + kl
            else:
                if run is not None:
                    blocks.append(_make_block(qi, run[0], run[1], (qa, qa + ql), (run[2], run[3]), False,
                                              cu_seqlens, device))
                    run = None
                if kind == "full":
                    run = [offset, offset + kl, ka, ka + kl]
                elif kind == "diag":
                    blocks.append(_make_block(qi, offset, offset + kl, (qa, qa + ql), (ka, ka + kl), True,
                                              cu_seqlens, device))
            offset += kl
        if run is not None:
            blocks.append(_make_block(qi, run[0], run[1], (qa, qa + ql), (run[2], run[3]), False,
                                      cu_seqlens, device))
    return [b for b in blocks if b is not None]


def split_chunks(x: torch.Tensor, chunks, dim: int = 1) -> list[torch.Tensor]:
    """Cut `dim` of `x` into the local chunks (contiguous copies only where a slice is not)."""
    out, offset = [], 0
    for _, length in chunks:
        out.append(x.narrow(dim, offset, length).contiguous())
        offset += length
    return out


def new_accumulators(q_chunks):
    """Zero outputs and -inf lse per query chunk, in the accumulator dtype (float32, or float64)."""
    acc = acc_dtype(q_chunks[0].dtype)
    outs = [torch.zeros(q.shape, dtype=acc, device=q.device) for q in q_chunks]
    lses = [torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc, device=q.device)
            for q in q_chunks]
    return outs, lses


def _rows(x, block):
    return x[:, block.k_start:block.k_end].contiguous()


def forward_blocks(q_chunks, k, v, blocks, outs, lses, *, softmax_scale, backend) -> None:
    """Merge every block's attention into the running (outs[i], lses[i]) of its query chunk, in place."""
    for b in blocks:
        block_attention(q_chunks[b.q_index], _rows(k, b), _rows(v, b), causal=b.causal,
                        softmax_scale=softmax_scale, out=outs[b.q_index], lse=lses[b.q_index],
                        cu_seqlens_q=b.cu_seqlens_q, cu_seqlens_k=b.cu_seqlens_k, backend=backend)


def backward_blocks(dout_chunks, q_chunks, k, v, out_chunks, lse_chunks, blocks, dqs, dk, dv, *,
                    softmax_scale, backend) -> None:
    """Accumulate every block's gradients: dqs[i] per query chunk, dk/dv rows of the K/V buffer (all in
    the accumulator dtype), against the final (out, lse) of each query chunk."""
    for b in blocks:
        i = b.q_index
        dk_rows, dv_rows = dk[:, b.k_start:b.k_end], dv[:, b.k_start:b.k_end]
        args = (dout_chunks[i], q_chunks[i], _rows(k, b), _rows(v, b), out_chunks[i], lse_chunks[i])
        kw = dict(causal=b.causal, softmax_scale=softmax_scale, cu_seqlens_q=b.cu_seqlens_q,
                  cu_seqlens_k=b.cu_seqlens_k, backend=backend)
        if dk_rows.is_contiguous():
            block_attention_backward(*args, dq=dqs[i], dk=dk_rows, dv=dv_rows, **kw)
        else:  # B > 1 and a partial row range: accumulate through a temporary
            gq, gk, gv = block_attention_backward(*args, **kw)
            dqs[i].add_(gq)
            dk_rows.add_(gk)
            dv_rows.add_(gv)


def check_cu_seqlens(cu_seqlens, batch: int, global_len: int, device) -> tuple[list[int] | None, str | None]:
    """Host list of a global cu_seqlens and an error message (None when fine); never raises, so the
    caller can share the verdict with its peers before raising."""
    if cu_seqlens is None:
        return None, None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        return None, "cu_seqlens must be a 1-D tensor of N+1 >= 2 global offsets"
    if cu_seqlens.dtype != torch.int32:
        return None, f"cu_seqlens must be int32, got {cu_seqlens.dtype}; pass cu_seqlens.to(torch.int32)"
    if batch != 1:
        return None, f"packed varlen input (cu_seqlens given) needs batch size 1, got {batch}"
    if cu_seqlens.device != torch.device(device):
        return None, f"cu_seqlens is on {cu_seqlens.device} but the tensors are on {device}"
    bounds = cu_seqlens.tolist()  # one host copy before the loop, never inside it
    if bounds[0] != 0 or bounds[-1] != global_len or any(b < a for a, b in zip(bounds, bounds[1:])):
        return None, (f"cu_seqlens={bounds} must be the GLOBAL offsets over the padded sequence: start at 0, "
                      f"never decrease and end at the padded global length {global_len} (local length x "
                      f"sequence-parallel size); pad_cu_seqlens adds the padding segment")
    return bounds, None


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


def check_inputs(q, k, v, scheme, cu_seqlens, *, ring_size, ulysses_size=1):
    """(host cu_seqlens bounds, this rank's complaint or None) for local shards (B, S_local, ...) of a
    sequence split over ring_size x ulysses_size ranks; never raises, so the verdict can be shared with
    the peers first."""
    err = check_qkv_local(q, k, v)
    if err:
        return None, err
    if scheme not in SCHEMES:
        return None, f"scheme={scheme!r} is unknown; choose one of {SCHEMES}"
    ring_local = q.shape[1] * ulysses_size
    if scheme == "zigzag" and ring_local % 2:
        return None, (f"zigzag needs an even length per ring rank (chunks r and 2R-1-r), got {ring_local}; "
                      f"pad the sequence to a multiple of 2 x ring size x Ulysses size (shard_sequence does)")
    return check_cu_seqlens(cu_seqlens, q.shape[0], ring_local * ring_size, q.device)
