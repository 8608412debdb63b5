"""`benchmarks/bench_mmsp_sharding.py --smoke` runs as CI runs it (2 spawned gloo ranks, a temporary
results directory) and writes one JSON line per (variant, rank). No timing is judged."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_writes_one_line_per_variant_and_rank(tmp_path):
    script = os.path.join(REPO, "benchmarks", "bench_mmsp_sharding.py")
    proc = subprocess.run([sys.executable, script, "--smoke", "--results-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "slowest vision rank" in proc.stdout
    with open(tmp_path / "bench_mmsp_sharding.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert sorted((r["case"], r["rank"]) for r in rows) == [("balanced", 0), ("balanced", 1), ("by_position", 0),
                                                             ("by_position", 1)]
    for split in ("balanced", "by_position"):
        mine = [r for r in rows if r["case"] == split]
        assert sum(r["frames_here"] for r in mine) == 6  # every frame encoded once
        assert all(r["vision_ms"] > 0 and r["step_ms"] > 0 and r["lm_ms"] > 0 for r in mine)
    assert [r["frames_here"] for r in rows if r["case"] == "balanced"] == [3, 3]
