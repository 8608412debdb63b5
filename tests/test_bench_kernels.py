"""`benchmarks/bench_kernels.py`'s issue-13 options: the plan of `--preset issue13` (non-causal rows, both
thread counts, S and reference limits), the per-cell target summary on hand-made rows, and a `--smoke
--causal both --threads 1` run in a subprocess (as CI runs the script) whose rows must record the mask
and the thread count truthfully and carry a ratio to torch. No timing is judged."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_kernels  # noqa: E402
import harness  # noqa: E402

from longvila_engine.ops.flops import attention_flops  # noqa: E402

CPU_OK = {"forward": None, "backward": None, "merge": None}


def test_issue13_preset_plans_the_whole_matrix():
    todo = bench_kernels.plan("issue13")
    fwd = [(case, c) for case, c in todo if case in ("fwd", "fwd_bwd")]
    assert {c["threads"] for _, c in todo} == {1, 2}
    assert {c["causal"] for _, c in fwd} == {True, False}
    assert {c["dtype"] for _, c in todo} == {"fp32", "bf16"}
    assert {c["head_dim"] for _, c in todo} == {64, 128}
    assert {c["seq_len"] for _, c in fwd} == {1024, 4096, 16384}
    # every (case, dtype, D, causal, threads) cell at every S, once
    cells = {(case, c["dtype"], c["head_dim"], c["causal"], c["threads"], c["seq_len"]) for case, c in fwd}
    assert len(cells) == len(fwd) == 2 * 2 * 2 * 2 * 2 * 3
    resume = [c for case, c in todo if case == "resume"]
    assert {c["seq_len"] for c in resume} == {4096} and len(resume) == 2 * 2 * 2
    assert not any(c["causal"] for c in resume)  # its measured block is fully visible
    p = bench_kernels.SIZES["issue13"]
    assert (p["warmup"], p["repeats"], p["min_repeats"]) == (1, 5, 3)
    for case, c in todo:
        names = bench_kernels.backends_for(case, c, CPU_OK, p["reference_max"])
        assert ("reference" in names) == (c["seq_len"] <= 2048), (case, c)
    # the thread count is the outer loop: one whole pass per count
    first_two = [i for i, (_, c) in enumerate(todo) if c["threads"] == 2][0]
    assert all(c["threads"] == 1 for _, c in todo[:first_two])


def test_plan_defaults_and_overrides():
    smoke = bench_kernels.plan("smoke", threads=[3])
    assert all(c["causal"] for case, c in smoke if case != "resume")  # smoke stays causal by default
    assert {c["threads"] for _, c in smoke} == {3}
    full = bench_kernels.plan("full", threads=[2])
    assert {c["causal"] for case, c in full if case == "fwd_bwd"} == {True, False}
    only = bench_kernels.plan("issue13", causal="noncausal", threads=[2], dtypes=["fp32"])
    assert {c["causal"] for case, c in only if case != "resume"} == {False}
    assert {c["threads"] for _, c in only} == {2}


def _row(case, S, ratio, causal=True, threads=2, dtype="fp32", D=64, backend="cpu"):
    return {"case": case, "backend": backend, "ratio_vs_sdpa": ratio,
            "config": {"seq_len": S, "dtype": dtype, "head_dim": D, "causal": causal, "threads": threads}}


def test_target_cells_take_the_worst_ratio_over_s():
    todo = [(case, {"seq_len": S, "dtype": "fp32", "head_dim": 64, "causal": cz, "threads": 2})
            for case in ("fwd", "fwd_bwd") for cz in (True, False) for S in (1024, 4096)]
    rows = [_row("fwd", 1024, 0.70), _row("fwd", 4096, 0.85),                  # worst 0.85: not met
            _row("fwd_bwd", 1024, 0.60), _row("fwd_bwd", 4096, 0.79),          # met
            _row("fwd", 1024, 0.50, causal=False), _row("fwd", 4096, 0.80, causal=False),  # met at 0.8
            _row("fwd", 4096, 0.1, causal=False, backend="reference")]        # not the cpu backend
    out = bench_kernels.target_cells(todo, rows, CPU_OK)
    by = {(c["case"], c["causal"]): c for c in out["cells"]}
    assert len(by) == 4
    assert by[("fwd", True)]["worst_ratio"] == 0.85 and by[("fwd", True)]["worst_seq_len"] == 4096
    assert by[("fwd", True)]["met"] is False
    assert by[("fwd_bwd", True)]["met"] is True
    assert by[("fwd", False)]["worst_ratio"] == 0.80 and by[("fwd", False)]["met"] is True
    assert by[("fwd_bwd", False)]["met"] is None  # no cpu row: not measured, not "not met"
    assert (out["met"], out["measured"]) == (2, 3)
    assert out["lines"][-1] == "cells meeting cpu/SDPA <= 0.8 at every S: 2 of 4 (1 not measured)"


def test_smoke_noncausal_single_thread_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_kernels.py"), "--smoke",
                           "--causal", "both", "--threads", "1", "--dtypes", "fp32", "--no-plot",
                           "--results-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = harness.read_results(str(tmp_path / "bench_kernels.jsonl"))
    measured = [r for r in rows if r["case"] != "summary"]
    assert measured and {r["config"]["threads"] for r in measured} == {1}
    for case in ("fwd", "fwd_bwd"):
        assert {r["config"]["causal"] for r in measured if r["case"] == case} == {True, False}
    noncausal = [r for r in measured if r["case"] in ("fwd", "fwd_bwd") and not r["config"]["causal"]]
    for r in noncausal:
        c = r["config"]
        assert r["flops"] == attention_flops(c["seq_len"], c["seq_len"], c["num_heads"], c["head_dim"],
                                             causal=False, batch=c["batch"], mode=r["case"])
        if r["backend"] != "sdpa":  # compared with torch's non-causal op: same output, and a ratio
            assert r["ratio_vs_sdpa"] > 0 and r["max_abs_diff_vs_sdpa"] < 1e-4, r
    summary = [r for r in rows if r["case"] == "summary"]
    assert len(summary) == 1 and set(summary[0]["targets"]) >= {"fwd_bwd", "resume"}
    cells = summary[0]["target_cells"]
    assert {(c["case"], c["causal"], c["threads"]) for c in cells} == {
        (case, cz, 1) for case in ("fwd", "fwd_bwd") for cz in (True, False)}
    assert "fwd / SDPA fp32 hd64 noncausal 1t:" in proc.stdout
    assert "cells meeting cpu/SDPA <= 0.8 at every S:" in proc.stdout
