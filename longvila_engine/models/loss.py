"""The training loss of a sequence-parallel step (docs/design.md section 6), and the batch preparation it needs.

Rules:
- Labels are shifted GLOBALLY, on the whole sample, before sharding (`shift_labels`): token t's
  target is token t+1 even when t+1 lives on another rank, so the targets at shard seams are trained
  exactly once. The last token of a sample (of each packed sequence) has no target: `ignore_index`.
- Padding added to make the sequence divisible by the sp layout gets `ignore_index` labels.
- loss = (sum of this shard's per-token losses) / (global count of supervised tokens of the sample),
  the count all-reduced over the sp group. The losses of the sp ranks then add up to the sample's mean
  loss, a shard with no supervised token contributes exactly 0 (never 0/0), and parameter gradients
  are summed over sp (and averaged over dp) by the trainer.

`local_batch` also plans the batch (`attention.plan.BatchPlan`): the step's only agreement and host
copy of `cu_seqlens` happen here, before the model runs.

Not here: the cross-entropy itself (`tensor_parallel/cross_entropy.py`), the gradient reduction
(`train.py`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..attention.plan import BatchPlan, plan_batch
from ..attention.sharding import pad_cu_seqlens, padded_length, shard_sequence
from ..parallel.groups import as_groups
from ..tensor_parallel.mappings import all_reduce

__all__ = ["shift_labels", "global_positions", "LocalBatch", "local_batch", "divide_by_global_count"]


def _check_cu(cu_seqlens, seq_len: int, batch: int) -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor of N+1 offsets")
    offsets = [int(c) for c in cu_seqlens.tolist()]
    if batch != 1:
        raise ValueError(f"packed varlen batches (cu_seqlens given) need batch size 1, got {batch}")
    if (
        not offsets
        or offsets[0] != 0
        or offsets[-1] != seq_len
        or any(b < a for a, b in zip(offsets, offsets[1:]))
    ):
        raise ValueError(f"cu_seqlens={offsets} must rise from 0 to the sequence length {seq_len}")
    return offsets


def shift_labels(
    labels: torch.Tensor, ignore_index: int = -100, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token targets of a whole (unsharded) sample: out[..., t] = labels[..., t+1].

    `labels` is (B, S) (the input ids, with any unsupervised position already set to ignore_index).
    The last position, and with packed `cu_seqlens` (B=1) the last position of every sequence, gets
    ignore_index: no token predicts across a sequence boundary.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, S), got shape {tuple(labels.shape)}")
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        for end in _check_cu(cu_seqlens, labels.shape[1], labels.shape[0])[1:]:
            if end > 0:
                out[:, end - 1] = ignore_index
    return out


def global_positions(seq_len: int, cu_seqlens: torch.Tensor | None = None, *, device=None) -> torch.Tensor:
    """(seq_len,) int64 RoPE positions of a whole sample: 0..S-1, restarting at 0 per packed sequence."""
    pos = torch.arange(seq_len, dtype=torch.long, device=device)
    if cu_seqlens is not None:
        offsets = _check_cu(cu_seqlens, seq_len, 1)
        for start, end in zip(offsets, offsets[1:]):
            pos[start:end] -= start
    return pos


class LocalBatch(NamedTuple):
    """This rank's share of one global batch, ready for `Transformer.forward`.

    input_ids, positions, labels: (B, S_local); cu_seqlens: the GLOBAL int32 offsets over the padded
    sequence (with the padding as its own segment), or None; seq_len: the true global length; plan: the
    `BatchPlan` every attention layer of the step reads (pass it as `model(..., plan=batch.plan)`).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    seq_len: int
    plan: BatchPlan | None = None


def _pad(x: torch.Tensor, length: int, value) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    tail = x.new_full((x.shape[0], length - x.shape[1]), value)
    return torch.cat([x, tail], dim=1)


def _shard_tensors(input_ids, groups, labels, cu_seqlens, scheme, ignore_index, pad_id, pad):
    """(ids, positions, targets, cu_seqlens) of this rank; ValueError on a bad sample (host checks)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {tuple(getattr(input_ids, 'shape', ()))}")
    B, S = input_ids.shape
    if labels is None:
        labels = input_ids
    elif tuple(labels.shape) != (B, S):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {(B, S)}")
    targets = shift_labels(labels, ignore_index, cu_seqlens)
    positions = global_positions(S, cu_seqlens, device=input_ids.device).expand(B, S)
    if not pad:  # one process: no sp layout to pad for
        cu = None if cu_seqlens is None else cu_seqlens.to(torch.int32)
        return input_ids, positions.contiguous(), targets, cu
    S_p = padded_length(S, groups, scheme)
    ids_p = _pad(input_ids, S_p, pad_id)
    targets_p = _pad(targets, S_p, ignore_index)
    # Pads are their own segment when packed; otherwise they sit after every real token (causal).
    pos_p = torch.cat([positions, torch.arange(S, S_p, device=input_ids.device).expand(B, S_p - S)], dim=1)
    cu = None
    if cu_seqlens is not None:
        cu = pad_cu_seqlens(cu_seqlens.to(torch.int32), S_p)
        pos_p[:, S:] -= S
    shard = lambda x: shard_sequence(x, groups, dim=1, scheme=scheme)  # noqa: E731
    return shard(ids_p), shard(pos_p.contiguous()), shard(targets_p), cu


def local_batch(
    input_ids: torch.Tensor,
    groups,
    *,
    labels: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scheme: str = "zigzag",
    ignore_index: int = -100,
    pad_id: int = 0,
) -> LocalBatch:
    """Shift, pad and shard one global sample (the same on every sp and tp rank) for this rank, and plan it.

    | arg | shape | meaning |
    |---|---|---|
    | input_ids | (B, S) int64 | the whole sample |
    | labels | (B, S) or None | supervision before shifting (default: input_ids); ignore_index masks |
    | cu_seqlens | (N+1,) int | packed varlen (B=1): offsets of the sequences, S at the end |

    Labels are shifted on the whole sample first (`shift_labels`), then everything is padded to
    `padded_length(S, groups, scheme)` (ids with pad_id, labels with ignore_index) and cut with
    `shard_sequence`, so every rank holds its ids, the targets of those ids (possibly living on the
    next rank) and their global RoPE positions (restarting per packed sequence). `groups=None` is one
    process (nothing padded). The returned `plan` (`attention.plan.plan_batch`) is the step's one
    agreement over sp: a bad or mismatched sample raises the same ValueError on every sp rank here.
    """
    one_process = groups is None
    groups = as_groups(groups, getattr(input_ids, "device", None))
    try:
        ids, positions, targets, cu = _shard_tensors(input_ids, groups, labels, cu_seqlens, scheme, ignore_index,
                                                     pad_id, not one_process)
        err = None
    except ValueError as exc:  # shared with the peers by the plan's agreement, then raised everywhere
        ids = positions = targets = cu = None
        err = str(exc)
    B, S_local = (0, 0) if err else ids.shape
    seq_len = input_ids.shape[1] if err is None else 0
    plan = plan_batch(groups, batch=B, local_len=S_local, scheme=scheme, cu_seqlens=cu, positions=positions,
                      device=None if err else ids.device, local_error=err, extra_fields={"seq_len": seq_len},
                      what="local_batch")
    return LocalBatch(ids, positions, targets, cu, seq_len, plan)


def divide_by_global_count(loss_sum: torch.Tensor, count: torch.Tensor, groups) -> torch.Tensor:
    """loss_sum / (count summed over the sp group); a global count of 0 gives loss_sum / 1 (= 0).

    `loss_sum` (scalar, differentiable) and `count` (int) are this shard's; the division by the global
    count makes the sp ranks' losses add up to the sample's mean over supervised tokens.
    """
    total = count.detach().to(torch.int64).reshape(1).clone()
    all_reduce(total, groups, "sp")
    return loss_sum / total.clamp(min=1).to(loss_sum.dtype).squeeze(0)
