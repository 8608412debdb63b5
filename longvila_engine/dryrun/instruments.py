"""Instruments of the dry run: FLOP formulas for the engine's attention operators, a dispatch
recorder (attention backend, host syncs, FSDP collective bytes) and RMSNorm as CUDA keeps it.

Deliberately not here: the step itself (step.py) and its reports (report.py)."""
from __future__ import annotations

import contextlib
import os
import traceback

import torch


# --- FLOP formulas for the engine's attention operators ----------------------------------------------------
def _pairs(q, k, causal, cu_q, cu_k) -> tuple[int, bool]:
    """(visible pairs per head, exact?) of one block call; fake cu_seqlens give the dense worst case."""
    from torch._subclasses.fake_tensor import FakeTensor

    from ..ops.flops import visible_pairs

    B, S_q, S_k = q.shape[0], q.shape[1], k.shape[1]
    if cu_q is None:
        return B * visible_pairs(S_q, S_k, causal), True
    if isinstance(cu_q, FakeTensor) or isinstance(cu_k, FakeTensor):
        return visible_pairs(S_q, S_k, causal), False
    a, b = cu_q.tolist(), cu_k.tolist()
    return sum(visible_pairs(a[i + 1] - a[i], b[i + 1] - b[i], causal) for i in range(len(a) - 1)), True


INEXACT_CALLS = {"count": 0}


def _attn_fwd_flops(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume, *args,
                    out_val=None, **kwargs) -> int:
    # ops.flops rule: QK^T and PV, 4*D FLOPs per visible pair and query head.
    pairs, exact = _pairs(q, k, causal, cu_seqlens_q, cu_seqlens_k)
    INEXACT_CALLS["count"] += 0 if exact else 1
    return 4 * q.shape[3] * q.shape[2] * pairs


def _attn_bwd_flops(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                    accumulate, *args, out_val=None, **kwargs) -> int:
    # ops.flops rule: flash-style backward recomputes QK^T: 10*D FLOPs per visible pair and query head.
    pairs, exact = _pairs(q, k, causal, cu_seqlens_q, cu_seqlens_k)
    INEXACT_CALLS["count"] += 0 if exact else 1
    return 10 * q.shape[3] * q.shape[2] * pairs


def attention_flop_formulas() -> dict:
    """{op packet: raw flop formula} for FlopCounterMode(custom_mapping=...): the engine's C++ attention
    operators (and the Triton ones where they are registered as torch.library ops with the same
    argument order), counted by the rule of `ops.flops.attention_flops`."""
    formulas = {}
    for fn in (_attn_fwd_flops, _attn_bwd_flops):
        fn._get_raw = True
    try:
        from .._extension import extension_available

        have_ext = extension_available()
    except Exception:  # noqa: BLE001 - no extension: nothing of ours to count
        have_ext = False
    if have_ext:
        ns = torch.ops.longvila_engine
        formulas[ns.attn_fwd] = _attn_fwd_flops
        formulas[ns.attn_bwd] = _attn_bwd_flops
    try:  # the Triton launchers' torch.library ops (same argument order as the C++ ones)
        from ..kernels.triton import attention_bwd, attention_fwd  # noqa: F401

        formulas[torch.ops.longvila_engine.triton_attn_fwd] = _attn_fwd_flops
        formulas[torch.ops.longvila_engine.triton_attn_bwd] = _attn_bwd_flops
    except (ImportError, AttributeError, RuntimeError):  # no triton here, or an older tree without the ops
        pass
    return formulas


# --- what the step dispatched --------------------------------------------------------------------------------
_ATTENTION_OPS = {
    "longvila_engine::attn_fwd": "cpu",
    "longvila_engine::attn_bwd": "cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "aten",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "aten",
    "aten::_scaled_dot_product_flash_attention": "aten",
    "aten::_scaled_dot_product_flash_attention_backward": "aten",
    "aten::_scaled_dot_product_efficient_attention": "aten",
    "aten::_scaled_dot_product_efficient_attention_backward": "aten",
    "aten::_scaled_dot_product_cudnn_attention": "aten",
    "aten::_flash_attention_forward": "aten",
    "aten::_flash_attention_backward": "aten",
}
_COLLECTIVE_BYTES = {  # c10d op -> index of the argument whose bytes leave this rank (x (p-1)/p or p-1)
    "c10d::_allgather_base_": 1,
    "c10d::allgather_into_tensor_coalesced_": 1,
    "c10d::_reduce_scatter_base_": 1,
    "c10d::reduce_scatter_tensor_coalesced_": 1,
}


def _op_name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


def _attention_backend(name: str) -> str | None:
    if name in _ATTENTION_OPS:
        return _ATTENTION_OPS[name]
    if "triton" in name and ("attn" in name or "attention" in name):
        return "triton"
    return None


class _StepRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, per op, the attention calls (by backend), host syncs (`_local_scalar_dense`, with where
    they came from) and the FSDP collectives' bytes, while passing every op through unchanged."""

    def __init__(self):
        super().__init__()
        self.attention: dict[str, int] = {}
        self.host_syncs: list[str] = []
        self.collective_bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        backend = _attention_backend(name)
        if backend is not None:
            key = f"{backend}: {name}"
            self.attention[key] = self.attention.get(key, 0) + 1
        if name == "aten::_local_scalar_dense":
            self.host_syncs.append(_caller())
        if name in _COLLECTIVE_BYTES:
            t = args[_COLLECTIVE_BYTES[name]]
            tensors = t if isinstance(t, (list, tuple)) else [t]
            nbytes = sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))
            self.collective_bytes[name] = self.collective_bytes.get(name, 0) + nbytes
        return func(*args, **(kwargs or {}))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(os.path.dirname(_PACKAGE_DIR))


def engine_frame(frames) -> str:
    """file:line (from the repository root) of the innermost engine frame outside the dry run itself."""
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if "longvila_engine" in path and os.path.dirname(path) != _PACKAGE_DIR:
            return f"{os.path.relpath(path, _REPO_ROOT)}:{frame.lineno}"
    return "outside longvila_engine"


def _caller() -> str:
    """Where a host sync came from: the innermost engine frame on the stack."""
    return engine_frame(traceback.extract_stack())


# --- RMSNorm as CUDA keeps it ---------------------------------------------------------------------------------
class _RMSNormSavingInput(torch.autograd.Function):
    """F.rms_norm with what CUDA's fused kernel (`aten::_fused_rms_norm`) keeps for backward: the input
    and a float32 rstd per row. On CPU, rms_norm is composite: autograd there keeps the float32 upcast
    of the input and the float32 normalised rows (2 x 4 bytes per element instead of 2 bytes): a CPU
    dispatch artefact that would inflate a GPU estimate by ~64 KB per token and layer at hidden 4096."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            x32 = x.to(acc)
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            y = (x32 * rstd).to(x.dtype)
            if weight is not None:
                y = y * weight
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        g = dy.to(rstd.dtype) * (weight.to(rstd.dtype) if weight is not None else 1.0)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = None
        if weight is not None:
            dw = (dy.to(rstd.dtype) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), None, dw, None


def _rms_norm_saving_input(x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        raise ValueError(f"normalized_shape={tuple(normalized_shape)}: the dry run's RMSNorm normalises the "
                         f"last dim only")
    return _RMSNormSavingInput.apply(x, normalized_shape, weight, eps)


@contextlib.contextmanager
def _cuda_rms_norm(enabled: bool):
    """Within the dry run (precision='gpu'): torch.nn.functional.rms_norm keeps what CUDA keeps."""
    import torch.nn.functional as F

    original = F.rms_norm
    if enabled:
        F.rms_norm = _rms_norm_saving_input
    try:
        yield
    finally:
        F.rms_norm = original


