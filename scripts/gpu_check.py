"""`make gpu-check`: everything worth knowing from one CUDA GPU, in at most 8 minutes (one H100/H200).

    python scripts/gpu_check.py [--out benchmarks/results/gpu_check] [--budget-s 480] [--quick]

Steps, each under its own time limit inside the overall budget, each recorded whatever happens:
1. `pytest -m gpu tests` (tests/test_gpu.py: triton and aten against reference with varlen, GQA,
   resume, fp16/bf16, D 64/128; generate on CUDA; the CUDA elementwise kernels), then
   tests/test_backend_triton.py in its own process (on a GPU it runs the compiled kernels).
2. Kernel TFLOP/s, bf16, B=1, 16 heads, D=128, S = 4K..64K, causal and not, forward and
   forward+backward: the engine's `triton` and `aten` backends against torch SDPA pinned to the flash
   and to the cuDNN kernel. FLOPs from `longvila_engine.ops.flops.attention_flops`.
3. A 1-GPU trainer smoke in bf16 (`torchrun --nproc-per-node 1 -m longvila_engine.train --model tiny
   --dtype bfloat16`): exit status, finite loss, loss going down.
Writes gpu_check.json and gpu_check.md into --out. Exits 0 only if every step passed.

On a machine without a CUDA GPU it refuses at once (exit 2, "needs a CUDA GPU") and writes nothing.
No backend falls back to another: a kernel that raises is reported as an error in the table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # harness, imported where torch is needed

SEQ_LENS = (4096, 8192, 16384, 32768, 65536)
NUM_HEADS, HEAD_DIM = 16, 128
BACKENDS = ("triton", "aten", "sdpa_flash", "sdpa_cudnn")


def refuse_without_gpu() -> str | None:
    """Why this machine cannot run the check, or None."""
    import torch

    if torch.version.cuda is None:
        return f"needs a CUDA GPU: torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"
    return None


def _git_sha() -> str:
    if os.environ.get("LONGVILA_GIT_SHA"):  # a copied tree without .git (scripts/gpu_check_system.sh)
        return os.environ["LONGVILA_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from longvila_engine._extension import cuda_kernels_available

    props = torch.cuda.get_device_properties(0)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": _git_sha(), "device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "triton": triton_version,
            "extension_cuda_kernels": cuda_kernels_available()}


def _run(cmd, timeout_s, env=None) -> dict:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {timeout_s:.0f} s\n" + (exc.stdout or b"").decode(errors="replace")[-4000:]
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.monotonic() - start, 1), "tail": out[-4000:]}


def _pytest_summary(tail: str) -> str:
    lines = [ln.strip("= ") for ln in tail.splitlines() if (" passed" in ln or " failed" in ln or " skipped" in ln
                                                            or " error" in ln) and " in " in ln]
    return lines[-1] if lines else ""


def step_pytest(deadlines: tuple[float, float], out_dir: str) -> dict:
    """pytest -m gpu over the suite, then the Triton module in its own process, each by its deadline."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the compiled kernels, never the interpreter
    runs = []
    compiled = dict(env, LONGVILA_TRITON_TESTS="compiled")  # the Triton module on CUDA, not interpreted
    for cmd, deadline, run_env in (([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests",
                            f"--junitxml={os.path.join(out_dir, 'pytest_gpu.xml')}"], deadlines[0], env),
                          ([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_backend_triton.py",
                            f"--junitxml={os.path.join(out_dir, 'pytest_triton.xml')}"], deadlines[1], compiled)):
        r = _run(cmd, deadline - time.monotonic(), run_env)
        r["summary"] = _pytest_summary(r["tail"])
        # pytest exit 0: passed; 5: nothing collected, which here means the gpu tests went missing.
        r["ok"] = r["rc"] == 0
        runs.append(r)
    return {"ok": all(r["ok"] for r in runs), "runs": runs}


def _kernel_fns(backend, q, k, v, dout, causal):
    """(forward, forward+backward) closures of one backend on (B, S, H, D) bf16 tensors."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longvila_engine import ops

    if backend in ("triton", "aten"):
        def fwd():
            return ops.block_attention(q, k, v, causal=causal, backend=backend)

        def fwd_bwd():
            out, lse = fwd()
            return ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)

        return fwd, fwd_bwd
    kind = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    dt = dout.transpose(1, 2)

    def sdpa_fwd():
        with sdpa_kernel([kind]), torch.no_grad():
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fwd_bwd():
        with sdpa_kernel([kind]):
            y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return torch.autograd.grad(y, (qt, kt, vt), dt)

    return sdpa_fwd, sdpa_fwd_bwd


def step_kernels(deadline: float, seq_lens=SEQ_LENS) -> dict:
    import harness
    import torch

    from longvila_engine.ops.flops import attention_flops

    rows = []
    for seq_len in seq_lens:
        for causal in (True, False):
            gen = torch.Generator(device="cuda").manual_seed(seq_len)
            q, k, v, dout = (torch.randn(1, seq_len, NUM_HEADS, HEAD_DIM, generator=gen, device="cuda",
                                         dtype=torch.bfloat16) for _ in range(4))
            for backend in BACKENDS:
                row = {"seq_len": seq_len, "causal": causal, "backend": backend}
                if time.monotonic() > deadline:
                    row["error"] = "skipped: time budget spent"
                    rows.append(row)
                    continue
                try:
                    fwd, fwd_bwd = _kernel_fns(backend, q, k, v, dout, causal)
                    repeats = 10 if seq_len <= 16384 else 5
                    for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                        ms, lo, hi = harness.cuda_event_ms(fn, repeats=repeats)
                        flops = attention_flops(seq_len, seq_len, NUM_HEADS, HEAD_DIM, causal=causal, mode=mode)
                        row[f"{mode}_ms"] = round(ms, 3)
                        row[f"{mode}_ms_min"], row[f"{mode}_ms_max"] = round(lo, 3), round(hi, 3)
                        row["repeats"] = repeats
                        row[f"{mode}_tflops"] = round(flops / ms / 1e9, 1)
                except Exception as exc:  # reported in the table; never replaced by another kernel
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                rows.append(row)
            del q, k, v, dout
            torch.cuda.empty_cache()
    measured = [r for r in rows if "error" not in r]
    ours_ok = {r["backend"] for r in measured} >= {"triton", "aten"}
    return {"ok": ours_ok, "rows": rows}


def step_train(deadline: float, out_dir: str) -> dict:
    log = os.path.join(out_dir, "train_bf16.jsonl")
    if os.path.exists(log):
        os.remove(log)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "longvila_engine.train", "--model", "tiny", "--seq-len", "1024", "--steps", "30",
           "--dtype", "bfloat16", "--lr", "3e-3", "--log-json", log, "--no-progress"]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = _run(cmd, min(120, deadline - time.monotonic()), env)
    losses = []
    if os.path.exists(log):
        with open(log) as f:
            losses = [json.loads(line)["loss"] for line in f if line.strip()]
    finite = bool(losses) and all(x == x and abs(x) != float("inf") for x in losses)
    r.update({"steps_logged": len(losses), "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None})
    r["ok"] = r["rc"] == 0 and finite and len(losses) >= 2 and losses[-1] < losses[0]
    return r


def markdown(result: dict) -> str:
    """The report as markdown: environment, step status, and the kernel table."""
    env = result.get("environment", {})
    lines = [f"# gpu-check {env.get('date', '')}", "",
             f"{env.get('device', '?')} (sm_{env.get('capability', '?').replace('.', '')}, "
             f"{env.get('memory_gib', '?')} GiB), torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"cuDNN {env.get('cudnn', '?')}, triton {env.get('triton', '?')}, git {env.get('git_sha', '?')}, "
             f"extension CUDA kernels: {env.get('extension_cuda_kernels', '?')}", "",
             "| step | ok | seconds | detail |", "|---|---|---|---|"]
    for r in result.get("pytest", {}).get("runs", []):
        lines.append(f"| `{r['cmd'].split(' -m ', 1)[-1][:60]}` | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | "
                     f"{r.get('summary', '') or 'rc ' + str(r['rc'])} |")
    t = result.get("train")
    if t:
        lines.append(f"| trainer smoke, tiny, bf16, 1 GPU | {'yes' if t['ok'] else 'NO'} | {t['seconds']} | "
                     f"{t['steps_logged']} steps, loss {t['first_loss']} -> {t['last_loss']} |")
    rows = result.get("kernels", {}).get("rows", [])
    if rows:
        lines += ["", f"Kernel TFLOP/s, bf16, B=1, H={NUM_HEADS}, D={HEAD_DIM} (fwd; fwd+bwd), median of CUDA-event "
                  "timings; FLOPs from `attention_flops` (causal counts visible pairs only):", "",
                  "| S | causal | " + " | ".join(BACKENDS) + " |", "|---|---|" + "---|" * len(BACKENDS)]
        cells: dict = {}
        for r in rows:
            text = (f"{r['fwd_tflops']}; {r['fwd_bwd_tflops']}" if "error" not in r else r["error"][:50])
            cells.setdefault((r["seq_len"], r["causal"]), {})[r["backend"]] = text
        for (seq_len, causal), by_backend in cells.items():
            lines.append(f"| {seq_len // 1024}K | {'yes' if causal else 'no'} | "
                         + " | ".join(by_backend.get(b, "-") for b in BACKENDS) + " |")
    lines += ["", f"overall: {'ok' if result.get('ok') else 'FAILED'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "gpu_check"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check's wall-clock budget")
    ap.add_argument("--quick", action="store_true", help="kernels at S=4K and 8K only")
    args = ap.parse_args(argv)

    why = refuse_without_gpu()
    if why:
        print(f"gpu-check: refused, {why}. Run `make gpu-check` on a machine with one CUDA GPU.",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    result = {"environment": environment()}
    print(f"gpu-check: {result['environment']}", flush=True)
    # Shares of the budget: gpu tests 35% (the first Triton compiles land here; triton caches them on
    # disk for the later steps), the Triton module 15%, kernels 30%, the trainer the rest (>= 20%).
    result["pytest"] = step_pytest((start + 0.35 * args.budget_s, start + 0.50 * args.budget_s), args.out)
    print(f"gpu-check: pytest {'ok' if result['pytest']['ok'] else 'FAILED'}", flush=True)
    seq_lens = SEQ_LENS[:2] if args.quick else SEQ_LENS
    result["kernels"] = step_kernels(min(deadline - 0.2 * args.budget_s, time.monotonic() + 0.30 * args.budget_s),
                                     seq_lens)
    print(f"gpu-check: kernels {'ok' if result['kernels']['ok'] else 'FAILED'}", flush=True)
    result["train"] = step_train(deadline, args.out)
    print(f"gpu-check: trainer {'ok' if result['train']['ok'] else 'FAILED'}", flush=True)
    result["ok"] = all(result[k]["ok"] for k in ("pytest", "kernels", "train"))
    result["seconds"] = round(time.monotonic() - start, 1)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"gpu-check: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s; results in {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
