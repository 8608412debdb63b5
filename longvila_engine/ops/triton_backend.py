"""`triton` backend: block attention forward/backward through the Triton kernels.

Entry points with exactly the signatures of `reference.forward`/`reference.backward`, writing in
place; arguments were validated by `longvila_engine.ops`. The kernels live in
`longvila_engine.kernels.triton` and are imported on first use, so importing this module costs nothing
and never touches CUDA.

What it does not do: float64 (refused with the backends that take it), merge/zigzag/varlen-index ops
(other backends have them), or any host synchronisation: varlen offsets are read on the device.
CPU tensors run only when the process imported triton with TRITON_INTERPRET=1 (Triton's interpreter,
for tests); see `kernels.triton.attention_fwd.process_interprets`.
"""
from __future__ import annotations

import torch


def _check_dtype(q) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"backend='triton' takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                         f"use backend='cpu' or backend='reference' for {q.dtype}")


def forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    _check_dtype(q)
    from ..kernels.triton.attention_fwd import attention_fwd

    attention_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume)


def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, accumulate):
    _check_dtype(q)
    from ..kernels.triton.attention_bwd import attention_bwd

    attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                  accumulate)
