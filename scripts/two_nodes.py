"""`make two-nodes`: a two-node torchrun launch on this machine, and the faults a cluster sees.

Each "node" is a network namespace of `benchmarks/netns.py` (link-local 169.254.77.1 and .2 on one veth
pair; nothing leaves the namespaces made here). Each runs, as on a real host,

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint 169.254.77.1:29400 \\
        --rdzv-id <run> --local-addr <this node's address> [--max-restarts N] -m longvila_engine.train ...

with gloo bound to the node's veth (GLOO_SOCKET_IFNAME). The trainer runs ring=2 x ulysses=2, so the
ring crosses the link. Scenarios:
- train: 6 steps, checkpoints every 2: both launchers exit 0 and step 6 is published;
- cut:   a long run; after step 2 node 1's veth goes down (`ip link set ... down`): every one of the 4
         ranks must exit within the group timeout (--timeout) plus 30 s;
- kill:  `--max-restarts 1`, global rank 3 (node 1) SIGKILLed at step 3: both nodes restart, resume
         from step 2 and finish; steps 3..6 equal the train scenario's losses.
Prints a summary and writes it as JSON (`--json`). Needs root; where namespaces are refused it prints
a SKIPPED line with the reason (and records it in the JSON) and exits 0.

Deliberately not here: a supervisor (torchrun's elastic agent restarts the workers), traffic shaping
(`benchmarks/netns.py` measures bandwidth; here the link is only cut).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import netns  # noqa: E402 - the namespace helpers live with the network benchmark

RDZV_PORT = 29400
LINK = {"rate_bit_s": 10_000_000_000, "burst_bytes": 1 << 20}  # unshaped in practice: this is no benchmark
TRAIN = ["--model", "tiny", "--seq-len", "32", "--batch", "2", "--lr", "1e-2", "--seed", "5",
         "--ring", "2", "--ulysses", "2", "--attention-backend", "reference", "--no-progress"]  # fmt: skip
_launched: list = []


def make_nodes(tag: str) -> dict:
    """Two namespaces joined by a veth pair (netns.py's names and commands); PermissionError if refused."""
    n = netns.names(tag)
    for cmd in netns.setup_commands(n, LINK, netem=False):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            netns.teardown(n)
            raise PermissionError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return n


def node_command(n: dict, node: int, run_id: str, train_args: list[str], max_restarts: int = 0) -> list[str]:
    """The command line of node `node`: torchrun with the c10d rendezvous on node 0's address."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [
        "ip", "netns", "exec", n["ns"][node], torchrun, "--nnodes", "2", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{n['addr'][0]}:{RDZV_PORT}", "--rdzv-id", run_id,
        "--local-addr", n["addr"][node], "--max-restarts", str(max_restarts),
        # Node 0 hosts the rendezvous store. torchrun guesses that by matching the endpoint against the
        # host's name and addresses, which a bare namespace cannot resolve: say it.
        "--rdzv-conf", f"is_host={1 if node == 0 else 0},join_timeout=120",
        "-m", "longvila_engine.train", *TRAIN, *train_args,
    ]  # fmt: skip


def launch(n: dict, run_id: str, train_args: list[str], out_dir: str, max_restarts: int = 0) -> list:
    """Start both nodes; returns [(Popen, log file)]."""
    procs = []
    for node in (0, 1):
        env = dict(os.environ, GLOO_SOCKET_IFNAME=n["dev"][node], OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
        log = open(os.path.join(out_dir, f"node{node}.log"), "w")
        cmd = node_command(n, node, run_id, train_args, max_restarts)
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        procs.append((proc, log))
    _launched[:] = procs
    return procs


def stop(procs) -> None:
    for proc, log in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.close()


def wait_all(procs, limit_s: float) -> list:
    """Exit codes of both launchers (None: still running at the limit, then killed)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs):
        time.sleep(0.3)
    codes = [p.poll() for p, _ in procs]
    stop(procs)
    return codes


def workers_of(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (torchrun's worker processes)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_step(path: str, step: int, procs, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in records(path)):
            return True
        if all(p.poll() is not None for p, _ in procs):
            return False
        time.sleep(0.2)
    return False


def _tail(path: str, n: int = 2500) -> str:
    with open(path) as f:
        return f.read()[-n:]


def scenario_train(n, work, args) -> dict:
    ck, log = os.path.join(work, "ck"), os.path.join(work, "log.jsonl")
    procs = launch(n, f"train-{uuid.uuid4().hex[:6]}", ["--steps", "6", "--save-every", "2", "--checkpoint-dir", ck,
                   "--log-json", log, "--timeout", str(args.timeout)], work)  # fmt: skip
    codes = wait_all(procs, args.limit)
    steps = records(log)
    return {"exit_codes": codes, "steps": [r["step"] for r in steps], "losses": [r["loss"] for r in steps],
            "checkpoint_6": os.path.exists(os.path.join(ck, "step_00000006", "meta.json")),
            "ok": codes == [0, 0] and len(steps) == 6 and os.path.exists(os.path.join(ck, "step_00000006")),
            "tail": [_tail(os.path.join(work, f"node{i}.log")) for i in (0, 1)]}  # fmt: skip


def scenario_cut(n, work, args) -> dict:
    log = os.path.join(work, "log.jsonl")
    procs = launch(n, f"cut-{uuid.uuid4().hex[:6]}", ["--steps", "100000", "--log-json", log,
                   "--timeout", str(args.timeout)], work)  # fmt: skip
    if not wait_for_step(log, 2, procs, args.limit):
        codes = wait_all(procs, 1)
        return {"ok": False, "error": "never reached step 2", "exit_codes": codes,
                "tail": [_tail(os.path.join(work, f"node{i}.log")) for i in (0, 1)]}  # fmt: skip
    workers = [w for p, _ in procs for w in sorted(workers_of(p.pid))]
    cut_at = time.monotonic()
    subprocess.run(["ip", "-n", n["ns"][1], "link", "set", n["dev"][1], "down"], check=True, timeout=30)
    gone = {}
    deadline = cut_at + args.timeout + 30 + 30  # watch a little past the bound, to report how far past
    while time.monotonic() < deadline and len(gone) < len(workers):
        for w in workers:
            if w not in gone and not alive(w):
                gone[w] = time.monotonic() - cut_at
        time.sleep(0.2)
    codes = wait_all(procs, 5)  # an agent may still be retrying the unreachable rendezvous store: ended here
    last = max(gone.values()) if len(gone) == len(workers) else None
    text = [_tail(os.path.join(work, f"node{i}.log"), 200000) for i in (0, 1)]
    failed_lines = sum(t.count("FAILED during step") for t in text)
    return {"workers": len(workers), "exited_after_s": sorted(gone.values()), "last_exit_s": last,
            "bound_s": args.timeout + 30, "failed_log_lines": failed_lines, "launcher_codes": codes,
            "ok": len(workers) == 4 and last is not None and last <= args.timeout + 30,
            "tail": [t[-2500:] for t in text]}  # fmt: skip


def scenario_kill(n, work, args, reference: list | None) -> dict:
    ck, log = os.path.join(work, "ck"), os.path.join(work, "log.jsonl")
    procs = launch(n, f"kill-{uuid.uuid4().hex[:6]}", ["--steps", "6", "--save-every", "2", "--checkpoint-dir", ck,
                   "--log-json", log, "--timeout", str(args.timeout), "--fail-at-step", "3", "--fail-rank", "3",
                   "--fail-mode", "kill"], work, max_restarts=1)  # fmt: skip
    codes = wait_all(procs, args.limit)
    rec = records(log)
    second = [r for r in rec if r.get("attempt") == 1]
    text = [_tail(os.path.join(work, f"node{i}.log"), 200000) for i in (0, 1)]
    out = {"exit_codes": codes, "second_attempt_steps": [r["step"] for r in second],
           "second_attempt_losses": [r["loss"] for r in second], "fault_on_node1": "injecting fault" in text[1],
           "resumed": "at step 2" in text[0], "attempt0_steps": [r["step"] for r in rec if r.get("attempt") == 0],
           "checkpoint_6": os.path.exists(os.path.join(ck, "step_00000006", "meta.json"))}  # fmt: skip
    if reference and len(reference) >= 6 and second:
        ref = {i + 1: loss for i, loss in enumerate(reference)}
        out["max_rel_diff"] = max(abs(r["loss"] - ref[r["step"]]) / abs(ref[r["step"]]) for r in second)
    out["ok"] = (codes == [0, 0] and out["second_attempt_steps"] == [3, 4, 5, 6] and out["fault_on_node1"]
                 and out["resumed"] and out["checkpoint_6"] and out.get("max_rel_diff", 0.0) < 1e-5)  # fmt: skip
    out["tail"] = [t[-2500:] for t in text]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", nargs="+", default=["train", "cut", "kill"], choices=["train", "cut", "kill"])
    p.add_argument("--timeout", type=float, default=20.0, help="trainer --timeout (process-group timeout), s")
    p.add_argument("--limit", type=float, default=240.0, help="hard limit per scenario, s")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--work-dir", default=None, help="logs and checkpoints (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.timeout > 0 or not args.limit > 0:
        raise ValueError(f"--timeout and --limit must be > 0 s, got {args.timeout} and {args.limit}")
    summary: dict = {"scenarios": {}}

    def finish(code: int) -> int:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        return code

    if os.geteuid() != 0:
        summary["skipped"] = "needs root to create network namespaces"
        print(f"SKIPPED two-nodes: {summary['skipped']}")
        return finish(0)
    n = netns.names(uuid.uuid4().hex[:6])
    work = args.work_dir or tempfile.mkdtemp(prefix="two_nodes_")

    def on_signal(signum, frame):
        stop(_launched)
        netns.teardown(n)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reference = None
    try:
        for name in args.scenario:
            try:
                n = make_nodes(uuid.uuid4().hex[:6])
            except (PermissionError, OSError) as e:
                summary["skipped"] = f"network namespaces refused: {e}"
                print(f"SKIPPED two-nodes: {summary['skipped']}")
                return finish(0)
            sub = os.path.join(work, name)
            os.makedirs(sub, exist_ok=True)
            t0 = time.monotonic()
            try:
                if name == "train":
                    res = scenario_train(n, sub, args)
                    reference = res["losses"]
                elif name == "cut":
                    res = scenario_cut(n, sub, args)
                else:
                    res = scenario_kill(n, sub, args, reference)
            finally:
                stop(_launched)
                netns.teardown(n)
            res["wall_s"] = round(time.monotonic() - t0, 1)
            summary["scenarios"][name] = res
            shown = {k: v for k, v in res.items() if k != "tail"}
            print(f"{name}: {'OK' if res['ok'] else 'FAILED'} {json.dumps(shown)}", flush=True)
            if not res["ok"]:
                print("\n".join(res.get("tail", [])), flush=True)
    finally:
        stop(_launched)
        netns.teardown(n)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return finish(0 if all(r["ok"] for r in summary["scenarios"].values()) else 1)


if __name__ == "__main__":
    sys.exit(main())
