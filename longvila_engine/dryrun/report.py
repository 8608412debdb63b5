"""Reports of the dry run: the cost model beside it, the printed report, the fake-CUDA check, the
sweep behind the README table, and the command line (`python -m longvila_engine.dryrun`).

Deliberately not here: the step (step.py) and its instruments (instruments.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .instruments import _REPO_ROOT, _StepRecorder
from .step import CATEGORIES, HBM_BYTES, USABLE, DryRunConfig, GiB, dry_run, dry_run_extrapolated, parse_tokens


# --- cost model ------------------------------------------------------------------------------------------
def _costmodel():
    path = os.path.join(_REPO_ROOT, "benchmarks")
    if not os.path.exists(os.path.join(path, "costmodel.py")):
        return None
    if path not in sys.path:
        sys.path.insert(0, path)
    import costmodel

    return costmodel


def cost_model_view(result: dict) -> dict | None:
    """The cost model's figures for the same configuration (None when benchmarks/ is not there)."""
    cm = _costmodel()
    if cm is None:
        return None
    from ..models import get_config

    c = result["config"]
    config = get_config(c["model"]).replace(num_layers=c["num_layers"])
    model = cm.Model.from_config(c["model"], config)
    strat = cm.Strategy("dry run", ring=c["ring"], ulysses=c["ulysses"], tp=c["tp"])
    dtype_bytes = 2 if c["precision"] == "gpu" else 4
    comm = cm.communication_bytes(model, c["seq_len"], strat, dtype_bytes=dtype_bytes,
                                  activation_checkpointing=c["activation_checkpointing"])
    L = c["num_layers"]
    view = {"bytes": {"ring": int(L * (comm["ring_fwd"] + comm["ring_bwd"])),
                      "ulysses": int(L * comm["ulysses_a2a"]),
                      "tp": int(L * comm["tp_allreduce"] + cm.tp_head_bytes(model, c["seq_len"], strat, dtype_bytes))},
            "model_flops_per_rank": int(cm.model_flops(model, c["seq_len"]) / c["world"] * c["dp"])}
    view["memory"] = cm.memory_breakdown(model, c["seq_len"], strat, dp=c["dp"], dtype_bytes=dtype_bytes)
    return view


# --- output -------------------------------------------------------------------------------------------------
def _gib(x) -> str:
    return f"{x / GiB:.2f}"


def report(result: dict, cost: dict | None = None) -> str:
    """Human-readable lines of one dry run."""
    c = result["config"]
    m = result["memory"]
    lines = [f"dry run: {c['model']} ({c['num_layers']} layers), seq {c['seq_len']}, world {c['world']} "
             f"(dp {c['dp']} x ring {c['ring']} x ulysses {c['ulysses']} x tp {c['tp']}), rank {c['rank']}, "
             f"fsdp {'on' if result['fsdp'] else 'off'}, precision {c['precision']}, activation checkpointing "
             f"{'on' if c['activation_checkpointing'] else 'off'}, {result['tokens_local']} tokens on this rank"
             + (f" [extrapolated from {result['extrapolated_from_layers']} layers]"
                if result.get("extrapolated_from_layers") else "")]
    lines.append("peak memory GiB: " + ", ".join(f"{k} {_gib(m[k])}" for k in CATEGORIES)
                 + f"; total {_gib(m['total'])} -> {'fits' if result['fits'] else 'does NOT fit'} 90% of 80 GiB "
                 f"({_gib(USABLE * HBM_BYTES)})")
    if cost is not None and "memory" in cost:
        cmm = cost["memory"]
        lines.append("cost model GiB:  " + ", ".join(f"{k} {_gib(v)}" for k, v in cmm.items()
                                                     if isinstance(v, (int, float))))
    f = result["flops"]
    lines.append(f"FLOPs (FlopCounterMode): total {f['total']:.4g}, attention {f['attention_counted']:.4g}; "
                 f"ops.flops rule for attention {f['attention_rule']:.4g}"
                 + (f"; cost model (3x forward) {cost['model_flops_per_rank']:.4g}" if cost else ""))
    b = result["bytes"]
    lines.append("bytes per axis (groups.stats): " + (", ".join(f"{k} {v:.4g}" for k, v in
                                                            sorted(b["groups_stats"].items())) or "none")
                 + ("; cost model: " + ", ".join(f"{k} {v:.4g}" for k, v in cost["bytes"].items()) if cost else "")
                 + "; FSDP collectives: " + (", ".join(f"{k} {v:.4g}" for k, v in b["fsdp_collectives"].items())
                                             or "none"))
    lines.append("attention calls: " + (", ".join(f"{k} x{v}" for k, v in sorted(result["attention"].items()))
                                        or "none"))
    syncs = result["host_syncs"]
    where = {w: syncs.count(w) for w in sorted(set(syncs))}
    lines.append("host syncs inside the step: " + ("none" if not syncs else f"{len(syncs)} ("
                                                   + ", ".join(f"{w} x{n}" for w, n in where.items()) + ")"))
    if result["agreement_calls_answered_locally"]:
        lines.append(f"agreement all-gathers inside the step: "
                     f"{result['agreement_calls_answered_locally']}")
    lines.append(f"wall time of the dry run: {result['wall_s']:.1f} s")
    return "\n".join(lines)


_GRAD_ON_FAKE_CUDA = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    w = torch.empty(64, 64, device="cuda", requires_grad=True)
    y = torch.empty(8, 64, device="cuda") @ w
print("ok")
"""


def fake_cuda_forward() -> str:
    """Whether forwards on fake CUDA tensors run in this torch build; a one-line verdict.

    Without autograd (no tensor requires grad): RMSNorm, embedding, a matmul and the flash SDPA op that
    returns the log-sum-exp. With autograd recording (checked in a subprocess: it aborts the process
    with a C++ `c10::Error`, not a Python exception, in CPU-only builds)."""
    import subprocess

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            x = torch.empty(1, 128, 256, device="cuda", dtype=torch.bfloat16)
            h = F.rms_norm(x, (256,), torch.empty(256, device="cuda", dtype=torch.bfloat16), 1e-5)
            h = h + F.embedding(torch.zeros(1, 128, dtype=torch.long, device="cuda"),
                                torch.empty(512, 256, device="cuda", dtype=torch.bfloat16))
            q = (h @ torch.empty(256, 256, device="cuda", dtype=torch.bfloat16)).view(1, 128, 4, 64).transpose(1, 2)
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, True)[0]
        no_grad = f"yes without autograd (RMSNorm, embedding, matmul, flash SDPA -> {tuple(out.shape)} {out.device})"
    except Exception as exc:  # noqa: BLE001 - the verdict is the message
        no_grad = f"no, even without autograd: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        from .. import ops

        recorder = _StepRecorder()
        with torch.no_grad(), FakeTensorMode(), recorder:
            q = torch.empty(1, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.empty(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
            ops.block_attention(q, k, k, causal=True)
        no_grad += f"; ops.block_attention(backend='auto') on CUDA dispatches to {sorted(recorder.attention)}"
    except Exception as exc:  # noqa: BLE001 - the verdict is the message
        no_grad += f"; ops.block_attention on fake CUDA failed: {type(exc).__name__}: {str(exc)[:120]}"
    proc = subprocess.run([sys.executable, "-c", _GRAD_ON_FAKE_CUDA], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0 and "ok" in proc.stdout:
        grad = "yes with autograd recording"
    else:
        why = next((ln.strip() for ln in proc.stderr.splitlines() if "what()" in ln), f"exit {proc.returncode}")
        grad = f"no with autograd recording (the process aborts: {why})"
    return f"{no_grad}; {grad}"


# --- sweep --------------------------------------------------------------------------------------------------
SWEEP_MODELS = ("llama2_7b", "llama3_8b", "qwen2_7b")
SWEEP_SEQ = (256 * 2**10, 512 * 2**10, 2**20, 2 * 2**20)
SWEEP_WORLDS = (8, 32, 128, 256)


def sweep(models=SWEEP_MODELS, seq_lens=SWEEP_SEQ, worlds=SWEEP_WORLDS, *, activation_checkpointing=False,
          json_path=None, show_progress=True) -> list[dict]:
    """The README table: every (model, S, world) at MM-SP 2D (ulysses 8, or `sweep_ulysses`; ring the rest),
    depth-extrapolated, memory only (FLOPs are not counted in the sweep: it halves its time)."""
    from tqdm import tqdm

    rows = []
    cases = [(m, s, w) for m in models for s in seq_lens for w in worlds]
    with tqdm(total=2 * len(cases), desc="dry run sweep (2 depths each)", disable=not show_progress,
              file=sys.stderr) as bar:
        for model, seq_len, world in cases:
            ulysses = sweep_ulysses(model)
            cfg = DryRunConfig(model=model, seq_len=seq_len, world=world, ring=world // ulysses, ulysses=ulysses,
                               activation_checkpointing=activation_checkpointing)
            result = dry_run_extrapolated(cfg, progress=bar, count_flops=False)
            result["cost_model"] = cost_model_view(result)
            rows.append(result)
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(result, default=str) + "\n")
    return rows


def sweep_ulysses(model: str) -> int:
    """The Ulysses size of the sweep's MM-SP 2D layout: 8 (one node), or the largest size <= 8 the head
    counts allow (qwen2_7b: 28 query heads, so 4)."""
    from ..attention.ulysses import ulysses_sizes_for
    from ..models import get_config

    config = get_config(model)
    return max(u for u in ulysses_sizes_for(config.num_heads, config.num_kv_heads) if u <= 8)


def sweep_table(rows: list[dict]) -> str:
    head = ("| model | seq | ranks (ring x U) | params | grads | optimizer | activations | temporaries | peak GiB "
            "| fits 72 GiB | cost model GiB | layers run |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        m, c = r["memory"], r["config"]
        cm = r.get("cost_model") or {}
        cm_total = cm.get("memory", {}).get("total")
        depth = r.get("extrapolated_from_layers")
        lines.append(f"| {c['model']} | {_tokens(c['seq_len'])} | {c['world']} ({c['ring']} x {c['ulysses']}) | "
                     + " | ".join(_gib(m[k]) for k in CATEGORIES)
                     + f" | {_gib(m['total'])} | {'yes' if r['fits'] else 'no'} | "
                     + (f"{_gib(cm_total)}" if cm_total is not None else "-")
                     + f" | {f'{depth[0]}, {depth[1]}' if depth else 'all'} |")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n / 2**20:.3g}M" if n >= 2**20 else f"{n // 1024}K"


# --- CLI ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longvila_engine.dryrun", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--seq-len", default="2M", help="global tokens: 4096, 256K, 2M")
    p.add_argument("--world", type=int, default=256)
    p.add_argument("--ring", type=int, default=32)
    p.add_argument("--ulysses", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rank", type=int, default=0, help="the rank of the fake world to measure")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--fsdp", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--precision", default="gpu", choices=["gpu", "cpu"],
                   help="gpu: fp32 master weights, bf16 compute (the trainer on CUDA); cpu: fp32")
    p.add_argument("--layers", type=int, default=None,
                   help="run this many layers as they are (default: the preset's depth)")
    p.add_argument("--extrapolate", action="store_true",
                   help="measure at 2 and 3 layers and extrapolate linearly to the preset's depth")
    p.add_argument("--sweep", action="store_true", help="the README table (3 models x 4 lengths x 4 worlds)")
    p.add_argument("--json", default=None, help="append one JSON line per dry run")
    args = p.parse_args(argv)
    if args.sweep:
        rows = sweep(activation_checkpointing=args.activation_checkpointing, json_path=args.json)
        print(sweep_table(rows))
        print(longest_fitting(rows))
        print(f"fake CUDA forward in this torch build: {fake_cuda_forward()}")
        return 0
    cfg = DryRunConfig(model=args.model, seq_len=parse_tokens(args.seq_len), world=args.world, ring=args.ring,
                       ulysses=args.ulysses, tp=args.tp, rank=args.rank, gpus_per_node=args.gpus_per_node,
                       fsdp=args.fsdp, activation_checkpointing=args.activation_checkpointing,
                       precision=args.precision, layers=args.layers)
    result = dry_run_extrapolated(cfg) if args.extrapolate else dry_run(cfg)
    cost = cost_model_view(result)
    result["cost_model"] = cost
    print(report(result, cost))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
    return 0


def longest_fitting(rows: list[dict]) -> str:
    """Per model and rank count: the longest swept sequence whose measured peak fits 72 GiB, and the
    longest sequence by the straight line through that rank count's measured peaks (peak memory per
    rank is linear in the sequence at a fixed layout: activations grow with tokens, the rest is fixed)."""
    groups: dict = {}
    for r in rows:
        c = r["config"]
        groups.setdefault((c["model"], c["world"]), []).append((c["seq_len"], r["memory"]["total"]))
    budget = USABLE * HBM_BYTES
    lines = ["longest sequence that fits 72 GiB per rank (no activation checkpointing):",
             "| model | ranks | longest swept length that fits | by the line through the measured peaks |",
             "|---|---|---|---|"]
    for (model, world), points in sorted(groups.items()):
        fits = [s for s, total in points if total <= budget]
        line = "-"
        if len(points) >= 2:
            n = len(points)
            mx, my = sum(s for s, _ in points) / n, sum(t for _, t in points) / n
            slope = sum((s - mx) * (t - my) for s, t in points) / sum((s - mx) ** 2 for s, _ in points)
            longest = int((budget - (my - slope * mx)) / slope) // 1024 * 1024
            line = _tokens(longest) if longest > 0 else "none"
        lines.append(f"| {model} | {world} | {_tokens(max(fits)) if fits else 'none'} | {line} |")
    return "\n".join(lines)


