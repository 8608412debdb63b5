"""`cpu` backend: thin calls into the C++/OpenMP operators (csrc/cpu) registered as
torch.ops.longvila_engine.*. Arguments were validated by longvila_engine.ops."""
from __future__ import annotations

import torch


def _ops():
    from .._extension import require_extension

    require_extension()
    return torch.ops.longvila_engine


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    _ops().attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), out, lse, cu_seqlens_q, cu_seqlens_k,
                    softmax_scale, causal, resume)


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, accumulate):
    _ops().attn_bwd(dout, q.contiguous(), k.contiguous(), v.contiguous(), out, lse, dq, dk, dv, cu_seqlens_q,
                    cu_seqlens_k, softmax_scale, causal, accumulate)


def merge(out, lse, out_block, lse_block):
    _ops().merge_attn(out, lse, out_block, lse_block)


def zigzag_permute(x, ring_size, dim, inverse):
    return _ops().zigzag_permute(x, ring_size, dim, inverse)


def varlen_index(cu_seqlens, total):
    return _ops().varlen_index(cu_seqlens, total)


def kernel_info() -> dict:
    """What the C++ CPU kernels loaded in this process run on this machine, e.g. {'vector_bits': '512',
    'fp32_block': '6x64', 'bf16_dot_built': '1', 'bf16_dot': '1', 'gemm': 'micro_kernel',
    'isa': 'avx512bf16'}.
    isa: the instruction-set variant of the kernel library the loader chose (the best one built that
    this CPU runs, or LONGVILA_CPU_ISA's; longvila_engine/_extension.py); vector_bits and
    bf16_dot_built follow from it. bf16_dot: bf16 inputs go through AVX512-BF16 pair dot products (set
    LONGVILA_CPU_BF16=fp32 before the first call for the float32 route)."""
    return dict(word.split("=", 1) for word in _ops().cpu_info().split())


def peak_gflops(kind: str = "fp32") -> float:
    """Single-thread arithmetic peak of this CPU in GFLOP/s, measured (about 0.1 s) by register-only
    chains of the instructions the kernels use: kind 'fp32' (vector FMAs) or 'bf16_dot' (AVX512-BF16
    pair dot products; 0.0 where unavailable). A yardstick for benchmark GFLOP/s, not a promise."""
    return float(_ops().cpu_peak_gflops(kind))
