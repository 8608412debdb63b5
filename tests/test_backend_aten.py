"""backend='aten' (PyTorch's fused attention ops) against backend='reference', and `auto`'s choice.

On CPU the backend runs `_scaled_dot_product_flash_attention_for_cpu` and its backward; the CUDA ops
(flash, memory-efficient, cuDNN) are exercised by the `gpu`-marked test at the end. Shapes are small
and odd (S_q != S_k, GQA 4:2, MQA 4:1, head dim 24, sequences of one token or none).
"""
import pytest
import torch

from longvila_engine import ops
from longvila_engine.ops import aten, autoselect, block_attention, block_attention_backward, flash_attention

# (B, S_q, S_k, H, H_kv, D, causal)
CASES = [
    pytest.param(2, 37, 37, 4, 2, 16, True, id="gqa4:2-causal-S37"),
    pytest.param(1, 45, 67, 4, 1, 32, False, id="mqa4:1-Sq45-Sk67"),
    pytest.param(1, 67, 40, 2, 2, 16, True, id="mha-causal-Sq67-Sk40"),
    pytest.param(1, 33, 50, 4, 2, 24, True, id="gqa-causal-D24"),
]


def _qkv(shape_q, shape_k, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_k, shape_k))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _both(q, k, v, dout, causal, cu_q=None, cu_k=None):
    """(out, lse, dq, dk, dv) from aten and from reference, each backward against its own forward."""
    res = {}
    for backend in ("aten", "reference"):
        out, lse = block_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        grads = block_attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k, backend=backend)
        res[backend] = (out, lse, *grads)
    return res["aten"], res["reference"]


@pytest.mark.parametrize("dtype,tol_fwd,tol_bwd", [
    # docs/design.md section 2: every backend agrees with reference to 1e-10 in float64, 1e-5 (gradients
    # 1e-4) in float32; measured here: 2e-15 and 6e-7.
    pytest.param(torch.float64, 1e-10, 1e-10, id="fp64"),
    pytest.param(torch.float32, 1e-5, 1e-4, id="fp32"),
])
@pytest.mark.parametrize("B,Sq,Sk,H,Hk,D,causal", CASES)
def test_matches_reference(dtype, tol_fwd, tol_bwd, B, Sq, Sk, H, Hk, D, causal):
    q, k, v = _qkv((B, Sq, H, D), (B, Sk, Hk, D), dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    got, want = _both(q, k, v, dout, causal)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        tol = tol_fwd if i < 2 else tol_bwd
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def _naive_attention(q, k, v, causal):
    """Plain PyTorch attention computed in the inputs' dtype: the baseline of the tolerance rule."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


def _fwd_bwd(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in (q, k, v)]


def _check_tolerance_rule(dtype, device, causal, shape_q, shape_k):
    """Flash-attention's rule: the error against a float64 truth is at most 2x (forward) or 3x
    (backward) that of plain PyTorch attention in the same dtype, plus the error of merely rounding
    the truth to `dtype` (a floor no kernel returning `dtype` beats; without it a baseline that is
    nearly exact by chance would fail the rule)."""
    q, k, v = _qkv(shape_q, shape_k, dtype, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    truth = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="reference"),
                     q.double(), k.double(), v.double(), dout.double())
    base = _fwd_bwd(lambda a, b, c: _naive_attention(a, b, c, causal), q, k, v, dout)
    got = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="aten"), q, k, v, dout)
    for i, (name, factor) in enumerate((("out", 2), ("dq", 3), ("dk", 3), ("dv", 3))):
        assert got[i].dtype == dtype
        err = (got[i].double() - truth[i]).abs().max().item()
        base_err = (base[i].double() - truth[i]).abs().max().item()
        floor = (truth[i].to(dtype).double() - truth[i]).abs().max().item()
        assert err <= factor * base_err + floor, f"{name}: error {err:.3g} vs baseline {base_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_tolerance_rule(dtype):
    _check_tolerance_rule(dtype, "cpu", True, (1, 45, 4, 32), (1, 45, 2, 32))


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_with_single_token_and_empty_sequences(causal):
    # Sequence 1 has one query, sequence 2 no query, sequence 4 no key (its rows see nothing).
    lens_q, lens_k = [20, 1, 0, 17, 5], [23, 3, 4, 19, 0]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = _qkv((1, sum(lens_q), 4, 16), (1, sum(lens_k), 2, 16), torch.float32)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got, want = _both(q, k, v, dout, causal, cu_q, cu_k)
    for i, (g, w) in enumerate(zip(got, want)):
        tol = 1e-5 if i < 2 else 1e-4  # the float32 contract
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    out, lse, dq = got[:3]
    blind = slice(sum(lens_q[:4]), sum(lens_q))  # rows of the sequence without keys
    assert torch.all(lse[:, :, blind] == float("-inf"))
    assert torch.all(out[:, blind] == 0) and torch.all(dq[:, blind] == 0)


def test_no_keys_gives_empty_rows_without_calling_the_op():
    """Zero keys (the CPU op would divide by zero): out = 0, lse = -inf, and zero gradients."""
    q, k, v = _qkv((2, 19, 2, 16), (2, 0, 1, 16), torch.float32)
    out, lse = block_attention(q, k, v, causal=False, backend="aten")
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = block_attention_backward(torch.ones_like(q), q, k, v, out, lse, causal=False, backend="aten")
    assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


def test_resume_diagonal_then_past_block_and_accumulated_grads():
    """Ring order on one rank: the causal diagonal block, then a past block merged into the running
    (out, lse) through merge_attention; each backward against the final (out, lse), the second one
    accumulating into given gradients."""
    B, S, H, Hk, D = 1, 35, 4, 1, 16
    q, k_diag, v_diag = _qkv((B, S, H, D), (B, S, Hk, D), torch.float32, seed=3)
    _, k_past, v_past = _qkv((B, S, H, D), (B, S, Hk, D), torch.float32, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    results = {}
    for backend in ("aten", "reference"):
        out, lse = block_attention(q, k_diag, v_diag, causal=True, backend=backend)
        got = block_attention(q, k_past, v_past, causal=False, out=out, lse=lse, backend=backend)
        assert got[0] is out and got[1] is lse
        dq, dk, dv = block_attention_backward(dout, q, k_diag, v_diag, out, lse, causal=True, backend=backend)
        dq2, dk2, dv2 = (torch.full_like(t, 0.5) for t in (dq, dk, dv))
        block_attention_backward(dout, q, k_past, v_past, out, lse, causal=False, dq=dq2, dk=dk2, dv=dv2,
                                 backend=backend)
        results[backend] = (out, lse, dq, dk, dv, dq2, dk2, dv2)
    for i, (g, w) in enumerate(zip(results["aten"], results["reference"])):
        tol = 1e-5 if i < 2 else 1e-4  # the float32 contract
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)


def test_strided_inputs_need_no_copy():
    """q/k/v seen through a transpose of (B, H, S, D) memory give the contiguous inputs' results."""
    q, k, v = _qkv((1, 37, 4, 16), (1, 37, 2, 16), torch.float32, seed=9)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    got = block_attention(*views, causal=True, backend="aten")
    want = block_attention(q, k, v, causal=True, backend="aten")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)  # same op, possibly another summation order


def test_cuda_limits_raise_with_the_fix():
    """What the CUDA ops cannot do is refused before any kernel runs (meta tensors stand in for CUDA)."""
    q = torch.empty(1, 8, 2, 16, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"float64.*backend='reference'"):
        aten.check_supported(q, None)
    q16 = q.to(torch.float16)
    with pytest.raises(ValueError, match=r"cu_seqlens.*backend='triton'"):
        aten.check_supported(q16, torch.zeros(2, dtype=torch.int32, device="meta"))


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_ops_plumbing_on_meta_tensors(monkeypatch, kernel, causal):
    """The CUDA branch (any device but CPU) called through the ops' meta kernels: argument lists that
    the schemas accept, lse cut to (B, H, S) (efficient pads to 32 rows, cuDNN adds a dim), GQA
    gradients summed back to H_kv heads, resume through merge_attention. No numerics: see the gpu test."""
    monkeypatch.setenv("LONGVILA_ATEN_CUDA_KERNEL", kernel)
    q = torch.empty(2, 100, 4, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 100, 2, 64, dtype=torch.bfloat16, device="meta")
    out, lse = block_attention(q, k, k, causal=causal, backend="aten")
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    dq, dk, dv = block_attention_backward(out, q, k, k, out, lse, causal=causal, backend="aten")
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dk.dtype == torch.float32
    acc, lse_acc = torch.zeros(q.shape, device="meta"), torch.zeros(2, 4, 100, device="meta")
    assert block_attention(q, k, k, causal=False, out=acc, lse=lse_acc, backend="aten")[0] is acc


def test_cuda_kernel_choice(monkeypatch):
    monkeypatch.delenv("LONGVILA_ATEN_CUDA_KERNEL", raising=False)
    assert aten.cuda_kernel(torch.bfloat16, True, 128, 128, 128) == "flash"
    assert aten.cuda_kernel(torch.bfloat16, True, 128, 256, 128) == "efficient"  # flash would be bottom-right
    assert aten.cuda_kernel(torch.float32, False, 128, 128, 64) == "efficient"
    monkeypatch.setenv("LONGVILA_ATEN_CUDA_KERNEL", "cudnn")
    assert aten.cuda_kernel(torch.float16, False, 64, 64, 64) == "cudnn"
    assert aten.cuda_kernel(torch.float16, True, 64, 96, 64) == "efficient"  # the top-left causal mask
    monkeypatch.setenv("LONGVILA_ATEN_CUDA_KERNEL", "fast")
    with pytest.raises(ValueError, match="LONGVILA_ATEN_CUDA_KERNEL='fast'"):
        aten.cuda_kernel(torch.float16, False, 64, 64, 64)


# --- auto ------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_auto(monkeypatch):
    monkeypatch.delenv(autoselect.ENV, raising=False)
    autoselect.clear_cache()
    autoselect.set_auto_backend(None)
    yield
    autoselect.set_auto_backend(None)
    autoselect.clear_cache()


def test_auto_measures_once_per_shape_class(fresh_auto, monkeypatch):
    calls = []
    real = autoselect._time
    monkeypatch.setattr(autoselect, "_time", lambda run, device: calls.append(1) or real(run, device))
    q, k, v = _qkv((1, 40, 4, 16), (1, 40, 2, 16), torch.float32)
    want = block_attention(q, k, v, causal=True, backend="reference")
    got = block_attention(q, k, v, causal=True)
    assert len(calls) == len(ops._auto_candidates("forward", q.device, q.dtype))
    (key, chosen), = autoselect.auto_choices().items()
    assert key[0] == "forward" and chosen in ("cpu", "aten")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    q2, k2, v2 = _qkv((1, 45, 4, 16), (1, 45, 2, 16), torch.float32, seed=2)  # S 40 -> 45: same class
    block_attention(q2, k2, v2, causal=True)
    assert len(autoselect.auto_choices()) == 1 and len(calls) == 2


def test_auto_keeps_cpu_for_16_bit_and_never_picks_reference(fresh_auto):
    assert ops._auto_candidates("forward", torch.device("cpu"), torch.bfloat16) == ["cpu"]
    for dtype in (torch.float32, torch.float64):
        assert "reference" not in ops._auto_candidates("backward", torch.device("cpu"), dtype)


def test_auto_override_by_function_and_environment(fresh_auto, monkeypatch):
    q, k, v = _qkv((1, 16, 2, 16), (1, 16, 2, 16), torch.float32)
    used = []
    for name in ("aten", "cpu"):
        mod = __import__(f"longvila_engine.ops.{name}", fromlist=["forward"])
        real = mod.forward
        monkeypatch.setattr(mod, "forward", lambda *a, _n=name, _r=real: used.append(_n) or _r(*a))
    autoselect.set_auto_backend("aten")
    block_attention(q, k, v, causal=True)
    monkeypatch.setenv(autoselect.ENV, "cpu")  # the function wins over the variable
    block_attention(q, k, v, causal=True)
    autoselect.set_auto_backend(None)
    block_attention(q, k, v, causal=True)
    assert used == ["aten", "aten", "cpu"] and autoselect.auto_choices() == {}
    monkeypatch.setenv(autoselect.ENV, "triton")
    with pytest.raises(ValueError, match=r"LONGVILA_ATTN_BACKEND='triton'.*candidates"):
        block_attention(q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_ops_tolerance_rule(monkeypatch, kernel, dtype, head_dim):
    monkeypatch.setenv("LONGVILA_ATEN_CUDA_KERNEL", kernel)
    _check_tolerance_rule(dtype, "cuda", True, (2, 256, 8, head_dim), (2, 256, 2, head_dim))
