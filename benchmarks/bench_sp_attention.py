"""Sequence-parallel attention layouts on one engine: time, throughput, traffic and ring overlap.

For each layout of the world (W ranks): ring=W, ulysses=W, ring=W/2 x ulysses=2, and all-gather-K/V
over ring=W, it times one forward+backward of `sequence_parallel_attention` (causal, zigzag) and
reports, per layout:
- step time: median over repeats of the slowest rank's time, with min/max; tokens/s of the global
  sequence;
- bytes this rank sent per group and step (`groups.stats`: 'ring', 'ulysses', and the tiny 'check');
- time waiting on communication per step (mean over ranks) and the rest, computing;
- the overlap ratio: step time / compute-only time, where compute-only runs the very same block
  kernels on the same shapes (the ring plan on a local K/V block, or the Ulysses-gathered attention)
  with no communication at all. The ring goal on 4 CPU ranks is <= 1.10; it is reported, not asserted.
  Ulysses' all-to-alls are not overlapped by design, so its ratio counts them as exposed time.

On the pure ring layout (ring=W, ulysses=1) the peers run too, on the same shards in the same
repeats (interleaved): ring-flash-attn's zigzag ring (installed `--no-deps`; its private `flash_attn`
block calls served by torch's CPU flash op through benchmarks/ringflash_shim.py) and PyTorch's
templated ring attention (bench_strategies.torch_ring_attention, rotating K/V by all-to-all: a ring).
Their medians and the engine's time ratio to each are printed and stored in that layout's line; a peer
that cannot be imported or run is named with the reason and left out (`--no-peers` skips them).

Issue #13's target, "ring (and 2D) attention forward+backward at most 0.9x the faster of ring-flash-attn
and PyTorch's ring": every layout's line also stores `ratio_to_faster_peer`, its step time over the
median of the faster peer as timed on the ring layout in the same run at the same S and dtype. The peers
solve the same global problem (causal attention over the same global sequence, heads and head dim) on
the same W ranks, so the ratio compares two ways of doing one job; for the ring row the repeats are
interleaved with the peers', for the others (the 2D row ring=W/2 x ulysses=2 among them) they ran just
before or after, in the same process. A status line per layout prints it against <= 0.9. On 2 ranks the
2D layout would be ring1 x ulysses2, which is the Ulysses row.

`--seq-lens 4096,16384` measures several global S in one launch: each S is its own set of layout lines
with its own peer timings. `--dtype bf16` feeds bf16 shards to the engine and the peers (torch's CPU
flash op under both peers takes bf16); a peer that fails on them is reported as not measured, with why.

Every layout appends one JSON line to benchmarks/results/bench_sp_attention.jsonl (benchmarks/harness.py)
and rank 0 prints the table.

Launch:
    torchrun --nproc-per-node 4 benchmarks/bench_sp_attention.py [--smoke] [--seq-lens 4096,16384] [--dtype bf16]
    python benchmarks/bench_sp_attention.py --smoke      # no torchrun: spawns --world gloo ranks itself
On GPUs (NCCL) each rank uses cuda:LOCAL_RANK; there wait times only measure the host side of an
asynchronous wait, so the wait/compute split is a CPU (gloo) figure.
A backend that cannot run a tiny forward+backward here stops the script with the reason: no silent
fallback to `reference` (its O(S^2) scores would be measured under the requested name).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

NAME = "bench_sp_attention"
SIZES = {
    "smoke": dict(seq_len=512, num_heads=8, num_kv_heads=4, head_dim=32, batch=1, warmup=1, repeats=3),
    "full": dict(seq_len=8192, num_heads=8, num_kv_heads=8, head_dim=64, batch=1, warmup=2, repeats=5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEER_TARGET = 0.9  # issue #13: at most 0.9x the faster peer's fwd+bwd
COLUMNS = [("layout", "case", ""), ("algo", "config.algorithm", ""), ("step ms", "median_ms", ".1f"),
           ("min", "min_ms", ".1f"), ("max", "max_ms", ".1f"), ("tok/s", "tokens_per_s", ".0f"),
           ("ring MB", "ring_mb", ".3f"), ("ulysses MB", "ulysses_mb", ".3f"), ("wait ms", "wait_ms", ".1f"),
           ("compute ms", "compute_ms", ".1f"), ("compute-only ms", "compute_only_ms", ".1f"),
           ("overlap", "overlap_ratio", ".3f"), ("/peer", "ratio_to_faster_peer", ".3f")]
PEERS = ("ring_flash_attn", "torch_ring")


def peer_steps(q, k, v, dout, groups, device, reference):
    """{peer name: fwd+bwd closure on the same zigzag shards (B, S, H, D)}, {peer: why it is missing},
    {peer: max |its output - `reference`|} (the engine's output on these shards: same problem solved)."""
    steps, missing, diffs = {}, {}, {}
    attns = {}
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def closure(name, attn):
        attns[name] = attn

        def step():
            for t in leaves:
                t.grad = None
            attn(*leaves).backward(dout)
        return step

    try:
        if device.type != "cpu":
            raise RuntimeError("the flash_attn shim is CPU-only; on GPUs install the real flash-attn")
        import ringflash_shim

        rfa = ringflash_shim.import_ring_flash_attn()
        steps["ring_flash_attn"] = closure("ring_flash_attn", lambda q_, k_, v_: rfa.zigzag_ring_flash_attn_func(
            q_, k_, v_, causal=True, group=groups.ring))
    except Exception as e:  # a peer that is not there must not stop the engine's figures
        missing["ring_flash_attn"] = f"{type(e).__name__}: {str(e)[:160]}"
    try:
        from bench_strategies import torch_ring_attention

        steps["torch_ring"] = closure(
            "torch_ring", lambda q_, k_, v_: torch_ring_attention(q_, k_, v_, groups.ring, "alltoall"))
    except Exception as e:
        missing["torch_ring"] = f"{type(e).__name__}: {str(e)[:160]}"
    for name in list(steps):  # one untimed call each: a peer that fails here is reported, not timed
        try:
            with torch.no_grad():
                diffs[name] = float((attns[name](*leaves).float() - reference.float()).abs().max())
            steps[name]()
        except Exception as e:
            missing[name] = f"{type(e).__name__}: {str(e)[:160]}"
            del steps[name]
    return steps, missing, diffs


def layouts(world: int):
    from longvila_engine import ParallelLayout

    out = [(f"ring{world}", ParallelLayout(ring=world), "ring"),
           (f"ulysses{world}", ParallelLayout(ulysses=world), "ring")]
    if world % 2 == 0 and world > 2:
        out.append((f"ring{world // 2}_ulysses2", ParallelLayout(ring=world // 2, ulysses=2), "ring"))
    out.append((f"allgather{world}", ParallelLayout(ring=world), "allgather"))
    return out


def usable_backend(requested: str, device, dtype=torch.float32) -> tuple[str, str | None]:
    """(`requested`, None) once a tiny forward+backward ran on it; raises with the reason otherwise."""
    from longvila_engine.ops import available_backends, block_attention, block_attention_backward

    q = torch.randn(1, 4, 2, 8, device=device).to(dtype)
    try:
        out, lse = block_attention(q, q, q, causal=True, backend=requested)
        block_attention_backward(q, q, q, q, out, lse, causal=True, backend=requested)
    except Exception as e:
        raise RuntimeError(f"backend={requested!r} cannot run a tiny {dtype} forward+backward on {device} ({e}); pass "
                           f"--backend with one of {available_backends(device)}") from e
    return requested, None


# --- compute-only twins: the same kernels on the same shapes, no communication ----------------------


def compute_only_fn(q, k, v, dout, groups, algorithm, backend):
    """fwd+bwd of the kernels one rank runs inside sequence_parallel_attention, minus every collective."""
    from longvila_engine.attention._blocks import (
        backward_blocks,
        chunk_ranges,
        forward_blocks,
        global_chunks,
        new_accumulators,
        plan_blocks,
        split_chunks,
    )
    from longvila_engine.attention.ring import ring_plan
    from longvila_engine.ops import acc_dtype, flash_attention

    R, U = groups.ring_size, groups.ulysses_size
    B, S, H, D = q.shape
    kv_heads = max(k.shape[2] // U, 1)
    # What a Ulysses rank holds after the all-to-all: U x the sequence, H/U heads.
    qf, doutf = (torch.randn(B, U * S, H // U, D, device=q.device, dtype=q.dtype) for _ in range(2))
    kf, vf = (torch.randn(B, U * S, kv_heads, D, device=q.device, dtype=q.dtype) for _ in range(2))
    if R == 1:
        qf.requires_grad_()

        def run():
            qf.grad = None
            flash_attention(qf, kf, vf, causal=True, backend=backend).backward(doutf)
        return run
    L = U * S
    q_chunks = chunk_ranges(groups.ring_rank, R, L, "zigzag")
    if algorithm == "ring":
        steps = ring_plan(groups.ring_rank, R, L, causal=True)
    else:
        kf, vf = (torch.randn(B, R * L, kv_heads, D, device=q.device, dtype=q.dtype) for _ in range(2))
        steps = [plan_blocks(q_chunks, global_chunks(R, L, "zigzag"), causal=True)]
    acc = acc_dtype(q.dtype)

    def run():
        q_parts = split_chunks(qf, q_chunks)
        outs, lses = new_accumulators(q_parts)
        for blocks in steps:
            forward_blocks(q_parts, kf, vf, blocks, outs, lses, softmax_scale=None, backend=backend)
        out_parts = [o.to(q.dtype) for o in outs]
        dout_parts = split_chunks(doutf, q_chunks)
        dqs = [torch.zeros(p.shape, dtype=acc, device=q.device) for p in q_parts]
        # As ring.py: step 0 computes into the accumulators, later steps into one reused, zeroed pair.
        dk_acc, dv_acc = torch.zeros_like(kf, dtype=acc), torch.zeros_like(vf, dtype=acc)
        dk_step = dv_step = None
        for i, blocks in enumerate(steps):
            if i == 1:
                dk_step, dv_step = torch.zeros_like(kf, dtype=acc), torch.zeros_like(vf, dtype=acc)
            elif i > 1:
                dk_step.zero_()
                dv_step.zero_()
            backward_blocks(dout_parts, q_parts, kf, vf, out_parts, lses, blocks, dqs,
                            dk_acc if i == 0 else dk_step, dv_acc if i == 0 else dv_step,
                            softmax_scale=None, backend=backend)
            if i > 0:
                dk_acc.add_(dk_step)
                dv_acc.add_(dv_step)
        torch.cat(dqs, dim=1).to(q.dtype)
    return run


# --- one rank --------------------------------------------------------------------------------------


def timed_repeats(fns, device, warmup, repeats):
    """Per-repeat seconds of each callable in `fns`, interleaved repeat by repeat so that a noisy
    machine disturbs them alike; ranks line up before each call (outside the timed region)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
    return times


def bench_layout(name, layout, algorithm, size, backend, device, peers=True):
    from longvila_engine.attention.sequence_parallel import sequence_parallel_attention
    from longvila_engine.parallel import init_parallel

    groups = init_parallel(layout)
    sp = layout.ring * layout.ulysses
    S = size["seq_len"] // sp
    g = torch.Generator().manual_seed(1234 + groups.rank)
    shape_q = (size["batch"], S, size["num_heads"], size["head_dim"])
    shape_kv = (size["batch"], S, size["num_kv_heads"], size["head_dim"])
    dtype = DTYPES[size.get("dtype", "fp32")]
    q, dout = (torch.randn(shape_q, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(shape_kv, generator=g).to(device, dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        for t in (q, k, v):
            t.grad = None
        out = sequence_parallel_attention(q, k, v, groups, causal=True, backend=backend, algorithm=algorithm)
        out.backward(dout)

    twin = compute_only_fn(q, k, v, dout, groups, algorithm, backend)
    step()  # first-use costs of the groups, before the counters start
    twin()
    peer_fns, peer_missing, peer_diffs = {}, {}, {}
    if peers and algorithm == "ring" and layout.ulysses == 1:
        with torch.no_grad():
            reference = sequence_parallel_attention(q, k, v, groups, causal=True, backend=backend,
                                                    algorithm=algorithm)
        peer_fns, peer_missing, peer_diffs = peer_steps(q, k, v, dout, groups, device, reference)
        peer_missing = {n: why for n, why in peer_missing.items() if n not in peer_fns}
        # Ranks must agree on the set of peers (each is a collective loop): keep those all ranks have.
        names = [None] * groups.world_size
        dist.all_gather_object(names, sorted(peer_fns))
        common = set.intersection(*(set(n) for n in names))
        for n in list(peer_fns):
            if n not in common:
                peer_missing[n] = "failed on another rank"
                del peer_fns[n]
    groups.stats.reset()
    calls = size["warmup"] - 1 + size["repeats"]
    fns = [step, twin, *peer_fns.values()]
    times, twin_times, *peer_times = timed_repeats(fns, device, size["warmup"] - 1, size["repeats"])
    # The engine's stats count its own calls only: peers use torch.distributed directly.
    stats = groups.stats.summary()
    per_step = {axis: {"bytes": st["bytes"] / calls, "wait_s": st["wait_s"] / calls}
                for axis, st in stats.items()}
    return {"times": times, "compute_only": twin_times, "per_step": per_step,
            "link": {axis: s["link"] for axis, s in stats.items()},
            "peers": dict(zip(peer_fns, peer_times)), "peers_missing": peer_missing,
            "peers_max_abs_diff": peer_diffs}


def faster_peer(record):
    """(name, median ms) of the faster peer timed in this layout's line, or None."""
    peers = record.get("peers") or {}
    if not peers:
        return None
    name = min(peers, key=lambda n: peers[n]["median_ms"])
    return name, peers[name]["median_ms"]


def report(name, layout, algorithm, size, backend, per_rank, results, peer_ref=None):
    """Rank 0: fold the ranks' figures into one results line. `peer_ref` ((name, median ms) of the faster
    peer timed on the ring layout at this S) gives the line's ratio to it; a line with its own peers
    uses those."""
    world = len(per_rank)
    step = harness.Timing([max(ts) for ts in zip(*(r["times"] for r in per_rank))])
    compute_only = harness.median([max(ts) for ts in zip(*(r["compute_only"] for r in per_rank))])
    axis_mean = lambda axis, key: sum(r["per_step"].get(axis, {}).get(key, 0.0) for r in per_rank) / world
    wait = axis_mean("ring", "wait_s") + axis_mean("ulysses", "wait_s")
    tokens = size["batch"] * size["seq_len"]
    record = {"case": name, "backend": backend, **step.summary_ms(),
              "config": {"algorithm": algorithm, "ring": layout.ring, "ulysses": layout.ulysses,
                         "world": layout.world_size, **{k: v for k, v in size.items() if k != "warmup"}},
              "tokens": tokens, "tokens_per_s": tokens / step.median,
              "comm_bytes": {axis: axis_mean(axis, "bytes") for axis in ("ring", "ulysses", "check")},
              "links": per_rank[0]["link"],
              "ring_mb": axis_mean("ring", "bytes") / 2**20,
              "ulysses_mb": axis_mean("ulysses", "bytes") / 2**20,
              "wait_ms": wait * 1e3, "compute_ms": (step.median - wait) * 1e3,
              "compute_only_ms": compute_only * 1e3, "overlap_ratio": step.median / compute_only}
    peers = {}
    for peer in per_rank[0]["peers"]:
        t = harness.Timing([max(ts) for ts in zip(*(r["peers"][peer] for r in per_rank))])
        diff = max(r["peers_max_abs_diff"].get(peer, 0.0) for r in per_rank)
        peers[peer] = {**t.summary_ms(), "ratio": step.median / t.median, "max_abs_diff": diff}
    if peers or per_rank[0]["peers_missing"]:
        record["peers"] = peers
        record["peers_missing"] = per_rank[0]["peers_missing"]
    ref = faster_peer(record) or peer_ref
    if ref is not None:
        record["faster_peer"] = {"name": ref[0], "median_ms": ref[1], "same_repeats": ref is not peer_ref}
        record["ratio_to_faster_peer"] = record["median_ms"] / ref[1]
    return results.append(record) if results is not None else record


def run_rank(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    base = dict(SIZES["smoke" if args.smoke else "full"], dtype=args.dtype)
    if args.head_dim is not None:
        base["head_dim"] = args.head_dim
    seq_lens = args.seq_lens or ([args.seq_len] if args.seq_len else [base["seq_len"]])
    backend, _ = usable_backend(args.backend, device, DTYPES[args.dtype])
    results = harness.ResultsFile(NAME, results_dir=args.results_dir, device=device) if rank == 0 else None
    for seq_len in seq_lens:
        size = dict(base, seq_len=seq_len)
        rows, peer_ref = [], None
        for name, layout, algorithm in layouts(world):  # the ring layout first: its peers serve the rest
            if size["num_heads"] % layout.ulysses:
                continue
            per_rank = [None] * world
            dist.all_gather_object(per_rank, bench_layout(name, layout, algorithm, size, backend, device,
                                                          peers=not args.no_peers))
            if rank == 0:
                rows.append(report(name, layout, algorithm, size, backend, per_rank, results, peer_ref))
                if peer_ref is None:
                    peer_ref = faster_peer(rows[-1])
        if rank == 0:
            print_status(rows, size, world, device, backend, peers=not args.no_peers)
    if rank == 0:
        print(f"results appended to {results.path}")


def print_status(rows, size, world, device, backend, peers=True):
    """Rank 0: one S's table, the overlap goal, the peers and each layout's ratio to the faster peer."""
    title = (f"sequence-parallel attention, fwd+bwd, causal zigzag: S={size['seq_len']} "
             f"H={size['num_heads']} H_kv={size['num_kv_heads']} D={size['head_dim']} {size['dtype']} on "
             f"{world} {device.type} ranks, backend={backend}; /peer = step / the faster peer's")
    harness.print_table(rows, COLUMNS, title=title)
    for r in rows:
        if r["config"]["algorithm"] == "ring" and r["config"]["ulysses"] == 1:
            verdict = "meets" if r["overlap_ratio"] <= 1.10 else "misses"
            where = "" if world == 2 else f"; the goal is set for 2 ranks with a core each, this is {world}"
            print(f"overlap goal (ring, <= 1.10 on 2 ranks with one thread each{where}): "
                  f"{r['overlap_ratio']:.3f} {verdict} it (reported, not asserted)")
        for peer, p in r.get("peers", {}).items():
            print(f"peer {peer} on {r['case']}: {p['median_ms']:.1f} ms (min {p['min_ms']:.1f}, max "
                  f"{p['max_ms']:.1f}); engine / {peer} = {p['ratio']:.3f} (goal <= 0.9 of the faster peer); "
                  f"max |output - engine's| {p['max_abs_diff']:.1e}")
        for peer, why in r.get("peers_missing", {}).items():
            print(f"peer {peer} on {r['case']}: not measured ({why})")
    for r in rows:
        label = f"{r['case']} S={size['seq_len']} {size['dtype']} ratio to the faster peer"
        if r.get("ratio_to_faster_peer") is None:
            why = "--no-peers" if not peers else "no peer could be timed"
            print(f"{label}: not measured ({why}) (target <= {PEER_TARGET:g})")
            continue
        fp = r["faster_peer"]
        verdict = "met" if r["ratio_to_faster_peer"] <= PEER_TARGET else "not met"
        print(f"{label}: {r['ratio_to_faster_peer']:.3f} ({fp['name']} {fp['median_ms']:.1f} ms"
              f"{'' if fp['same_repeats'] else ', timed on the ring layout'}) (target <= {PEER_TARGET:g}): "
              f"{verdict}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (CI)")
    p.add_argument("--seq-len", type=int, default=None, help="global sequence length")
    p.add_argument("--seq-lens", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=None,
                   help="comma-separated global sequence lengths, one set of lines (and peer timings) each")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of q/k/v for all sides")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 64; 32 with --smoke)")
    p.add_argument("--backend", default="auto", help="block kernel backend (auto, reference, cpu, triton)")
    p.add_argument("--world", type=int, default=4, help="ranks to spawn when not under torchrun")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--no-peers", action="store_true", help="skip ring-flash-attn and PyTorch's ring")
    args = p.parse_args(argv)
    if args.head_dim is not None and args.head_dim <= 0:
        p.error(f"--head-dim must be a positive integer, got {args.head_dim}; e.g. --head-dim 128")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
        try:
            run_rank(args)
        finally:
            dist.destroy_process_group()
        return
    harness.spawn_gloo(run_rank, args, args.world)


if __name__ == "__main__":
    main()
