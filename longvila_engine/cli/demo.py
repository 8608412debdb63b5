"""`make demo`: train the `tiny` model on 4 CPU ranks in the MM-SP 2D layout (ring=2 x ulysses=2) and
on one process, on the same data, and show that the loss curves agree.

It launches the real trainer (`python -m longvila_engine.train`) twice through torchrun (gloo), reads
the JSON logs, prints both loss curves side by side with their largest difference and the tokens/s of
each run, and saves a PNG plot. It exits non-zero when the curves disagree beyond float32 round-off
(summation order differs between layouts; a wrong shard or gradient is off by orders of magnitude
more). It does not benchmark: tokens/s on 2 shared cores says little about a GPU cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# Per-step losses agree to float32 round-off (seen: ~1e-7), which grows slowly over AdamW steps.
LOSS_RTOL = 1e-4


def _run(nproc: int, layout: list[str], args, log_path: str, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(args.port + nproc), "-m", "longvila_engine.train",
           *layout, "--model", args.model, "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--lr", str(args.lr), "--seed", str(args.seed), "--log-json", log_path, "--timeout", "300"]
    if quiet:
        cmd.append("--no-progress")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env=env)


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plot(single, parallel, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in single], [r["loss"] for r in single], "o-", label="1 process", ms=3)
    ax.plot([r["step"] for r in parallel], [r["loss"] for r in parallel], "x--", label="4 ranks: ring 2 x ulysses 2")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("tiny model, MM-SP 2D vs one process (same data)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=29600)
    ap.add_argument("--plot", default=os.path.join("benchmarks", "results", "demo_loss.png"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lv_demo_") as tmp:
        par_log, one_log = os.path.join(tmp, "parallel.jsonl"), os.path.join(tmp, "single.jsonl")
        print("== 4 CPU ranks, MM-SP 2D layout: ring=2 x ulysses=2 ==", flush=True)
        _run(4, ["--ring", "2", "--ulysses", "2"], args, par_log, quiet=False)
        print("== 1 process, same model, same data ==", flush=True)
        _run(1, [], args, one_log, quiet=False)
        parallel, single = _read(par_log), _read(one_log)
    if len(parallel) != args.steps or len(single) != args.steps:
        print(f"expected {args.steps} steps, got {len(parallel)} (4 ranks) and {len(single)} (1 process)")
        return 1
    print("\n step | loss, 4 ranks (2D) | loss, 1 process | rel. diff")
    worst = 0.0
    for p, s in zip(parallel, single):
        rel = abs(p["loss"] - s["loss"]) / max(abs(s["loss"]), 1e-12)
        worst = max(worst, rel)
        print(f" {p['step']:4d} | {p['loss']:18.6f} | {s['loss']:15.6f} | {rel:.1e}")

    def tok_s(rows):
        vals = sorted(r["tokens_per_s"] for r in rows[1:] or rows)
        return vals[len(vals) // 2]

    print(f"\nlargest relative loss difference: {worst:.2e} (tolerance {LOSS_RTOL:.0e})")
    print(f"median tokens/s: 4 ranks {tok_s(parallel):.0f}, 1 process {tok_s(single):.0f} "
          "(2 shared CPU cores: a correctness demo, not a speed claim)")
    try:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        _plot(single, parallel, args.plot)
        print(f"plot: {args.plot}")
    except ImportError:
        print("matplotlib missing: no plot")
    if worst > LOSS_RTOL:
        print("FAILED: the 2D run does not reproduce the single-process losses")
        return 1
    print("OK: the MM-SP 2D run reproduces the single-process loss curve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
