"""Long-video needle in a haystack (LongVILA section 6.3, in miniature and fully procedural).

A haystack video is N small frames of smooth random noise, correlated over time (an AR(1) walk of a
coarse 4 x 4 colour grid, upsampled bilinearly); no download. One frame, at depth d (needle index
round(d * (N - 1))), is replaced by the needle: a digit 0-9 drawn as a seven-segment figure in white
on a saturated red card. After the video comes a fixed question; the model must answer with the
digit's token (ASCII '0'..'9' = ids 48..57).

    [BOS] [IMG] x N [Q tokens]  ->  digit token

Evaluation writes each haystack (needle included) as an mp4 file (lossless H.264 RGB, PyAV) and reads
it back through the trainer's data path (`data.read_video`: PyAV decoding, F frames sampled uniformly,
here all of them), mapping pixels back with `pixels_to_frames`. It then runs `inference.generate`
(sequence-parallel prefill, greedy, one new token) over a grid of
lengths (frames) x depths, `trials` needles per cell, and writes JSON (one row per cell: frames,
tokens, depth, correct, trials, accuracy, answers) and a heatmap PNG. Under torchrun every rank of the
sp group runs the same grid (MM-SP prefill over --ring x --ulysses); rank 0 writes the files.

Training (`--train`) is one process: `VisionLanguageModel(PatchViT, MLPProjector(pool=2), tiny
Transformer)` on random lengths in [--train-min-frames, --train-max-frames], loss on the answer token
only. A few minutes on 2 CPU cores. Commands:

    python -m longvila_engine.eval.niah --train --steps 800 --save niah.pt
    python -m longvila_engine.eval.niah --load niah.pt --lengths 8,16,32,64 --json niah.json --png niah.png
    torchrun --nproc-per-node 2 -m longvila_engine.eval.niah --load niah.pt --ring 2 --json niah_sp.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from ..models import Transformer, get_config
from ..multimodal import MLPProjector, PatchViT, VisionLanguageModel

__all__ = ["IMAGE_TOKEN", "BOS", "QUESTION", "DIGIT_TOKENS", "SEGMENTS", "render_needle", "make_haystack",
           "needle_index", "make_sample", "frames_to_pixels", "pixels_to_frames", "write_sample_video",
           "read_sample_video", "build_model", "train", "run_grid", "write_heatmap", "main"]

IMAGE_TOKEN = 255
BOS = 1
QUESTION = (81, 85, 69, 83, 84, 63)  # "QUEST?": which digit was on the red card?
DIGIT_TOKENS = tuple(range(48, 58))  # '0'..'9'
FRAME = 16  # frame side; patch 4 -> 16 patches -> 4 visual tokens per frame after 2 x 2 merging

# Seven-segment figures on the 16 x 16 grid: (rows, cols) of each segment, stroke 2 pixels.
_SEG_BOXES = {
    "a": (slice(2, 4), slice(4, 12)), "g": (slice(7, 9), slice(4, 12)), "d": (slice(12, 14), slice(4, 12)),
    "f": (slice(2, 9), slice(4, 6)), "b": (slice(2, 9), slice(10, 12)),
    "e": (slice(7, 14), slice(4, 6)), "c": (slice(7, 14), slice(10, 12)),
}
SEGMENTS = ("abcdef", "bc", "abdeg", "abcdg", "bcfg", "acdfg", "acdefg", "abc", "abcdefg", "abcdfg")
NEEDLE_LEVEL = 1.5  # needle pixels are +-1.5; haystack noise stays well inside (-1.5, 1.5)


def render_needle(digit: int, size: int = FRAME) -> torch.Tensor:
    """(3, size, size) float32: the digit in white (all channels +1.5) on a red card (+1.5, -1.5, -1.5)."""
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int in 0..9, got {digit!r}")
    if size % FRAME:
        raise ValueError(f"size must be a multiple of {FRAME}, got {size}")
    card = torch.tensor([NEEDLE_LEVEL, -NEEDLE_LEVEL, -NEEDLE_LEVEL]).view(3, 1, 1).repeat(1, FRAME, FRAME)
    for seg in SEGMENTS[digit]:
        rows, cols = _SEG_BOXES[seg]
        card[:, rows, cols] = NEEDLE_LEVEL
    if size != FRAME:
        card = card.repeat_interleave(size // FRAME, 1).repeat_interleave(size // FRAME, 2)
    return card


def make_haystack(num_frames: int, seed: int, size: int = FRAME) -> torch.Tensor:
    """(num_frames, 3, size, size) float32 smooth noise, deterministic in (num_frames, seed).

    A coarse 3 x 4 x 4 grid follows an AR(1) walk over time (x_t = 0.9 x_{t-1} + 0.44 e_t, unit
    stationary variance), scaled by 0.4 and upsampled bilinearly: slowly drifting colour blobs, values
    within +-1.5 except with negligible probability (clamped to +-1.2 to make it certain)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(num_frames, 3, 4, 4, generator=gen)
    coarse = torch.empty_like(noise)
    coarse[0] = noise[0]
    rho = 0.9
    for t in range(1, num_frames):
        coarse[t] = rho * coarse[t - 1] + math.sqrt(1 - rho * rho) * noise[t]
    frames = F.interpolate(0.4 * coarse, size=(size, size), mode="bilinear", align_corners=False)
    return frames.clamp_(-1.2, 1.2)


def needle_index(num_frames: int, depth: float) -> int:
    """Frame index of the needle at depth d in [0, 1]: round(d * (num_frames - 1))."""
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    return int(round(float(depth) * (num_frames - 1)))


def make_sample(num_frames: int, depth: float, digit: int, seed: int, size: int = FRAME):
    """(prompt ids (S,), frames (N, 3, size, size), needle index, answer token id)."""
    frames = make_haystack(num_frames, seed, size)
    index = needle_index(num_frames, depth)
    frames[index] = render_needle(digit, size)
    ids = torch.tensor([BOS, *([IMAGE_TOKEN] * num_frames), *QUESTION], dtype=torch.long)
    return ids, frames, index, DIGIT_TOKENS[digit]


# Pixels <-> model frames: [-1.5, 1.5] <-> [0, 255], i.e. rescale 1/255, mean 0.5, std 1/3 (an image
# processor's settings; 1/std = 3 is applied as a product, so 0 and 255 map to -1.5 and 1.5 exactly).
# The needle's levels (+-1.5) are 0 and 255, exact; the haystack is quantised to 3/255 steps (error
# <= 1.5/255 = 0.006, far below the needle/haystack margin of 0.3).
PIXEL_MEAN, PIXEL_INV_STD = 0.5, 3.0


def frames_to_pixels(frames: torch.Tensor):
    """(N, 3, S, S) float frames -> (N, S, S, 3) uint8 RGB numpy array."""
    scaled = (frames.detach().float().cpu() / PIXEL_INV_STD + PIXEL_MEAN) * 255.0
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pixels_to_frames(arrays) -> torch.Tensor:
    """A list of (S, S, 3) uint8 RGB arrays -> (N, 3, S, S) float32 frames (the processor's normalisation)."""
    import numpy as np

    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - PIXEL_MEAN) * PIXEL_INV_STD


def write_sample_video(frames: torch.Tensor, path: str) -> None:
    """The haystack as a lossless H.264 RGB mp4 (PyAV)."""
    from ..data.video import write_video

    write_video(path, frames_to_pixels(frames), lossless=True)


def read_sample_video(path: str, num_frames: int) -> torch.Tensor:
    """The haystack back through the data path: PyAV decoding, `num_frames` sampled uniformly."""
    from ..data.video import read_video

    return pixels_to_frames(read_video(path, num_frames))


def build_model(groups=None, *, seed: int = 0, backend: str = "auto", dtype=None) -> VisionLanguageModel:
    """PatchViT(16 px, patch 4, width 32) + MLPProjector(pool=2: 4 tokens per frame) + tiny Transformer."""
    torch.manual_seed(seed)
    kw = {"dtype": dtype}
    device = None if groups is None else groups.device
    vit = PatchViT(FRAME, 4, 3, 32, num_heads=2, num_layers=1, device=device, **kw)
    projector = MLPProjector(32, get_config("tiny").hidden_size, pool=2, device=device, **kw)
    lm = Transformer(get_config("tiny"), groups, attention_backend=backend, seed=seed, device=device, **kw)
    return VisionLanguageModel(vit, projector, lm, groups, image_token_id=IMAGE_TOKEN)


# --- training ------------------------------------------------------------------------------------------------
def _train_batch(step: int, batch: int, min_frames: int, max_frames: int, seed: int):
    """One batch of `batch` samples with the same (random) frame count; labels on the answer only."""
    gen = torch.Generator().manual_seed(10_000_019 * (seed + 1) + step)
    n = int(torch.randint(min_frames, max_frames + 1, (1,), generator=gen))
    rows, frames, labels = [], [], []
    for b in range(batch):
        depth = float(torch.rand((), generator=gen))
        digit = int(torch.randint(0, 10, (1,), generator=gen))
        ids, f, _, answer = make_sample(n, depth, digit, seed=1_000_003 * (seed + 7) + step * batch + b)
        full = torch.cat([ids, torch.tensor([answer])])
        lab = torch.full_like(full, -100)
        lab[-1] = answer
        rows.append(full)
        frames.append(f)
        labels.append(lab)
    return torch.stack(rows), torch.cat(frames), torch.stack(labels)


def train(model: VisionLanguageModel, steps: int, *, batch: int = 16, lr: float = 3e-3, min_frames: int = 2,
          max_frames: int = 16, seed: int = 0, log_every: int = 50, log=print) -> list[dict]:
    """AdamW with linear warmup (5%) and cosine decay; returns the log rows (step, loss, acc, s)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    rows, start, run_loss = [], time.perf_counter(), None
    for step in range(steps):
        ids, frames, labels = _train_batch(step, batch, min_frames, max_frames, seed)
        loss = model(ids, frames, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        run_loss = value if run_loss is None else 0.9 * run_loss + 0.1 * value
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "loss": round(run_loss, 4), "frames": ids.shape[1] - 2 - len(QUESTION),
                   "s": round(time.perf_counter() - start, 1)}
            rows.append(row)
            log(f"step {row['step']:5d}  loss {row['loss']:.4f}  frames {row['frames']:3d}  {row['s']:.1f}s")
    model.eval()
    return rows


# --- evaluation ------------------------------------------------------------------------------------------------
def _cell_seed(seed: int, frames: int, depth_index: int, trial: int) -> int:
    return 7_919 * (seed + 3) + 104_729 * frames + 1_299_709 * depth_index + trial + 10**9  # disjoint from training


def run_grid(model: VisionLanguageModel, lengths, depths, trials: int = 5, *, seed: int = 0,
             backend: str | None = None, keep_logits: bool = False, video_dir: str | None = None) -> list[dict]:
    """Every cell of lengths x depths: `trials` needles (consecutive digits from a seeded start, each
    with its own haystack, written as an mp4 and read back through the data path) answered by
    sequence-parallel greedy generation. The same call on every sp rank; every rank returns the same rows.
    keep_logits: each row also gets "digit_logits", per trial the scores of the ten digit tokens.
    video_dir: keep the mp4 files there (default: a temporary folder of this process)."""
    import tempfile

    from ..inference import generate

    scratch = None
    if video_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="lv_niah_")
        video_dir = scratch.name
    os.makedirs(video_dir, exist_ok=True)

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    rows = []
    model.eval()
    for n in lengths:
        for j, depth in enumerate(depths):
            answers, expected, tokens, digit_logits = [], [], 0, []
            first = _cell_seed(seed, n, j, 0) % 10
            for t in range(trials):
                s = _cell_seed(seed, n, j, t)
                digit = (first + t) % 10  # ten trials: every digit once
                ids, frames, _, answer = make_sample(n, depth, digit, s)
                path = os.path.join(video_dir, f"haystack_{n}f_d{j}_t{t}_r{_rank()}.mp4")
                write_sample_video(frames, path)
                frames = read_sample_video(path, n)
                out = generate(model, ids.to(device), frames.to(device=device, dtype=dtype), model.groups,
                               max_new_tokens=1, backend=backend)
                answers.append(int(out.tokens[0]))
                expected.append(answer)
                if keep_logits:
                    digit_logits.append(out.logits[0, list(DIGIT_TOKENS)].double().tolist())
                tokens = sum(out.kv_tokens)  # the prompt's expanded length (one new token, not cached)
            correct = sum(a == e for a, e in zip(answers, expected))
            rows.append({"frames": int(n), "tokens": int(tokens), "depth": float(depth),
                         "needle_index": needle_index(n, depth), "correct": int(correct), "trials": int(trials),
                         "accuracy": correct / trials, "answers": answers, "expected": expected})
            if keep_logits:
                rows[-1]["digit_logits"] = digit_logits
    if scratch is not None:
        scratch.cleanup()
    return rows


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def write_heatmap(rows: list[dict], path: str, title: str = "needle in a haystack") -> None:
    """Accuracy heatmap: depth (rows) x frames (columns), each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["frames"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for r in rows:
        grid[depths.index(r["depth"]), lengths.index(r["frames"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)))
    im = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i in range(len(depths)):
        for k in range(len(lengths)):
            if not math.isnan(float(grid[i, k])):
                ax.text(k, i, f"{float(grid[i, k]):.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- command line -------------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m longvila_engine.eval.niah", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train a model first (one process)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-min-frames", type=int, default=2)
    p.add_argument("--train-max-frames", type=int, default=16)
    p.add_argument("--save", help="write the trained model here (torch.save)")
    p.add_argument("--load", help="evaluate this saved model (default: untrained, seeded)")
    p.add_argument("--lengths", type=_ints, default=[8, 16, 32, 64], help="frame counts, comma-separated")
    p.add_argument("--depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=10, help="needles per cell")
    p.add_argument("--json", help="write the per-cell results here")
    p.add_argument("--png", help="write the accuracy heatmap here")
    p.add_argument("--video-dir", help="keep the haystack mp4 files here (default: a temporary folder)")
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--backend", default="auto", help="attention backend (ops): auto, reference, cpu, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (1 is fastest on a shared, loaded machine)")
    p.add_argument("--timeout", type=float, default=300.0, help="collective timeout, seconds (distributed)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "trials", "ring", "ulysses", "train_min_frames", "train_max_frames"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_min_frames > args.train_max_frames:
        raise SystemExit("--train-min-frames must not exceed --train-max-frames")
    if not args.lengths or min(args.lengths) < 1 or not args.depths or not all(0 <= d <= 1 for d in args.depths):
        raise SystemExit("--lengths must be ints >= 1 and --depths fractions in [0, 1]")
    return args


def _init_groups(args):
    """(groups, owned): (None, False) in one process; under torchrun gloo (or NCCL on CUDA) and
    ParallelLayout(dp, ring, ulysses). owned: this call created the default process group."""
    import torch.distributed as dist

    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.ring * args.ulysses == 1:
        return None, False

    from ..parallel import ParallelLayout, init_parallel

    timeout = datetime.timedelta(seconds=args.timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    world, sp = dist.get_world_size(), args.ring * args.ulysses
    if world % sp:
        raise SystemExit(f"world size {world} is not a multiple of ring x ulysses = {sp}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    layout = ParallelLayout(dp=world // sp, ring=args.ring, ulysses=args.ulysses, gpus_per_node=per_node)
    return init_parallel(layout, timeout=timeout), owned


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    groups, owned = _init_groups(args)
    rank0 = True
    if groups is not None:
        import torch.distributed as dist

        rank0 = dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    if args.train:
        if groups is not None and groups.layout.dp * groups.sp_size > 1:
            raise SystemExit("--train runs in one process; launch it without torchrun")
        model = build_model(None, seed=args.seed, backend=args.backend)
        say(f"training {args.steps} steps, batch {args.batch}, {args.train_min_frames}-{args.train_max_frames} "
            f"frames")
        train(model, args.steps, batch=args.batch, lr=args.lr, min_frames=args.train_min_frames,
              max_frames=args.train_max_frames, seed=args.seed, log=say)
        if args.save:
            torch.save({"model": model.state_dict(), "train_max_frames": args.train_max_frames,
                        "train_min_frames": args.train_min_frames, "steps": args.steps, "seed": args.seed},
                       args.save)
            say(f"saved {args.save}")
        state = {"model": model.state_dict(), "train_max_frames": args.train_max_frames}
    elif args.load:
        state = torch.load(args.load, map_location="cpu", weights_only=True)
    else:
        state = None
        say("no --load: evaluating an UNTRAINED model (answers are chance)")
    if not (args.json or args.png) and args.train:
        return 0
    model = build_model(groups, seed=args.seed, backend=args.backend)
    if state is not None:
        model.load_state_dict(state["model"])
    trained_to = None if state is None else state.get("train_max_frames")
    sp = 1 if groups is None else groups.sp_size
    say(f"eval: lengths {args.lengths} x depths {args.depths}, {args.trials} trials per cell, sp={sp} "
        f"(ring={args.ring}, ulysses={args.ulysses})")
    start = time.perf_counter()
    rows = run_grid(model, args.lengths, args.depths, args.trials, seed=args.seed, backend=args.backend,
                    video_dir=args.video_dir)
    elapsed = time.perf_counter() - start
    total = sum(r["correct"] for r in rows) / sum(r["trials"] for r in rows)
    say(f"{'frames':>6} {'tokens':>6} " + " ".join(f"d={d:<5g}" for d in args.depths))
    for n in args.lengths:
        cells = [r for r in rows if r["frames"] == n]
        say(f"{n:6d} {cells[0]['tokens']:6d} " + " ".join(f"{r['accuracy']:<7.2f}" for r in cells)
            + ("  (beyond training length)" if trained_to is not None and n > trained_to else ""))
    say(f"overall accuracy {total:.3f} (chance 0.1), {elapsed:.1f}s")
    if rank0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                           "ring": args.ring, "ulysses": args.ulysses, "train_max_frames": trained_to,
                           "model": args.load if not args.train else "trained in this run",
                           "overall_accuracy": total, "cells": rows}, f, indent=1)
            say(f"wrote {args.json}")
        if args.png:
            what = "untrained" if state is None else f"trained on <= {trained_to} frames"
            write_heatmap(rows, args.png, f"needle in a haystack ({what}; sp={sp})")
            say(f"wrote {args.png}")
    if groups is not None:
        dist.barrier()
        if owned:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
