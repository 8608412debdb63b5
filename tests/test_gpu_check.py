"""scripts/gpu_check.py on a machine without a GPU: it refuses at once and writes nothing; its report
renders every step and kernel cell, errors included."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would run")
def test_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr
    assert not out.exists()


def test_markdown_report_lists_steps_and_kernel_cells():
    mod = _module()
    result = {
        "environment": {"date": "2026-01-01T00:00:00+00:00", "device": "NVIDIA H100", "capability": "9.0",
                        "memory_gib": 79.1, "torch": "2.13.0+cu130", "cuda": "13.0", "cudnn": 91000,
                        "triton": "3.7.1", "git_sha": "abc1234", "extension_cuda_kernels": True},
        "pytest": {"ok": False, "runs": [{"cmd": "python -m pytest -q -m gpu tests", "ok": False, "seconds": 12.5,
                                          "rc": 1, "summary": "1 failed, 40 passed in 12.0s"}]},
        "kernels": {"ok": True, "rows": [
            {"seq_len": 4096, "causal": True, "backend": "triton", "fwd_tflops": 300.0, "fwd_bwd_tflops": 200.0},
            {"seq_len": 4096, "causal": True, "backend": "sdpa_cudnn", "error": "RuntimeError: no kernel"}]},
        "train": {"ok": True, "seconds": 30.0, "steps_logged": 30, "first_loss": 5.5, "last_loss": 1.0},
        "ok": False,
    }
    text = mod.markdown(result)
    assert "NVIDIA H100 (sm_90" in text and "git abc1234" in text
    assert "| NO | 12.5 | 1 failed, 40 passed in 12.0s |" in text
    assert "30 steps, loss 5.5 -> 1.0" in text
    row = next(line for line in text.splitlines() if line.startswith("| 4K | yes |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["300.0; 200.0", "-", "-", "RuntimeError: no kernel"]
    assert text.rstrip().endswith("overall: FAILED")


def test_cuda_build_check_names_the_ops_without_a_cuda_kernel(tmp_path):
    """scripts/cuda_build_check.py (the last step of `make cuda-build`) on this CPU-only build: it must
    fail and name exactly the operators that need a CUDA kernel, not those served by Triton/aten."""
    from longvila_engine._extension import cuda_kernels_available, extension_available

    if not extension_available() or cuda_kernels_available():
        pytest.skip("needs the CPU-only build of the extension")
    out = tmp_path / "cuda-build.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "cuda_build_check.py"), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["cpu_roundtrip"] is True
    # The CPU kernels come from one of the instruction-set variants next to _C (host op cpu_supports
    # is no CUDA kernel either, so it must not be listed below).
    assert report["cpu_isa"] in ("native", "avx512bf16", "avx512", "avx2", "base"), report
    assert sorted(report["missing_cuda"]) == ["longvila_engine::merge_attn", "longvila_engine::varlen_index",
                                              "longvila_engine::zigzag_permute"]
    assert "FAILED, no CUDA kernel for" in proc.stdout and "attn_fwd" not in proc.stdout.split("FAILED")[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: gpu-check would run")
def test_system_python_path_refuses_without_a_gpu_and_writes_nothing(tmp_path):
    """scripts/gpu_check_system.sh (`make gpu-check` where python3 has a CUDA torch): without a GPU it
    stops before building, with exit 2 and the reason, and creates no results folder."""
    out = tmp_path / "results"
    env = dict(os.environ, PY=sys.executable, GPU_CHECK_OUT=str(out), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check_system.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stdout + proc.stderr
    assert not out.exists()
