"""Measured peak memory per rank against the cost model's activation model (issue 6 item 4).

For a small model on CPU it measures, per rank, the peak of torch's allocator during one
forward+backward of `Transformer` (harness.measure_memory: profiler memory events) at a few global
sequence lengths S and rank counts W (ring=W, so each rank holds S/W tokens), then fits

    peak(tokens_local) = intercept + slope * tokens_local          (least squares over every point)

and holds the slope against costmodel's per-token prediction: layers * activation_bytes_per_token
(at 4 bytes per element: fp32 on CPU) plus the float32 logits and their gradient of a token
(`memory_per_gpu`'s logits term, unchunked here). The intercept collects what does not grow with S
(parameter gradients, workspace). Reported: slope, predicted slope, their ratio, R^2 and the worst
relative residual; one JSON line per point and one for the fit in benchmarks/results/memory_check.jsonl.

Deliberately not here: timing (bench_strategies.py), GPU memory (the same code runs under torchrun on
GPUs, but this script spawns gloo ranks), activation checkpointing.
    python benchmarks/memory_check.py [--smoke]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

NAME = "memory_check"
SIZES = {"smoke": dict(model="tiny", seq_lens=[256, 512, 1024], worlds=[1, 2]),
         "full": dict(model="small", seq_lens=[512, 1024, 2048, 4096], worlds=[1, 2])}


def predicted_bytes_per_token(cfg) -> float:
    """costmodel's activation bytes of one token over all layers (fp32), plus its fp32 logits and grad.

    On CPU, RMSNorm is composite and also keeps its normalised rows (one more hidden-size row per norm,
    two norms per layer) where CUDA's fused kernel keeps only a float32 rstd; the cost model describes
    CUDA, so the CPU extra is added here."""
    import costmodel

    m = costmodel.Model.from_config("bench", cfg)
    cpu_norms = 2 * cfg.hidden_size * 4
    return cfg.num_layers * (costmodel.activation_bytes_per_token(m, dtype_bytes=4) + cpu_norms) + \
        cfg.vocab_size * 4 * 2


def fit_line(xs, ys) -> dict:
    """Least-squares y = a + b x with R^2 and the worst |residual| / y."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept": a, "slope": b, "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0,
            "max_rel_residual": max(abs(y - a - b * x) / y for x, y in zip(xs, ys))}


def _rank(rank, world, init_file, size, queue):
    from bench_strategies import model_config

    from longvila_engine import ParallelLayout
    from longvila_engine.models import Transformer, local_batch
    from longvila_engine.parallel import init_parallel

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        groups = init_parallel(ParallelLayout(ring=world, gpus_per_node=max(world, 1)))
        cfg = model_config(size["model"])
        model = Transformer(cfg, groups)
        for seq_len in size["seq_lens"]:
            ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(5))
            lb = local_batch(ids, groups)

            def step(lb=lb):
                model.zero_grad(set_to_none=False)  # gradient buffers stay: they are the intercept
                model(lb.input_ids, lb.positions, lb.labels, lb.cu_seqlens).backward()
            step()
            memory, _ = harness.measure_memory(step)
            peaks = [None] * world
            dist.all_gather_object(peaks, memory["peak_alloc_mb"])
            if rank == 0:
                queue.put({"world": world, "seq_len": seq_len, "tokens_local": lb.input_ids.numel(),
                           "peak_alloc_mb": max(peaks), "peak_rss_mb": memory["peak_rss_mb"]})
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    ctx = mp.get_context("spawn")
    points = []
    for world in size["worlds"]:
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory(prefix="memory_check_") as tmp:
            mp.spawn(_rank, args=(world, os.path.join(tmp, "rdzv"), size, queue), nprocs=world)
        while not queue.empty():
            points.append(queue.get())
    from bench_strategies import model_config

    cfg = model_config(size["model"])
    per_token = predicted_bytes_per_token(cfg)
    results = harness.ResultsFile(NAME, results_dir=args.results_dir)
    rows = []
    for pt in points:
        pt["predicted_mb"] = pt["tokens_local"] * per_token / 2**20
        rows.append(results.append({"case": "point", "config": {"model": size["model"], "world": pt["world"],
                                                                 "seq_len": pt["seq_len"]}, **pt}))
    fit = fit_line([pt["tokens_local"] for pt in points], [pt["peak_alloc_mb"] * 2**20 for pt in points])
    fit.update({"predicted_slope": per_token, "slope_over_predicted": fit["slope"] / per_token,
                "intercept_mb": fit["intercept"] / 2**20})
    results.append({"case": "fit", "config": {"model": size["model"]}, **fit})
    harness.print_table(rows, [("W", "world", ""), ("S", "seq_len", ""), ("tokens/rank", "tokens_local", ""),
                               ("peak MB", "peak_alloc_mb", ".2f"), ("rss MB", "peak_rss_mb", ".2f"),
                               ("activations model MB", "predicted_mb", ".2f")],
                        title=f"peak memory per rank, fwd+bwd, model={size['model']} fp32 CPU")
    print(f"fit: peak = {fit['intercept_mb']:.2f} MB + {fit['slope']:.0f} B/token * tokens_local; "
          f"model {per_token:.0f} B/token (layers * activation_bytes_per_token + logits); "
          f"slope/model = {fit['slope_over_predicted']:.3f}; R^2 = {fit['r2']:.4f}; "
          f"worst residual {fit['max_rel_residual'] * 100:.1f}%")
    print(f"results appended to {results.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
