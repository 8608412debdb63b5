"""`aten` backend: block attention through PyTorch's own fused kernels that return the log-sum-exp.

CPU: `aten::_scaled_dot_product_flash_attention_for_cpu` and its `_backward`. CUDA:
`_scaled_dot_product_flash_attention` (fp16/bf16), `_scaled_dot_product_efficient_attention` (fp32,
or causal with S_q != S_k), `_scaled_dot_product_cudnn_attention` when LONGVILA_ATEN_CUDA_KERNEL=cudnn
asks for it (on square or non-causal blocks), each with its `_backward` op.

Conventions checked against `reference`: the ops take (B, H, S, D) views (a transpose of our (B, S, H, D),
no copy) and return a natural-log lse of (B, H, S) in float32 (float64 for float64 on CPU); the
memory-efficient op pads it to a multiple of 32 rows and cuDNN returns (B, H, S, 1), so it is cut to
(B, H, S). `is_causal` is top-left aligned on CPU and in the memory-efficient op; the CUDA flash op
is used causally only on square blocks, the one case where top-left and bottom-right agree.

What this backend adds around them: GQA (native on CPU; K/V repeated per query head on CUDA, their
gradients summed back), rows that see no key (an empty key block: the CPU op would divide by zero)
get lse = -inf and out = 0 without calling the op, a final lse of -inf is turned into +inf before a
backward so those rows get exactly zero gradient, resume goes through `merge_attention`, and packed
varlen runs one op per sequence on CPU (reading `cu_seqlens` on the host costs nothing there). Not
here: varlen on CUDA (that would be a host synchronisation; ValueError, use `triton`), float64 on
CUDA, dropout. Outputs of 16-bit inputs are rounded to the input dtype by the ops themselves (block
out, gradients) before they reach the float32 accumulators; `cpu` and `triton` keep them in float32.

merge / zigzag / varlen-index are the plain tensor-op implementations of `reference` (memory-bound,
O(S), no host synchronisation), so `auto` can use them on a GPU without the CUDA extension.

Legend: B batch, S sequence, H query heads, H_kv key/value heads, D head dim.
"""
from __future__ import annotations

import os

import torch

from ._validate import acc_dtype
from .reference import merge as merge  # noqa: F401  (re-exported as this backend's merge)
from .reference import varlen_index as varlen_index  # noqa: F401
from .reference import zigzag_permute as zigzag_permute  # noqa: F401

CUDA_KERNELS = ("flash", "efficient", "cudnn")
_ENV_KERNEL = "LONGVILA_ATEN_CUDA_KERNEL"


def cuda_kernel(dtype: torch.dtype, causal: bool, seqlen_q: int, seqlen_k: int, head_dim: int) -> str:
    """Which fused CUDA op runs this block: LONGVILA_ATEN_CUDA_KERNEL if set, else flash for
    fp16/bf16 (head dim a multiple of 8 up to 256), else efficient. A causal block with S_q != S_k
    always takes efficient, the one whose mask is documented top-left (flash aligns it bottom-right)."""
    square_or_full = not causal or seqlen_q == seqlen_k
    forced = os.environ.get(_ENV_KERNEL)
    if forced:
        if forced not in CUDA_KERNELS:
            raise ValueError(f"{_ENV_KERNEL}={forced!r} is unknown; choose one of {CUDA_KERNELS} or unset it")
        return forced if square_or_full else "efficient"
    if dtype == torch.float32:
        return "efficient"
    if square_or_full and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    return "efficient"


def check_supported(q, cu_seqlens_q) -> None:
    """ValueError for what the CUDA ops cannot do (the CPU op takes every dtype of the contract)."""
    if q.device.type == "cpu":
        return
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='aten' on {q.device} takes float16, bfloat16 or float32, got {q.dtype}; "
                         f"pass backend='reference' explicitly for {q.dtype} (it materialises S_q x S_k scores)")
    if cu_seqlens_q is not None:
        raise ValueError("backend='aten' does not take cu_seqlens on CUDA (it would read them on the host); "
                         "use backend='triton' for packed varlen batches")


def _segments(cu_q, cu_k, sq, sk):
    if cu_q is None:
        return [(0, sq, 0, sk)]
    a, b = cu_q.tolist(), cu_k.tolist()
    return [(a[i], a[i + 1], b[i], b[i + 1]) for i in range(len(a) - 1)]


def _bhsd(x):
    return x.transpose(1, 2)


def _repeat_kv(x_BSKD, num_heads):
    group = num_heads // x_BSKD.shape[2]
    return x_BSKD.repeat_interleave(group, dim=2) if group > 1 else x_BSKD


def _sum_groups(g_BSHD, num_kv_heads):
    b, s, h, d = g_BSHD.shape
    return g_BSHD if h == num_kv_heads else g_BSHD.reshape(b, s, num_kv_heads, h // num_kv_heads, d).sum(3)


def _philox_state(device):
    """(seed, offset) stand-ins: with dropout 0 the kernels never read them."""
    return torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device)


def _forward_dense(q, k, v, scale, causal):
    """One dense block: (out (B,S_q,H,D) view in q's dtype, lse (B,H,S_q)); S_k > 0, S_q > 0."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
        return _bhsd(o), lse
    num_heads, seqlen_q = q.shape[2], q.shape[1]
    k, v = _repeat_kv(k, num_heads), _repeat_kv(v, num_heads)
    kernel = cuda_kernel(q.dtype, causal, seqlen_q, k.shape[1], q.shape[3])
    a = torch.ops.aten
    if kernel == "flash":
        res = a._scaled_dot_product_flash_attention(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale)
    elif kernel == "cudnn":
        res = a._scaled_dot_product_cudnn_attention(_bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False,
                                                    scale=scale)
    else:
        res = a._scaled_dot_product_efficient_attention(_bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal,
                                                        scale=scale)
    o, lse = res[0], res[1]
    b = q.shape[0]
    # efficient pads lse rows to a multiple of 32, cuDNN returns (B, H, S, 1): cut to (B, H, S). (Only
    # when needed: slicing a fake CUDA tensor fails on a CPU-only torch, and the dry run traces this.)
    lse = lse.reshape(b, num_heads, -1)
    return _bhsd(o), lse if lse.shape[-1] == seqlen_q else lse[:, :, :seqlen_q]


def _backward_dense(dout, q, k, v, out, lse, scale, causal):
    """Gradients of one dense block, (dq, dk, dv) in q's dtype, dk/dv at H_kv heads."""
    if q.device.type == "cpu":
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, causal, scale=scale)
        return _bhsd(gq), _bhsd(gk), _bhsd(gv)
    b, seqlen_q, num_heads, _ = q.shape
    num_kv_heads, seqlen_k = k.shape[2], k.shape[1]
    k, v = _repeat_kv(k, num_heads), _repeat_kv(v, num_heads)
    kernel = cuda_kernel(q.dtype, causal, seqlen_q, seqlen_k, q.shape[3])
    a = torch.ops.aten
    dev = q.device
    args = (_bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v))
    if kernel == "flash":
        # Dropout is 0, so the RNG state is never read; shapes and dtypes are those the forward returns.
        rng = torch.zeros(2, dtype=torch.uint64, device=dev)
        unused = torch.zeros((), dtype=torch.uint64, device=dev)
        gq, gk, gv = a._scaled_dot_product_flash_attention_backward(
            *args, _bhsd(out), lse, None, None, seqlen_q, seqlen_k, 0.0, causal, rng, unused, scale=scale)
    elif kernel == "cudnn":
        seed, offset = _philox_state(dev)
        gq, gk, gv = a._scaled_dot_product_cudnn_attention_backward(
            *args, _bhsd(out), lse.unsqueeze(-1), seed, offset, None, None, None, seqlen_q, seqlen_k, 0.0, causal,
            scale=scale)
    else:
        pad = (-seqlen_q) % 32  # the efficient kernel reads lse rows in multiples of 32
        lse_padded = torch.nn.functional.pad(lse, (0, pad)) if pad else lse
        seed, offset = _philox_state(dev)
        gq, gk, gv, _ = a._scaled_dot_product_efficient_attention_backward(
            *args, None, _bhsd(out), lse_padded, seed, offset, 0.0, [True, True, True, False], causal,
            scale=scale)
    gq, gk, gv = _bhsd(gq), _bhsd(gk), _bhsd(gv)
    return gq, _sum_groups(gk, num_kv_heads), _sum_groups(gv, num_kv_heads)


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    """Same contract as `reference.forward`: writes (or with `resume` merges into) out/lse in place."""
    check_supported(q, cu_seqlens_q)
    acc = acc_dtype(q.dtype)
    segments = _segments(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1])
    if len(segments) == 1 and segments[0][1] > 0 and segments[0][3] > 0:
        block_out, block_lse = _forward_dense(q, k, v, softmax_scale, causal)
        block_lse = block_lse.to(acc)
    else:
        block_out = torch.zeros(out.shape, dtype=q.dtype, device=q.device)
        block_lse = torch.full(lse.shape, float("-inf"), dtype=acc, device=q.device)
        for q0, q1, k0, k1 in segments:
            if q1 > q0 and k1 > k0:  # an empty key range keeps out = 0, lse = -inf
                o, s_lse = _forward_dense(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], softmax_scale, causal)
                block_out[:, q0:q1] = o
                block_lse[:, :, q0:q1] = s_lse
    if resume:
        from . import merge_attention

        merge_attention(out, lse, block_out, block_lse)
    else:
        out.copy_(block_out)
        lse.copy_(block_lse)


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, accumulate):
    """Same contract as `reference.backward`; dq/dk/dv are overwritten or, with `accumulate`, added to."""
    check_supported(q, cu_seqlens_q)
    # A row whose final lse is -inf saw no key: +inf makes its probabilities exp(s - inf) = 0 exactly,
    # where the fused kernels would otherwise compute exp(s + inf).
    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    dout = dout.to(q.dtype)
    out = out.to(q.dtype)
    if cu_seqlens_q is None and q.shape[1] > 0 and k.shape[1] > 0:
        grads = _backward_dense(dout, q, k, v, out, lse, softmax_scale, causal)
        for dst, src in zip((dq, dk, dv), grads):
            dst.add_(src) if accumulate else dst.copy_(src)
        return
    if not accumulate:
        for t in (dq, dk, dv):
            t.zero_()
    for q0, q1, k0, k1 in _segments(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1]):
        if q1 == q0 or k1 == k0:
            continue
        gq, gk, gv = _backward_dense(dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1],
                                     lse[:, :, q0:q1].contiguous(), softmax_scale, causal)
        dq[:, q0:q1] += gq
        dk[:, k0:k1] += gk
        dv[:, k0:k1] += gv
