"""Sequence-parallel attention on 4 CPU ranks, checked against one device.

    torchrun --nproc-per-node 4 examples/sp_attention.py            # MM-SP 2D: ring=2 x ulysses=2
    torchrun --nproc-per-node 4 examples/sp_attention.py --ring 4 --ulysses 1

Every rank builds the same global q, k, v from one seed, keeps its zigzag shard, runs
`sequence_parallel_attention` forward and backward, and compares its shard of the output and of the
three gradients with single-device `flash_attention` on the whole sequence (float64).
"""
import argparse
import datetime

import torch
import torch.distributed as dist

from longvila_engine import ParallelLayout, init_parallel, sequence_parallel_attention, shard_sequence
from longvila_engine.ops import flash_attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ring", type=int, default=2)
    ap.add_argument("--ulysses", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1000)  # not a multiple of 2*ring*ulysses: padded
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    groups = init_parallel(ParallelLayout(ring=args.ring, ulysses=args.ulysses), timeout=120)

    torch.manual_seed(0)
    B, S, H, H_kv, D = 1, args.seq_len, 8, 4, 64
    q, k, v = (torch.randn(B, S, h, D, dtype=torch.float64) for h in (H, H_kv, H_kv))
    dout = torch.randn(B, S, H, D, dtype=torch.float64)

    # Reference on one device.
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out_ref = flash_attention(qr, kr, vr, causal=True)
    out_ref.backward(dout)

    # This rank's zigzag shard (padded at the end; causal attention never lets real tokens see pads).
    q_local, k_local, v_local = (shard_sequence(t, groups).detach().requires_grad_() for t in (q, k, v))
    out_local = sequence_parallel_attention(q_local, k_local, v_local, groups, causal=True)
    out_local.backward(shard_sequence(dout, groups))

    # Compare this rank's positions only (padding rows are excluded).
    from longvila_engine.attention.sharding import padded_length, shard_positions

    pos = shard_positions(padded_length(S, groups), groups)
    real = pos < S
    errs = {
        "out": (out_local[:, real] - out_ref[:, pos[real]]).abs().max().item(),
        "dq": (q_local.grad[:, real] - qr.grad[:, pos[real]]).abs().max().item(),
        "dk": (k_local.grad[:, real] - kr.grad[:, pos[real]]).abs().max().item(),
        "dv": (v_local.grad[:, real] - vr.grad[:, pos[real]]).abs().max().item(),
    }
    worst = torch.tensor(max(errs.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if groups.rank == 0:
        print(f"layout {groups.layout}: max |error| vs one device over all ranks = {worst.item():.2e}")
        print(f"rank 0 traffic: {groups.stats.summary()}")
    dist.destroy_process_group()
    if worst.item() > 1e-10:  # float64 on both sides: only summation order differs
        raise SystemExit("MISMATCH")


if __name__ == "__main__":
    main()
