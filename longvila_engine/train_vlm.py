"""The multimodal trainer: `torchrun ... -m longvila_engine.train --task vlm --llm PATH --vision PATH
--data data.jsonl --num-frames F --seq-len S [--ring R --ulysses U] ...`.

One step on one rank:
1. The DataLoader (workers decode the videos) gives this dp replica's next pack of samples: the SAME
   global pack on every sp rank of the replica (`data.VLMData`: ids with one placeholder per frame,
   labels on the answers only, `cu_seqlens`, preprocessed frames).
2. One tiny all-reduce over the world agrees on bad packs: a rank whose pack failed (a missing,
   corrupt or too-short video in strict mode) or came out empty (every sample skipped) makes every rank
   stop with the error, or skip the step, together. Never a hang.
3. `VisionLanguageModel` (MM-SP, docs/design.md section 7): stage 1 runs the vision tower and projector on
   this rank's share of the frames; stage 2 moves the visual tokens to the token-balanced zigzag
   layout with one all-to-all-v; the language model runs on the local shard.
4. Backward, gradients summed over dp_sp and divided by dp (`train.average_gradients`), global-norm
   clipping, AdamW over the trainable parameters only.

Models: the vision tower is transformers' `SiglipVisionModel` (`--vision PATH`, multimodal/hf_vision.py);
the projector is `MLPProjector` (`--pool 2`: 2 x 2 token merging); the language model at `--llm PATH`
(Llama, Qwen2, Mistral) is the engine `Transformer` via `from_hf` (default, `--tp` allowed) or, with
`--llm-impl hf`, the transformers model made sequence-parallel by `integrations.enable_sequence_parallel`.
`--freeze vision,llm,projector` (any subset) follows LongVILA's stages: stage 1 (alignment) trains the
projector only (`--freeze vision,llm`), later stages train projector and LLM (`--freeze vision`) or
everything.

Checkpoints (`checkpoint.py`) hold the trainable parameters and their AdamW state; frozen weights are
read again from `--llm`/`--vision` on resume. The data position is the step (packs are deterministic).
Rank 0 appends one JSON line per step to `--log-json`: loss, tokens/s, frames/s, peak memory, skips.

Faults and restarts are the text trainer's (`elastic.run_trainer`): a failure names the rank, the step and
the collective it was in, and leaves with exit 1; SIGTERM stops every rank after the current step with a
checkpoint of it and exit 0 (143 past `--preempt-grace`); `--resume auto` (the default) continues from
the newest intact checkpoint, so torchrun's restarts and a requeued job go on by themselves. DataLoader
workers ignore SIGTERM (torchrun signals the worker's whole process group): the trainer stops them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["split_task", "parse_args", "build_vlm", "TrainableView", "check_processor_size", "train", "main"]

FREEZABLE = ("vision", "llm", "projector")
PATCHVIT = "patchvit"


def split_task(argv) -> tuple[str, list[str]]:
    """('text' or 'vlm', the other arguments) from a command line with an optional `--task X`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task, rest, i = "text", [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--task":
            if i + 1 >= len(argv):
                raise ValueError("--task needs a value: text or vlm")
            task, i = argv[i + 1], i + 2
            continue
        if a.startswith("--task="):
            task = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if task not in ("text", "vlm"):
        raise ValueError(f"--task {task!r} is unknown; choose text (token files or synthetic) or vlm (video-text)")
    return task, rest


def _freeze_list(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in FREEZABLE]
    if bad:
        raise argparse.ArgumentTypeError(f"--freeze {text!r}: {bad} unknown; choose from {', '.join(FREEZABLE)}")
    return parts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m longvila_engine.train --task vlm", description=__doc__.split("\n")[0])
    p.add_argument("--llm", required=True, help="Llama/Qwen2/Mistral folder (config, safetensors, tokenizer files)")
    p.add_argument("--llm-impl", default="engine", choices=["engine", "hf"],
                   help="engine: longvila_engine Transformer.from_hf (tp allowed); hf: the transformers model "
                        "with enable_sequence_parallel (tp=1)")
    p.add_argument("--vision", required=True,
                   help="SiglipVisionModel folder with preprocessor_config.json, or 'patchvit': the engine's small "
                        "PatchViT (random init; --image-size pixels, 4 x 4 patches, width 64, 2 layers)")
    p.add_argument("--image-size", type=int, default=32, help="frame side for --vision patchvit")
    p.add_argument("--data", required=True, help="jsonl file (see longvila_engine/data/vlm_data.py)")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per video")
    p.add_argument("--seq-len", type=int, default=2048, help="packed length in LM tokens (text + visual)")
    p.add_argument("--truncate-frames", action="store_true",
                   help="fit a too-long sample by using fewer frames (default: skip it and count it)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="skip (and count) rows with bad JSON, no marker or a bad video instead of stopping")
    p.add_argument("--image-token", default="<image>", help="the tokenizer's placeholder token for a frame")
    p.add_argument("--pool", type=int, default=2, choices=[1, 2], help="projector token merging (2: 2x2)")
    p.add_argument("--feature-layer", type=int, default=-1, help="vision tower hidden layer to project")
    p.add_argument("--freeze", type=_freeze_list, default=(), help="comma list of vision,llm,projector")
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism of the language model (--llm-impl engine)")
    p.add_argument("--dp", type=int, default=None, help="default: world / (ring*ulysses)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: LOCAL_WORLD_SIZE")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; 0 disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--autocast", action="store_true",
                   help="bf16 autocast for the forward, float32 parameters, gradients and optimizer state")
    p.add_argument("--fsdp", default="auto", choices=["auto", "on", "off"],
                   help="FSDP2-shard parameters, gradients and AdamW state over dp_sp (fsdp.shard_model: each LLM "
                        "block a unit; tower, projector, embeddings and head in the root unit); auto: when dp*sp > 1")
    p.add_argument("--data-workers", type=int, default=1, help="DataLoader worker processes (0: decode inline)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--save-every", type=int, default=0, help="save after every N steps (0: never)")
    p.add_argument("--resume", nargs="?", const="latest", default="auto",
                   help="auto (default): the newest intact checkpoint in --checkpoint-dir if there is one, else "
                        "start fresh (what a torchrun restart needs); latest: the same, --checkpoint-dir required; "
                        "none: start fresh; or a step directory")
    p.add_argument("--preempt-grace", type=float, default=30.0,
                   help="seconds from SIGTERM to a saved checkpoint and exit 0; past it the rank exits 143")
    p.add_argument("--log-json", default=None, help="append one JSON line per step (rank 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a collective gives up")
    p.add_argument("--no-progress", action="store_true", help="no tqdm line")
    args = p.parse_args(argv)
    for name in ("ring", "ulysses", "tp", "seq_len", "steps", "num_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data_workers < 0:
        raise ValueError(f"--data-workers must be >= 0, got {args.data_workers}")
    if set(args.freeze) == set(FREEZABLE):
        raise ValueError("--freeze vision,llm,projector leaves nothing to train; drop one of them")
    if args.resume == "latest" and not args.checkpoint_dir:
        raise ValueError("--resume without a path needs --checkpoint-dir")
    if not args.preempt_grace > 0:
        raise ValueError(f"--preempt-grace must be > 0 seconds, got {args.preempt_grace}; pass e.g. 30")
    if args.autocast and args.llm_impl == "hf":
        raise ValueError("--autocast needs --llm-impl engine: transformers' attention upcasts q/k for RoPE and "
                         "the sequence-parallel attention refuses mixed q/k/v dtypes")
    if args.tp > 1 and args.llm_impl == "hf":
        raise ValueError(f"--tp {args.tp} needs --llm-impl engine: transformers models run with tp=1 here")
    return args


# --- models ------------------------------------------------------------------------------------------------
class TrainableView(nn.Module):
    """The trainable parameters of a model, under their names, as a module: what the optimizer, the
    gradient reduction, clipping and checkpoints see (frozen weights are reloaded from their folders)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = [model]  # a list: not registered as a submodule, so only named_parameters shows it

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self._model[0].named_parameters(prefix=prefix, recurse=recurse,
                                                       remove_duplicate=remove_duplicate):
            if p.requires_grad:
                yield name, p

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p


def _load_llm(args, groups):
    """The language model at --llm: the engine Transformer (`from_hf`, each rank reading its tp slices)
    or the transformers model made sequence-parallel."""
    from transformers import AutoModelForCausalLM

    from .integrations.hf import enable_sequence_parallel
    from .models import Transformer

    path, backend = args.llm, args.attention_backend
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--llm {path}: no config.json there; pass a folder written by save_pretrained")
    if args.llm_impl == "engine":
        return Transformer.from_hf(path, groups, max_seq_len=args.seq_len, attention_backend=backend,
                                   dtype=torch.float32, device=groups.device, seed=args.seed)
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                              attn_implementation="eager")
    if getattr(lm.config, "attention_dropout", 0.0):
        lm.config.attention_dropout = 0.0  # refused by the SP attention; ranks must compute what one process does
    return enable_sequence_parallel(lm.to(groups.device), groups, backend=backend)


def build_vlm(args, groups, image_token_id: int):
    """(VisionLanguageModel, tokens per frame) with `--freeze` applied."""
    from transformers.utils import logging as hf_logging

    from .multimodal import MLPProjector, PatchViT, VisionLanguageModel
    from .multimodal.hf_vision import load_vision_tower

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per rank says nothing
    torch.manual_seed(args.seed)
    if args.vision == PATCHVIT:
        if args.image_size < 4 or args.image_size % 4:
            raise ValueError(f"--image-size {args.image_size} must be a positive multiple of 4 (4 x 4 patches)")
        tower = PatchViT(args.image_size, args.image_size // 4, 3, 64, num_heads=4, num_layers=2)
        tower.hidden_size = tower.dim
        tower = tower.to(groups.device)
    else:
        tower = load_vision_tower(args.vision, feature_layer=args.feature_layer).to(groups.device)
    lm = _load_llm(args, groups)
    hidden = lm.config.hidden_size
    torch.manual_seed(args.seed + 1)  # the projector is the only freshly initialised part: same on every rank
    projector = MLPProjector(tower.hidden_size, hidden, pool=args.pool).to(groups.device)
    for name, module in (("vision", tower), ("llm", lm), ("projector", projector)):
        module.requires_grad_(name not in args.freeze)
    vlm = VisionLanguageModel(tower, projector, lm, groups, image_token_id=image_token_id)
    with torch.no_grad():  # tokens per frame are read from the projector's output, never assumed
        probe = torch.zeros(1, 3, tower.image_size, tower.image_size, device=groups.device)
        tokens_per_frame = vlm.encode_frames(probe).shape[1]
    return vlm, tokens_per_frame


# --- data --------------------------------------------------------------------------------------------------
def _build_data(args, tokens_per_frame: int):
    from .data import VLMData, load_image_processor, load_tokenizer

    tokenizer = load_tokenizer(args.llm)
    if args.vision == PATCHVIT:  # SigLIP's processing (resize, 1/255, mean 0.5, std 0.5) at --image-size
        import logging

        from transformers import SiglipImageProcessor

        logging.getLogger("transformers").setLevel(logging.ERROR)
        processor = SiglipImageProcessor(size={"height": args.image_size, "width": args.image_size},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        processor = load_image_processor(args.vision)
    return VLMData(args.data, tokenizer, processor, num_frames=args.num_frames, seq_len=args.seq_len,
                   tokens_per_frame=tokens_per_frame, image_token=args.image_token,
                   truncate_frames=args.truncate_frames, skip_bad=args.skip_bad_samples)


def check_processor_size(processor, image_size: int, where: str) -> None:
    """The image processor must produce the frame size the tower was built for (else the tower's position
    embeddings would not fit): one tiny image through it, at start-up."""
    import numpy as np

    out = processor(images=[np.zeros((8, 8, 3), dtype=np.uint8)], return_tensors="pt")["pixel_values"]
    if tuple(out.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"--vision {where}: the image processor makes {tuple(out.shape[-2:])} frames but the "
                         f"tower expects {image_size} x {image_size}; fix 'size' in preprocessor_config.json")


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the trainer: torchrun signals the whole process group, and a
    worker killed by it would fail the step the trainer is finishing before its preemption checkpoint.
    The trainer ends its workers when the loop stops (and they leave by themselves when it is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _SafePacks(torch.utils.data.Dataset):
    """Packs by step: item k is the pack of step start+k for this dp replica. A failing pack comes back
    as {'error': message} so the trainer can agree on it with the other ranks before raising."""

    def __init__(self, data, start: int, steps: int, dp: int, dp_rank: int):
        self.data, self.start, self.steps, self.dp, self.dp_rank = data, start, steps, dp, dp_rank

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, k: int) -> dict:
        step = self.start + k
        try:
            return self.data[step * self.dp + self.dp_rank]
        except ValueError as exc:
            return {"error": str(exc)}


def _agree_on_pack(pack: dict, groups) -> str:
    """'ok', 'skip' (some replica's pack is empty: every rank skips the step) or raises the error on
    every rank (this rank's own message, or which rank failed). One all-reduce of two ints."""
    error = pack.get("error")
    empty = error is None and pack["input_ids"].numel() == 0
    flags = torch.tensor([1 if error else 0, 1 if empty else 0], dtype=torch.int64, device=groups.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        mine = flags.clone()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] and not mine[0]:
            raise ValueError("another rank could not build its batch (a bad sample; its log names the file and "
                             "line); every rank stops here")
    if error:
        raise ValueError(error)
    return "skip" if flags[1] else "ok"


def _per_rank_traffic(groups, num_frames: int) -> dict:
    """What each rank did in this step: its stage-1 frames (vision tower + projector), and the bytes it
    sent in the stage-2 all-to-all-v (axis 'sp', forward and backward), the ring and the Ulysses
    all-to-alls. One small all-gather over the world; lists are in rank order."""
    from .multimodal import split_frames

    stats = groups.stats.bytes_sent
    mine = torch.tensor([split_frames(num_frames, groups.sp_size)[groups.sp_rank] if num_frames else 0,
                         stats.get("sp", 0), stats.get("ring", 0), stats.get("ulysses", 0)], dtype=torch.int64,
                        device=groups.device)
    rows = [mine]
    if dist.get_world_size() > 1:
        rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, mine)
    keys = ("stage1_frames", "stage2_bytes", "ring_bytes", "ulysses_bytes")
    return {k: [int(r[i]) for r in rows] for i, k in enumerate(keys)}


def _peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- the loop ----------------------------------------------------------------------------------------------
def train(args, progress: dict | None = None, preemption=None) -> list[dict]:
    """Run the whole job on this rank; returns the per-step records. `preemption` (`elastic.Preemption`,
    main installs it on SIGTERM) is polled collectively after every step, as in the text trainer."""
    from tqdm import tqdm

    from . import elastic
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import collate_identity, image_token_id, load_tokenizer
    from .tensor_parallel.mappings import all_reduce
    from .train import average_gradients, build_optimizer, clip_grad_norm_, init_distributed, resume_choice

    progress = {} if progress is None else progress
    if preemption is None:
        preemption = elastic.Preemption(args.preempt_grace, name="longvila_engine.train --task vlm")
    progress["where"] = "start-up"
    groups = init_distributed(args)
    rank = dist.get_rank()
    progress["rank"] = rank
    vlm, tokens_per_frame = build_vlm(args, groups, image_token_id(load_tokenizer(args.llm), args.image_token))
    sharded = args.fsdp == "on" or (args.fsdp == "auto" and groups.dp_sp_size > 1)
    if sharded:
        from .fsdp import shard_model

        shard_model(vlm, groups)  # gradients: reduce-scattered over dp_sp and divided by dp in backward
    view = TrainableView(vlm)
    optimizer = build_optimizer(view, args.lr, args.weight_decay)
    if rank == 0:
        from .fsdp import format_state_bytes, state_bytes

        print(format_state_bytes(state_bytes(view, optimizer), rank, sharded), file=sys.stderr, flush=True)
    progress["where"] = "indexing the data"
    data = _build_data(args, tokens_per_frame)
    check_processor_size(data.image_processor, vlm.vision_tower.image_size, args.vision)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    rep = data.report
    say(f"[vlm] {rep.rows} rows -> {len(data.samples)} samples in {len(data)} packs of <= {args.seq_len} tokens "
        f"({tokens_per_frame} tokens per frame); {rep.truncated} truncated by frames, {len(rep.skipped)} skipped")
    for line, reason in rep.skipped:
        say(f"[vlm] skipped {data.path}, line {line}: {reason}")
    parts = {"vision": vlm.vision_tower, "projector": vlm.projector, "llm": vlm.language_model}
    counts = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items()}
    say(f"[vlm] trainable: {', '.join(f'{k} ({v} params)' for k, v in counts.items() if v)}; "
        f"frozen: {', '.join(k for k in parts if k in args.freeze) or 'nothing'}")
    start, path = 0, resume_choice(args, rank)
    if path is not None:
        start = int(load_checkpoint(path, view, optimizer, groups)["step"])
        say(f"resumed from {path} at step {start} (torchrun attempt {elastic.restart_count()})")
    loader = torch.utils.data.DataLoader(
        _SafePacks(data, start, args.steps, groups.dp_size, groups.dp_rank), batch_size=None, shuffle=False,
        num_workers=args.data_workers, collate_fn=collate_identity,
        worker_init_fn=_ignore_sigterm if args.data_workers else None,
        multiprocessing_context="fork" if args.data_workers else None)

    def save(step: int) -> None:
        save_checkpoint(args.checkpoint_dir, step, view, optimizer, groups,
                        meta={"task": "vlm", "llm": args.llm, "vision": args.vision, "seed": args.seed,
                              "freeze": list(args.freeze)})

    bar = tqdm(total=args.steps, initial=start, disable=rank != 0 or args.no_progress, file=sys.stderr,
               dynamic_ncols=True)
    log = open(args.log_json, "a") if (args.log_json and rank == 0) else None
    records, skipped_total, vlm_device = [], len(rep.skipped), groups.device
    vlm.train()
    preemption.arm()
    try:
        t_prev = time.perf_counter()
        for step, pack in enumerate(loader, start=start):
            progress["where"] = f"step {step + 1}"
            verdict = _agree_on_pack(pack, groups)
            skipped_total += len(pack.get("skipped", ()))
            for line, reason in pack.get("skipped", ()):
                say(f"[vlm] skipped {data.path}, line {line}: {reason}")
            record = {"step": step + 1, "pack": pack["pack"], "skipped_samples_total": skipped_total}
            if verdict == "skip":
                record.update(loss=None, skipped_step=True)
                say(f"[vlm] step {step + 1}: an empty pack (every sample skipped) on some replica; step skipped")
            else:
                frames = None if pack["frames"] is None else pack["frames"].to(vlm_device)
                optimizer.zero_grad(set_to_none=True)
                groups.stats.reset()
                with torch.autocast(vlm_device.type, dtype=torch.bfloat16, enabled=args.autocast):
                    loss = vlm(pack["input_ids"].to(vlm_device), frames, pack["labels"].to(vlm_device),
                               pack["cu_seqlens"])
                loss.backward()
                if not sharded:
                    average_gradients(view, groups)
                norm = clip_grad_norm_(vlm if sharded else view, args.grad_clip, groups)
                optimizer.step()
                counts = torch.tensor([float(loss.detach()), pack["tokens"],
                                       0 if frames is None else frames.shape[0]], dtype=torch.float64,
                                      device=vlm_device)
                all_reduce(counts, groups, "dp_sp")  # sp ranks' losses add up; tokens/frames counted sp times
                now = time.perf_counter()
                elapsed, t_prev = now - t_prev, now
                sp = groups.sp_size
                tokens, nframes = float(counts[1]) / sp, float(counts[2]) / sp
                record.update(loss=float(counts[0]) / groups.dp_size, grad_norm=float(norm), tokens=int(tokens),
                              frames=int(nframes), step_time_s=elapsed, tokens_per_s=tokens / max(elapsed, 1e-9),
                              frames_per_s=nframes / max(elapsed, 1e-9),
                              peak_memory_mib=round(_peak_memory_mib(vlm_device), 1), lines=pack["lines"])
                record["per_rank"] = _per_rank_traffic(groups, 0 if frames is None else frames.shape[0])
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                fr_s=f"{record['frames_per_s']:.1f}")
            records.append(record)
            bar.update(1)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            saved = args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0
            if saved:
                progress["where"] = f"saving checkpoint {step + 1}"
                save(step + 1)
                t_prev = time.perf_counter()
            if preemption.stop_after(step + 1, vlm_device, progress, rank, args.checkpoint_dir,
                                     None if saved else functools.partial(save, step + 1)):
                break
    finally:
        if not preemption.requested:  # once preempted, a second SIGTERM changes nothing
            preemption.disarm()
        bar.close()
        if log is not None:
            log.close()
    say(f"[vlm] done: {len(records)} steps, {skipped_total} samples skipped in all")
    return records


def main(argv=None) -> int:
    """The `--task vlm` entry of `python -m longvila_engine.train`: the text trainer's failure and
    preemption path (`elastic.run_trainer`). A ValueError is the input's fault (a bad sample or argument,
    named with its file and line): reported without a traceback."""
    from . import elastic

    return elastic.run_trainer("longvila_engine.train --task vlm", parse_args, train, argv, quiet=(ValueError,))


if __name__ == "__main__":
    from longvila_engine import elastic

    elastic.leave_process(main())
