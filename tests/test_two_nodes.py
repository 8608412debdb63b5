"""Two emulated nodes (network namespaces) under `torchrun --nnodes 2 --rdzv-backend c10d` (issue 15).

One run of scripts/two_nodes.py per module, scenarios `kill` and `cut` (`make two-nodes` adds `train`,
an uninterrupted reference the kill scenario's losses are compared to):
- kill: global rank 3 (node 1) SIGKILLed at step 3 under `--max-restarts 1`: both nodes restart, resume
  from the step-2 checkpoint and finish 6 steps, publishing step 6;
- cut: node 1's veth set down after step 2: all four ranks exit within the group timeout + 30 s.
Needs root to make namespaces: SKIPPED with the reason where they are refused.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP_TIMEOUT_S = 20
LIMIT_S = 600


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_nodes")
    out = tmp / "summary.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "two_nodes.py"), "--scenario", "kill", "cut",
           "--timeout", str(GROUP_TIMEOUT_S), "--limit", "240", "--json", str(out), "--work-dir", str(tmp)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        text, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script tears its namespaces down on SIGTERM
        text, _ = proc.communicate(timeout=60)
    if not out.exists():
        pytest.fail(f"scripts/two_nodes.py wrote no summary (exit {proc.returncode}):\n{text[-4000:]}")
    result = json.loads(out.read_text())
    if "skipped" in result:
        pytest.skip(result["skipped"])
    result["output"] = text
    return result


def test_node1_rank_killed_recovers_across_both_nodes(summary):
    kill = summary["scenarios"]["kill"]
    detail = summary["output"][-6000:]
    assert kill["exit_codes"] == [0, 0], detail
    assert kill["fault_on_node1"] and kill["resumed"], detail
    assert kill["attempt0_steps"][:2] == [1, 2] and kill["second_attempt_steps"] == [3, 4, 5, 6], detail
    assert kill["checkpoint_6"], detail


def test_link_cut_ends_all_four_ranks_within_the_timeout(summary):
    cut = summary["scenarios"]["cut"]
    detail = summary["output"][-6000:]
    assert cut["workers"] == 4, detail
    assert cut["last_exit_s"] is not None and cut["last_exit_s"] <= GROUP_TIMEOUT_S + 30, detail
    # Each rank said which step (and collective) it was in when it gave up.
    assert cut["failed_log_lines"] == 4, detail
