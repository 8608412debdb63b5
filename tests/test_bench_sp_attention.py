"""`benchmarks/bench_sp_attention.py --smoke --world 2` runs with its peers (PyTorch's ring and, when
installed, ring-flash-attn over the CPU flash_attn shim) in a subprocess, into a temporary results
directory. The peers' lines and ratios must be there; no time is judged. The shim itself is checked
against torch's own attention in float64."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_RFA = importlib.util.find_spec("ring_flash_attn") is not None


def test_smoke_run_times_the_peers(tmp_path):
    script = os.path.join(REPO, "benchmarks", "bench_sp_attention.py")
    proc = subprocess.run([sys.executable, script, "--smoke", "--world", "2", "--results-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "bench_sp_attention.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    ring = [r for r in rows if r.get("case") == "ring2"]
    assert len(ring) == 1, rows
    peers = ring[0]["peers"]
    want = {"torch_ring", "ring_flash_attn"} if HAS_RFA else {"torch_ring"}
    assert want <= set(peers), (peers, ring[0].get("peers_missing"))
    for p in peers.values():  # timed on the same problem: outputs agree with the engine's (fp32)
        assert p["median_ms"] > 0 and p["ratio"] > 0 and p["max_abs_diff"] < 1e-4
    assert "engine / torch_ring" in proc.stdout


@pytest.mark.skipif(not HAS_RFA, reason="ring-flash-attn not installed (pip install --no-deps ring-flash-attn)")
def test_shim_matches_torch_attention_in_float64():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import ringflash_shim
    finally:
        sys.path.pop(0)
    ringflash_shim.install()
    # The stand-in `flash_attn` must not outlive this test: other tests probe for the real package.
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    for name in ("flash_attn", "flash_attn.flash_attn_interface"):
        sys.modules.pop(name, None)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 24, 4, 8, generator=g, dtype=torch.float64) for _ in range(4))
    for causal in (True, False):
        out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, 0.3, causal)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves),
                                                               is_causal=causal, scale=0.3).transpose(1, 2)
        ref.backward(dout)
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        _flash_attn_backward(dout, q, k, v, out, lse, *grads, 0.0, 0.3, causal)
        for got, leaf in zip(grads, leaves):
            torch.testing.assert_close(got, leaf.grad, rtol=0, atol=1e-12)


def test_smoke_2d_row_ratio_to_the_faster_peer_per_s_in_bf16(tmp_path):
    """4 ranks (so there is a ring2 x ulysses2 row), two S in one launch, bf16 on every side: each S has
    its own peer timings on the ring row, and every layout's line a ratio to the faster of them."""
    script = os.path.join(REPO, "benchmarks", "bench_sp_attention.py")
    proc = subprocess.run([sys.executable, script, "--smoke", "--world", "4", "--seq-lens", "256,512",
                           "--dtype", "bf16", "--results-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "bench_sp_attention.jsonl") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    assert {r["config"]["seq_len"] for r in rows} == {256, 512}
    assert {r["config"]["dtype"] for r in rows} == {"bf16"}
    for S in (256, 512):
        ring = [r for r in rows if r["case"] == "ring4" and r["config"]["seq_len"] == S]
        two_d = [r for r in rows if r["case"] == "ring2_ulysses2" and r["config"]["seq_len"] == S]
        assert len(ring) == 1 and len(two_d) == 1, rows
        peers = ring[0]["peers"]
        assert "torch_ring" in peers, ring[0].get("peers_missing")  # torch's CPU flash op takes bf16
        fastest = min(peers, key=lambda n: peers[n]["median_ms"])
        fp = two_d[0]["faster_peer"]
        assert fp["name"] == fastest and fp["median_ms"] == peers[fastest]["median_ms"]
        assert not fp["same_repeats"] and ring[0]["faster_peer"]["same_repeats"]
        assert abs(two_d[0]["ratio_to_faster_peer"] - two_d[0]["median_ms"] / fp["median_ms"]) < 1e-9
        assert f"ring2_ulysses2 S={S} bf16 ratio to the faster peer:" in proc.stdout
        assert f"ring4 S={S} bf16 ratio to the faster peer:" in proc.stdout
