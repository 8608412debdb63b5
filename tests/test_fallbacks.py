"""The GPU path fails loudly instead of falling back in silence (issue 12), checked without a GPU.

CUDA tensors are FakeTensorMode tensors on device "cuda" (no kernel runs, no driver is needed); a
missing Triton is `sys.modules["triton"] = None`; an interpreting process is TRITON_INTERPRET=1 or a
patched `process_interprets`. Also here: the Triton launchers trace as custom operators with fakes,
the benchmarks' backend probe raises, and setup.py's CPU-only build on a CUDA toolchain mismatch.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from longvila_engine import ops
from longvila_engine.kernels.triton import attention_bwd, attention_fwd  # noqa: F401  (registers both ops)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


@pytest.fixture
def compiled_triton(monkeypatch):
    """This process as one whose triton compiles (whatever an earlier test module imported)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(attention_fwd, "process_interprets", lambda: False)
    monkeypatch.delenv("LONGVILA_ATTN_BACKEND", raising=False)


@pytest.fixture
def no_triton(compiled_triton, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError


def _fake_cuda(*shapes, dtype=torch.float16):
    return [torch.empty(s, dtype=dtype, device="cuda") for s in shapes]


def test_missing_triton_raises_with_the_fix(no_triton):
    with FakeTensorMode():
        q, k = _fake_cuda((1, 64, 4, 64), (1, 64, 2, 64))
        with pytest.raises(ValueError, match=r"backend='triton'.*pip install triton==3\.7\.1"):
            ops.block_attention(q, k, k, causal=True, backend="triton")
        cu = torch.zeros(2, dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match=r"backend='auto'.*pip install triton==3\.7\.1"):
            ops.block_attention(q, k, k, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    # dense fp16 still has PyTorch's fused kernels, never reference
    assert ops._auto_candidates("forward", CUDA, torch.float16) == ["aten"]


@pytest.mark.parametrize("op", ["forward", "backward", "merge", "zigzag", "varlen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_never_picks_reference_for_cuda(compiled_triton, op, dtype):
    assert "reference" not in ops._auto_candidates(op, CUDA, dtype)
    assert "reference" not in ops._auto_candidates(op, CUDA, dtype, varlen=True)


def test_float64_on_cuda_asks_for_reference_explicitly(compiled_triton):
    with FakeTensorMode():
        q, = _fake_cuda((1, 16, 2, 16), dtype=torch.float64)
        with pytest.raises(ValueError, match=r"float64 needs backend='reference', passed explicitly"):
            ops.block_attention(q, q, q, causal=True)


def test_interpreter_refused_for_cuda_tensors(compiled_triton, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with FakeTensorMode():
        q, = _fake_cuda((1, 64, 2, 64))
        with pytest.raises(ValueError, match=r"backend='triton'.*TRITON_INTERPRET=1.*unset it"):
            ops.block_attention(q, q, q, causal=True, backend="triton")
    assert ops._auto_candidates("forward", CUDA, torch.float16) == ["aten"]
    assert "triton" not in ops.available_backends("cuda")


def test_interpreting_process_refuses_cuda_launches(monkeypatch):
    """Below the dispatcher too: a launcher asked to run CUDA tensors in an interpreting process."""
    monkeypatch.setattr(attention_fwd, "process_interprets", lambda: True)
    with pytest.raises(RuntimeError, match="refusing CUDA tensors"):
        attention_fwd.runs_interpreted(CUDA)
    assert attention_fwd.runs_interpreted(torch.device("cpu")) is True


def test_device_guard():
    guard = attention_fwd.device_guard(torch.device("cuda", 3))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 3
    with attention_fwd.device_guard(torch.device("cpu")):
        pass


@pytest.mark.parametrize("varlen", [False, True])
def test_triton_ops_trace_under_fake_tensors(compiled_triton, varlen):
    """The launchers are torch.library custom ops with fakes: FakeTensorMode (the dry run) and
    torch.compile see shapes without a GPU, and nothing is launched."""
    assert hasattr(torch.ops.longvila_engine, "triton_attn_fwd")
    assert hasattr(torch.ops.longvila_engine, "triton_attn_bwd")
    with FakeTensorMode():
        q, k = _fake_cuda((1, 96, 4, 64), (1, 80, 2, 64), dtype=torch.bfloat16)
        cu = dict(cu_seqlens_q=torch.zeros(3, dtype=torch.int32, device="cuda"),
                  cu_seqlens_k=torch.zeros(3, dtype=torch.int32, device="cuda")) if varlen else {}
        out, lse = ops.block_attention(q, k, k, causal=False, backend="triton", **cu)
        assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device.type == "cuda"
        assert lse.shape == (1, 4, 96) and lse.dtype == torch.float32
        dq, dk, dv = ops.block_attention_backward(q, q, k, k, out, lse, causal=False, backend="triton", **cu)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.dtype == torch.float32
        out2, lse2 = ops.block_attention(q, k, k, causal=True)  # auto takes triton, measures nothing
        assert out2.shape == q.shape


def test_benchmark_probe_raises_instead_of_measuring_reference():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from bench_sp_attention import usable_backend
    finally:
        sys.path.pop(0)
    assert usable_backend("reference", torch.device("cpu")) == ("reference", None)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run.*--backend"):
        usable_backend("cuda", torch.device("cpu"))  # cuda has no attention: it used to become reference


CUDA_VENV = os.path.join(REPO, "build", "cuda-venv", "bin", "python")


@pytest.mark.skipif(not os.path.exists(CUDA_VENV), reason="needs the CUDA torch venv of `make cuda-build`")
def test_setup_builds_cpu_only_on_a_cuda_major_mismatch(tmp_path):
    """A CUDA torch with an nvcc of another major version: setup.py decides on the CPU-only build and
    says why (decided when setup.py runs; `--name` stops before compiling anything)."""
    fake = tmp_path / "cuda" / "bin"
    fake.mkdir(parents=True)
    (fake / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.99'\n")
    (fake / "nvcc").chmod(0o755)
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "cuda"))
    proc = subprocess.run([CUDA_VENV, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "building the CPU-only extension" in text and "nvcc is CUDA 12" in text
