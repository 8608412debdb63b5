"""`make soak`: a long run of the real trainer, watched for leaks (issue 15).

`torchrun --nproc-per-node 4 -m longvila_engine.train --ring 2 --ulysses 2 --model tiny --steps 500 ...`
with checkpoints every 100 steps. Every `--every` steps (25) it samples the resident memory (VmRSS) of
each of the 4 worker processes and the median step time of the steps since the previous sample (from
the trainer's --log-json), and the CPU seconds the ranks used per step (utime+stime from /proc: unlike
wall time, not inflated by other jobs on a shared machine). Writes benchmarks/results/soak.json and
soak.png and prints the growth from step 50 to the last step; goals (reported, never asserted): RSS
under 3%, step time under 10% (CPU time per step: median of 3 samples, so one checkpoint is left out).

The growth of step time is that of the window medians; on a machine shared with other jobs it moves
with their load, so read it with the load average the JSON records at each sample.

Deliberately not here: a memory profiler (RSS from /proc is what an operator sees), assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REPO_ROOT = harness.REPO_ROOT


def worker_pids(parent: int) -> list[int]:
    """PIDs whose parent is `parent` (torchrun's workers), sorted."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == parent:
                out.append(int(entry))
    return sorted(out)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (s): what it computed, whatever the other jobs on the machine do."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_log(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def growth(samples: list[dict], key: str, first_step: int) -> float | None:
    """Relative change of samples[key] from the sample at `first_step` to the last one."""
    base = [s for s in samples if s["step"] == first_step]
    if not base or not samples or samples[-1]["step"] <= first_step:
        return None
    return samples[-1][key] / base[0][key] - 1.0


def growth_median(samples: list[dict], key: str, first_step: int, k: int = 3) -> float | None:
    """Relative change of the median of `key` over the k samples from `first_step` to that of the last k
    (a checkpoint's CPU lands in one window: the median of 3 leaves it out)."""
    head = [s[key] for s in samples if s["step"] >= first_step and s[key] is not None][:k]
    tail = [s[key] for s in samples if s[key] is not None][-k:]
    if len(head) < k or len(tail) < k or samples[-1]["step"] <= first_step:
        return None
    return statistics.median(tail) / statistics.median(head) - 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=25, help="sample RSS and step time every N steps")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="40 steps, sampled every 10 (CI size)")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--timeout", type=float, default=3600, help="hard limit on the whole run, s")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.steps, args.every, args.save_every = 40, 10, 20
    if args.steps < 2 * args.every or args.every < 1:
        raise ValueError(f"--steps {args.steps} must be at least 2 x --every {args.every} (>= 1)")
    out_dir = args.results_dir or harness.RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="soak_")
    log = os.path.join(work, "log.jsonl")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(args.nproc), "-m", "longvila_engine.train",
           "--model", "tiny", "--seq-len", str(args.seq_len), "--ring", "2", "--ulysses", str(args.nproc // 2),
           "--steps", str(args.steps), "--save-every", str(args.save_every), "--checkpoint-dir",
           os.path.join(work, "ck"), "--log-json", log, "--no-progress", "--timeout", "300"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=open(os.path.join(work, "out.txt"), "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    samples, next_step, deadline = [], args.every, time.monotonic() + args.timeout
    last_cpu, last_seen = None, None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            records = read_log(log)
            if records and records[-1]["step"] >= next_step:
                pids = worker_pids(proc.pid)
                window = [r["step_time_s"] for r in records if next_step - args.every < r["step"] <= next_step]
                rss = [rss_mb(p) for p in pids]
                cpu = sum(c for c in (cpu_seconds(p) for p in pids) if c is not None)
                seen = records[-1]["step"]
                # CPU seconds of all ranks per step since the previous sample (includes any checkpoint).
                cpu_per_step = (cpu - last_cpu) / (seen - last_seen) if last_cpu is not None else None
                last_cpu, last_seen = cpu, seen
                sample = {"step": next_step, "seen_at_step": records[-1]["step"], "rss_mb": rss,
                          "rss_mb_total": sum(r for r in rss if r), "step_time_s": statistics.median(window),
                          "cpu_s_per_step": cpu_per_step,
                          "loadavg_1m": os.getloadavg()[0]}  # fmt: skip
                samples.append(sample)
                print(f"step {next_step:4d}: RSS per rank {', '.join(f'{r:.0f}' for r in rss if r)} MB, "
                      f"median step {sample['step_time_s'] * 1e3:.1f} ms, CPU "
                      f"{(cpu_per_step or 0) * 1e3:.0f} ms/step (all ranks), load {sample['loadavg_1m']:.1f}",
                      flush=True)  # fmt: skip
                next_step += args.every
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    first = 2 * args.every
    result = {
        "bench": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        **harness.environment(),
        "config": {"steps": args.steps, "every": args.every, "nproc": args.nproc, "seq_len": args.seq_len,
                   "model": "tiny", "layout": f"ring 2 x ulysses {args.nproc // 2}", "save_every": args.save_every},
        "exit_code": rc,
        "samples": samples,
        "rss_growth": growth(samples, "rss_mb_total", first),
        "step_time_growth": growth(samples, "step_time_s", first),
        "cpu_per_step_growth": growth_median(samples, "cpu_s_per_step", first),
        "from_step": first,
    }  # fmt: skip
    name = "soak_smoke" if args.smoke else "soak"
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    rows = [{"step": s["step"], "value": r, "series": f"rank {i}", "panel": "RSS (MB)"}
            for s in samples for i, r in enumerate(s["rss_mb"]) if r]  # fmt: skip
    rows += [{"step": s["step"], "value": s["step_time_s"] * 1e3, "series": "median wall", "panel": "step time (ms)"}
             for s in samples]  # fmt: skip
    rows += [{"step": s["step"], "value": s["cpu_s_per_step"] * 1e3 / args.nproc, "series": "CPU per rank",
              "panel": "step time (ms)"} for s in samples if s["cpu_s_per_step"]]  # fmt: skip
    png = harness.plot_lines(rows, x="step", y="value", series=lambda r: r["series"], panel=lambda r: r["panel"],
                             path=os.path.join(out_dir, f"{name}.png"), logx=False, logy=False,
                             title=f"soak: tiny model, {args.nproc} ranks, {args.steps} steps", ylabel="")  # fmt: skip
    fmt = lambda g: "n/a" if g is None else f"{g * 100:+.2f}%"  # noqa: E731
    print(f"exit {rc}; growth from step {first} to {samples[-1]['step'] if samples else '-'}: RSS "
          f"{fmt(result['rss_growth'])} (goal < 3%), step time {fmt(result['step_time_growth'])} (goal < 10%), "
          f"CPU time per step {fmt(result['cpu_per_step_growth'])}; "
          f"{os.path.join(out_dir, name + '.json')}{', ' + png if png else ''}")  # fmt: skip
    if rc != 0:
        with open(os.path.join(work, "out.txt")) as f:
            print(f.read()[-4000:])
    shutil.rmtree(work, ignore_errors=True)
    return 0 if rc == 0 and len(samples) >= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
