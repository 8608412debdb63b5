"""Block plans for sequence-parallel attention: which (query chunk, key chunk) pairs to compute, and how.

Ring and all-gather attention both see the global (padded) sequence as chunks with known global
positions: zigzag cuts it into 2R chunks and ring rank r holds chunks r and 2R-1-r, in that order;
contiguous cuts it into R pieces and ring rank r holds piece r (`parallel/zigzag.py`). Given the
query chunks a rank holds and the key chunks of a K/V buffer, `plan_blocks` decides per pair

| pair | block |
|---|---|
| key chunk is the query chunk | causal (top-left aligned is right: same positions) |
| key chunk entirely earlier | full (non-causal) |
| key chunk entirely later | skipped |

(everything is full when not causal), merges neighbouring full key chunks of one query chunk into one
call, and for packed varlen input intersects the global segments with each block's query and key
position ranges to get the block's own cu_seqlens (empty segments allowed). Plans are built on the
host when the batch is planned (`plan.py`), so the step never synchronises.

Accumulators are kept per query chunk (out (B, C, H, D) and lse (B, H, C) must be contiguous to be
merged into in place, which a slice of one (B, H, S) tensor is not).

Deliberately not here: communication, and the autograd Functions (ring.py, allgather.py).

Legend: B batch, C chunk length, H query heads, H_kv key/value heads, D head dim, R ring size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import acc_dtype, block_attention, block_attention_backward, visible_pairs
from ..parallel.zigzag import global_chunks, ring_chunks

__all__ = ["Block", "plan_blocks", "split_chunks", "new_accumulators", "forward_blocks", "backward_blocks",
           "finish_forward", "backward_parts", "chunk_ranges", "global_chunks"]

# The layout arithmetic lives in parallel/zigzag.py; these names stay for the benchmarks that plan blocks.
chunk_ranges = ring_chunks


class Block(NamedTuple):
    """One kernel call: local query chunk `q_index` against rows [k_start, k_end) of the K/V buffer."""

    q_index: int
    k_start: int
    k_end: int
    causal: bool
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    pairs: int  # visible (query, key) pairs per batch row and head


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


def finish_forward(ctx, q, k, v, outs, lses):
    """Concatenate the chunk accumulators into out (q's dtype); save (q, k, v, out, lse) for backward."""
    out = torch.cat(outs, dim=1).to(q.dtype)
    ctx.save_for_backward(q, k, v, out, torch.cat(lses, dim=2))
    return out


def backward_parts(q, out, dout, lse, q_chunks):
    """Per query chunk: q, out, dout and lse pieces, and zero dq accumulators (the accumulator dtype)."""
    acc = acc_dtype(q.dtype)
    q_parts, out_parts, dout_parts = (split_chunks(t, q_chunks) for t in (q, out, dout))
    lse_parts = split_chunks(lse, q_chunks, dim=2)
    dqs = [torch.zeros(p.shape, dtype=acc, device=q.device) for p in q_parts]
    return q_parts, out_parts, dout_parts, lse_parts, dqs


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
