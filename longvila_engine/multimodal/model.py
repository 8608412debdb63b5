"""`VisionLanguageModel`: vision tower + projector + language model trained with two-stage MM-SP sharding.

Every rank of the sequence-parallel group gets the same GLOBAL sample (docs/design.md section 7): token ids
with one placeholder (`image_token_id`) per frame, text interleaved anywhere, the frames, the labels;
several samples (rows of a (B, S) batch, or `cu_seqlens`) are packed with their boundaries kept.
One forward on one rank:

1. Host checks, identical on every rank (same global sample): placeholders vs frames, frame shapes,
   an empty sample. A bad sample raises the same ValueError everywhere before any collective.
2. Stage 1: this rank runs the vision tower and the projector on its own frames only (`split_frames`:
   even split, remainder to the lowest ranks; a rank without a frame runs them on an empty batch,
   so its parameters still get (zero) gradients and every rank runs the same collectives).
   Tokens per frame P and the width are read from the projector's output; one tiny all-gather over
   sp makes every rank agree on P, on the sample's fingerprint and on errors (a tower that fails on
   one rank stops every rank with a ValueError instead of leaving them blocked in the exchange).
3. Stage 2: the integer plan (`sharding.plan_multimodal_shards`) places the expanded sequence in the
   token-balanced zigzag layout of `attention.sharding`. Visual tokens travel to the rank that holds
   their position with ONE `all_to_all_v` over sp; its backward is the inverse all-to-all-v, so every
   token's gradient returns to the projector and vision tower of the rank that made it. Text tokens
   are embedded by the rank they land on (they never travel); no rank holds the whole sequence.
4. The language model runs on the local shard with global positions and the globally shifted labels
   (visual tokens are never targets); the loss is docs/design.md section 6: this shard's token-loss sum
   over the global count of supervised tokens. The sp ranks' losses add up to the sample mean, and
   the trainer sums parameter gradients over sp (vision tower and projector included).

Language models: the engine's `models.Transformer` (tp and tp sequence parallelism included), or a
transformers causal LM prepared with `integrations.hf.enable_sequence_parallel` (tp=1; one process:
a plain model, without packing). Not here: the decoding loop (`inference/generate.py`), data loading,
image preprocessing, gradient reduction (`train.average_gradients`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention.plan import plan_batch
from ..comm.all_to_all import all_to_all_v
from ..comm.counted import DTYPE_CODES, agree
from ..models.transformer import Transformer
from ..parallel.groups import as_groups
from ..tensor_parallel.mappings import axis_size, scatter_to_sequence_region
from .sharding import FRAME_SPLITS, MultimodalShardPlan, plan_multimodal_shards, split_frames

__all__ = ["VisionLanguageModel"]

_MOD = (1 << 31) - 1


def _checksum(t: torch.Tensor | None) -> int:
    """Position-weighted sum of an integer tensor mod 2^31-1 (no int64 overflow below 2^32 entries)."""
    if t is None:
        return -1
    flat = t.reshape(-1).to(device="cpu", dtype=torch.long) % _MOD
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.long) % _MOD
    return int(((flat * weights) % _MOD).sum() % _MOD) + flat.numel()


def _flatten_sample(input_ids, labels, cu_seqlens):
    """(S,) ids, (S,) labels or None, offsets or None from a (S,) / (B, S) global sample."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor (S,) or (B, S), got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.numel() == 0:
        raise ValueError(f"the sample is empty: input_ids has shape {tuple(input_ids.shape)}")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape
                               or labels.is_floating_point()):
        raise ValueError(f"labels must be an integer tensor of the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {getattr(labels, 'shape', type(labels).__name__)}")
    if input_ids.dim() == 2 and input_ids.shape[0] > 1:
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens describes a packed batch of one row; got input_ids of shape "
                             f"{tuple(input_ids.shape)}. Pack the rows yourself or drop cu_seqlens")
        B, S = input_ids.shape
        cu_seqlens = torch.arange(B + 1, dtype=torch.long) * S  # rows become packed sequences
    ids = input_ids.reshape(-1).cpu()
    return ids, None if labels is None else labels.reshape(-1).cpu(), cu_seqlens


def _frames_info(frames):
    """(number of frames, per-frame shape, dtype) of a (N, ...) tensor, a list of tensors, or None."""
    if frames is None:
        return 0, None, None
    if isinstance(frames, torch.Tensor):
        if frames.dim() < 2 or not frames.is_floating_point():
            raise ValueError(f"frames must be a floating tensor (N, C, H, W), got {frames.dtype} of shape "
                             f"{tuple(frames.shape)}")
        return frames.shape[0], tuple(frames.shape[1:]), frames.dtype
    if not isinstance(frames, (list, tuple)):
        raise ValueError(f"frames must be a tensor (N, C, H, W), a list of (C, H, W) tensors, or None; got "
                         f"{type(frames).__name__}")
    if not frames:
        return 0, None, None
    first = frames[0]
    for i, f in enumerate(frames):
        if not isinstance(f, torch.Tensor) or not f.is_floating_point():
            raise ValueError(f"frame {i} must be a floating tensor, got {getattr(f, 'dtype', type(f).__name__)}")
        if f.shape != first.shape or f.dtype != first.dtype:
            raise ValueError(f"frames have mismatched shapes: frame {i} is {tuple(f.shape)} {f.dtype} but frame 0 "
                             f"is {tuple(first.shape)} {first.dtype}; resize them to one shape first")
    return len(frames), tuple(first.shape), first.dtype


def _local_frames(frames, index, frame_shape, dtype):
    """The frames at `index` (a slice, or a LongTensor of frame numbers) as one (n, ...) tensor."""
    if isinstance(frames, torch.Tensor):
        return frames[index.to(frames.device) if isinstance(index, torch.Tensor) else index]
    chosen = list(frames[index]) if isinstance(index, slice) else [frames[i] for i in index.tolist()]
    if chosen:
        return torch.stack(chosen)
    return torch.empty((0, *frame_shape), dtype=dtype, device=frames[0].device)


def _is_engine(lm) -> bool:
    return isinstance(lm, Transformer)


class VisionLanguageModel(nn.Module):
    """Frames + interleaved text -> loss, sharded over the sp group of `groups` (None: one process).

    | arg | meaning |
    |---|---|
    | vision_tower | module: frames (n, C, H, W) -> (n, P0, Dv) (or an output with `.last_hidden_state`) |
    | projector | module: (n, P0, Dv) -> (n, P, E), per frame (e.g. `MLPProjector`) |
    | language_model | `models.Transformer(config, groups)` or an SP-enabled transformers causal LM |
    | groups | the `ParallelGroups` the language model was built with, or None |
    | image_token_id | the placeholder id; one per frame in input_ids |
    | scheme | sharding scheme (engine models: taken from the model; must match if given) |
    | frame_split | "balanced" (MM-SP stage 1, default) or "by_position": the one-stage baseline of |
    |  | the ablation, each frame encoded by the rank holding its first token; it needs |
    |  | `tokens_per_frame` before encoding (checked against the projector's output) |
    """

    def __init__(self, vision_tower: nn.Module, projector: nn.Module, language_model: nn.Module, groups=None, *,
                 image_token_id: int, scheme: str | None = None, frame_split: str = "balanced",
                 tokens_per_frame: int | None = None):
        super().__init__()
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int):
            raise ValueError(f"image_token_id must be an int, got {image_token_id!r}")
        if frame_split not in FRAME_SPLITS:
            raise ValueError(f"frame_split={frame_split!r} is unknown; choose one of {FRAME_SPLITS}")
        if frame_split == "by_position" and (isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int)
                                             or tokens_per_frame < 1):
            raise ValueError(f"frame_split='by_position' places frames by their tokens, so it needs "
                             f"tokens_per_frame (an int >= 1) up front; got {tokens_per_frame!r}")
        self.frame_split, self.tokens_per_frame = frame_split, tokens_per_frame
        self.vision_tower, self.projector, self.language_model = vision_tower, projector, language_model
        if groups is None and _is_engine(language_model) and language_model.groups.world_size == 1:
            groups = language_model.groups  # one process: the model's single-process groups
        self.groups, self.image_token_id = as_groups(groups), image_token_id
        if _is_engine(language_model):
            if language_model.groups is not self.groups:
                raise ValueError("language_model was built with other ParallelGroups than the ones given; pass the "
                                 "same groups object to Transformer(config, groups) and VisionLanguageModel")
            model_scheme = language_model.scheme
            if scheme is not None and scheme != model_scheme:
                raise ValueError(f"scheme={scheme!r} differs from the language model's scheme={model_scheme!r}")
            self.scheme, self.ignore_index = model_scheme, language_model.ignore_index
        elif hasattr(language_model, "get_input_embeddings") and hasattr(language_model, "config"):
            if axis_size(self.groups) != 1:
                raise ValueError("transformers language models support tp=1 only; use models.Transformer for tp")
            if self.sp_size > 1:
                from ..integrations.hf import ATTN_IMPLEMENTATION

                if getattr(language_model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
                    raise ValueError("the transformers language model is not sequence-parallel: call "
                                     "integrations.enable_sequence_parallel(model, groups) first")
            self.scheme, self.ignore_index = scheme or "zigzag", -100
        else:
            raise ValueError(f"language_model must be a longvila_engine Transformer or a transformers causal LM, "
                             f"got {type(language_model).__name__}")

    @property
    def layers(self) -> nn.ModuleList:
        """The language model's transformer blocks: the FSDP units of `fsdp.shard_model(vlm, groups)`,
        whose root unit then holds the vision tower, the projector, the embeddings and the head."""
        lm = self.language_model
        return lm.layers if _is_engine(lm) else lm.model.layers

    # --- sp geometry -----------------------------------------------------------------------------------
    @property
    def sp_size(self) -> int:
        return self.groups.sp_size

    @property
    def sp_index(self) -> int:
        return self.groups.sp_rank

    def _text_embedding_weight(self) -> torch.Tensor:
        lm = self.language_model
        return lm.embed.weight if _is_engine(lm) else lm.get_input_embeddings().weight

    # --- stage 1 ---------------------------------------------------------------------------------------
    def encode_frames(self, frames_local: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector on this rank's frames: (n, C, H, W) -> (n, P, E)."""
        out = self.vision_tower(frames_local)
        out = getattr(out, "last_hidden_state", out)
        feats = self.projector(out)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 3 or feats.shape[0] != frames_local.shape[0]:
            raise ValueError(f"the projector must return (n, P, E) for n={frames_local.shape[0]} frames, got "
                             f"{getattr(feats, 'shape', type(feats).__name__)}")
        return feats

    def _agree(self, fields: dict, tokens: int, width: int, error: str | None) -> tuple[int, int]:
        """One agreement over sp (`comm.counted.agree`) of the sample's fingerprint, errors and each
        rank's (P, E); raise the same error on every rank or return the agreed (P, E). P = E = -1 marks
        a rank that could not run the tower on no frame."""
        table = agree(self.groups, "sp", {"tokens": tokens, "width": width, **fields}, error,
                      "VisionLanguageModel: the vision tower or projector failed, or the sample is bad",
                      uncompared=("tokens", "width"), mismatch_hint="every rank must get the same global sample")
        known = {(r[0], r[1]) for r in table if r[0] >= 0}
        if len(known) != 1:
            raise ValueError(f"VisionLanguageModel: the projector gave different (tokens per frame, width) on the "
                             f"sp ranks: {[(r[0], r[1]) for r in table]}; it must map every frame alike")
        return known.pop()

    # --- the two stages ----------------------------------------------------------------------------------
    def embed_shard(self, input_ids: torch.Tensor, frames=None, labels: torch.Tensor | None = None,
                    cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MultimodalShardPlan]:
        """This rank's shard of the interleaved embedding sequence (1, S_local, E) and its plan.

        Arguments as `forward`. Differentiable: gradients reach this rank's text embeddings, and (through
        the inverse all-to-all-v) the projector and vision tower of this rank's frames.
        """
        ids, flat_labels, cu = _flatten_sample(input_ids, labels, cu_seqlens)
        num_frames, frame_shape, frame_dtype = _frames_info(frames)
        num_placeholders = int((ids == self.image_token_id).sum())
        if num_placeholders != num_frames:
            raise ValueError(f"the sample has {num_placeholders} image placeholder(s) (token id "
                             f"{self.image_token_id}) but {num_frames} frame(s); it needs one placeholder per frame")
        weight = self._text_embedding_weight()
        R, U = self.groups.ring_size, self.groups.ulysses_size
        sharded = self.sp_size > 1  # one rank: the sample as it is, unpadded

        def make_plan(tokens_per_frame):
            return plan_multimodal_shards(
                ids, flat_labels, image_token_id=self.image_token_id, num_frames=num_frames,
                tokens_per_frame=tokens_per_frame if num_frames else 1, sp_index=self.sp_index, ring_size=R,
                ulysses_size=U, scheme=self.scheme if sharded else "contiguous", cu_seqlens=cu,
                pad=sharded, ignore_index=self.ignore_index, frame_split=self.frame_split)

        plan = None
        if self.frame_split == "balanced":
            counts = split_frames(num_frames, self.sp_size)
            start = sum(counts[:self.sp_index])
            index, n_here = slice(start, start + counts[self.sp_index]), counts[self.sp_index]
        else:  # the ablation baseline: frames go where their tokens land, which needs P up front
            plan = make_plan(self.tokens_per_frame)
            index, n_here = plan.frame_index, plan.frame_index.numel()
        feats, error, tokens, width = None, None, 0, 0
        if num_frames:
            try:
                feats = self.encode_frames(_local_frames(frames, index, frame_shape, frame_dtype))
                tokens, width = feats.shape[1], feats.shape[2]
            except Exception as exc:  # reported to every rank by _agree, then raised here
                if n_here or self.sp_size == 1:
                    error = f"vision tower / projector failed on this rank's frames: {type(exc).__name__}: {exc}"
                    if self.sp_size == 1:
                        raise
                else:  # no frame here and the tower refuses an empty batch: take P from the peers
                    feats, tokens, width = None, -1, -1
        fields = {"seq_len": ids.numel(), "frames": num_frames, "ids": _checksum(ids), "labels": _checksum(flat_labels),
                  "cu_seqlens": _checksum(cu), "frame_shape": _checksum(torch.tensor(frame_shape or ())),
                  "frame_dtype": DTYPE_CODES.get(frame_dtype, 0), "scheme": int(self.scheme == "zigzag")}
        if num_frames or self.sp_size > 1:
            tokens, width = self._agree(fields, tokens, width, error)
        if num_frames and width != weight.shape[1]:
            raise ValueError(f"the projector's output width {width} differs from the language model's hidden size "
                             f"{weight.shape[1]}")
        if plan is None:
            plan = make_plan(tokens)
        elif num_frames and tokens != plan.tokens_per_frame:
            raise ValueError(f"tokens_per_frame={plan.tokens_per_frame} was given but the projector makes {tokens} "
                             f"tokens per frame")
        device = weight.device
        text = self._embed_text(plan.text_ids.to(device))
        visual = text.new_zeros((0, text.shape[1]))
        if num_frames:
            if feats is None:  # a rank without frames whose tower refused the empty batch
                needs_grad = torch.is_grad_enabled() and any(
                    p.requires_grad for p in (*self.vision_tower.parameters(), *self.projector.parameters()))
                feats = text.new_zeros((0, tokens, width)).requires_grad_(needs_grad)
            visual = feats.reshape(-1, width).to(device=device, dtype=text.dtype)[plan.send_index.to(device)]
            if sharded:
                visual = all_to_all_v(visual, plan.send_counts, plan.recv_counts, self.groups, "sp", dim=0)
        rows = torch.cat([text, visual, text.new_zeros((1, text.shape[1]))])
        # The batch plan of the language model: every input it depends on was agreed above (sample
        # fingerprint, P, scheme), so it needs no second agreement.
        cu_local = None if plan.cu_seqlens is None else plan.cu_seqlens.to(device)
        positions = plan.positions.to(device).unsqueeze(0)
        attention = plan_batch(self.groups, batch=1, local_len=plan.shard.numel(), scheme=self.scheme,
                               cu_seqlens=cu_local, positions=positions, device=device, check_peers=False,
                               what="VisionLanguageModel.embed_shard")
        plan = plan._replace(attention=attention)
        return rows[plan.assemble_index.to(device)].unsqueeze(0), plan

    def _embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids -> (n, E) replicated over tp (the vocab-parallel lookup without its sequence scatter)."""
        lm = self.language_model
        return lm.embed_replicated(ids) if _is_engine(lm) else lm.get_input_embeddings()(ids)

    # --- the language model on the shard -------------------------------------------------------------------
    def language_model_hidden(self, h: torch.Tensor, plan: MultimodalShardPlan, kv_cache=None) -> torch.Tensor:
        """Engine Transformer layers + final norm on the shard h (1, S_local, E) -> (1, S_local, E).

        `Transformer.decode` after the tp-sequence scatter; under tp sequence parallelism the output is
        this tp rank's 1/tp slice of the local sequence. `kv_cache` (`inference.KVCache`) is filled
        in place by this prefill.
        """
        lm = self.language_model
        if not _is_engine(lm):
            raise ValueError("language_model_hidden needs the engine Transformer")
        positions = plan.positions.to(h.device).unsqueeze(0)
        cu = None if plan.cu_seqlens is None else plan.cu_seqlens.to(h.device)
        batch_plan = plan.attention if plan.attention is not None else lm.plan(1, h.shape[1], cu, device=h.device)
        if lm.tp_sequence_parallel:
            tp = axis_size(self.groups)
            if h.shape[1] % tp:
                raise ValueError(f"tp_sequence_parallel needs the local length {h.shape[1]} divisible by tp={tp}")
            h = scatter_to_sequence_region(h, self.groups, dim=1)
        return lm.decode(h, positions, plan=batch_plan, kv_cache=kv_cache)

    def shard_loss(self, h: torch.Tensor, plan: MultimodalShardPlan) -> torch.Tensor:
        """The loss (docs/design.md section 6) of an embedded shard from `embed_shard` and its plan."""
        lm = self.language_model
        labels = plan.labels.to(h.device).unsqueeze(0)
        if _is_engine(lm):
            return lm.shard_loss(self.language_model_hidden(h, plan), labels)
        from ..integrations.hf import (
            ATTN_IMPLEMENTATION,
            CU_SEQLENS_KWARG,
            PLAN_KWARG,
            SCHEME_KWARG,
            sequence_parallel_loss,
        )

        kwargs = {"inputs_embeds": h, "position_ids": plan.positions.to(h.device).unsqueeze(0), "use_cache": False}
        # An SP-enabled model on a one-rank sp group (the trainer's 1-process run) keeps packed boundaries too.
        if self.sp_size > 1 or getattr(lm.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            kwargs[SCHEME_KWARG], kwargs[PLAN_KWARG] = self.scheme, plan.attention
            if plan.cu_seqlens is not None:
                kwargs[CU_SEQLENS_KWARG] = plan.cu_seqlens.to(h.device)
        elif plan.cu_seqlens is not None:
            raise ValueError("packed samples (several rows or cu_seqlens) need a sequence-parallel transformers "
                             "model (enable_sequence_parallel), whose attention keeps the boundaries")
        return sequence_parallel_loss(lm(**kwargs), labels, self.groups, self.ignore_index)

    def forward(self, input_ids: torch.Tensor, frames=None, labels: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of the sample's mean next-token loss (docs/design.md section 6); the same global
        sample on every sp rank.

        | arg | shape | meaning |
        |---|---|---|
        | input_ids | (S,) or (B, S) int | text ids, one `image_token_id` per frame; B rows are packed |
        | frames | (N, C, H, W), a list of N (C, H, W) tensors, or None | in placeholder order (row-major) |
        | labels | like input_ids, or None | unshifted supervision (default input_ids); ignore_index masks |
        | cu_seqlens | (K+1,) int or None | packed sequences of a one-row sample (offsets into input_ids) |

        Visual tokens are never targets. The sp ranks' returned losses add up to the sample mean; a rank
        without a supervised token returns 0. Sum parameter gradients over sp (`train.average_gradients`).
        """
        h, plan = self.embed_shard(input_ids, frames, labels, cu_seqlens)
        return self.shard_loss(h, plan)
