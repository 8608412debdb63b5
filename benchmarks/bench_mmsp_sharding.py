"""Two-stage MM-SP sharding ablation: frames balanced over the sp group vs frames split by position.

Both variants train the same `VisionLanguageModel` (PatchViT tower, MLPProjector, engine Transformer)
on the same long-video sample, with the same token-balanced zigzag layout for the language model:

- `balanced` (MM-SP, docs/design.md section 7): stage 1 gives every rank an equal share of the frames,
  stage 2 moves the visual tokens to their layout positions with one all-to-all-v;
- `by_position` (the one-stage baseline): each frame is encoded by the rank holding its first token,
  so the vision work follows the token layout; text-heavy shards encode few frames, video-heavy ones
  many, and the slowest rank sets the pace.

Per rank it times: `vision` (tower + projector forward and backward on that rank's frames alone),
`lm` (language-model forward and backward on an already-embedded shard) and `step` (the whole
training forward and backward, collectives included), each a median over repeats via the shared
harness, plus the frames it encoded and the bytes it sent (per axis, from groups.stats). Rank 0
prints one table and appends one JSON line per (variant, rank) to
benchmarks/results/bench_mmsp_sharding.jsonl. It reports; it asserts nothing about speed.

Launch: `python benchmarks/bench_mmsp_sharding.py [--smoke]` spawns --world local gloo processes
itself; under `torchrun` (RANK set) it joins the given job instead (NCCL when CUDA is available).
Sizes: --smoke (2 ranks, 6 frames, seconds: CI), default (4 ranks, 48 frames of 32x32).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from longvila_engine import ParallelLayout, init_parallel  # noqa: E402
from longvila_engine.models import Transformer, get_config  # noqa: E402
from longvila_engine.multimodal import MLPProjector, PatchViT, VisionLanguageModel  # noqa: E402

NAME = "bench_mmsp_sharding"
VARIANTS = ("balanced", "by_position")
SIZES = {
    "smoke": dict(world=2, ring=2, ulysses=1, frames=6, image=16, patch=4, vit_dim=32, vit_layers=1, pool=2,
                  text_before=24, text_after=8, model="tiny", warmup=1, repeats=2),
    "default": dict(world=4, ring=2, ulysses=2, frames=48, image=32, patch=4, vit_dim=64, vit_layers=2, pool=1,
                    text_before=1536, text_after=64, model="tiny", warmup=1, repeats=5),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds-long size for CI")
    for key, value in SIZES["default"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    p.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a collective gives up")
    args = p.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "default"]
    for key, value in size.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.world != args.ring * args.ulysses:
        p.error(f"--world {args.world} must equal ring*ulysses = {args.ring * args.ulysses} (one sp group)")
    return args


def _sample(args, vocab: int, image_token_id: int):
    """A long-video prompt: a system/text prefix, the frames, a question; fixed seed."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, image_token_id, (args.text_before,), generator=gen),
                     torch.full((args.frames,), image_token_id),
                     torch.randint(0, image_token_id, (args.text_after,), generator=gen)])
    frames = torch.randn(args.frames, 3, args.image, args.image, generator=gen)
    return ids, frames


def _build(args, groups, split: str, tokens_per_frame: int | None, device):
    config = get_config(args.model)
    torch.manual_seed(1)
    tower = PatchViT(args.image, args.patch, 3, args.vit_dim, num_heads=2, num_layers=args.vit_layers, device=device)
    projector = MLPProjector(args.vit_dim, config.hidden_size, pool=args.pool, device=device)
    lm = Transformer(config, groups, seed=2, device=device)
    return VisionLanguageModel(tower, projector, lm, groups, image_token_id=config.vocab_size - 1, frame_split=split,
                               tokens_per_frame=tokens_per_frame)


def _measure_variant(args, groups, split: str, tokens_per_frame: int, ids, frames, device) -> dict:
    model = _build(args, groups, split, tokens_per_frame, device)
    h, plan = model.embed_shard(ids, frames)
    h = h.detach().requires_grad_()
    local = frames[plan.frame_index.to(device)]
    timing = dict(device=device, warmup=args.warmup, repeats=args.repeats, min_repeats=args.repeats)
    # Fixed repeat counts (no time budget): every rank makes the same calls, so collectives match.
    t_vision = harness.time_fn(lambda: model.encode_frames(local).sum().backward(), **timing)  # this rank alone
    dist.barrier()
    t_lm = harness.time_fn(lambda: model.shard_loss(h, plan).backward(), **timing)
    groups.stats.reset()
    model(ids, frames).backward()
    traffic = groups.stats.summary()  # one step's bytes per axis
    t_step = harness.time_fn(lambda: model(ids, frames).backward(), **timing)
    return {"case": split, "rank": groups.sp_rank, "frames_here": int(plan.frame_index.numel()),
            "tokens_here": int((plan.shard < plan.seq_len).sum()), "seq_len": plan.seq_len,
            "tokens_per_frame": plan.tokens_per_frame, "vision_ms": t_vision.median * 1e3,
            "lm_ms": t_lm.median * 1e3, "step": t_step.summary_ms(), "step_ms": t_step.median * 1e3,
            "comm": traffic}


def _measure_rank(args, groups, device) -> list[dict]:
    config = get_config(args.model)
    ids, frames = _sample(args, config.vocab_size, config.vocab_size - 1)
    frames = frames.to(device)
    probe = _build(args, groups, "balanced", None, device)
    with torch.no_grad():  # P for the baseline, which must place frames before encoding them
        tokens_per_frame = probe.encode_frames(frames[:1]).shape[1]
    return [_measure_variant(args, groups, split, tokens_per_frame, ids, frames, device) for split in VARIANTS]


def _report(args, all_rows: list[dict], device) -> None:
    results = harness.ResultsFile(NAME, results_dir=args.results_dir, device=device)
    config = {k: getattr(args, k) for k in SIZES["default"]}
    for row in all_rows:
        results.append({"config": config, **row})
    columns = [("variant", "case", ""), ("rank", "rank", "d"), ("frames", "frames_here", "d"),
               ("tokens", "tokens_here", "d"), ("vision ms", "vision_ms", ".1f"), ("lm ms", "lm_ms", ".1f"),
               ("step ms", "step_ms", ".1f"), ("sp bytes", "comm.sp.bytes", "d")]
    harness.print_table(all_rows, columns, title=f"{NAME}: {args.frames} frames, world {args.world} "
                                                 f"(ring {args.ring} x ulysses {args.ulysses})")
    for split in VARIANTS:
        rows = [r for r in all_rows if r["case"] == split]
        vision = [r["vision_ms"] for r in rows]
        print(f"{split:>12}: slowest vision rank {max(vision):.1f} ms (mean {sum(vision) / len(vision):.1f}), "
              f"step {max(r['step_ms'] for r in rows):.1f} ms")
    print(f"results appended to {results.path}")


def _run(args, rank: int, world: int, init_method: str | None) -> None:
    use_cuda = torch.cuda.is_available() and init_method is None
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=args.timeout)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method or "env://", rank=rank,
                            world_size=world, timeout=timeout)
    try:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        groups = init_parallel(ParallelLayout(ring=args.ring, ulysses=args.ulysses, gpus_per_node=per_node),
                               timeout=timeout)
        rows = _measure_rank(args, groups, device)
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            _report(args, [r for per_rank in gathered for r in per_rank], device)
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, args, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    _run(args, rank, world, f"file://{init_file}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:
        _run(args, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_mmsp_") as tmp:
        torch.multiprocessing.spawn(_spawned, args=(args, args.world, os.path.join(tmp, "rendezvous")),
                                    nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
