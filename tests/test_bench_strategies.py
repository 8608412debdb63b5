"""The strategies benchmark's --smoke size (as CI runs it) and the emulated network's link arithmetic.

`bench_strategies.py --smoke` runs in a subprocess (it spawns its own 4 gloo ranks) into a temporary
results directory; the test checks the JSON lines' keys, positive times and that PyTorch's context-
parallel ring attention either ran and agreed with ours or was reported as skipped with its reason.
The netns test covers the scale computation and the commands only: it needs no root and creates
nothing. No timing is judged.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_strategies  # noqa: E402
import harness  # noqa: E402
import netns  # noqa: E402

ROW_KEYS = {"bench", "run_id", "case", "backend", "config", "median_ms", "min_ms", "max_ms", "tokens_per_s",
            "tokens_per_s_per_rank", "peak_alloc_mb", "peak_rss_mb", "comm", "intra_mb", "inter_mb", "cross_node_mb",
            "wait_ms", "compute_ms", "ratio_vs_mmsp"}
LAYOUTS = {"ring_only", "megatron_cp_tp", "ulysses_only", "mmsp_2d"}


def test_bench_strategies_smoke_subprocess(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_strategies.py"), "--smoke",
                           "--results-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = harness.read_results(str(tmp_path / "bench_strategies.jsonl"))
    assert rows and len({r["run_id"] for r in rows}) == 1
    for r in rows:
        assert ROW_KEYS <= set(r), sorted(ROW_KEYS - set(r))
        assert r["median_ms"] > 0 and r["min_ms"] > 0 and r["tokens_per_s_per_rank"] > 0
        assert r["config"]["world"] == 4 and r["config"]["seq_len"] == 512
        assert r["peak_alloc_mb"] is None or r["peak_alloc_mb"] >= 0
    for mode in ("attention", "train"):
        cases = {r["case"] for r in rows if r["config"]["mode"] == mode}
        assert LAYOUTS <= cases, (mode, cases)
        mmsp = [r for r in rows if r["config"]["mode"] == mode and r["case"] == "mmsp_2d"]
        assert mmsp[0]["ratio_vs_mmsp"] == pytest.approx(1.0)
    ring = next(r for r in rows if r["case"] == "ring_only" and r["config"]["mode"] == "attention")
    assert ring["inter_mb"] > 0 and ring["intra_mb"] == 0  # ring=4 over 2 "nodes" of 2 ranks
    ulysses = next(r for r in rows if r["case"] == "ulysses_only" and r["config"]["mode"] == "attention")
    assert ulysses["intra_mb"] > 0
    torch_rows = [r for r in rows if r["case"].startswith("torch_cp")]
    if torch_rows:
        for r in torch_rows:
            assert r["max_abs_diff_vs_ours"] < 1e-4 and r["ours_over_torch"] > 0
    else:
        assert "torch_cp_alltoall: could not run" in proc.stdout
    assert "speedups" in proc.stdout
    assert os.path.exists(tmp_path / "bench_strategies.png")


class _Groups:
    """The two things cross_node_fraction reads from ParallelGroups, from a layout alone."""

    def __init__(self, layout, rank):
        self.layout, self.rank = layout, rank

    def ranks(self, axis):
        if axis not in ("ring", "ulysses", "tp", "dp_sp", "sp"):
            raise KeyError(axis)
        return self.layout.group_ranks(axis, self.rank)


def test_cross_node_fraction_counts_physical_hops():
    from longvila_engine import ParallelLayout

    ring = ParallelLayout(ring=4, gpus_per_node=2)  # 0 -> 1 stays, 1 -> 2 crosses, 2 -> 3 stays, 3 -> 0 crosses
    assert [bench_strategies.cross_node_fraction(_Groups(ring, r), "ring", 2) for r in range(4)] == [0, 1, 0, 1]
    mmsp = ParallelLayout(ring=2, ulysses=2, gpus_per_node=2)  # Ulysses inside a node, every ring hop crosses
    assert all(bench_strategies.cross_node_fraction(_Groups(mmsp, r), "ring", 2) == 1 for r in range(4))
    assert all(bench_strategies.cross_node_fraction(_Groups(mmsp, r), "ulysses", 2) == 0 for r in range(4))
    uly = ParallelLayout(ulysses=4, gpus_per_node=4)  # labelled one node, physically two of 2 ranks
    assert bench_strategies.cross_node_fraction(_Groups(uly, 0), "ulysses", 2) == pytest.approx(2 / 3)
    assert bench_strategies.cross_node_fraction(_Groups(uly, 0), "check", 2) == pytest.approx(2 / 3)


def test_strategy_layouts_follow_design_section_3():
    plan = {name: (layout, why) for name, layout, why in bench_strategies.strategy_layouts(4, 2, 4, 2)}
    assert plan["ring_only"][0].as_tuple()[:4] == (1, 4, 1, 1)
    assert plan["megatron_cp_tp"][0].as_tuple()[:4] == (1, 2, 1, 2)
    assert plan["ulysses_only"][0].as_tuple()[:4] == (1, 1, 4, 1)
    assert plan["mmsp_2d"][0].as_tuple()[:4] == (1, 2, 2, 1)
    odd = {name: (layout, why) for name, layout, why in bench_strategies.strategy_layouts(4, 2, 6, 3)}
    assert odd["ulysses_only"][0] is None and "does not fit" in odd["ulysses_only"][1]


def test_netns_link_params_scale_with_compute_and_factor():
    gemm = 40e9
    link = netns.link_params(gemm, ranks_per_node=2, factor=1.0, max_latency_s=1e-3)
    # Same bytes per FLOP as 50 GB/s IB per 989.4 TFLOP/s H100, for 2 ranks' worth of compute.
    expected = 2 * gemm * 50e9 / 989.4e12
    assert link["rate_bit_s"] == pytest.approx(expected * 8, rel=1e-6)
    assert link["rate_mbit"] == pytest.approx(expected * 8 / 1e6, rel=1e-6)
    fast = netns.link_params(gemm, ranks_per_node=2, factor=4.0, max_latency_s=1.0)
    assert fast["rate_bit_s"] == pytest.approx(4 * link["rate_bit_s"], rel=1e-6)
    # Latency: IB's 33 us stretched by the compute ratio, divided by the factor, capped.
    assert fast["latency_s"] == pytest.approx(33e-6 * 989.4e12 / gemm / 4, rel=1e-6)
    assert link["latency_s"] == pytest.approx(1e-3)
    assert link["burst_bytes"] >= 16 * 1024
    with pytest.raises(ValueError):
        netns.link_params(0.0, 2)
    with pytest.raises(ValueError):
        netns.link_params(1e9, 2, factor=0)


def test_netns_commands_stay_on_the_link_local_subnet():
    n = netns.names("abc123")
    assert all(len(d) <= 15 for d in n["dev"])
    link = netns.link_params(40e9, 2)
    cmds = netns.setup_commands(n, link)
    text = [" ".join(c) for c in cmds]
    assert any("tbf" in t and f"rate {link['rate_bit_s']}bit" in t for t in text)
    assert sum("netem" in t for t in text) == 2 and not any("netem" in t for t in
                                                                   map(" ".join, netns.setup_commands(n, link, False)))
    addrs = [tok for c in cmds for tok in c if tok.count(".") == 3]
    assert addrs and all(a.startswith("169.254.77.") for a in addrs)
    ranks = netns.rank_commands(n, world=4, ranks_per_node=2, port=29123, bench_args=["--smoke"])
    assert [argv[3] for argv, _ in ranks] == [n["ns"][0], n["ns"][0], n["ns"][1], n["ns"][1]]
    for rank, (argv, env) in enumerate(ranks):
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == str(rank % 2)
        assert env["MASTER_ADDR"] == "169.254.77.1" and env["GLOO_SOCKET_IFNAME"] == n["dev"][rank // 2]
        assert argv[:3] == ["ip", "netns", "exec"] and "--gpus-per-node" in argv and "--smoke" in argv


def test_netns_dry_run_changes_nothing(capsys):
    assert netns.main(["--dry-run", "--gemm-gflops", "40", "--factors", "1", "2"]) == 0
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [x["factor"] for x in lines] == [1.0, 2.0]
    assert lines[1]["rate_bit_s"] == pytest.approx(2 * lines[0]["rate_bit_s"], rel=1e-6)


def test_memory_check_fit_and_prediction():
    import memory_check

    fit = memory_check.fit_line([1.0, 2.0, 4.0], [3.0, 5.0, 9.0])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(1.0)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_rel_residual"] == pytest.approx(0.0, abs=1e-12)
    cfg = bench_strategies.small_config()
    # costmodel's saved activations per token and layer, at 4 bytes an element (held against the dry run):
    # both norms' inputs and outputs, q/k/v (ring layout), attention out, o-proj input, gate/up/silu/product;
    # fp32 lse and 8 B of ids; plus CPU's composite RMSNorm rows (2 per layer) and fp32 logits and grad.
    elems = 4 * 256 + (8 + 2 * 4) * 32 + 2 * 8 * 32 + 4 * 688
    per_layer = elems * 4 + 4 * 8 + 8 + 2 * 256 * 4
    assert memory_check.predicted_bytes_per_token(cfg) == pytest.approx(2 * per_layer + 1024 * 8)
