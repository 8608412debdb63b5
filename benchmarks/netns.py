"""`make bench-net`: the strategies benchmark on two emulated nodes joined by a shaped link (docs/design.md section 10).

Two network namespaces are the "nodes", joined by one veth pair on link-local 169.254.77.0/24
(node 0: .1, node 1: .2). The veth is shaped with `tc`: tbf for bandwidth, plus netem for latency where
the kernel has it (it is reported, and skipped, where it does not). Ranks of a node run inside its
namespace (`ip netns exec`) with gloo bound to the veth (GLOO_SOCKET_IFNAME, MASTER_ADDR on node 0's
veth address): ranks in one namespace talk over local routing (the NVLink stand-in), ranks in
different namespaces over the shaped link (the InfiniBand stand-in). Namespaces and link are removed
when the run ends, however it ends (finally + SIGTERM/SIGINT handlers).

Link speed: an H100 node on 400 Gb/s InfiniBand has one 50 GB/s NIC per GPU for 989.4 TFLOP/s of dense
bf16 per GPU (docs/design.md section 13), i.e. 5.05e-5 bytes per FLOP. The emulated link gets the same
bytes-per-FLOP against this CPU's measured fp32 GEMM rate per rank, times the ranks of a node (they
share the one veth as 8 GPUs share 8 NICs), times a scale factor (1 = the H100/IB ratio; larger = a
relatively faster network). Latency is the InfiniBand small-message latency (~33 us) stretched by the
same compute ratio, capped (`--max-latency-ms`): uncapped it would be most of a second.

Reported: per link speed, MM-SP's speedup over ring-only and over Megatron CP+TP (time of the layout /
time of MM-SP), for attention alone and the training step, from one run of bench_strategies.py each.
Needs root; when namespaces are refused it prints a SKIPPED line and exits 0. Traffic goes only to
loopback and the 169.254.77.x addresses created here.

Deliberately not here: the benchmark itself (bench_strategies.py), a multi-host launcher.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

H100_FLOPS = 989.4e12  # dense bf16 tensor FLOP/s per GPU (docs/design.md section 13)
IB_BYTES_PER_S = 50e9  # 400 Gb/s NDR per GPU, one direction (docs/design.md section 13)
IB_LATENCY_S = 33e-6  # inter-node small-message send/recv (docs/design.md section 13, NVIDIA/nccl-tests#214)
SUBNET = "169.254.77"
_children: list = []  # rank processes of the current link speed, ended with the namespaces


def link_params(gemm_flops_per_rank: float, ranks_per_node: int, factor: float = 1.0,
                max_latency_s: float = 1e-3) -> dict:
    """tc figures for the inter-node veth: rate (bit/s), burst (bytes), latency (s).

    rate = ranks_per_node * gemm_flops_per_rank * (IB bytes per H100 FLOP) * factor. The latency is
    IB's scaled by (H100 FLOP/s / this rank's FLOP/s) / factor, at most `max_latency_s`.
    """
    if gemm_flops_per_rank <= 0 or ranks_per_node < 1 or factor <= 0:
        raise ValueError(f"need gemm_flops_per_rank > 0, ranks_per_node >= 1, factor > 0; got "
                         f"{gemm_flops_per_rank}, {ranks_per_node}, {factor}")
    bytes_per_flop = IB_BYTES_PER_S / H100_FLOPS
    rate_bytes = ranks_per_node * gemm_flops_per_rank * bytes_per_flop * factor
    slowdown = H100_FLOPS / gemm_flops_per_rank
    latency = min(IB_LATENCY_S * slowdown / factor, max_latency_s)
    # tbf needs a bucket of at least one MTU; ~10 ms of traffic keeps it smooth at low rates.
    burst = max(int(rate_bytes * 0.01), 16 * 1024)
    return {"rate_bit_s": int(rate_bytes * 8), "rate_mbit": rate_bytes * 8 / 1e6, "burst_bytes": burst,
            "latency_s": latency, "bytes_per_flop": bytes_per_flop, "compute_slowdown": slowdown,
            "factor": factor}


def measure_gemm_flops(threads: int, n: int = 768, seconds: float = 1.0) -> float:
    """fp32 GEMM FLOP/s of this CPU with `threads` torch threads (a rank's share of the cores)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            calls += 1
        return 2 * n ** 3 * calls / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)


def names(tag: str) -> dict:
    """Namespace and interface names, unique per run (interface names stay under 15 characters)."""
    return {"ns": [f"lvnode0_{tag}", f"lvnode1_{tag}"], "dev": [f"lvv0{tag}", f"lvv1{tag}"],
            "addr": [f"{SUBNET}.1", f"{SUBNET}.2"]}


def setup_commands(n: dict, link: dict, netem: bool = True) -> list[list[str]]:
    """The ip/tc commands that build the two nodes and shape both directions of the link."""
    ns, dev, addr = n["ns"], n["dev"], n["addr"]
    cmds = [["ip", "netns", "add", ns[0]], ["ip", "netns", "add", ns[1]],
            ["ip", "link", "add", dev[0], "type", "veth", "peer", "name", dev[1]]]
    for i in (0, 1):
        cmds += [["ip", "link", "set", dev[i], "netns", ns[i]],
                 ["ip", "-n", ns[i], "addr", "add", f"{addr[i]}/24", "dev", dev[i]],
                 ["ip", "-n", ns[i], "link", "set", dev[i], "up"],
                 ["ip", "-n", ns[i], "link", "set", "lo", "up"],
                 ["ip", "netns", "exec", ns[i], "tc", "qdisc", "add", "dev", dev[i], "root", "handle", "1:", "tbf",
                  "rate", f"{link['rate_bit_s']}bit", "burst", str(link["burst_bytes"]), "latency", "500ms"]]
        if netem:
            cmds.append(["ip", "netns", "exec", ns[i], "tc", "qdisc", "add", "dev", dev[i], "parent", "1:1",
                         "handle", "10:", "netem", "delay", f"{max(int(link['latency_s'] * 1e6), 1)}us"])
    return cmds


def rank_commands(n: dict, world: int, ranks_per_node: int, port: int, bench_args: list[str]) -> list[tuple]:
    """(argv, env) per rank: rank r runs in namespace r // ranks_per_node, gloo on that node's veth."""
    threads = max(1, (os.cpu_count() or 1) // world)
    out = []
    for rank in range(world):
        node = rank // ranks_per_node
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % ranks_per_node),
                   LOCAL_WORLD_SIZE=str(ranks_per_node), MASTER_ADDR=n["addr"][0], MASTER_PORT=str(port),
                   GLOO_SOCKET_IFNAME=n["dev"][node], OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
        argv = ["ip", "netns", "exec", n["ns"][node], sys.executable,
                os.path.join(REPO_ROOT, "benchmarks", "bench_strategies.py"), "--gpus-per-node", str(ranks_per_node),
                *bench_args]
        out.append((argv, env))
    return out


def teardown(n: dict) -> None:
    for ns in n["ns"]:  # deleting a namespace deletes the veth end inside it, and with it the pair
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def ratios(rows: list[dict]) -> dict:
    """{mode: {ring_only: x, megatron_cp_tp: x}} as time of the layout / time of MM-SP."""
    out = {}
    for r in rows:
        if r.get("case") in ("ring_only", "megatron_cp_tp") and r.get("ratio_vs_mmsp"):
            out.setdefault(r["config"]["mode"], {})[r["case"]] = r["ratio_vs_mmsp"]
    return out


def run_at(n, link, args, bench_args, tag) -> tuple[int, list[dict]]:
    """Build the link, run every rank, tear down; returns (exit code, rows of this run)."""
    import harness

    cmds = setup_commands(n, link, netem=True)
    netem_note = None
    for cmd in cmds:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            if "netem" in cmd:
                netem_note = f"latency not shaped: netem refused ({res.stderr.strip()})"
                continue
            raise PermissionError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    print(f"link {link['rate_mbit']:.1f} Mbit/s (factor {link['factor']:g}), latency "
          f"{link['latency_s'] * 1e6:.0f} us{' - ' + netem_note if netem_note else ''}", flush=True)
    port = 29000 + os.getpid() % 1000
    procs = [subprocess.Popen(argv, env=env, cwd=REPO_ROOT)
             for argv, env in rank_commands(n, args.world, args.ranks_per_node, port, bench_args + ["--tag", tag])]
    _children[:] = procs
    rc = 0
    try:
        for p in procs:
            rc = p.wait(timeout=args.timeout) or rc
    except subprocess.TimeoutExpired:
        rc = 124
        for p in procs:
            p.terminate()
    path = os.path.join(args.results_dir or harness.RESULTS_DIR, "bench_strategies.jsonl")
    rows = [r for r in harness.read_results(path) if r.get("config", {}).get("tag") == tag] \
        if os.path.exists(path) else []
    for r in rows:
        r["netem"] = netem_note is None
    return rc, rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factors", type=float, nargs="+", default=[4.0, 16.0, 64.0],
                   help="link speed multiples of the H100/IB bytes-per-FLOP ratio (1 = H100 on IB; on a "
                        "loaded 2-core CPU factor 1 is a few Mbit/s and a run takes many minutes)")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--gemm-gflops", type=float, default=None, help="per-rank fp32 GEMM rate (default: measure)")
    p.add_argument("--max-latency-ms", type=float, default=1.0)
    p.add_argument("--smoke", action="store_true", help="pass --smoke to the benchmark")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per link speed")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the link figures and commands, change nothing")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: more bench_strategies.py options")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.world % args.ranks_per_node or args.world // args.ranks_per_node != 2:
        raise SystemExit(f"--world {args.world} must be 2 x --ranks-per-node {args.ranks_per_node} (two nodes)")
    threads = max(1, (os.cpu_count() or 1) // args.world)
    gemm = args.gemm_gflops * 1e9 if args.gemm_gflops else measure_gemm_flops(threads)
    print(f"per-rank fp32 GEMM {gemm / 1e9:.1f} GFLOP/s ({threads} threads); H100/IB: "
          f"{IB_BYTES_PER_S / H100_FLOPS:.3g} bytes per FLOP", flush=True)
    bench_args = [a for a in args.bench_args if a != "--"]
    if args.smoke:
        bench_args.append("--smoke")
    if args.results_dir:
        bench_args += ["--results-dir", args.results_dir]
    run = uuid.uuid4().hex[:6]
    n = names(run)
    if args.dry_run:
        for f in args.factors:
            link = link_params(gemm, args.ranks_per_node, f, args.max_latency_ms / 1e3)
            print(json.dumps(link))
            for cmd in setup_commands(n, link):
                print(" ".join(cmd))
        return 0
    if os.geteuid() != 0:
        print("SKIPPED bench-net: needs root to create network namespaces")
        return 0

    def on_signal(signum, frame):
        for p in _children:
            if p.poll() is None:
                p.terminate()
        teardown(n)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    summary = []
    try:
        for f in args.factors:
            link = link_params(gemm, args.ranks_per_node, f, args.max_latency_ms / 1e3)
            try:
                rc, rows = run_at(n, link, args, bench_args, f"net-{run}-x{f:g}")
            except PermissionError as e:
                print(f"SKIPPED bench-net: network namespaces refused: {e}")
                return 0
            finally:
                teardown(n)
            if rc != 0:
                print(f"bench_strategies failed at factor {f:g} (exit {rc})")
                return rc
            summary.append((dict(link, netem=all(r.get("netem") for r in rows)), ratios(rows)))
    finally:
        teardown(n)
    print("\nMM-SP speedup on the emulated 2-node link (time of layout / time of MM-SP; > 1: MM-SP faster; "
          "lat '-': netem unavailable, latency not shaped)")
    print(f"{'factor':>6}  {'Mbit/s':>8}  {'lat us':>7}  {'attn ring':>9}  {'attn megatron':>13}  "
          f"{'train ring':>10}  {'train megatron':>14}")
    cell = lambda r, mode, case: f"{r.get(mode, {}).get(case, float('nan')):.2f}"
    for link, r in summary:
        lat = f"{link['latency_s'] * 1e6:.0f}" if link["netem"] else "-"
        print(f"{link['factor']:>6g}  {link['rate_mbit']:>8.1f}  {lat:>7}  "
              f"{cell(r, 'attention', 'ring_only'):>9}  {cell(r, 'attention', 'megatron_cp_tp'):>13}  "
              f"{cell(r, 'train', 'ring_only'):>10}  {cell(r, 'train', 'megatron_cp_tp'):>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
