"""Vocab-parallel, sequence-chunked cross-entropy straight from hidden states (docs/design.md section 6).

The output projection and the loss are fused: logits are computed chunk by chunk (a few hundred tokens
at a time) from the final hidden states and this rank's vocabulary shard of the output weight, so
neither the full vocabulary (it is split over tp) nor the full sequence of float32 logits is ever
held. The backward recomputes each chunk's logits from the saved hidden states and the per-token
log-sum-exp, so memory stays at one chunk of logits in both passes.

Per chunk, the softmax statistics are combined over tp without gathering logits:
- max over the vocabulary: all-reduce MAX;
- sum of exp(logit - max) and the target logit (picked on the rank that owns the target id, zero on
  the others): one all-reduce SUM of a (2, chunk) tensor.

Returns (sum of per-token losses, number of supervised tokens); the caller divides by the count it
all-reduces over the sequence-parallel group (`models/loss.py`). Tokens whose label is `ignore_index`
contribute exactly 0 to the sum and to the gradient.

Not here: label shifting and the global normalisation (`models/loss.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mappings import all_reduce, axis_rank, copy_to_tp_region, gather_from_sequence_region

__all__ = ["vocab_parallel_cross_entropy", "default_chunk_size"]


def default_chunk_size(vocab_local: int) -> int:
    """Tokens per chunk so that one chunk of float32 logits is about 256 MB (at least 64 tokens)."""
    return max(64, (1 << 26) // max(1, vocab_local))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedVocabParallelCE(torch.autograd.Function):
    """Loss sum of softmax cross-entropy over a tp-split vocabulary, chunked over tokens.

    | tensor | shape | notes |
    |---|---|---|
    | hidden | (N, E) | replicated over tp (the caller's copy/gather sums the partial grad) |
    | weight | (V/tp, E) | rows [vocab_start, vocab_start + V/tp) of the dense output weight |
    | labels | (N,) int64 | global ids, or ignore_index |
    | out | () float32 (float64 for float64 input) | sum over supervised tokens |

    | | forward | backward |
    |---|---|---|
    | per chunk | all-reduce MAX (max logit); all-reduce SUM (sum-exp, target logit) over tp | none |
    | hidden | - | partial grad of this vocab shard (the caller's `copy_to_tp_region` all-reduces it) |

    Saved: hidden, weight, labels and the per-token lse (N,) float32; logits are recomputed per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, groups, vocab_start, chunk_size, ignore_index):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        acc = _compute_dtype(hidden.dtype)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            logits = (hidden[start:stop] @ weight.t()).to(acc)  # (c, V/tp): the only logits alive
            lab = labels[start:stop]
            local = lab - vocab_start
            owned = (local >= 0) & (local < v_local)
            row_max = logits.max(dim=-1).values
            all_reduce(row_max, groups, "tp", op=dist.ReduceOp.MAX)
            sum_exp = torch.exp(logits - row_max.unsqueeze(-1)).sum(dim=-1)
            target = logits.gather(1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
            target = torch.where(owned, target, torch.zeros_like(target))
            stats = torch.stack([sum_exp, target])
            all_reduce(stats, groups, "tp")
            chunk_lse = row_max + torch.log(stats[0])
            lse[start:stop] = chunk_lse
            valid = lab != ignore_index
            total += torch.where(valid, chunk_lse - stats[1], torch.zeros_like(chunk_lse)).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.args = (vocab_start, chunk_size, ignore_index)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, labels, lse = ctx.saved_tensors
        vocab_start, chunk_size, ignore_index = ctx.args
        v_local = weight.shape[0]
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        scale = grad_total.to(acc)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(hidden.shape[0], start + chunk_size)
            h = hidden[start:stop]
            logits = (h @ weight.t()).to(acc)
            lab = labels[start:stop]
            local = lab - vocab_start
            owned = (local >= 0) & (local < v_local)
            # d loss_i / d logit_ij = softmax_ij - [j == target_i], for supervised rows only.
            probs = torch.exp(logits - lse[start:stop].unsqueeze(-1))
            # Subtract 1 at the target on its owning rank (scatter, no host sync; 0 elsewhere).
            index = local.clamp(0, v_local - 1).unsqueeze(-1)
            probs.scatter_add_(1, index, -owned.to(acc).unsqueeze(-1))
            weight_rows = ((lab != ignore_index).to(acc) * scale).unsqueeze(-1)
            probs.mul_(weight_rows)
            g = probs.to(hidden.dtype)
            grad_hidden[start:stop] = g @ weight
            grad_weight.addmm_(probs.t(), h.to(acc))
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    groups,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of `hidden @ weight_dense^T` against `labels`, summed; returns (loss_sum, count).

    | arg | shape |
    |---|---|
    | hidden | (..., E), replicated over tp; with sequence_parallel (B, S/tp, E), this tp rank's slice |
    | weight | (V/tp, E): this tp rank's contiguous vocabulary shard of the output weight |
    | labels | (...) int64 global ids (ignore_index = unsupervised), matching hidden without E; with |
    |        | sequence_parallel the full (B, S) labels of the tp group |

    loss_sum is float32 (float64 for float64 hidden), identical on every tp rank; count is the int64
    number of labels != ignore_index. Labels must lie in [0, V) or equal ignore_index (not checked on
    the device, to avoid a host sync). `chunk_size` tokens per chunk (default: `default_chunk_size`).
    """
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    if sequence_parallel:
        hidden = gather_from_sequence_region(hidden, groups, dim=1, grad_is_partial=True)
    else:
        hidden = copy_to_tp_region(hidden, groups)
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    v_local = weight.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(v_local)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_l = labels.reshape(-1).long()
    vocab_start = axis_rank(groups) * v_local
    count = (flat_l != ignore_index).sum()
    loss_sum = _ChunkedVocabParallelCE.apply(
        flat_h, weight, flat_l, groups, vocab_start, int(chunk_size), int(ignore_index)
    )
    return loss_sum, count
