"""Where the GPU time of one attention forward+backward goes, kernel by kernel (torch.profiler).

    python benchmarks/profile_gpu_attention.py [--seq-len 16384] [--heads 16] [--head-dim 128]
        [--backends triton,aten] [--repeats 5] [--out prof.json]

For each backend and causal/full: bf16, B=1, the op timed by CUDA events (median of --repeats after
two warm-ups), then one profiled forward+backward whose CUDA kernels are listed with their time and
share of the total. FLOPs from `attention_flops`. Needs a CUDA GPU; refuses (exit 2) without one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def profile_one(backend, seq_len, heads, head_dim, causal, repeats):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from longvila_engine import ops
    from longvila_engine.ops.flops import attention_flops

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, seq_len, heads, head_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))

    def fwd():
        return ops.block_attention(q, k, v, causal=causal, backend=backend)

    out, lse = fwd()

    def bwd():
        return ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)

    row = {"backend": backend, "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "causal": causal,
           "repeats": repeats}
    for mode, fn in (("fwd", fwd), ("bwd", bwd)):
        med, lo, hi = harness.cuda_event_ms(fn, repeats=repeats)
        flops = attention_flops(seq_len, seq_len, heads, head_dim, causal=causal, mode=mode)
        row[mode] = {"ms_median": round(med, 3), "ms_min": round(lo, 3), "ms_max": round(hi, 3),
                     "tflops": round(flops / med / 1e9, 1)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd()
        bwd()
        torch.cuda.synchronize()
    kernels = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.device_time / 1e3
    total = sum(kernels.values()) or 1.0
    row["kernels"] = [{"name": name[:90], "ms": round(ms, 3), "share": round(ms / total, 3)}
                      for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backends", default="triton,aten")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("profile_gpu_attention: refused, needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for backend in args.backends.split(","):
        for causal in (True, False):
            row = profile_one(backend, args.seq_len, args.heads, args.head_dim, causal, args.repeats)
            rows.append(row)
            print(f"{backend} causal={causal} S={args.seq_len} H={args.heads} D={args.head_dim}: "
                  f"fwd {row['fwd']['ms_median']} ms ({row['fwd']['tflops']} TFLOP/s), "
                  f"bwd {row['bwd']['ms_median']} ms ({row['bwd']['tflops']} TFLOP/s)", flush=True)
            for kern in row["kernels"][:6]:
                print(f"    {kern['share']:6.1%} {kern['ms']:9.3f} ms  {kern['name']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
