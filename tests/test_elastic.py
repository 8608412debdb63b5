"""Restart, preemption and data position under torchrun's elastic agent (issue 15), single node, no root.

Three 2-rank launches run concurrently (dp=2, so each rank reads its own samples), then one more:
- R: uninterrupted, 6 steps: the reference losses;
- K: static rendezvous, `--max-restarts 1`, rank 1 SIGKILLed at step 3 (first attempt only): torchrun
  restarts both workers, they resume by themselves from step 2 (`--resume auto`) and finish; steps
  3..6 of the second attempt equal R's losses;
- T: c10d (`--standalone`) rendezvous, rank 1 gets SIGTERM during step 3: every rank stops after step 3,
  the checkpoint step_3 exists, exit code 0;
- T2: T's command again: continues at step 4 with R's losses for 4..6.
Plus in-process checks of the pieces (store prefix, RNG round trip, --resume values, error messages).
"""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from longvila_engine import elastic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
LIMIT_S = 240  # hard limit on every launch
COMMON = [
    "--model", "tiny", "--seq-len", "32", "--batch", "2", "--steps", "6", "--lr", "1e-2", "--seed", "5",
    "--attention-backend", "reference", "--no-progress", "--timeout", "30",
]  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(rdzv, args, log_path):
    cmd = [TORCHRUN, *rdzv, "--nproc-per-node", "2", "-m", "longvila_engine.train", *COMMON, *args]
    out = open(log_path, "w")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, out


def _finish(proc, out):
    """Exit code, or None after killing the whole process group at the limit."""
    try:
        return proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    finally:
        out.close()


def _records(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("elastic"))
    d = {k: os.path.join(tmp, k) for k in ("R", "K", "T")}
    for path in d.values():
        os.makedirs(path)
    static = ["--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    started = {
        "R": _launch(
            ["--standalone"],
            ["--checkpoint-dir", f"{d['R']}/ck", "--save-every", "2", "--log-json", f"{d['R']}/log.jsonl"],
            f"{d['R']}/out.txt",
        ),
        "K": _launch(
            [*static, "--max-restarts", "1"],
            ["--checkpoint-dir", f"{d['K']}/ck", "--save-every", "2", "--log-json", f"{d['K']}/log.jsonl",
             "--fail-at-step", "3", "--fail-rank", "1", "--fail-mode", "kill"],
            f"{d['K']}/out.txt",
        ),  # fmt: skip
    }
    term = ["--checkpoint-dir", f"{d['T']}/ck", "--log-json", f"{d['T']}/log.jsonl",
            "--fail-at-step", "3", "--fail-rank", "1", "--fail-mode", "term", "--preempt-grace", "60"]  # fmt: skip
    started["T"] = _launch(["--standalone"], term, f"{d['T']}/out.txt")
    results = {"dir": d}
    for key, (proc, out) in started.items():
        results[key] = _finish(proc, out)
    if results["T"] == 0:
        results["T_steps"] = [r["step"] for r in _records(f"{d['T']}/log.jsonl")]
        results["T2"] = _finish(*_launch(["--standalone"], term, f"{d['T']}/out2.txt"))
    return results


def _text(path):
    with open(path) as f:
        return f.read()


def _losses(records, steps):
    by_step = {r["step"]: r["loss"] for r in records}
    return [by_step[s] for s in steps]


def test_killed_rank_restarts_and_matches_uninterrupted_run(runs):
    d = runs["dir"]
    assert runs["R"] == 0, _text(f"{d['R']}/out.txt")[-3000:]
    out = _text(f"{d['K']}/out.txt")
    assert runs["K"] == 0, out[-5000:]
    assert "injecting fault mode=kill at step 3" in out
    # The survivor names the step and the collective it was in when the peer died.
    assert "[longvila_engine.train rank 0] FAILED during step 3, in collective" in out, out[-5000:]
    assert "step_00000002 at step 2 (epoch 0, sample 4, RNG restored; torchrun attempt 1)" in out
    ref, log = _records(f"{d['R']}/log.jsonl"), _records(f"{d['K']}/log.jsonl")
    second = [r for r in log if r["attempt"] == 1]
    assert [r["step"] for r in second] == [3, 4, 5, 6]
    assert [r["step"] for r in log if r["attempt"] == 0] == [1, 2]
    torch.testing.assert_close(
        [r["loss"] for r in second], _losses(ref, [3, 4, 5, 6]), rtol=1e-6, atol=1e-7
    )
    assert os.path.isdir(f"{d['K']}/ck/step_00000006")


def test_sigterm_saves_exits_zero_and_resumes(runs):
    d = runs["dir"]
    out = _text(f"{d['T']}/out.txt")
    assert runs["T"] == 0, out[-5000:]
    assert "SIGTERM received: stopping at the next step boundary" in out
    assert "preempted by SIGTERM: every rank stopped after step 3; checkpoint step 3 saved" in out
    assert runs["T_steps"] == [1, 2, 3]
    with open(f"{d['T']}/ck/step_00000003/meta.json") as f:
        meta = json.load(f)
    assert meta["step"] == 3 and meta["data"]["sample_index"] == 6 and meta["data"]["epoch"] == 0
    out2 = _text(f"{d['T']}/out2.txt")
    assert runs["T2"] == 0, out2[-5000:]
    assert "step_00000003 at step 3" in out2
    log = _records(f"{d['T']}/log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    ref = _records(f"{d['R']}/log.jsonl")
    torch.testing.assert_close([r["loss"] for r in log], _losses(ref, range(1, 7)), rtol=1e-6, atol=1e-7)


# --- the pieces, in process ----------------------------------------------------------------------------
def test_default_group_uses_a_per_attempt_prefix_of_the_agent_store(monkeypatch):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=20)
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timeout)
    env = dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agent.port),
               TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="3")  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    agent.set("attempt2/stale", "from the dead attempt")
    try:
        elastic.init_default_group("gloo", timeout)
        x = torch.ones(2)
        dist.all_reduce(x)
        dist.barrier()
        assert torch.equal(x, torch.ones(2))
    finally:
        dist.destroy_process_group()
    # Every key this attempt wrote lives under attempt3/; the dead attempt's key was never read.
    keys = agent.list_keys()
    ours = [k for k in keys if k != "attempt2/stale"]
    assert ours and all(k.startswith("attempt3/") for k in ours), keys


def test_data_position_round_trip_restores_the_rng():
    torch.manual_seed(11)
    torch.rand(3)
    position = elastic.DataPosition.capture(sample_index=10, samples_per_epoch=4)
    expected = torch.rand(5)
    assert position.epoch == 2 and position.rng_of_rank == [0]
    meta = json.loads(json.dumps(position.to_meta()))  # through meta.json
    torch.manual_seed(999)
    restored = elastic.DataPosition.from_meta(meta)
    assert restored.restore_rng(rank=0)
    assert torch.equal(torch.rand(5), expected)
    assert restored.sample_index == 10
    assert elastic.DataPosition.from_meta({"step": 3}) is None  # an older checkpoint: no position


def test_resume_values(tmp_path):
    assert elastic.resume_path("none", str(tmp_path)) == (None, [])
    assert elastic.resume_path("auto", None) == (None, [])
    assert elastic.resume_path("auto", str(tmp_path / "empty"))[0] is None
    assert elastic.resume_path(str(tmp_path / "step_00000002"), None)[0].endswith("step_00000002")
    with pytest.raises(ValueError, match="--resume latest needs --checkpoint-dir"):
        elastic.resume_path("latest", None)


def test_bad_arguments_name_the_fix():
    from longvila_engine.train import parse_args

    assert parse_args([]).resume == "auto" and parse_args([]).preempt_grace == 30.0
    with pytest.raises(ValueError, match="--preempt-grace must be > 0 seconds, got 0.0"):
        parse_args(["--preempt-grace", "0"])
    with pytest.raises(ValueError, match="preemption grace must be > 0"):
        elastic.Preemption(grace_s=-1)


def test_failed_collective_names_the_innermost_collective():
    def all_reduce():
        raise RuntimeError("Connection reset by peer")

    try:
        all_reduce()
    except RuntimeError as exc:
        name = elastic.failed_collective(exc.__traceback__)
    assert name.startswith("all_reduce (") and "test_elastic.py" in name
    try:
        raise ValueError("not a collective")
    except ValueError as exc:
        assert elastic.failed_collective(exc.__traceback__) is None


_WATCHDOG = """
import os, signal, sys, time
from longvila_engine import elastic
p = elastic.Preemption(grace_s=1.0, describe=lambda: "[probe]").install()
if sys.argv[1] == "armed":
    p.arm()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(float(sys.argv[2]))  # a rank stuck in a collective: never reaches a step boundary
print("still here", flush=True)
"""


@pytest.mark.parametrize("mode,expect", [("unarmed", "outside the training loop"), ("armed", "grace of 1 s expired")])
def test_sigterm_never_leaves_a_rank_behind(mode, expect):
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", _WATCHDOG, mode, "30"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 143, res.stderr
    assert expect in res.stderr and "still here" not in res.stdout
    assert time.monotonic() - start < 20


def test_batches_follow_the_sample_index_not_the_step():
    from longvila_engine.train import SyntheticTokens, global_batch

    data = SyntheticTokens(vocab_size=64, seq_len=8, seed=2)
    # A resume at sample 6 reads samples 6.. whatever the batch size is now.
    assert torch.equal(global_batch(data, 6, 3, None), torch.stack([data.sample(i) for i in (6, 7, 8)]))
    assert elastic.DataPosition.epoch_of(25, 10) == 2 and elastic.DataPosition.epoch_of(25, None) == 0
