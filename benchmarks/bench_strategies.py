"""Parallel strategies of docs/design.md section 3 head to head: attention alone and a full training step.

For one model preset, a world of G ranks and one or more global sequence lengths S, it runs, on the
same ranks and kernels:
- ring-only sequence parallelism       ParallelLayout(ring=G)
- Megatron context parallel + TP       ParallelLayout(tp=T, ring=G/T), T = min(gpus_per_node, G)
- Ulysses only                         ParallelLayout(ulysses=G), where the head counts allow it
- MM-SP 2D attention                   ParallelLayout(ulysses=T, ring=G/T)
and, beside them, PyTorch's own context-parallel ring attention (the templated ring attention of
torch.distributed.tensor.experimental, forward+backward, zigzag "round-robin" load balance) on the
same ranks and shapes, attention only.

Two modes per layout:
- `attention`: one forward+backward of the attention of one layer (`sequence_parallel_attention`) on
  this rank's shard: tp ranks hold H/tp heads.
- `train`: forward+backward of the whole model (`Transformer`, loss included); with --grad-sync also
  the gradient all-reduce over dp x sp (`train.average_gradients`), which on these small models
  outweighs the activations' traffic; no optimizer step (it is layout-free).

Reported per layout and mode: step time (median over repeats of the slowest rank), tokens/s per rank,
peak memory per rank (harness: torch allocator high-water mark and RSS growth on CPU,
max_memory_allocated on CUDA), bytes per group and step split intra-/inter-node (`groups.stats`: a
group spanning nodes counts as inter-node) and the bytes that physically cross a node boundary
(`x-node`: the ring's hop to the next rank, collectives' share of peers on the other node),
communication wait (mean over ranks) vs the rest (compute), and time / MM-SP time. The torch rows add
our time / theirs. Rank 0 appends JSON lines to benchmarks/results/bench_strategies.jsonl, prints a
table and draws benchmarks/results/bench_strategies.png.

With `gpus_per_node` < G the ring of the Megatron and MM-SP layouts crosses "nodes"; on CPU that is only
a label unless the ranks run in the network namespaces of benchmarks/netns.py (make bench-net).
Ulysses-only over G > gpus_per_node is refused by ParallelLayout (Ulysses would straddle nodes): it runs
here with gpus_per_node=G, so its bytes read intra-node even where they physically cross the link.

Launch:
    torchrun --nproc-per-node 4 benchmarks/bench_strategies.py [--smoke] [--seq-len 4096 8192]
    python benchmarks/bench_strategies.py --smoke     # no torchrun: spawns --world gloo ranks itself
Deliberately not here: kernel choice (bench_kernels.py), ring overlap analysis (bench_sp_attention.py),
the analytic projection to H100 clusters (projection.py).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_sp_attention import timed_repeats, usable_backend  # noqa: E402

NAME = "bench_strategies"
SIZES = {
    "smoke": dict(model="tiny", seq_lens=[512], warmup=1, repeats=3, batch=1, torch_rotates=["alltoall"]),
    "full": dict(model="small", seq_lens=[2048, 4096], warmup=1, repeats=5, batch=1,
                 torch_rotates=["allgather", "alltoall"]),
}
MMSP = "mmsp_2d"
COLUMNS = [("mode", "config.mode", ""), ("S", "config.seq_len", ""), ("layout", "case", ""),
           ("r/u/tp", "config.shape", ""), ("step ms", "median_ms", ".1f"), ("min", "min_ms", ".1f"),
           ("max", "max_ms", ".1f"), ("tok/s/rank", "tokens_per_s_per_rank", ".0f"),
           ("peak MB", "peak_alloc_mb", ".1f"), ("rss MB", "peak_rss_mb", ".1f"),
           ("intra MB", "intra_mb", ".3f"), ("inter MB", "inter_mb", ".3f"),
           ("x-node MB", "cross_node_mb", ".3f"), ("wait ms", "wait_ms", ".1f"),
           ("compute ms", "compute_ms", ".1f"), ("x MM-SP", "ratio_vs_mmsp", ".2f"),
           ("ours/torch", "ours_over_torch", ".2f"), ("|diff|", "max_abs_diff_vs_ours", ".1e")]


def small_config():
    """A CPU-sized Llama-class model with 8 query heads (so TP/Ulysses up to 8 fit), GQA 8:4."""
    from longvila_engine.models import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32,
                       ffn_hidden_size=688, vocab_size=1024)


def model_config(name: str):
    from longvila_engine.models import get_config

    return small_config() if name == "small" else get_config(name)


def strategy_layouts(world: int, gpus_per_node: int, num_heads: int, num_kv_heads: int):
    """[(name, layout or None, reason when skipped)] for the four layouts of docs/design.md section 3."""
    from longvila_engine import ParallelLayout
    from longvila_engine.attention.ulysses import ulysses_sizes_for

    T = min(gpus_per_node, world)
    ulysses_ok = ulysses_sizes_for(num_heads, num_kv_heads)
    tp_ok = [t for t in range(1, num_heads + 1)
             if num_heads % t == 0 and (num_kv_heads % t == 0 or t % num_kv_heads == 0)]
    out = [("ring_only", ParallelLayout(ring=world, gpus_per_node=gpus_per_node), None)]
    if T in tp_ok and world % T == 0:
        out.append(("megatron_cp_tp", ParallelLayout(tp=T, ring=world // T, gpus_per_node=gpus_per_node), None))
    else:
        out.append(("megatron_cp_tp", None, f"tp={T} does not fit heads {num_heads}/{num_kv_heads}"))
    if world in ulysses_ok:
        # ParallelLayout refuses Ulysses across nodes; gpus_per_node=world keeps it legal (see docstring).
        out.append(("ulysses_only", ParallelLayout(ulysses=world, gpus_per_node=max(world, gpus_per_node)), None))
    else:
        out.append(("ulysses_only", None, f"ulysses={world} does not fit heads {num_heads}/{num_kv_heads}"))
    if T in ulysses_ok and world % T == 0:
        out.append((MMSP, ParallelLayout(ulysses=T, ring=world // T, gpus_per_node=gpus_per_node), None))
    else:
        out.append((MMSP, None, f"ulysses={T} does not fit heads {num_heads}/{num_kv_heads}"))
    return out


# --- PyTorch's context-parallel ring attention --------------------------------------------------------


def _torch_cp_ops():
    """Forward/backward ops for torch's templated ring attention, wrapping the CPU flash kernel.

    The templates call `op(q, k, v, is_causal=..., **kw)` expecting (out, lse, ...) and
    `op(query=, key=, value=, out=, logsumexp=, is_causal=, grad_out=, **kw)` expecting (dq, dk, dv).
    On CUDA the stock `_scaled_dot_product_flash_attention[_backward]` fit as they are; on CPU the flash
    kernel is `_scaled_dot_product_flash_attention_for_cpu[_backward]`, with other argument orders.
    """
    aten = torch.ops.aten

    def fwd(query, key, value, *, is_causal, dropout_p=0.0, scale=None):
        if query.is_cuda:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)
        return aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                 scale=scale)

    def bwd(*, grad_out, query, key, value, out, logsumexp, is_causal, dropout_p=0.0, scale=None, **cuda_kw):
        if query.is_cuda:  # cum_seq_q/k, max_q/k, philox_seed/offset from the forward (torch's own names)
            return aten._scaled_dot_product_flash_attention_backward.default(
                grad_out=grad_out, query=query, key=key, value=value, out=out, logsumexp=logsumexp,
                dropout_p=dropout_p, is_causal=is_causal, scale=scale, **cuda_kw)
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, scale=scale)
    return fwd, bwd


class _TorchRingAttention(torch.autograd.Function):
    """q, k, v: (B, H, S_local, D) zigzag shards (torch's round-robin = our zigzag); causal.

    Forward: torch's `_templated_ring_attention` (K/V rotated by its rotater: all-gather by default,
    or all-to-all). Backward: `_templated_ring_attention_backward` (K/V again, dK/dV passed around).
    """

    @staticmethod
    def forward(ctx, q, k, v, group):
        from torch.distributed.tensor.experimental._context_parallel._attention import _templated_ring_attention

        fwd, _ = _torch_cp_ops()
        out, lse, *rest = _templated_ring_attention(group, 2, fwd, q, k, v, is_causal=True, dropout_p=0.0,
                                                    scale=None)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group = group
        names = ("cum_seq_q", "cum_seq_k", "max_q", "max_k", "philox_seed", "philox_offset")
        ctx.cuda_kw = dict(zip(names, rest)) if q.is_cuda else {}
        return out

    @staticmethod
    def backward(ctx, dout):
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention_backward,
        )

        q, k, v, out, lse = ctx.saved_tensors
        _, bwd = _torch_cp_ops()
        dq, dk, dv, *_ = _templated_ring_attention_backward(ctx.group, 2, bwd, dout.contiguous(), "grad_out", q, k,
                                                            v, out, lse.contiguous(), is_causal=True, dropout_p=0.0,
                                                            scale=None, **ctx.cuda_kw)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def torch_ring_attention(q, k, v, group, rotate_method: str):
    """Torch CP ring attention of zigzag shards (B, S_local, H, D) -> (B, S_local, H, D); GQA by repeat."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    reps = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if reps > 1:  # the CPU flash op has no GQA: repeat K/V heads (counted in the time, as SDPA's enable_gqa)
        kh, vh = kh.repeat_interleave(reps, dim=1), vh.repeat_interleave(reps, dim=1)
    saved = cp._cp_options.rotate_method
    cp._cp_options.rotate_method = {"allgather": cp._RotateMethod.ALL_GATHER,
                                    "alltoall": cp._RotateMethod.ALL_TO_ALL}[rotate_method]
    try:
        out = _TorchRingAttention.apply(qh.contiguous(), kh.contiguous(), vh.contiguous(), group)
    finally:
        cp._cp_options.rotate_method = saved
    return out.transpose(1, 2)


def torch_cp_traffic(cfg, seq_len, batch, groups, dtype) -> dict:
    """Bytes this rank sends per fwd+bwd in torch's templated ring attention (from its source).

    Forward and backward each move K/V once around the group: (G-1) K/V buffers sent, by one
    all-gather or G-1 all-to-all rotations. The backward also rotates the float32 dK/dV accumulators
    at every one of its G steps (an all-to-all rotater). K/V carry H heads (GQA repeated). The same
    bytes whichever rotater (all-gather or all-to-all) moves K/V.
    """
    G = groups.ring_size
    kv_elems = 2 * batch * (seq_len // G) * cfg.num_heads * cfg.head_dim
    nbytes = 2 * (G - 1) * kv_elems * torch.finfo(dtype).bits // 8 + G * kv_elems * 4
    return {"ring": {"bytes": float(nbytes), "wait_s": 0.0,
                     "link": "intra-node" if groups.is_intra_node("ring") else "inter-node"}}


def torch_matches_ours(groups, cfg, seq_len, batch, backend, device, dtype, rotate_method: str) -> float:
    """Max |torch CP output - our ring attention output| on the same zigzag shards (both fwd only)."""
    from longvila_engine.attention.sequence_parallel import sequence_parallel_attention

    S = seq_len // groups.ring_size
    g = torch.Generator().manual_seed(7 + groups.rank)
    q = torch.randn((batch, S, cfg.num_heads, cfg.head_dim), generator=g).to(device, dtype)
    k, v = (torch.randn((batch, S, cfg.num_kv_heads, cfg.head_dim), generator=g).to(device, dtype)
            for _ in range(2))
    with torch.no_grad():
        ours = sequence_parallel_attention(q, k, v, groups, causal=True, backend=backend, algorithm="ring")
        theirs = torch_ring_attention(q, k, v, groups.ring, rotate_method)
    return float((ours.float() - theirs.float()).abs().max())


# --- one rank ---------------------------------------------------------------------------------------------


def _attention_step(groups, cfg, seq_len, batch, backend, device, dtype, torch_rotate=None):
    """A closure running one attention fwd+bwd on this rank's shard (ours, or torch's if torch_rotate)."""
    from longvila_engine.attention.sequence_parallel import sequence_parallel_attention

    layout = groups.layout
    tp, sp = layout.tp, layout.ring * layout.ulysses
    H, K = cfg.num_heads // tp, max(cfg.num_kv_heads // tp, 1)
    S = seq_len // sp
    g = torch.Generator().manual_seed(1234 + groups.rank)
    q, dout = (torch.randn((batch, S, H, cfg.head_dim), generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn((batch, S, K, cfg.head_dim), generator=g).to(device, dtype) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        for t in (q, k, v):
            t.grad = None
        if torch_rotate is None:
            out = sequence_parallel_attention(q, k, v, groups, causal=True, backend=backend, algorithm="ring")
        else:
            out = torch_ring_attention(q, k, v, groups.ring, torch_rotate)
        out.backward(dout)
    return step


def _train_step(groups, cfg, seq_len, batch, backend, device, dtype, grad_sync=False):
    """A closure running forward+backward of the model (and with grad_sync the gradient all-reduce)."""
    from longvila_engine.models import Transformer, local_batch
    from longvila_engine.train import average_gradients

    model = Transformer(cfg, groups, tp_sequence_parallel=groups.layout.tp > 1, attention_backend=backend,
                        device=device, dtype=dtype)
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g).to(device)
    lb = local_batch(ids, groups)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(lb.input_ids, lb.positions, lb.labels, lb.cu_seqlens)
        loss.backward()
        if grad_sync:
            average_gradients(model, groups)
    return step


def cross_node_fraction(groups, axis: str, gpus_per_node: int) -> float:
    """Share of this rank's bytes on `axis` that cross a node boundary, with `gpus_per_node` ranks per
    physical node: the ring sends to the next rank only; collectives spread evenly over the peers.
    (groups.stats labels a whole group inter-node as soon as it spans nodes.)"""
    try:
        ranks = groups.ranks(axis)
    except KeyError:  # counters such as 'check' ride on the sp group
        ranks = groups.ranks("sp")
    me = groups.rank
    if len(ranks) <= 1 or me not in ranks:
        return 0.0
    if axis == "ring":
        nxt = ranks[(ranks.index(me) + 1) % len(ranks)]
        return float(me // gpus_per_node != nxt // gpus_per_node)
    peers = [r for r in ranks if r != me]
    return sum(r // gpus_per_node != me // gpus_per_node for r in peers) / len(peers)


def bench_interleaved(cases, device, warmup, repeats):
    """This rank's figures for several closures [(step, groups)], timed repeat by repeat in turn so a
    noisy machine disturbs them alike. Every step has run once already (first-use costs)."""
    memories = [harness.measure_memory(step, device=device)[0] for step, _ in cases]
    for _, groups in cases:
        groups.stats.reset()
    times = timed_repeats([step for step, _ in cases], device, max(warmup - 1, 0), repeats)
    calls = max(warmup - 1, 0) + repeats
    out = []
    for (_, groups), ts, memory in zip(cases, times, memories):
        per_axis = {axis: {"bytes": st["bytes"] / calls, "wait_s": st["wait_s"] / calls, "link": st["link"]}
                    for axis, st in groups.stats.summary().items()}
        out.append({"times": ts, "memory": memory, "per_axis": per_axis})
    return out


def fold(name, layout, mode, seq_len, size, backend, per_rank, extra=None):
    """Rank 0: one results record from every rank's figures."""
    world = len(per_rank)
    step = harness.Timing([max(ts) for ts in zip(*(r["times"] for r in per_rank))])
    axes = sorted({a for r in per_rank for a in r["per_axis"]})
    mean = lambda axis, key: sum(r["per_axis"].get(axis, {}).get(key, 0.0) for r in per_rank) / world
    links = {}
    for r in per_rank:
        for axis, st in r["per_axis"].items():
            links[axis] = st["link"] if links.get(axis, st["link"]) == st["link"] else "mixed"
    comm = {axis: {"bytes": mean(axis, "bytes"), "wait_ms": mean(axis, "wait_s") * 1e3, "link": links[axis]}
            for axis in axes}
    intra = sum(c["bytes"] for c in comm.values() if c["link"] == "intra-node")
    inter = sum(c["bytes"] for c in comm.values() if c["link"] != "intra-node")
    wait = sum(c["wait_ms"] for c in comm.values())
    mem_max = lambda key: max((r["memory"].get(key) or 0.0) for r in per_rank)
    tokens = size["batch"] * seq_len
    shape = f"{layout.ring}/{layout.ulysses}/{layout.tp}" if layout is not None else f"{world}/1/1"
    record = {"case": name, "backend": backend, **step.summary_ms(),
              "config": {"mode": mode, "seq_len": seq_len, "model": size["model"], "world": world,
                         "shape": shape, "gpus_per_node": None if layout is None else layout.gpus_per_node,
                         "batch": size["batch"], "dtype": size.get("dtype"), "tag": size.get("tag"),
                         "grad_sync": size.get("grad_sync")},
              "tokens": tokens, "tokens_per_s": tokens / step.median,
              "tokens_per_s_per_rank": tokens / step.median / world,
              "peak_alloc_mb": mem_max("peak_alloc_mb"), "peak_rss_mb": mem_max("peak_rss_mb"),
              "comm": comm, "comm_bytes": {a: c["bytes"] for a, c in comm.items()},
              "intra_mb": intra / 2**20, "inter_mb": inter / 2**20,
              "cross_node_mb": sum(r.get("cross_node_bytes", 0.0) for r in per_rank) / world / 2**20,
              "wait_ms": wait, "compute_ms": max(step.median * 1e3 - wait, 0.0)}
    record.update(extra or {})
    return record


def _find(rows, case, mode, seq_len):
    found = [m for m in rows if m["case"] == case and m["config"]["mode"] == mode and m["config"]["seq_len"] == seq_len]
    return found[0] if found else None


def add_ratios(rows):
    """time / MM-SP time per (mode, S); torch rows also get ours / theirs for ring-only and MM-SP."""
    for r in rows:
        mode, seq_len = r["config"]["mode"], r["config"]["seq_len"]
        ref = _find(rows, MMSP, mode, seq_len)
        r["ratio_vs_mmsp"] = r["median_ms"] / ref["median_ms"] if ref else None
        if r["case"].startswith("torch_cp"):
            ring, mmsp = _find(rows, "ring_only", mode, seq_len), _find(rows, MMSP, mode, seq_len)
            r["ours_over_torch"] = ring["median_ms"] / r["median_ms"] if ring else None
            r["mmsp_over_torch"] = mmsp["median_ms"] / r["median_ms"] if mmsp else None
    return rows


def run_rank(args):
    from longvila_engine.parallel import init_parallel

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    size = dict(SIZES["smoke" if args.smoke else "full"])
    for key in ("model", "seq_lens", "repeats"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    size["tag"], size["grad_sync"] = args.tag, args.grad_sync
    gpus_per_node = args.gpus_per_node or (torch.cuda.device_count() if device.type == "cuda" else 2)
    cfg = model_config(size["model"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size["dtype"] = str(dtype).replace("torch.", "")
    backend, _ = usable_backend(args.backend, device)
    results = harness.ResultsFile(NAME, results_dir=args.results_dir, device=device) if rank == 0 else None
    rows, skipped = [], []
    plan = strategy_layouts(world, gpus_per_node, cfg.num_heads, cfg.num_kv_heads)
    modes = [m for m in ("attention", "train") if m in args.modes]
    layouts = []
    for name, layout, reason in plan:
        if layout is None:
            skipped.append(f"{name}: {reason}")
        else:
            layouts.append((name, layout, init_parallel(layout)))
    ring_groups = next(g for n, _, g in layouts if n == "ring_only")
    for seq_len in size["seq_lens"]:
        for mode in modes:
            maker = _attention_step if mode == "attention" else \
                functools.partial(_train_step, grad_sync=args.grad_sync)
            cases, meta = [], []
            for name, layout, groups in layouts:
                step = maker(groups, cfg, seq_len, size["batch"], backend, device, dtype)
                step()  # first use of the groups and kernels, before memory and counters
                cases.append((step, groups))
                meta.append((name, layout, "", {}))
            for rotate in ([] if mode != "attention" or args.no_torch else size["torch_rotates"]):
                case = f"torch_cp_{rotate}"
                try:
                    diff = torch_matches_ours(ring_groups, cfg, seq_len, size["batch"], backend, device, dtype,
                                              rotate)
                    step = _attention_step(ring_groups, cfg, seq_len, size["batch"], backend, device, dtype,
                                           torch_rotate=rotate)
                    step()
                    err = None
                except Exception as e:  # report why torch's CP could not run, measure the rest
                    diff, err = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                errs = [None] * world
                dist.all_gather_object(errs, err)
                if any(errs):
                    skipped.append(f"{case}: could not run: {next(e for e in errs if e)}")
                    continue
                cases.append((step, ring_groups))
                meta.append((case, None, "torch-flash", {"max_abs_diff": diff, "rotate": rotate}))
            mine = bench_interleaved(cases, device, size["warmup"], size["repeats"])
            for i, (case, layout, torch_backend, info) in enumerate(meta):
                if torch_backend:  # torch's collectives bypass groups.stats: bytes from its source
                    mine[i]["per_axis"] = torch_cp_traffic(cfg, seq_len, size["batch"], ring_groups, dtype)
                    mine[i]["max_abs_diff"] = info["max_abs_diff"]
                groups = cases[i][1]
                mine[i]["cross_node_bytes"] = sum(
                    st["bytes"] * cross_node_fraction(groups, axis, gpus_per_node)
                    for axis, st in mine[i]["per_axis"].items())
                per_rank = [None] * world
                dist.all_gather_object(per_rank, mine[i])
                if rank != 0:
                    continue
                extra = None
                if torch_backend:
                    extra = {"max_abs_diff_vs_ours": max(m["max_abs_diff"] for m in per_rank), "comm_estimated": True,
                             "note": "torch.distributed.tensor.experimental templated ring attention, "
                                     f"rotate={info['rotate']}, flash op wrapped; bytes computed from its "
                                     "collectives (not counted by groups.stats)"}
                rows.append(fold(case, layout, mode, seq_len, size, torch_backend or backend, per_rank, extra))
    if rank != 0:
        return
    add_ratios(rows)
    for r in rows:
        results.append(r)
    title = (f"parallel strategies: model={size['model']} world={world} gpus_per_node={gpus_per_node} "
             f"{device.type} ranks, {size['dtype']}, backend={backend}, causal, fwd+bwd"
             + (f", tag={args.tag}" if args.tag else ""))
    harness.print_table(rows, COLUMNS, title=title)
    for line in skipped:
        print(f"skipped {line}")
    summary = {}
    for mode in modes:
        for r in rows:
            if r["config"]["mode"] == mode and r["case"] in ("ring_only", "megatron_cp_tp") and r["ratio_vs_mmsp"]:
                summary[f"{mode}:{r['case']}/mmsp@{r['config']['seq_len']}"] = round(r["ratio_vs_mmsp"], 3)
    for r in rows:
        if r.get("ours_over_torch"):
            summary[f"ours_ring/{r['case']}@{r['config']['seq_len']}"] = round(r["ours_over_torch"], 3)
        if r.get("mmsp_over_torch"):
            summary[f"mmsp/{r['case']}@{r['config']['seq_len']}"] = round(r["mmsp_over_torch"], 3)
    print("speedups (time of the layout / time of MM-SP; ours/torch = our time / torch's):")
    for k, v in summary.items():
        print(f"  {k} = {v}")
    png = harness.plot_lines(rows, x="config.seq_len", y="median_ms", series=lambda r: r["case"],
                             panel=lambda r: r["config"]["mode"],
                             path=os.path.join(results.dir, f"{NAME}{'_' + args.tag if args.tag else ''}.png"),
                             title=title, xlabel="global sequence length", ylabel="step ms (median)", logy=False)
    print(f"results appended to {results.path} (run_id {results.run_id}); plot: {png}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, S=512, seconds (CI)")
    p.add_argument("--model", default=None, help="model preset (tiny, small, or a models.PRESETS name)")
    p.add_argument("--seq-lens", "--seq-len", dest="seq_lens", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--modes", nargs="+", default=["attention", "train"], choices=["attention", "train"])
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="ranks per node (default: CUDA devices on GPU, 2 on CPU so the ring crosses nodes)")
    p.add_argument("--backend", default="auto", help="block kernel backend (auto, reference, cpu, triton)")
    p.add_argument("--world", type=int, default=4, help="ranks to spawn when not under torchrun")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--grad-sync", action="store_true",
                   help="train mode: add the gradient all-reduce over dp x sp (train.average_gradients)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch's context-parallel rows")
    p.add_argument("--tag", default=None, help="label stored in every row (e.g. the emulated link speed)")
    p.add_argument("--results-dir", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, or netns.py's per-rank launch
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            harness.configure_threads()
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
        try:
            run_rank(args)
        finally:
            dist.destroy_process_group()
    else:
        harness.spawn_gloo(run_rank, args, args.world)
    if "RANK" not in os.environ or os.environ.get("RANK") == "0":
        print(f"wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
