"""backend='cpu' (the C++/OpenMP kernels in csrc/cpu/attention_*.cpp) against backend='reference'.

Covers forward and backward in float64 (1e-10) and float32 (1e-5, gradients 1e-4), bf16/fp16 inputs
under the flash-attention tolerance rule, odd shapes (lengths that are no multiple of the 96/128-row
tiles, S_q != S_k, GQA 4:2, MQA 4:1, head dims 16/24/64/80), packed varlen with a length-1 sequence
and empty q and k sequences, resuming a running (out, lse) over 2-4 key blocks, NaN-poisoned outputs
(every element must be written), accumulation into given gradients, bad input, the fake (meta)
implementations, and 1 vs 2 threads. The extension must build: nothing here is skipped without it.
"""
import math

import pytest
import torch

from longvila_engine import ops
from longvila_engine._extension import extension_available, require_extension
from longvila_engine.ops import cpu as cpu_backend

F64, F32 = torch.float64, torch.float32
TOL = {F64: (1e-10, 1e-10), F32: (1e-5, 1e-4)}  # (forward, gradients)


def test_extension_builds():
    require_extension()  # raises with the build error and the fix
    assert extension_available()
    for name in ("attn_fwd", "attn_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"longvila_engine::{name}", "CPU")


def _qkv(B, Sq, Sk, H, Hk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g, dtype=F64).to(dtype)
    k = torch.randn(B, Sk, Hk, D, generator=g, dtype=F64).to(dtype)
    v = torch.randn(B, Sk, Hk, D, generator=g, dtype=F64).to(dtype)
    dout = torch.randn(B, Sq, H, D, generator=g, dtype=F64).to(dtype)
    return q, k, v, dout


def _assert_lse_close(a, b, atol):
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "rows without a visible key differ"
    fin = torch.isfinite(b)
    torch.testing.assert_close(a[fin], b[fin], atol=atol, rtol=0)


# (B, S_q, S_k, H, H_kv, D): tiles are 192 x 128 (forward) and 96 x 96 (backward), so every length
# below leaves a partial tile, and 200/250/600 span several.
SHAPES = [
    (2, 37, 37, 4, 4, 16),
    (1, 130, 77, 4, 2, 64),  # GQA 4:2, S_q > S_k
    (1, 77, 250, 4, 1, 80),  # MQA 4:1, S_q < S_k
    (1, 200, 200, 2, 2, 24),  # head dim that is no multiple of the 16-float panel
    (3, 101, 101, 3, 1, 32),  # MQA with B*H_kv = 3 on 2 threads: dQ split in chunks
    # Causal: the diagonal crosses forward tiles at offsets 0, +-64, ... and backward tiles at 0 and
    # +-96, where the GEMMs skip each row strip's masked part (attention_cpu_causal.h, Causal).
    (1, 600, 600, 2, 1, 64),
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape, causal, dtype):
    q, k, v, _ = _qkv(*shape, dtype)
    out, lse = ops.block_attention(q, k, v, causal=causal, backend="cpu")
    out_r, lse_r = ops.block_attention(q, k, v, causal=causal, backend="reference")
    atol = TOL[dtype][0]
    torch.testing.assert_close(out, out_r, atol=atol, rtol=0)
    _assert_lse_close(lse, lse_r, atol)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape, causal, dtype):
    q, k, v, dout = _qkv(*shape, dtype)
    out, lse = ops.block_attention(q, k, v, causal=causal, backend="reference")
    got = ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, backend="cpu")
    want = ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, backend="reference")
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=TOL[dtype][1], rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def _autograd_attention(q, k, v, causal, scale=None):
    """Plain softmax attention, differentiated by torch autograd: the oracle of the gradients."""
    H, Hk = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hk, dim=2)
    v = v.repeat_interleave(H // Hk, dim=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 130, 77, 4, 2, 64), (2, 150, 150, 4, 1, 16)])
def test_flash_attention_grads_match_autograd(shape, causal):
    q, k, v, dout = _qkv(*shape, F64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.flash_attention(*leaves, causal=causal, softmax_scale=0.3, backend="cpu")
    out.backward(dout)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = _autograd_attention(*ref_leaves, causal, scale=0.3)
    out_ref.backward(dout)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=0)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_tolerance_rule(dtype, causal):
    # The flash-attention rule: against a float64 oracle on the same (rounded) inputs, the kernel may
    # err at most 2x (forward) / 3x (backward) as much as plain PyTorch attention run in the input
    # dtype, plus a small absolute floor for entries where that baseline happens to be exact. The
    # kernel computes in float32, so in practice it sits well inside the bound.
    q, k, v, dout = _qkv(1, 150, 170, 4, 2, 64, dtype)
    out, lse = ops.block_attention(q, k, v, causal=causal, backend="cpu")
    grads = ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, backend="cpu")
    assert all(g.dtype == torch.float32 for g in grads)
    _assert_flash_rule(out, grads, (q, k, v, dout), causal)


def _assert_flash_rule(out, grads, inputs, causal, what=""):
    """The low-precision rule of the test above: errors against float64 on the same rounded inputs at
    most 2x (forward) / 3x (gradients) those of plain PyTorch attention in the input dtype, + 1e-4."""
    q, k, v, dout = inputs
    q64, k64, v64, do64 = (t.double().requires_grad_() for t in (q, k, v, dout))
    out64 = _autograd_attention(q64, k64, v64, causal)
    out64.backward(do64.detach())
    lowp = [t.clone().requires_grad_() for t in (q, k, v)]
    out_lowp = _autograd_attention(*lowp, causal)
    out_lowp.backward(dout)
    assert _err(out, out64) <= 2 * _err(out_lowp, out64) + 1e-4, what
    for g, leaf64, leaf_lowp in zip(grads, (q64, k64, v64), lowp):
        assert _err(g, leaf64.grad) <= 3 * _err(leaf_lowp.grad, leaf64.grad) + 1e-4, what


def _varlen(seq_q, seq_k, H, Hk, D, dtype, seed=1):
    cu_q = torch.tensor([0, *torch.tensor(seq_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(seq_k).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, dout = _qkv(1, int(cu_q[-1]), int(cu_k[-1]), H, Hk, D, dtype, seed)
    return q, k, v, dout, cu_q, cu_k


# Lengths: a 1-token sequence, an empty k sequence (its rows see nothing: lse=-inf, out=0), an empty
# q sequence (its keys get zero gradients), and sequences longer than one tile.
VARLEN = [([1, 30, 7, 0, 140], [1, 0, 25, 9, 130]), ([100, 1, 60], [100, 1, 60])]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", VARLEN)
def test_varlen_matches_reference(lengths, causal, dtype):
    q, k, v, dout, cu_q, cu_k = _varlen(*lengths, 4, 2, 16, dtype)
    kw = dict(causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    out, lse = ops.block_attention(q, k, v, backend="cpu", **kw)
    out_r, lse_r = ops.block_attention(q, k, v, backend="reference", **kw)
    fwd_tol, grad_tol = TOL[dtype]
    torch.testing.assert_close(out, out_r, atol=fwd_tol, rtol=0)
    _assert_lse_close(lse, lse_r, fwd_tol)
    got = ops.block_attention_backward(dout, q, k, v, out_r, lse_r, backend="cpu", **kw)
    want = ops.block_attention_backward(dout, q, k, v, out_r, lse_r, backend="reference", **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=grad_tol, rtol=0)


def test_varlen_rows_without_keys_are_empty():
    q, k, v, _, cu_q, cu_k = _varlen(*VARLEN[0], 2, 2, 16, F32)
    out, lse = ops.block_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="cpu")
    rows = slice(int(cu_q[1]), int(cu_q[2]))  # the q sequence whose k sequence is empty
    assert torch.all(lse[:, :, rows] == float("-inf"))
    assert torch.all(out[:, rows] == 0)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("cuts", [[60], [1, 97, 150], [33, 33, 200]])
def test_resume_over_key_blocks_equals_one_call(cuts, dtype):
    q, k, v, _ = _qkv(2, 90, 230, 4, 2, 64, dtype)
    edges = [0, *cuts, k.shape[1]]
    out = lse = None
    for a, b in zip(edges, edges[1:]):
        if out is None:
            out, lse = ops.block_attention(q, k[:, a:b], v[:, a:b], causal=False, backend="cpu")
        else:  # includes an empty block (33, 33), which must leave the result unchanged
            ops.block_attention(q, k[:, a:b], v[:, a:b], causal=False, out=out, lse=lse, backend="cpu")
    out_r, lse_r = ops.block_attention(q, k, v, causal=False, backend="reference")
    torch.testing.assert_close(out, out_r, atol=TOL[dtype][0], rtol=0)
    torch.testing.assert_close(lse, lse_r, atol=TOL[dtype][0], rtol=0)


def test_resume_ring_pattern_equals_causal():
    # Second half of a causal sequence, as a ring step sees it: the earlier keys unmasked, then the
    # diagonal block causal; merged, equal to the causal rows of one call.
    q, k, v, _ = _qkv(1, 260, 260, 4, 2, 64, F64)
    half = 130
    out, lse = ops.block_attention(q[:, half:], k[:, :half], v[:, :half], causal=False, backend="cpu")
    ops.block_attention(q[:, half:], k[:, half:], v[:, half:], causal=True, out=out, lse=lse, backend="cpu")
    out_r, lse_r = ops.block_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, out_r[:, half:], atol=1e-10, rtol=0)
    torch.testing.assert_close(lse, lse_r[:, :, half:], atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_poisoned_outputs_are_fully_written(causal):
    # Empty q and k sequences, keys no query sees (causal, S_k > S_q within a sequence): every out,
    # lse, dq, dk, dv element must still be written when not resuming / not accumulating.
    q, k, v, dout, cu_q, cu_k = _varlen([1, 30, 0, 50], [1, 0, 25, 120], 4, 1, 24, F32)
    out = torch.full(q.shape, float("nan"))
    lse = torch.full((1, 4, q.shape[1]), float("nan"))
    cpu_backend.forward(q, k, v, out, lse, cu_q, cu_k, 0.2, causal, False)
    assert not out.isnan().any() and not lse.isnan().any()
    out_r, lse_r = ops.block_attention(q, k, v, causal=causal, softmax_scale=0.2, cu_seqlens_q=cu_q,
                                       cu_seqlens_k=cu_k, backend="reference")
    torch.testing.assert_close(out, out_r, atol=1e-5, rtol=0)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    cpu_backend.backward(dout, q, k, v, out, lse, *grads, cu_q, cu_k, 0.2, causal, False)
    want = ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=0.2,
                                        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="reference")
    for a, b in zip(grads, want):
        assert not a.isnan().any()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_accumulate_adds_into_given_grads():
    q, k, v, dout = _qkv(1, 120, 110, 4, 1, 32, F64)  # MQA: chunked dQ on 2 threads
    out, lse = ops.block_attention(q, k, v, causal=True, backend="cpu")
    fresh = ops.block_attention_backward(dout, q, k, v, out, lse, causal=True, backend="cpu")
    start = [torch.randn(t.shape, dtype=F64) for t in fresh]
    given = [t.clone() for t in start]
    got = ops.block_attention_backward(dout, q, k, v, out, lse, causal=True, dq=given[0], dk=given[1],
                                       dv=given[2], backend="cpu")
    for g, buf, s, f in zip(got, given, start, fresh):
        assert g is buf
        torch.testing.assert_close(g, s + f, atol=1e-12, rtol=0)


def test_thread_count_does_not_change_results():
    q, k, v, dout = _qkv(1, 250, 250, 4, 1, 64, F32)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, lse = ops.block_attention(q, k, v, causal=True, backend="cpu")
            results.append((out, lse, *ops.block_attention_backward(dout, q, k, v, out, lse, causal=True,
                                                                    backend="cpu")))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bad_input_raises_value_error():
    q, k, v, _ = _qkv(1, 10, 10, 4, 2, 16, F32)
    with pytest.raises(ValueError, match="4 dimensions"):
        ops.block_attention(q[0], k, v, causal=False, backend="cpu")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ops.block_attention(q[:, :, :3], k, v, causal=False, backend="cpu")
    bad_cu = torch.tensor([0, 4, 9], dtype=torch.int32)  # ends at 9, the packed length is 10
    with pytest.raises(ValueError, match="malformed"):
        ops.block_attention(q, k, v, causal=False, cu_seqlens_q=bad_cu, cu_seqlens_k=bad_cu, backend="cpu")
    out = torch.zeros(q.shape)
    with pytest.raises(ValueError, match="lse must have shape"):
        ops.block_attention(q, k, v, causal=False, out=out, lse=torch.zeros(1, 4, 9), backend="cpu")


def test_kernel_boundary_checks():
    # The C++ boundary re-checks what a direct torch.ops caller could get wrong (TORCH_CHECK).
    q, k, v, dout = _qkv(1, 10, 10, 4, 2, 16, F32)
    lse = torch.zeros(1, 4, 10)
    with pytest.raises(RuntimeError, match="accumulator dtype"):
        torch.ops.longvila_engine.attn_fwd(q, k, v, torch.zeros(q.shape, dtype=F64), lse, None, None, 0.25,
                                           False, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.longvila_engine.attn_fwd(q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                           torch.zeros(q.shape), lse, None, None, 0.25, False, False)
    cu = torch.tensor([0, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        torch.ops.longvila_engine.attn_fwd(q, k, v, torch.zeros(q.shape), lse, cu, cu, 0.25, False, False)
    with pytest.raises(RuntimeError, match="dk must have shape"):
        torch.ops.longvila_engine.attn_bwd(dout, q, k, v, q, lse, torch.zeros(q.shape), torch.zeros(q.shape),
                                           torch.zeros(k.shape), None, None, 0.25, False, False)


def test_fake_implementations_trace_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_extension()
    lib = torch.ops.longvila_engine
    with FakeTensorMode():
        q = torch.empty(1, 8, 4, 16)
        k = torch.empty(1, 8, 2, 16)
        out, lse = torch.empty(1, 8, 4, 16), torch.empty(1, 4, 8)
        assert lib.attn_fwd(q, k, k, out, lse, None, None, 0.25, True, False) is None
        grads = (torch.empty(q.shape), torch.empty(k.shape), torch.empty(k.shape))
        assert lib.attn_bwd(q, q, k, k, out, lse, *grads, None, None, 0.25, True, False) is None
        assert lib.merge_attn(out, lse, out, lse) is None
        assert lib.zigzag_permute(q, 2, 1, False).shape == q.shape
        seq_id, pos = lib.varlen_index(torch.empty(3, dtype=torch.int32), 8)
        assert seq_id.shape == pos.shape == (8,) and seq_id.dtype == torch.int32


def test_opcheck_attention_ops():
    q, k, v, dout = _qkv(1, 20, 17, 4, 2, 16, F32)
    out, lse = torch.zeros(q.shape), torch.zeros(1, 4, 20)
    torch.library.opcheck(torch.ops.longvila_engine.attn_fwd.default,
                          (q, k, v, out, lse, None, None, 0.25, True, False))
    grads = (torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(k.shape))
    torch.library.opcheck(torch.ops.longvila_engine.attn_bwd.default,
                          (dout, q, k, v, out, lse, *grads, None, None, 0.25, True, False))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_kernel_info_matches_this_cpu():
    info = cpu_backend.kernel_info()
    assert info["vector_bits"] in ("256", "512"), info
    assert info["bf16_dot"] in ("0", "1") and info["gemm"] in ("micro_kernel", "blas"), info
    flags = _cpu_flags()
    if info["bf16_dot"] == "1":
        assert info["bf16_dot_built"] == "1" and "avx512_bf16" in flags
    elif info["bf16_dot_built"] == "1" and "avx512_bf16" in flags:
        import os

        assert os.environ.get("LONGVILA_CPU_BF16") == "fp32", "bf16 dot products built and supported but off"


_BF16_ROUTE = """
import sys, torch
from longvila_engine import ops
from longvila_engine.ops import cpu
q, k, v, dout = torch.load(sys.argv[1])
out, lse = ops.block_attention(q, k, v, causal=True, backend="cpu")
grads = ops.block_attention_backward(dout, q, k, v, out, lse, causal=True, backend="cpu")
torch.save({"out": out, "grads": grads, "info": cpu.kernel_info()}, sys.argv[2])
"""


def test_bf16_routes_both_meet_the_tolerance_rule(tmp_path):
    # bf16 inputs run through AVX512-BF16 pair dot products where built and supported (P and dS
    # rounded to bf16), else through the float32 route; LONGVILA_CPU_BF16=fp32 forces the latter. Both
    # must meet the flash-attention tolerance rule, and on a machine with the dot products the two
    # routes must really differ (P, dS rounded), which shows the dot route ran.
    import os
    import subprocess
    import sys

    q, k, v, dout = _qkv(1, 200, 200, 4, 2, 64, torch.bfloat16, seed=5)
    torch.save((q, k, v, dout), tmp_path / "in.pt")
    results = {}
    for route, env in (("default", {}), ("fp32", {"LONGVILA_CPU_BF16": "fp32"})):
        script = tmp_path / "route.py"
        script.write_text(_BF16_ROUTE)
        out_file = tmp_path / f"{route}.pt"
        subprocess.run([sys.executable, str(script), str(tmp_path / "in.pt"), str(out_file)], check=True,
                       env={**os.environ, **env}, timeout=300)
        results[route] = torch.load(out_file)
    assert results["fp32"]["info"]["bf16_dot"] == "0"
    for route, res in results.items():
        _assert_flash_rule(res["out"], res["grads"], (q, k, v, dout), True, what=route)
    same = torch.equal(results["default"]["out"], results["fp32"]["out"])
    assert same == (results["default"]["info"]["bf16_dot"] == "0")


def test_peak_gflops_measures_and_rejects_unknown_kinds():
    fp32 = cpu_backend.peak_gflops("fp32")
    assert 1.0 < fp32 < 1e4  # GFLOP/s of one core: any real CPU lands far inside this range
    bf16 = cpu_backend.peak_gflops("bf16_dot")
    assert (bf16 > 0) == (cpu_backend.kernel_info()["bf16_dot"] == "1")
    with pytest.raises(RuntimeError, match="kind must be"):
        cpu_backend.peak_gflops("fp64")
