"""`make demo`: multimodal MM-SP training from the command line, on 4 CPU ranks next to one process.

It writes small offline assets (`data.toy_assets`: a tiny random Qwen2 with a BPE tokenizer and chat
template, a tiny random SigLIP tower with its preprocessor config, mp4 clips written with PyAV, frame
folders, text-only rows), then launches the real trainer twice through torchrun (gloo):

    python -m longvila_engine.train --task vlm --llm L --vision V --data data.jsonl --num-frames 4 ...
        --ring 2 --ulysses 2        (4 ranks, the MM-SP 2D layout)   and   1 process

and prints, from the JSON logs: what each rank did in stage 1 (its frames through the vision tower
and projector) and stage 2 (bytes it sent in the all-to-all-v that moves visual tokens to the zigzag
layout), the ring/Ulysses traffic of the attention, and both loss curves side by side. It exits
non-zero when they disagree beyond what float32 summation order explains. Not a benchmark: 2 shared
CPU cores say nothing about GPU speed. The text-only demo is `make demo-text` (cli/demo.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Same hyper-parameters and tolerance as tests/test_vlm_train.py (its docstring has the measurements):
# at lr 2e-3 the two layouts differ by float32 summation order only, <= 2.2e-7 relative over 30 steps,
# like a 1-ulp perturbation of the initial weights; a wrong shard or a lost gradient is > 1e-2 from
# step 1. (At lr 3e-3 the toy run is at the edge of stability and AdamW grows round-off to ~1e-5.)
RTOL, GRAD_RTOL = 1e-5, 1e-4  # loss at every step; grad norm (a derivative more sensitive; seen <= 6.9e-6)
SHOWN = (1, 2, 5, 10, 15, 20, 25, 30)


def _run(nproc: int, layout: list[str], common: list[str], log: str, port: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(port), "-m", "longvila_engine.train", "--task", "vlm", *common, *layout, "--log-json", log]
    print("$ " + " ".join(cmd[1:]).replace(os.path.dirname(common[1]), "<assets>"), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("MKL_CBWR", "AUTO,STRICT")  # MKL sgemm results independent of buffer alignment
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _kb(values) -> str:
    return "[" + ", ".join(f"{v / 1024:.1f}" for v in values) + "]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num-frames", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--port", type=int, default=29700)
    ap.add_argument("--keep", default=None, help="write the assets and logs here instead of a temporary folder")
    args = ap.parse_args(argv)
    from ..data.toy_assets import build_assets

    with tempfile.TemporaryDirectory(prefix="lv_demo_vlm_") as tmp:
        root = args.keep or tmp
        os.makedirs(root, exist_ok=True)
        assets = build_assets(os.path.join(root, "assets"))
        rows = [json.loads(line) for line in open(assets["data"])]
        n_video = sum(1 for r in rows if str(r.get("video", "")).endswith(".mp4"))
        n_folder = sum(1 for r in rows if "video" in r) - n_video
        print(f"== data: {len(rows)} rows in data.jsonl: {n_video} mp4 clips (PyAV), {n_folder} frame folders, "
              f"{len(rows) - n_video - n_folder} text-only; tiny Qwen2 LLM, tiny SigLIP tower ==", flush=True)
        common = ["--llm", assets["llm"], "--vision", assets["vision"], "--data", assets["data"], "--num-frames",
                  str(args.num_frames), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--lr",
                  str(args.lr), "--no-progress", "--timeout", "300"]
        par_log, one_log = os.path.join(root, "mmsp.jsonl"), os.path.join(root, "one.jsonl")
        for path in (par_log, one_log):
            if os.path.exists(path):
                os.remove(path)
        print("== 4 CPU ranks, MM-SP 2D layout: ring=2 x ulysses=2 ==", flush=True)
        t_par = _run(4, ["--ring", "2", "--ulysses", "2"], common, par_log, args.port)
        print("== 1 process, same models, same data ==", flush=True)
        t_one = _run(1, [], common, one_log, args.port + 1)
        parallel, single = _read(par_log), _read(one_log)
    if len(parallel) != args.steps or len(single) != args.steps:
        print(f"expected {args.steps} steps, got {len(parallel)} (4 ranks) and {len(single)} (1 process)")
        return 1
    first = parallel[0]["per_rank"]
    print(f"\nstep 1 on the 4 ranks (packed lines {parallel[0]['lines']} of data.jsonl, {parallel[0]['frames']} "
          f"frames, {parallel[0]['tokens']} LM tokens):")
    print(f"  stage 1, frames through SigLIP + projector per rank: {first['stage1_frames']}")
    print(f"  stage 2, all-to-all-v of visual tokens, KiB sent per rank (fwd + bwd): {_kb(first['stage2_bytes'])}")
    print(f"  attention, KiB sent per rank: ring {_kb(first['ring_bytes'])}, ulysses {_kb(first['ulysses_bytes'])}")
    print("\n step | frames per rank | loss, 4 ranks (2D) | loss, 1 process | rel. diff")
    worst = worst_norm = 0.0
    for p, s in zip(parallel, single):
        rel = abs(p["loss"] - s["loss"]) / max(abs(s["loss"]), 1e-12)
        worst = max(worst, rel)
        worst_norm = max(worst_norm, abs(p["grad_norm"] - s["grad_norm"]) / max(abs(s["grad_norm"]), 1e-12))
        if p["step"] in SHOWN or p["step"] == args.steps:
            frames = str(p["per_rank"]["stage1_frames"])
            print(f" {p['step']:4d} | {frames:>15} | {p['loss']:18.6f} | {s['loss']:15.6f} | {rel:.1e}")

    def median(rows, key):
        vals = sorted(r[key] for r in rows[1:] or rows)
        return vals[len(vals) // 2]

    print(f"\nlargest relative difference over {len(single)} steps: loss {worst:.1e}, grad norm {worst_norm:.1e} "
          f"(tolerances {RTOL:.0e} and {GRAD_RTOL:.0e}: float32 round-off)")
    print(f"loss {single[0]['loss']:.3f} -> {single[-1]['loss']:.3f} over {args.steps} steps")
    print(f"median tokens/s: 4 ranks {median(parallel, 'tokens_per_s'):.0f}, 1 process "
          f"{median(single, 'tokens_per_s'):.0f}; frames/s {median(parallel, 'frames_per_s'):.0f} and "
          f"{median(single, 'frames_per_s'):.0f}; wall {t_par:.0f} s and {t_one:.0f} s with start-up "
          f"(2 shared CPU cores: a correctness demo, not a speed claim)")
    if worst > RTOL or worst_norm > GRAD_RTOL or not single[-1]["loss"] < single[0]["loss"]:
        print("FAILED: the MM-SP run does not reproduce the single-process losses (or the loss did not fall)")
        return 1
    print("OK: multimodal MM-SP on 4 ranks reproduces the single-process loss curve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
