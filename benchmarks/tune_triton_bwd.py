"""Sweep tile configurations of the Triton backward kernels on one GPU and time each one.

    python benchmarks/tune_triton_bwd.py [--seq-len 16384] [--heads 16] [--head-dims 64,128]
        [--repeats 5] [--out tune.json]

For each head dim, causal and not: bf16 inputs, the forward once (the engine's own config), then the
backward with every candidate (dK/dV tiles, dQ tiles, warps, stages) in place of
`attention_bwd.bwd_config`. Each candidate's dq/dk/dv is compared with the shipped config's (max abs
difference, printed); its time is the median of --repeats CUDA-event timings after two warm-ups.
A candidate that fails to compile or launch is reported, not dropped silently. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages) for dK/dV; dQ candidates separately, the other kernel kept as shipped.
DKDV = {64: [(32, 128, 8, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2),
             (32, 128, 4, 4)],
        128: [(16, 64, 8, 2), (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 2), (32, 128, 4, 2), (32, 128, 8, 3),
              (64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (16, 128, 8, 2)]}
DQ = {64: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
      128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)]}


def sweep(seq_len, heads, head_dim, causal, repeats, device="cuda", dkdv=None, dq=None):
    import torch

    from longvila_engine.kernels.triton import attention_bwd as ab
    from longvila_engine.kernels.triton.attention_fwd import attention_fwd

    shipped = ab.bwd_config
    gen = torch.Generator(device=device).manual_seed(head_dim)
    q, k, v, dout = (torch.randn(1, seq_len, heads, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
                     for _ in range(4))
    scale = head_dim ** -0.5
    out = torch.zeros(q.shape, device=device, dtype=torch.float32)
    lse = torch.zeros(1, heads, seq_len, device=device, dtype=torch.float32)
    attention_fwd(q, k, v, out, lse, None, None, scale, causal, False)
    out_lo = out.to(torch.bfloat16)
    grads = [torch.empty(t.shape, device=device, dtype=torch.float32) for t in (q, k, v)]

    def run():
        ab.attention_bwd(dout, q, k, v, out_lo, lse, *grads, None, None, scale, causal, False)

    base_cfg = shipped(head_dim, False, fp32=False, arch=90)
    run()
    want = [g.clone() for g in grads]
    rows = []
    cands = [("dkdv", c) for c in (dkdv if dkdv is not None else DKDV[head_dim])]
    cands += [("dq", c) for c in (dq if dq is not None else DQ[head_dim])]
    for which, (bm, bn, warps, stages) in cands:
        cfg = {key: dict(val) for key, val in base_cfg.items()}
        cfg[which] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
        row = {"head_dim": head_dim, "causal": causal, "seq_len": seq_len, "heads": heads, "kernel": which,
               "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages,
               "shipped": cfg[which] == base_cfg[which]}
        ab.bwd_config = lambda *a, _cfg=cfg, **kw: _cfg
        try:
            for g in grads:
                g.fill_(float("nan"))
            run()
            if q.is_cuda:
                torch.cuda.synchronize()
            row["max_abs_diff"] = max(float((g - w).abs().max()) for g, w in zip(grads, want))
            med, lo, hi = harness.cuda_event_ms(run, repeats=repeats)
            row.update(ms=round(med, 3), ms_min=round(lo, 3), ms_max=round(hi, 3), repeats=repeats)
        except Exception as exc:  # reported in the table
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        finally:
            ab.bwd_config = shipped
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tune_triton_bwd: refused, needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for head_dim in (int(d) for d in args.head_dims.split(",")):
        for causal in (True, False):
            rows += sweep(args.seq_len, args.heads, head_dim, causal, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
