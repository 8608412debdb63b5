"""Every attention backend against `reference` on a CUDA GPU, and generation on CUDA (`pytest -m gpu`).

Skipped on CPU, with the reason. Run by `make gpu-check` (scripts/gpu_check.py). Covers, per backend
that runs attention on CUDA (`triton`, `aten`): fp16 and bf16, head dims 64 and 128, causal and not,
GQA (8 query heads on 2 K/V heads), forward, backward, and resume into a running (out, lse); for
`triton` also packed varlen batches (`aten` refuses them on CUDA: that is checked too).

The tolerance rule (flash-attention's): a backend's error against a float64 reference is at most 2x
(forward) / 3x (backward) the error of plain PyTorch attention computed in the same low precision
(`_plain_low_precision`), plus a small absolute floor.
"""
import pytest
import torch

from longvila_engine import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ATTN_BACKENDS = ["triton", "aten"]
DTYPES = [torch.float16, torch.bfloat16]
FLOOR = 2e-3


def _inputs(seed, B, Sq, Sk, H, H_kv, D, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64)

    q, k, v = randn(B, Sq, H, D), randn(B, Sk, H_kv, D), randn(B, Sk, H_kv, D)
    dout = randn(B, Sq, H, D)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _fwd_bwd(backend, q, k, v, dout, causal, cu_q=None, cu_k=None):
    out, lse = ops.block_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    dq, dk, dv = ops.block_attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q,
                                              cu_seqlens_k=cu_k, backend=backend)
    return out, lse, dq, dk, dv


def _plain_low_precision(q, k, v, dout, causal, cu_q=None, cu_k=None):
    """Attention in plain PyTorch ops at the inputs' own dtype (scores, probabilities and products in
    fp16/bf16; softmax statistics in float32), with autograd gradients: the error yardstick."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    ks, vs = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    bounds_q = [0, q.shape[1]] if cu_q is None else cu_q.tolist()
    bounds_k = [0, k.shape[1]] if cu_k is None else cu_k.tolist()
    outs, lses = [], []
    for i in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[i:i + 2], bounds_k[i:i + 2]
        scores = torch.einsum("bshd,bthd->bhst", q[:, q0:q1], ks[:, k0:k1]) * q.shape[-1] ** -0.5
        if causal:
            visible = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores.float(), dim=-1)
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
        outs.append(torch.einsum("bhst,bthd->bshd", probs, vs[:, k0:k1]))
        lses.append(lse)
    out, lse = torch.cat(outs, 1), torch.cat(lses, -1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse.detach(), dq, dk, dv


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def _check_rule(backend, q, k, v, dout, causal, cu_q=None, cu_k=None):
    exact = _fwd_bwd("reference", *(t.double() for t in (q, k, v, dout)), causal, cu_q, cu_k)
    plain = _plain_low_precision(q, k, v, dout, causal, cu_q, cu_k)
    got = _fwd_bwd(backend, q, k, v, dout, causal, cu_q, cu_k)
    torch.cuda.synchronize()
    names = ["out", "lse", "dq", "dk", "dv"]
    for i, name in enumerate(names):
        assert got[i].shape == exact[i].shape, (name, got[i].shape, exact[i].shape)
        assert not got[i].isnan().any(), f"{backend} {name} has NaN"
        factor = 2.0 if i < 2 else 3.0
        bound = factor * _err(plain[i], exact[i]) + FLOOR
        assert _err(got[i], exact[i]) <= bound, (backend, name, _err(got[i], exact[i]), bound)
    # Fully masked rows: lse -inf and out 0, as on CPU.
    masked = torch.isneginf(exact[1])
    assert torch.equal(torch.isneginf(got[1]), masked)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_block_attention_gqa_against_reference(backend, dtype, head_dim, causal):
    # Odd lengths (not multiples of any tile) and S_q != S_k.
    q, k, v, dout = _inputs(1, 2, 333, 333 if causal else 517, 8, 2, head_dim, dtype)
    _check_rule(backend, q, k, v, dout, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_varlen_against_reference(dtype, head_dim):
    lengths = [1, 130, 77, 300]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    q, k, v, dout = _inputs(2, 1, sum(lengths), sum(lengths), 8, 2, head_dim, dtype)
    for causal in (True, False):
        _check_rule("triton", q, k, v, dout, causal, cu, cu)


def test_aten_refuses_varlen_on_cuda():
    q, k, v, _ = _inputs(3, 1, 64, 64, 4, 2, 64, torch.bfloat16)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.block_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="aten")


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_resume_two_blocks_equals_one_pass(backend, dtype, head_dim):
    """A ring step: block 1 causal, then block 2 (earlier keys, fully visible) merged into (out, lse)."""
    q, k1, v1, _ = _inputs(4, 1, 256, 256, 8, 2, head_dim, dtype)
    _, k2, v2, _ = _inputs(5, 1, 256, 200, 8, 2, head_dim, dtype)
    out, lse = ops.block_attention(q, k1, v1, causal=True, backend=backend)
    out, lse = out.float(), lse.float()
    ops.block_attention(q, k2, v2, causal=False, out=out, lse=lse, backend=backend)
    # One pass over [k2, k1] with the mask that shows all of k2 and the causal part of k1.
    qd, kd, vd = q.double(), torch.cat([k2, k1], 1).double(), torch.cat([v2, v1], 1).double()
    kd, vd = kd.repeat_interleave(4, dim=2), vd.repeat_interleave(4, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", qd, kd) / head_dim ** 0.5
    visible = torch.ones(256, 456, dtype=torch.bool, device="cuda")
    visible[:, 200:] = torch.tril(visible[:, 200:])
    scores = scores.masked_fill(~visible, float("-inf"))
    want_lse = torch.logsumexp(scores, dim=-1)
    want = torch.einsum("bhst,bthd->bshd", torch.softmax(scores, -1), vd)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-2)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_flash_attention_autograd_auto_backend(dtype):
    """`backend='auto'` on CUDA never picks `reference`, and the autograd op matches the float64 one."""
    q, k, v, dout = _inputs(6, 1, 512, 512, 8, 2, 128, dtype)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    y = ops.flash_attention(qs, ks, vs, causal=True)
    y.backward(dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    y64 = ops.flash_attention(q64, k64, v64, causal=True, backend="reference")
    y64.backward(dout.double())
    assert _err(y, y64) < 3e-2
    for got, want in ((qs.grad, q64.grad), (ks.grad, k64.grad), (vs.grad, v64.grad)):
        assert _err(got, want) < 1e-1


def test_generate_on_cuda_matches_cpu():
    """Greedy generation with the KV cache on CUDA (float32) gives the CPU tokens."""
    from test_multimodal import SEVEN, _build, _sample

    from longvila_engine.inference import generate

    ids, frames, _ = _sample(7, SEVEN, dtype=torch.float32)
    cpu_model = _build(None, dtype=torch.float32)
    want = generate(cpu_model, ids, frames, None, 8)
    gpu_model = _build(None, dtype=torch.float32).to("cuda")
    got = generate(gpu_model, ids.cuda(), frames.cuda(), None, 8)
    assert got.tokens.cpu().tolist() == want.tokens.tolist()
    torch.testing.assert_close(got.logits.cpu(), want.logits, rtol=0, atol=1e-3)
