"""The shared benchmark harness (benchmarks/harness.py) and the kernel benchmark's --smoke size.

Checks the statistics, the timing loop, the memory probe, the results-file lines and the table
helper directly, then runs `benchmarks/bench_kernels.py --smoke` as CI does (in a subprocess, into a
temporary results directory) and checks the JSON lines it writes. It does not judge any timing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import harness  # noqa: E402

ROW_KEYS = {"bench", "run_id", "date", "device", "torch", "triton", "git_sha", "case", "backend", "config",
            "median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "repeats", "flops", "gflops_per_s", "tokens",
            "tokens_per_s", "peak_alloc_mb", "peak_rss_mb"}


def test_median_odd_even_and_empty():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert harness.median([7.0]) == 7.0
    with pytest.raises(ValueError):
        harness.median([])


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_quantile_matches_numpy(q):
    xs = [5.0, 1.0, 9.0, 2.5, 7.0, 3.0]
    assert harness.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))
    with pytest.raises(ValueError):
        harness.quantile(xs, 1.5)


def test_timing_summary():
    t = harness.Timing([0.004, 0.001, 0.002, 0.003])
    s = t.summary_ms()
    assert s["median_ms"] == pytest.approx(2.5)
    assert (s["min_ms"], s["max_ms"], s["repeats"]) == (pytest.approx(1.0), pytest.approx(4.0), 4)
    assert s["q1_ms"] <= s["median_ms"] <= s["q3_ms"]


def test_time_fn_counts_calls_and_respects_budget():
    calls = []
    t = harness.time_fn(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times) == 5 and all(x >= 0 for x in t.times)
    calls.clear()
    t = harness.time_fn(lambda: calls.append(1), warmup=0, repeats=50, min_repeats=3, budget_s=0.0)
    assert len(t.times) == 3  # budget spent at once: stops at min_repeats
    with pytest.raises(ValueError):
        harness.time_fn(lambda: None, repeats=0)


def test_measure_memory_sees_a_large_cpu_tensor():
    mem, out = harness.measure_memory(lambda: torch.ones(4 * 2 ** 20))  # 16 MiB, pages touched
    assert out.numel() == 4 * 2 ** 20
    assert mem["peak_rss_mb"] is not None and mem["peak_rss_mb"] >= 8
    if mem["peak_alloc_mb"] is not None:  # profiler available
        assert 15.9 <= mem["peak_alloc_mb"] < 64


def test_measure_writes_a_results_line(tmp_path):
    results = harness.ResultsFile("unit", results_dir=str(tmp_path))
    m = harness.measure(lambda: torch.randn(64, 64) @ torch.randn(64, 64), case="mm", backend="torch",
                        config={"n": 64}, flops=2 * 64 ** 3, tokens=64, repeats=3, results=results)
    rows = harness.read_results(results.path, run_id=results.run_id)
    assert len(rows) == 1 and rows[0] == json.loads(json.dumps(m.record, default=str))
    assert ROW_KEYS <= set(rows[0])
    assert rows[0]["gflops_per_s"] == pytest.approx(2 * 64 ** 3 / (rows[0]["median_ms"] / 1e3) / 1e9)


def test_format_table_aligns_and_fills_missing():
    text = harness.format_table([{"a": 1.23456, "b": {"c": "x"}}, {"a": None}],
                                [("A", "a", ".2f"), ("C", "b.c", "")])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "1.23" in lines[2] and lines[3].split() == ["-", "-"]


def test_bench_kernels_smoke_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_kernels.py"), "--smoke",
                           "--results-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cpu fwd+bwd / SDPA at S=4096 fp32:" in proc.stdout
    assert "fused resume / SDPA-then-merge:" in proc.stdout
    rows = harness.read_results(str(tmp_path / "bench_kernels.jsonl"))
    measured = [r for r in rows if r["case"] != "summary"]
    assert measured and len({r["run_id"] for r in rows}) == 1
    for r in measured:
        assert ROW_KEYS <= set(r), sorted(ROW_KEYS - set(r))
        assert r["median_ms"] > 0 and r["config"]["size"] == "smoke"
    assert {r["backend"] for r in measured} >= {"sdpa", "reference"}
    assert {r["case"] for r in measured} == {"fwd", "fwd_bwd", "resume"}
    assert {r["config"]["dtype"] for r in measured} == {"fp32", "bf16"}
    summary = [r for r in rows if r["case"] == "summary"]
    assert len(summary) == 1 and set(summary[0]["targets"]) == {"fwd_bwd", "resume"}
    assert os.path.exists(tmp_path / "bench_kernels_smoke.png")


def test_results_dir_follows_the_environment(tmp_path):
    """LONGVILA_RESULTS_DIR (smoke runs) keeps results files out of the tracked benchmarks/results."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import harness; "
            "r = harness.ResultsFile('envcheck'); r.append({'x': 1}); print(r.path)")
    env = dict(os.environ, LONGVILA_RESULTS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(tmp_path / "envcheck.jsonl")
    assert [json.loads(line)["x"] for line in open(tmp_path / "envcheck.jsonl")] == [1]
    assert not os.path.exists(os.path.join(REPO, "benchmarks", "results", "envcheck.jsonl"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_cuda_event_times_refuses_without_a_gpu():
    calls = []
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        harness.cuda_event_times(lambda: calls.append(1), repeats=2)
    assert calls == []  # refused before running anything
