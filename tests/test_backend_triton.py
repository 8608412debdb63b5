"""backend='triton' against backend='reference': forward (pointer and tensor-descriptor loads), backward,
varlen, resume, AOT compile.

How this file gets an interpreter. Measured on triton 3.7.1: TRITON_INTERPRET is read when a
function is decorated with @triton.jit, and triton's own language helpers (tl.zeros, tl.sum, ...) are
decorated by `import triton`. So whether a process interprets or compiles is fixed by its first
`import triton`, for the whole process; setting the variable later only changes `triton.knobs` and the
dispatcher's availability check (`ops._available`, read at every call).
This module therefore:
- sets TRITON_INTERPRET=1 only if triton is not imported yet, imports triton, and puts os.environ
  back at once, so other modules see the environment they started with;
- sets it again only while its own tests run (a module fixture), for the dispatcher's check;
- runs on CPU tensors when the process interprets, else on CUDA (and skips without a GPU);
- with LONGVILA_TRITON_TESTS=compiled it leaves triton compiling, so on a GPU machine the same
  tests check the compiled kernels (`make gpu-check` runs it so).
What other modules do inherit, when this module is the first to import triton: an interpreting
triton. On a CPU-only machine that is the only triton that can run at all.

Shapes are small (the interpreter runs every tile op in Python) and odd: sequences that are not a
multiple of the 32-row interpreter tile, S_q != S_k, GQA 4:2, MQA 4:1, a head dim of 24.
"""
import os
import subprocess
import sys

_PRIOR = os.environ.get("TRITON_INTERPRET")
# LONGVILA_TRITON_TESTS=compiled (scripts/gpu_check.py on a GPU): leave triton compiling, so these
# tests run the real kernels on CUDA instead of interpreting them.
if "triton" not in sys.modules and os.environ.get("LONGVILA_TRITON_TESTS") != "compiled":
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401,E402  (must follow the variable)
finally:
    if _PRIOR is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PRIOR

import pytest  # noqa: E402
import torch  # noqa: E402

from longvila_engine.kernels.triton.attention_fwd import process_interprets  # noqa: E402
from longvila_engine.ops import (  # noqa: E402
    block_attention,
    block_attention_backward,
    flash_attention,
    reference,
    triton_backend,
)

INTERPRETS = process_interprets()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    """While this module's tests run, let the dispatcher accept backend='triton' for CPU tensors."""
    if not INTERPRETS:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture(scope="module")
def device():
    if INTERPRETS:
        return torch.device("cpu")
    if not torch.cuda.is_available() and os.environ.get("LONGVILA_TRITON_TESTS") == "compiled":
        pytest.skip("needs a CUDA GPU: LONGVILA_TRITON_TESTS=compiled runs the compiled kernels on CUDA")
    if not torch.cuda.is_available():
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1 and there is no "
                    "GPU; run `pytest tests/test_backend_triton.py` on its own")
    return torch.device("cuda")


def _qkv(shape_q, shape_k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64)
    k = torch.randn(shape_k, generator=g, dtype=torch.float64)
    v = torch.randn(shape_k, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _nan(shape, device):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def _run_both(q, k, v, dout, causal, cu_q=None, cu_k=None, scale=None):
    """Forward and backward through both backends' entry points; the triton outputs start as NaN, so
    any element a kernel does not write fails the comparison."""
    B, Sq, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    res = {}
    for name, be in (("triton", triton_backend), ("reference", reference)):
        out, lse = _nan((B, Sq, H, D), q.device), _nan((B, H, Sq), q.device)
        be.forward(q, k, v, out, lse, cu_q, cu_k, scale, causal, False)
        dq, dk, dv = _nan(q.shape, q.device), _nan(k.shape, q.device), _nan(v.shape, q.device)
        be.backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal, False)
        res[name] = (out, lse, dq, dk, dv)
    return res


# (B, S_q, S_k, H, H_kv, D, causal)
CASES = [
    pytest.param(2, 37, 37, 4, 2, 16, True, id="gqa4:2-causal-S37"),
    pytest.param(1, 45, 67, 4, 1, 32, False, id="mqa4:1-Sq45-Sk67"),
    pytest.param(1, 67, 40, 2, 2, 16, True, id="mha-causal-Sq67-Sk40"),
    pytest.param(1, 33, 50, 4, 2, 24, True, id="gqa-causal-D24"),
]


@pytest.mark.parametrize("B,Sq,Sk,H,Hk,D,causal", CASES)
def test_float32_matches_reference(device, B, Sq, Sk, H, Hk, D, causal):
    q, k, v = _qkv((B, Sq, H, D), (B, Sk, Hk, D), torch.float32, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    res = _run_both(q, k, v, dout, causal)
    for got, want in zip(res["triton"][:2], res["reference"][:2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(res["triton"][2:], res["reference"][2:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Sq,Sk,H,Hk,D,causal", [
    pytest.param(1, 45, 45, 4, 2, 32, True, id="gqa-causal"),
    pytest.param(1, 37, 53, 4, 1, 16, False, id="mqa-Sq37-Sk53"),
])
def test_low_precision_tolerance_rule(device, dtype, B, Sq, Sk, H, Hk, D, causal):
    """Flash-attention's rule: the kernel's error against a float64 truth is at most 2x (forward) or
    3x (backward) the error of plain PyTorch attention run in the same dtype. A ratio alone would
    fail on tensors where the baseline happens to be nearly exact, so each bound has a floor: the
    error of merely rounding the float64 truth to `dtype`, which no kernel returning `dtype` beats."""
    q, k, v = _qkv((B, Sq, H, D), (B, Sk, Hk, D), dtype, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    truth = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="reference"),
                     q.double(), k.double(), v.double(), dout.double())
    base = _fwd_bwd(lambda a, b, c: _naive_attention(a, b, c, causal), q, k, v, dout)
    got = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="triton"), q, k, v, dout)
    for i, (name, factor) in enumerate((("out", 2), ("dq", 3), ("dk", 3), ("dv", 3))):
        assert got[i].dtype == dtype
        err = (got[i].double() - truth[i]).abs().max().item()
        base_err = (base[i].double() - truth[i]).abs().max().item()
        floor = (truth[i].to(dtype).double() - truth[i]).abs().max().item()
        assert err <= factor * base_err + floor, f"{name}: error {err:.3g} vs baseline {base_err:.3g}"


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_with_single_token_and_empty_sequences(device, causal):
    # Sequence 1 has one query, sequence 2 no query, sequence 4 no key (its rows see nothing).
    lens_q, lens_k = [20, 1, 0, 17, 5], [23, 3, 4, 19, 0]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    H, Hk, D = 4, 2, 16
    q, k, v = _qkv((1, sum(lens_q), H, D), (1, sum(lens_k), Hk, D), torch.float32, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    res = _run_both(q, k, v, dout, causal, cu_q, cu_k)
    for got, want in zip(res["triton"][:2], res["reference"][:2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(res["triton"][2:], res["reference"][2:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    out, lse, dq = res["triton"][:3]
    blind = slice(sum(lens_q[:4]), sum(lens_q))  # rows of the sequence without keys
    assert torch.all(lse[:, :, blind] == float("-inf"))
    assert torch.all(out[:, blind] == 0) and torch.all(dq[:, blind] == 0)


@pytest.mark.parametrize("splits", [(20, 30, 17), (40, 27)])
def test_resume_over_key_blocks_equals_one_call(device, splits):
    """The fused ring step: merging K/V blocks one by one, from an empty (0, -inf) start, equals one
    call over all keys (non-causal: every key block is fully visible, as in the ring's past blocks)."""
    B, Sq, H, Hk, D = 1, 41, 4, 2, 16
    Sk = sum(splits)
    q, k, v = _qkv((B, Sq, H, D), (B, Sk, Hk, D), torch.float32, device)
    whole_out, whole_lse = block_attention(q, k, v, causal=False, backend="reference")
    out = torch.zeros((B, Sq, H, D), dtype=torch.float32, device=device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=device)
    start = 0
    for n in splits:
        got = block_attention(q, k[:, start:start + n], v[:, start:start + n], causal=False, out=out, lse=lse,
                              backend="triton")
        assert got[0] is out and got[1] is lse
        start += n
    torch.testing.assert_close(out, whole_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_resume_causal_diagonal_then_past_block_and_accumulated_grads(device):
    """Ring order on one rank: the causal diagonal block first, then a past block merged in; the
    backward of each block against the final (out, lse) accumulates into shared dq."""
    B, S, H, Hk, D = 1, 35, 4, 1, 16
    q, k_diag, v_diag = _qkv((B, S, H, D), (B, S, Hk, D), torch.float32, device, seed=3)
    _, k_past, v_past = _qkv((B, S, H, D), (B, S, Hk, D), torch.float32, device, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device)
    results = {}
    for backend in ("triton", "reference"):
        out, lse = block_attention(q, k_diag, v_diag, causal=True, backend=backend)
        out = out.float()
        block_attention(q, k_past, v_past, causal=False, out=out, lse=lse, backend=backend)
        dq, dk, dv = block_attention_backward(dout, q, k_diag, v_diag, out, lse, causal=True, backend=backend)
        dq2, dk2, dv2 = (torch.full_like(t, 0.5) for t in (dq, dk, dv))
        block_attention_backward(dout, q, k_past, v_past, out, lse, causal=False, dq=dq2, dk=dk2, dv=dv2,
                                 backend=backend)
        results[backend] = (out, lse, dq, dk, dv, dq2, dk2, dv2)
    for i, (got, want) in enumerate(zip(results["triton"], results["reference"])):
        tol = 1e-5 if i < 2 else 1e-4
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [True, False])
def test_autograd_matches_reference_autograd(device, causal):
    q, k, v = _qkv((2, 29, 4, 16), (2, 29, 2, 16), torch.float32, device, seed=7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(device)
    got = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="triton"), q, k, v, dout)
    want = _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, causal=causal, backend="reference"), q, k, v, dout)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_strided_inputs(device):
    """q/k/v as (B, H, S, D) memory seen through a transpose (head stride S*D): same results."""
    q, k, v = _qkv((1, 37, 4, 16), (1, 37, 2, 16), torch.float32, device, seed=9)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(device)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    got = _run_both(*views, dout, True)["triton"]
    want = _run_both(q, k, v, dout, True)["triton"]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("Sq,Sk", [(19, 0), (0, 19)])
def test_no_keys_or_no_queries(device, Sq, Sk):
    """Zero keys: out = 0, lse = -inf, dq = 0. Zero queries: dk = dv = 0. Every element written."""
    q, k, v = _qkv((2, Sq, 2, 16), (2, Sk, 1, 16), torch.float32, device)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    res = _run_both(q, k, v, dout, False)
    for got, want in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_gpu_tile_shapes_split_diagonal_correctly(device, monkeypatch):
    """The masked/unmasked split with the unequal tiles the GPU configs use (forward 64x32, dQ 64x16,
    dK/dV 16x64: several tiles cross the diagonal, some lie wholly left of it), interpreted."""
    from longvila_engine.kernels.triton import attention_bwd, attention_fwd

    if not INTERPRETS:
        pytest.skip("tile shapes are forced only under the interpreter")

    def cfg(m, n):
        return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": 1, "num_stages": 1}

    monkeypatch.setattr(attention_fwd, "fwd_config", lambda *a, **k: cfg(64, 32))
    monkeypatch.setattr(attention_bwd, "bwd_config", lambda *a, **k: {
        "pre": {"BLOCK_M": 32, "num_warps": 1, "num_stages": 1}, "dkdv": cfg(16, 64), "dq": cfg(64, 16)})
    q, k, v = _qkv((1, 100, 2, 16), (1, 100, 1, 16), torch.float32, device, seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(device)
    res = _run_both(q, k, v, dout, True)
    for i, (got, want) in enumerate(zip(res["triton"], res["reference"])):
        tol = 1e-5 if i < 2 else 1e-4  # the float32 contract
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("case", ["dense-gqa-causal-Sq67-Sk40", "dense-mqa-Sq45-Sk67-D32", "varlen",
                                  "resume-causal-then-past"])
def test_tensor_descriptor_forward_matches_reference(device, monkeypatch, case):
    """The sm_90 forward's tensor-descriptor loads (TMA=True), forced on under the interpreter (which
    runs `tl.make_tensor_descriptor` loads, zero-filling rows past the sequence end as TMA does), with
    the GPU's unequal 64x32 tiles: same results as `reference` and as the pointer path."""
    from longvila_engine.kernels.triton import attention_fwd

    if not INTERPRETS:
        pytest.skip("the descriptor path is forced only under the interpreter")
    taken = []
    eligible = attention_fwd._tma_eligible
    monkeypatch.setattr(attention_fwd, "_tma_eligible", lambda *a: taken.append(eligible(*a)) or taken[-1])

    def run(tma):
        monkeypatch.setattr(attention_fwd, "fwd_config", lambda *a, **k: {
            "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1, "TMA": tma})
        if case == "varlen":
            lens_q, lens_k = [20, 1, 0, 70, 5], [23, 3, 4, 66, 0]
            cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
            cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
            q, k, v = _qkv((1, sum(lens_q), 4, 16), (1, sum(lens_k), 2, 16), torch.float32, device, seed=13)
            return block_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        if case == "resume-causal-then-past":
            q, k, v = _qkv((1, 70, 4, 16), (1, 70, 2, 16), torch.float32, device, seed=14)
            _, k2, v2 = _qkv((1, 70, 4, 16), (1, 50, 2, 16), torch.float32, device, seed=15)
            out, lse = block_attention(q, k, v, causal=True, backend=backend)
            out = out.float()
            return block_attention(q, k2, v2, causal=False, out=out, lse=lse, backend=backend)
        shapes = {"dense-gqa-causal-Sq67-Sk40": ((2, 67, 4, 16), (2, 40, 2, 16), True),
                  "dense-mqa-Sq45-Sk67-D32": ((1, 45, 4, 32), (1, 67, 1, 32), False)}
        shape_q, shape_k, causal = shapes[case]
        q, k, v = _qkv(shape_q, shape_k, torch.float32, device, seed=16)
        return block_attention(q, k, v, causal=causal, backend=backend)

    backend = "reference"
    want = run(False)
    backend = "triton"
    pointers = run(False)
    assert taken and not any(taken)
    taken.clear()
    got = run(True)
    assert taken and all(taken)  # every launch went through the descriptors
    for g, w, p in zip(got, want, pointers):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, p, atol=1e-6, rtol=1e-6)


def test_tensor_descriptors_only_on_sm90_16bit_and_aligned():
    """Dispatch: the descriptor forward is the sm_90 16-bit config (the AOT spec compiles it there),
    never sm_80, float32 or the interpreter's; the launcher falls back to pointers for a padded head
    dim, a misaligned base or row stride, or empty keys."""
    from longvila_engine.kernels.triton import attention_fwd as fwd

    for d in (64, 128):
        assert fwd.fwd_config(d, interpreted=False, arch=90).get("TMA") is True
        assert not fwd.fwd_config(d, interpreted=False, arch=80).get("TMA", False)
        assert not fwd.fwd_config(d, interpreted=False, fp32=True, arch=90).get("TMA", False)
        assert not fwd.fwd_config(d, interpreted=True, arch=90).get("TMA", False)
        for dtype in ("fp16", "bf16"):
            tma = {arch: {s[0]: s[3]["TMA"] for s in fwd.aot_specs(dtype, d, True, arch)} for arch in (80, 90)}
            assert all(tma[90].values()) and not any(tma[80].values())
    cfg = {"TMA": True}
    t = torch.zeros(2, 40, 4, 64, dtype=torch.float16)
    assert fwd._tma_eligible(cfg, 64, t, t, t)
    assert not fwd._tma_eligible({}, 64, t, t, t)
    assert not fwd._tma_eligible(cfg, 24, *(torch.zeros(2, 40, 4, 24, dtype=torch.float16),) * 3)
    flat = torch.zeros(2 * 40 * 4 * 64 + 1, dtype=torch.float16)
    shifted = flat[1:].view(2, 40, 4, 64)  # base 2 bytes past an aligned allocation
    assert not fwd._tma_eligible(cfg, 64, shifted, t, t)
    odd_rows = torch.zeros(2, 40, 4, 68, dtype=torch.float16)[..., :64]  # row stride 136 bytes
    assert not fwd._tma_eligible(cfg, 64, t, odd_rows, t)
    assert not fwd._tma_eligible(cfg, 64, t, t[:, :0], t[:, :0])


def test_float64_is_refused_with_the_fix(device):
    q, k, v = _qkv((1, 8, 2, 16), (1, 8, 2, 16), torch.float64, device)
    with pytest.raises(ValueError, match=r"float64.*backend='cpu'.*backend='reference'"):
        block_attention(q, k, v, causal=True, backend="triton")


def test_aot_compile_one_kernel_for_sm90():
    """AOT needs a process whose triton compiles (not interpreting): a fresh interpreter, without the
    variable, compiles the causal dQ kernel for sm_90 in fp16 at D=128 (the kernel whose wgmma ptxas
    serialized, C7515, before its diagonal tiles left the main loop). No GPU is needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    code = ("from longvila_engine.kernels.triton import aot\n"
            "r = aot.compile_kernel('attn_bwd_dq', 90, 'fp16', 128)\n"
            "print(r.n_regs, r.n_spills, r.shared, r.stages, r.block, repr(r.problems))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_regs, n_spills, shared, stages, block, problems = proc.stdout.split(maxsplit=5)
    assert 0 < int(n_regs) <= 255 and int(shared) > 0
    assert block.startswith("128x") and int(stages) >= 2  # 128-row dQ tiles, pipelined
    assert (int(n_spills), problems.strip()) == (0, "[]")


def test_aot_forward_uses_tma_on_sm90_only():
    """The sm_90 forward (bf16, D=128, the ring's hot path) compiles with tensor descriptors into TMA
    copies (`cp.async.bulk.tensor` in its PTX), without spills or serialized wgmma; the sm_80 one has none."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    code = ("from longvila_engine.kernels.triton import aot\n"
            "for arch in (90, 80):\n"
            "    r = aot.compile_kernel('attn_fwd', arch, 'bf16', 128)\n"
            "    print(arch, r.tma_copies, int(r.wants_tma), r.n_spills, r.stages, len(r.problems))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {int(line.split()[0]): [int(x) for x in line.split()[1:]] for line in proc.stdout.splitlines()}
    tma90, wants90, spills90, stages90, problems90 = rows[90]
    assert tma90 > 0 and wants90 == 1 and stages90 >= 3 and (spills90, problems90) == (0, 0)
    assert rows[80][:2] == [0, 0] and rows[80][2:] == [0, 3, 0]


@pytest.mark.parametrize("arch,notes,spills,want", [
    (90, ("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized",), 0,
     ["wgmma serialized (ptxas C7515)"]),
    (80, ("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized",), 0, []),
    (90, (), 12, ["12 bytes of register spills"]),
    (80, (), 0, []),
])
def test_aot_rejects_spills_and_serialized_wgmma(arch, notes, spills, want):
    from longvila_engine.kernels.triton.aot import AotResult

    r = AotResult("attn_bwd_dq", arch, "fp16", 128, 192, spills, 98304, 3, 8, "128x32", notes, 1.0)
    assert r.problems == want


def test_aot_accepts_spills_only_in_configs_measured_faster():
    """The sm_90 dK/dV configs that spill were measured faster on an H200 and are listed; the same
    tile shape with another warp count, or the same config on sm_80, is still rejected."""
    from longvila_engine.kernels.triton import attention_bwd as ab
    from longvila_engine.kernels.triton.aot import AotResult

    tiles = {"BLOCK_D": 128, "BLOCK_M": 64, "BLOCK_N": 64}
    assert ab.spills_measured_faster(90, "dkdv", tiles, {"num_warps": 4, "num_stages": 2})
    assert not ab.spills_measured_faster(90, "dkdv", tiles, {"num_warps": 8, "num_stages": 2})
    assert not ab.spills_measured_faster(80, "dkdv", tiles, {"num_warps": 4, "num_stages": 2})
    assert not ab.spills_measured_faster(90, "dq", tiles, {"num_warps": 4, "num_stages": 2})
    args = ("attn_bwd_dkdv", 90, "bf16", 128, 255, 2240, 99328, 2, 4, "64x64", (), 1.0)
    assert AotResult(*args, spills_measured=True).problems == []
    assert AotResult(*args).problems == ["2240 bytes of register spills"]


def test_aot_rejects_descriptors_without_tma_copies():
    from longvila_engine.kernels.triton.aot import AotResult

    args = ("attn_fwd", 90, "bf16", 128, 244, 0, 131072, 3, 8, "128x64", (), 1.0)
    assert AotResult(*args, tma_copies=0, wants_tma=True).problems == [
        "tensor descriptors compiled without TMA (cp.async.bulk.tensor not in the PTX)"]
    assert AotResult(*args, tma_copies=4, wants_tma=True).problems == []
    assert AotResult(*args).problems == []
