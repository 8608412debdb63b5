"""The two-stage MM-SP sharding plan (docs/design.md section 7): integer bookkeeping on the host, no tensors of floats.

Every rank of a sequence-parallel group gets the same global sample: token ids with one placeholder
(`image_token_id`) per frame, the frames, the labels, optional packed boundaries. Each placeholder
stands for the P tokens its frame becomes (P read from the projector's output), so the sequence the
language model sees is the EXPANDED one, of length L = (text tokens) + N * P.

`plan_multimodal_shards` computes, for one sp rank and from the global ids alone:

- Stage 1, vision: the frames this rank encodes (`split_frames`: equal counts, the remainder to the
  lowest ranks, nothing dropped; fewer frames than ranks leaves the last ranks without a frame).
  `frame_split="by_position"` is the one-stage baseline of the ablation instead: a frame is encoded
  by the rank that holds its first token, so vision work follows the token layout.
- Stage 2, language: the token-balanced layout of the expanded sequence, padded exactly as
  `attention.sharding` pads it (`sp_order`: the concatenation of `shard_positions` over sp ranks).
  Visual tokens travel to the rank that holds their position (send order and counts of one
  all-to-all-v); text tokens are embedded where they land, so text embeddings never travel and no
  rank embeds or holds the whole sequence. `assemble_index` then builds the local shard from
  [this rank's text embeddings; the received visual tokens; one zero row for pads].
- Labels shifted on the whole expanded sample (visual tokens get ignore_index; no target crosses a
  packed boundary), global RoPE positions (restarting per packed sequence) and the padded global
  cu_seqlens, all cut to this rank's positions, as `models.local_batch` does for text.

The work is O(L) integer ops, identical on every rank (no collective), so a malformed sample raises
the same ValueError everywhere. Not here: running the vision tower, the exchange and the language
model (`model.py`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..attention.plan import BatchPlan
from ..attention.sharding import pad_cu_seqlens
from ..models.loss import global_positions, shift_labels
from ..parallel import zigzag

__all__ = ["split_frames", "sp_order", "MultimodalShardPlan", "plan_multimodal_shards", "FRAME_SPLITS"]

FRAME_SPLITS = ("balanced", "by_position")


def split_frames(num_frames: int, sp_size: int) -> list[int]:
    """Frames per sp rank: num_frames // sp_size each, one more on the lowest num_frames % sp_size ranks."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 0:
        raise ValueError(f"num_frames must be a non-negative int, got {num_frames!r}")
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive int, got {sp_size!r}")
    base, extra = divmod(num_frames, sp_size)
    return [base + (i < extra) for i in range(sp_size)]


def sp_order(seq_len_padded: int, ring_size: int, ulysses_size: int, scheme: str = "zigzag") -> torch.Tensor:
    """(seq_len_padded,) global positions in sp order: sp rank i = ulysses_rank + U * ring_rank holds
    entries [i*n, (i+1)*n), n = seq_len_padded / (R*U), in the order of its shard (`parallel.zigzag`:
    `shard_positions` of every rank at once, without a process group)."""
    return zigzag.sp_order(seq_len_padded, ring_size, ulysses_size, scheme)


class MultimodalShardPlan(NamedTuple):
    """What one sp rank does with one global sample (all integer tensors on the CPU).

    | field | shape / type | meaning |
    |---|---|---|
    | seq_len, seq_len_padded | int | expanded length L and the padded length the layout shards |
    | tokens_per_frame | int | P (0 when the sample has no frame) |
    | frame_counts | tuple, one per sp rank | stage 1: frames each rank encodes |
    | frame_index | (n_frames_here,) | this rank's frames (placeholder order), ascending |
    | send_index | (n_send,) | rows of this rank's flattened (frame-major) visual tokens in send order |
    | send_counts, recv_counts | tuple, one per sp rank | the all-to-all-v split sizes |
    | text_ids | (n_text,) | the text ids this rank embeds: exactly those that land on it |
    | assemble_index | (S_local,) | local row t = cat([text_emb, received, zero_row])[assemble_index[t]] |
    | shard | (S_local,) | global expanded positions of the local rows (>= seq_len: padding) |
    | positions, labels | (S_local,) | RoPE positions and globally shifted targets of the local rows |
    | cu_seqlens | (K+1,) int32 or None | global padded offsets of packed sequences (pads their own) |
    | attention | `BatchPlan` or None | the language model's batch plan (set by `embed_shard`) |
    """

    seq_len: int
    seq_len_padded: int
    tokens_per_frame: int
    frame_counts: tuple
    frame_index: torch.Tensor
    send_index: torch.Tensor
    send_counts: tuple
    recv_counts: tuple
    text_ids: torch.Tensor
    assemble_index: torch.Tensor
    shard: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    attention: BatchPlan | None = None


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_boundaries(cu_seqlens, seq_len: int) -> torch.Tensor | None:
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError("cu_seqlens must be a 1-D integer tensor of N+1 offsets into input_ids")
    cu = cu_seqlens.to(device="cpu", dtype=torch.long)
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens={cu.tolist()} must rise from 0 to the sample length {seq_len}")
    return cu


def plan_multimodal_shards(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, image_token_id: int,
                           num_frames: int, tokens_per_frame: int, sp_index: int = 0, ring_size: int = 1,
                           ulysses_size: int = 1, scheme: str = "zigzag", cu_seqlens: torch.Tensor | None = None,
                           pad: bool = True, ignore_index: int = -100,
                           frame_split: str = "balanced") -> MultimodalShardPlan:
    """The plan of sp rank `sp_index` for one global sample (see the module docstring).

    | arg | meaning |
    |---|---|
    | input_ids | (S,) int: the whole sample, one `image_token_id` per frame, text anywhere |
    | labels | (S,) int or None: supervision before shifting (default input_ids); ignore_index masks. |
    |        | The value at a placeholder is never used: its visual tokens are never targets |
    | num_frames | frames given with the sample; must equal the placeholder count |
    | tokens_per_frame | P, read from the projector's output (ignored when num_frames == 0) |
    | ring_size, ulysses_size, scheme | the sp layout (`attention.sharding`) |
    | cu_seqlens | (K+1,) offsets into input_ids of packed sequences, or None |
    | pad | pad the expanded length to the layout's multiple (False: one process, no padding) |
    | frame_split | "balanced" (MM-SP stage 1) or "by_position" (frames follow their tokens; ablation) |
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a 1-D integer tensor, got {getattr(input_ids, 'shape', input_ids)}")
    ids = input_ids.to(device="cpu", dtype=torch.long)
    S = ids.numel()
    if S == 0:
        raise ValueError("the sample is empty: input_ids holds no token")
    if labels is None:
        labels = ids
    elif not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (S,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape {(S,)}, got {getattr(labels, 'shape', labels)}")
    labels = labels.to(device="cpu", dtype=torch.long)
    _check_int("num_frames", num_frames, 0)
    R, U = _check_int("ring_size", ring_size, 1), _check_int("ulysses_size", ulysses_size, 1)
    sp = R * U
    _check_int("sp_index", sp_index, 0)
    if sp_index >= sp:
        raise ValueError(f"sp_index={sp_index} is outside the sp group of {sp} ranks")
    zigzag.check_scheme(scheme)
    if frame_split not in FRAME_SPLITS:
        raise ValueError(f"frame_split={frame_split!r} is unknown; choose one of {FRAME_SPLITS}")
    is_image = ids == image_token_id
    num_placeholders = int(is_image.sum())
    if num_placeholders != num_frames:
        raise ValueError(f"the sample has {num_placeholders} image placeholder(s) (token id {image_token_id}) but "
                         f"{num_frames} frame(s) were given; it needs exactly one placeholder per frame")
    P = _check_int("tokens_per_frame", tokens_per_frame, 1) if num_frames else 0
    cu = _check_boundaries(cu_seqlens, S)

    # The expanded sequence: a placeholder becomes P consecutive positions, a text token one.
    lengths = torch.where(is_image, P, 1)
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    L = int(ends[-1])
    if not pad and sp != 1:
        raise ValueError("pad=False is the one-process plan; it needs ring_size = ulysses_size = 1")
    m = zigzag.multiple(R, U, scheme) if pad else 1
    L_p = -(-L // m) * m
    order = sp_order(L_p, R, U, scheme) if pad else torch.arange(L_p)
    n = L_p // sp
    slot = torch.arange(L_p)
    owner = torch.empty(L_p, dtype=torch.long)
    owner[order] = slot // n
    offset = torch.empty(L_p, dtype=torch.long)
    offset[order] = slot % n

    # Stage 1: frame f is encoded by rank frame_rank[f]; its tokens sit at visual[f, :] (frame-major).
    visual = (starts[is_image].unsqueeze(1) + torch.arange(P)).reshape(num_frames, P)
    if frame_split == "balanced":
        counts = torch.tensor(split_frames(num_frames, sp), dtype=torch.long)
        frame_rank = torch.repeat_interleave(torch.arange(sp), counts)
    else:
        frame_rank = owner[visual[:, 0]]
    frame_index = (frame_rank == sp_index).nonzero().flatten()

    # Stage 2, send side: this rank's visual tokens sorted by (destination rank, offset there).
    mine = visual[frame_index].reshape(-1)
    dest = owner[mine]
    send_index = torch.argsort(dest * n + offset[mine])
    send_counts = torch.bincount(dest, minlength=sp)
    # Receive side: the tokens that land here, in the order the senders send them: by source rank,
    # then by offset here (each sender sorted its block for us by that offset).
    flat = visual.reshape(-1)
    here = owner[flat] == sp_index
    recv_pos = flat[here]
    recv_src = frame_rank.repeat_interleave(P)[here]
    recv_offset = offset[recv_pos[torch.argsort(recv_src * n + offset[recv_pos])]]
    recv_counts = torch.bincount(recv_src, minlength=sp)
    # Text tokens are embedded where they land.
    text_pos = starts[~is_image]
    text_here = owner[text_pos] == sp_index
    text_ids = ids[~is_image][text_here]
    text_offset = offset[text_pos[text_here]]
    n_text, n_recv = text_ids.numel(), recv_offset.numel()
    assemble = torch.full((n,), n_text + n_recv, dtype=torch.long)  # default: the zero row (padding)
    assemble[text_offset] = torch.arange(n_text)
    assemble[recv_offset] = n_text + torch.arange(n_recv)

    # Labels and positions of the whole expanded sample, shifted globally, padded, then cut.
    expanded_labels = torch.full((L,), ignore_index, dtype=torch.long)
    expanded_labels[text_pos] = labels[~is_image]
    cu_expanded = None if cu is None else torch.cat([torch.zeros(1, dtype=torch.long), ends])[cu]
    targets = shift_labels(expanded_labels.unsqueeze(0), ignore_index, cu_expanded)[0]
    positions = global_positions(L, cu_expanded)
    pad_positions = torch.arange(L, L_p) - (L if cu is not None else 0)  # pads: their own sequence if packed
    targets = torch.cat([targets, torch.full((L_p - L,), ignore_index, dtype=torch.long)])
    positions = torch.cat([positions, pad_positions])
    cu_padded = None if cu is None else pad_cu_seqlens(cu_expanded.to(torch.int32), L_p)
    shard = order[sp_index * n:(sp_index + 1) * n]
    return MultimodalShardPlan(
        seq_len=L, seq_len_padded=L_p, tokens_per_frame=P,
        frame_counts=tuple(torch.bincount(frame_rank, minlength=sp).tolist()), frame_index=frame_index,
        send_index=send_index, send_counts=tuple(send_counts.tolist()), recv_counts=tuple(recv_counts.tolist()),
        text_ids=text_ids, assemble_index=assemble, shard=shard, positions=positions[shard], labels=targets[shard],
        cu_seqlens=cu_padded)
