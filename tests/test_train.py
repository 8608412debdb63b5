"""The trainer as a user runs it: `torchrun -m longvila_engine.train` subprocesses on gloo.

Independent launches run concurrently (each torchrun picks its own port with --standalone) to fit
the 2-core budget:
- A: tp=2 x ring=2, 4 steps, checkpoints at 2 and 4: finite, decreasing losses;
- B: A's layout resumed from A's step 2: losses and the final checkpoint bit-for-bit equal to A's;
- C: ring=2 x ulysses=2 (tp=1) resumed from A's step 2: A's losses to float32 tolerance;
- D: a rank raises mid-step, K: a rank is SIGKILLed mid-step (ranks started by hand, so every exit
  code is seen): all other ranks exit non-zero with the message, well within the group timeout;
- E: a rank crashes while a checkpoint is being saved: the previous checkpoint stays complete, and is
  what `latest` names.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from longvila_engine.checkpoint import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TIMEOUT_S = 20  # --timeout of every process group in these runs
COMMON = [
    "--model",
    "tiny",
    "--seq-len",
    "48",
    "--batch",
    "2",
    "--lr",
    "1e-2",
    "--seed",
    "3",
    "--attention-backend",
    "reference",
    "--no-progress",
    "--timeout",
    str(TIMEOUT_S),
]


def _env():
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _torchrun(args, log_path):
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "4", "-m", "longvila_engine.train", *COMMON, *args]
    out = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT), out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(args, tmp, world=4):
    """Start `world` trainer processes with the torchrun environment but no launcher supervising them."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            _env(),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        err = open(os.path.join(tmp, f"rank{rank}.log"), "w")
        cmd = [sys.executable, "-m", "longvila_engine.train", *COMMON, *args]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT), err))
    return procs


def _wait(proc, handle, limit):
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        handle.close()


def _wait_all(ranks, limit):
    """Poll every process; returns (exit codes, unix time each exit was seen), None for a killed straggler."""
    codes, seen = [None] * len(ranks), [None] * len(ranks)
    deadline = time.monotonic() + limit
    while any(c is None for c in codes) and time.monotonic() < deadline:
        for i, (proc, _) in enumerate(ranks):
            if codes[i] is None and proc.poll() is not None:
                codes[i], seen[i] = proc.returncode, time.time()
        time.sleep(0.2)
    for i, (proc, handle) in enumerate(ranks):
        if codes[i] is None:
            proc.kill()
            proc.wait()
        handle.close()
    return codes, seen


def _losses(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train"))
    d = {k: os.path.join(tmp, k) for k in "ABCDEK"}
    for path in d.values():
        os.makedirs(path)
    # Wave 1: A, D, K and E are independent.
    a = _torchrun(
        [
            "--tp",
            "2",
            "--ring",
            "2",
            "--steps",
            "4",
            "--save-every",
            "2",
            "--checkpoint-dir",
            f"{d['A']}/ck",
            "--log-json",
            f"{d['A']}/log.jsonl",
        ],
        f"{d['A']}/out.txt",
    )
    by_hand = {
        "D": _by_hand(
            [
                "--tp",
                "2",
                "--ulysses",
                "2",
                "--steps",
                "2",
                "--fail-at-step",
                "1",
                "--fail-rank",
                "1",
                "--fail-mode",
                "raise",
            ],
            d["D"],
        ),
        "K": _by_hand(
            ["--ring", "4", "--steps", "2", "--fail-at-step", "1", "--fail-rank", "2", "--fail-mode", "kill"],
            d["K"],
        ),
    }
    e = _torchrun(
        [
            "--ring",
            "4",
            "--steps",
            "2",
            "--save-every",
            "1",
            "--checkpoint-dir",
            f"{d['E']}/ck",
            "--fail-at-step",
            "2",
            "--fail-rank",
            "2",
            "--fail-mode",
            "save",
        ],
        f"{d['E']}/out.txt",
    )
    results = {"tmp": d}
    for key, ranks in by_hand.items():
        results[key], results[key + "_exit_time"] = _wait_all(ranks, 300)
    results["A"], results["E"] = _wait(*a, 300), _wait(*e, 300)
    # Wave 2: B and C resume from A's step 2.
    step2 = os.path.join(d["A"], "ck", "step_00000002")
    if os.path.exists(step2):
        os.makedirs(f"{d['B']}/ck")
        shutil.copytree(step2, f"{d['B']}/ck/step_00000002")
        b = _torchrun(
            [
                "--tp",
                "2",
                "--ring",
                "2",
                "--steps",
                "4",
                "--save-every",
                "2",
                "--checkpoint-dir",
                f"{d['B']}/ck",
                "--resume",
                "--log-json",
                f"{d['B']}/log.jsonl",
            ],
            f"{d['B']}/out.txt",
        )
        c = _torchrun(
            [
                "--ring",
                "2",
                "--ulysses",
                "2",
                "--steps",
                "4",
                "--resume",
                step2,
                "--log-json",
                f"{d['C']}/log.jsonl",
            ],
            f"{d['C']}/out.txt",
        )
        results["B"], results["C"] = _wait(*b, 300), _wait(*c, 300)
    return results


def _tail(path, n=3000):
    with open(path) as f:
        return f.read()[-n:]


def test_training_runs_and_loss_decreases(runs):
    d = runs["tmp"]
    assert runs["A"] == 0, _tail(f"{d['A']}/out.txt")
    log = _losses(f"{d['A']}/log.jsonl")
    losses = [r["loss"] for r in log]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in log)
    assert latest_checkpoint(f"{d['A']}/ck").endswith("step_00000004")


def _dense_state(path, tmp):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp, os.path.basename(os.path.dirname(os.path.dirname(path))) + "_state.pt")
    dcp_to_torch_save(path, out)
    return torch.load(out)


def test_resume_same_layout_is_bit_for_bit(runs):
    d = runs["tmp"]
    assert runs.get("B") == 0, _tail(f"{d['B']}/out.txt")
    a, b = _losses(f"{d['A']}/log.jsonl"), _losses(f"{d['B']}/log.jsonl")
    assert [r["step"] for r in b] == [3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in b] == [(r["loss"], r["grad_norm"]) for r in a[2:]]
    sa = _dense_state(f"{d['A']}/ck/step_00000004", d["A"])
    sb = _dense_state(f"{d['B']}/ck/step_00000004", d["B"])
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]
    # The checkpoint holds dense tensors, whatever the layout that wrote it.
    assert tuple(sa["model/embed.weight"].shape) == (256, 64)
    assert tuple(sa["optim/layers.0.mlp.down_proj.weight/exp_avg"].shape) == (64, 128)


def test_resume_on_another_layout_matches(runs):
    d = runs["tmp"]
    assert runs.get("C") == 0, _tail(f"{d['C']}/out.txt")
    a, c = _losses(f"{d['A']}/log.jsonl")[2:], _losses(f"{d['C']}/log.jsonl")
    assert [r["step"] for r in c] == [3, 4]
    # The first resumed step sees exactly the loaded weights; later ones carry float32 reordering.
    torch.testing.assert_close(c[0]["loss"], a[0]["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([r["loss"] for r in c], [r["loss"] for r in a], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key,failing,mode", [("D", 1, "raise"), ("K", 2, "kill")])
def test_failing_rank_stops_every_rank(runs, key, failing, mode):
    d = runs["tmp"]
    codes, exit_time = runs[key], runs[key + "_exit_time"]
    logs = [_tail(os.path.join(d[key], f"rank{r}.log"), 20000) for r in range(4)]
    assert all(c is not None and c != 0 for c in codes), (codes, logs)
    fired = re.search(rf"injecting fault mode={mode} at step 1 \(unix time ([0-9.]+)\)", logs[failing])
    assert fired, logs[failing]
    # Every rank is gone within the group timeout of the fault (plus slack for a loaded machine).
    assert max(exit_time) - float(fired.group(1)) < TIMEOUT_S + 30, (exit_time, fired.group(1))
    for rank, text in enumerate(logs):
        if mode == "kill" and rank == failing:
            assert codes[rank] == -9  # SIGKILL: no chance to say anything
            continue
        assert f"[longvila_engine.train rank {rank}] FAILED during step 1" in text, text


def test_crash_during_save_keeps_last_checkpoint(runs):
    d = runs["tmp"]
    assert runs["E"] not in (0, None), _tail(f"{d['E']}/out.txt")
    out = _tail(f"{d['E']}/out.txt", 50000)
    assert "FAILED during saving checkpoint 2" in out
    ck = f"{d['E']}/ck"
    assert latest_checkpoint(ck).endswith("step_00000001")
    assert not os.path.exists(f"{ck}/step_00000002")
    with open(f"{ck}/step_00000001/meta.json") as f:
        meta = json.load(f)
    assert meta["step"] == 1 and meta["layout"]["ring"] == 4
    state = _dense_state(f"{ck}/step_00000001", d["E"])
    assert int(state["trainer/step"]) == 1 and tuple(state["model/lm_head.weight"].shape) == (256, 64)
