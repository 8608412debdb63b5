"""Block attention operators and their backend dispatch (docs/design.md section 2).

One contract, several backends: `reference` (PyTorch oracle), `cpu` (C++/OpenMP extension), `triton`,
and `cuda` for the memory-bound pieces (merge, zigzag permutes, varlen indices). `backend="auto"`
picks the fastest one available for the tensors' device. This module validates arguments once; the
backends assume valid input.

Legend: B batch, S sequence, H query heads, H_kv key/value heads, D head dim.
"""
from __future__ import annotations

import importlib
import math

import torch

from . import autoselect, reference  # noqa: F401  (ops.reference stays an attribute)
from ._validate import acc_dtype, check_backward, check_out_lse, check_qkv
from .flops import attention_flops, visible_pairs

__all__ = [
    "block_attention",
    "block_attention_backward",
    "merge_attention",
    "flash_attention",
    "zigzag_permute",
    "zigzag_unpermute",
    "varlen_index",
    "available_backends",
    "attention_flops",
    "visible_pairs",
    "acc_dtype",
    "set_auto_backend",
]

set_auto_backend = autoselect.set_auto_backend

BACKENDS = ("reference", "cpu", "triton", "cuda", "aten")
_MODULES = {"reference": "longvila_engine.ops.reference", "cpu": "longvila_engine.ops.cpu",
            "triton": "longvila_engine.ops.triton_backend", "cuda": "longvila_engine.ops.cuda",
            "aten": "longvila_engine.ops.aten"}
# Which operations each backend implements.
_SUPPORTS = {
    "reference": {"forward", "backward", "merge", "zigzag", "varlen"},
    "cpu": {"forward", "backward", "merge", "zigzag", "varlen"},
    "triton": {"forward", "backward"},
    "cuda": {"merge", "zigzag", "varlen"},
    "aten": {"forward", "backward", "merge", "zigzag", "varlen"},
}
_TRITON_FIX = "pip install triton==3.7.1 (the version the Makefile pins)"


def _available(name: str, device: torch.device) -> bool:
    from .._extension import cuda_kernels_available, extension_available

    if name in ("reference", "aten"):
        return True
    if name == "cpu":
        return device.type == "cpu" and extension_available()
    if name == "cuda":
        return device.type == "cuda" and cuda_kernels_available()
    if name == "triton":
        return _triton_problem(device) is None
    return False


def _triton_problem(device: torch.device) -> str | None:
    """Why the triton backend cannot run tensors on `device` in this process, or None."""
    import os

    interpret_env = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret_env:
        return f"triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), tensors are on {device}"
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not importable ({e}); fix: {_TRITON_FIX}"
    if device.type == "cuda":
        from ..kernels.triton.attention_fwd import process_interprets

        if interpret_env or process_interprets():
            return ("TRITON_INTERPRET=1 would run CUDA tensors in Triton's CPU interpreter; unset it "
                    "before python starts")
    return None


def _auto_candidates(op: str, device: torch.device, dtype=None, varlen=False) -> list[str]:
    """Backends `auto` may pick, default first. Never `reference`: for CUDA tensors that would be a
    silent O(S^2) fallback; on CPU `aten` is always there."""
    if op not in ("forward", "backward"):
        first = "cuda" if device.type == "cuda" else "cpu"
        return [first] if _available(first, device) else ["aten"]
    if device.type == "cuda":
        kernel_dtype = dtype in (torch.float16, torch.bfloat16, torch.float32) or dtype is None
        found = ["triton"] if kernel_dtype and _available("triton", device) else []
        if kernel_dtype and not varlen:
            found.append("aten")
        if not found:
            why = [_triton_problem(device) or "triton takes float16, bfloat16 or float32"]
            if not kernel_dtype:
                why.append(f"{dtype} needs backend='reference', passed explicitly (it materialises the scores)")
            if varlen:
                why.append("aten takes no cu_seqlens on CUDA")
            raise ValueError(f"backend='auto' has no attention kernel for these {device} tensors: " + "; ".join(why))
        return found
    found = ["cpu"] if _available("cpu", device) else []
    # aten rounds 16-bit block results and gradients to the input dtype; cpu keeps float32, so on CPU
    # aten competes only where both are exact to the accumulator (fp32, fp64), or when cpu is missing.
    if not found or dtype in (torch.float32, torch.float64):
        found.append("aten")
    return found


def _attention_backend(name: str, op: str, q, k, causal: bool, varlen: bool, resume: bool, run):
    """The backend module for one attention call; `run(name)` runs it into scratch outputs (auto only)."""
    if name != "auto":
        return _backend(name, op, q.device)
    candidates = _auto_candidates(op, q.device, q.dtype, varlen)
    key = autoselect.shape_class(op, q, k, causal, varlen, resume)
    chosen = autoselect.choose(candidates, key, q, lambda cand: run(importlib.import_module(_MODULES[cand])))
    return importlib.import_module(_MODULES[chosen])


def available_backends(device="cpu") -> list[str]:
    """Backends usable for tensors on `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if _available(b, device)]


def _backend(name: str, op: str, device: torch.device):
    if name == "auto":
        return importlib.import_module(_MODULES[_auto_candidates(op, device)[0]])
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is unknown; choose one of {('auto',) + BACKENDS}")
    if op not in _SUPPORTS[name]:
        ops = sorted(_SUPPORTS[name])
        raise ValueError(f"backend={name!r} does not implement {op!r} (it has {ops}); use backend='auto'")
    if name == "cpu":
        from .._extension import require_extension

        require_extension()
    if name == "triton" and _triton_problem(device) is not None:
        raise ValueError(f"backend='triton' cannot run tensors on {device}: {_triton_problem(device)}")
    if not _available(name, device):
        raise ValueError(f"backend={name!r} is not available for tensors on {device}; available: "
                         f"{available_backends(device)}")
    return importlib.import_module(_MODULES[name])


def _scale(softmax_scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def block_attention(q, k, v, *, causal, softmax_scale=None, out=None, lse=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, backend="auto"):
    """Attention of one block, optionally merged into a running result.

    | arg | shape | dtype |
    |---|---|---|
    | q | (B, S_q, H, D) | fp16/bf16/fp32/fp64 |
    | k, v | (B, S_k, H_kv, D) | as q |
    | out (resume) | (B, S_q, H, D) | float32 (float64 for fp64 q), updated in place |
    | lse (resume) | (B, H, S_q) | as out, natural log |

    Without out/lse returns (out in q's dtype, lse float32/float64). With them, the block result is
    merged in place (the fused ring step) and the same two tensors are returned. `causal` masks
    top-left aligned (query i sees keys j <= i of its block). Rows that see no key get lse=-inf, out=0.
    Packed varlen: B=1 and int32 `cu_seqlens_q`/`cu_seqlens_k` of N+1 offsets.
    """
    check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check_out_lse(q, out, lse)
    scale = _scale(softmax_scale, q.shape[-1])
    resume, varlen = out is not None, cu_seqlens_q is not None

    def run(mod):  # one scratch run, for auto's one-time measurement
        acc = acc_dtype(q.dtype)
        o = out.clone() if resume else torch.empty(q.shape, dtype=acc, device=q.device)
        s = lse.clone() if resume else torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=acc, device=q.device)
        mod.forward(q, k, v, o, s, cu_seqlens_q, cu_seqlens_k, scale, bool(causal), resume)

    be = _attention_backend(backend, "forward", q, k, causal, varlen, resume, run)
    if out is not None:
        be.forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, bool(causal), True)
        return out, lse
    B, S, H, D = q.shape
    acc = acc_dtype(q.dtype)
    out_acc = torch.empty((B, S, H, D), dtype=acc, device=q.device)
    lse_new = torch.empty((B, H, S), dtype=acc, device=q.device)
    be.forward(q, k, v, out_acc, lse_new, cu_seqlens_q, cu_seqlens_k, scale, bool(causal), False)
    return out_acc.to(q.dtype), lse_new


def block_attention_backward(dout, q, k, v, out, lse, *, causal, softmax_scale=None, cu_seqlens_q=None,
                             cu_seqlens_k=None, dq=None, dk=None, dv=None, backend="auto"):
    """Gradients of one block against the final (out, lse) of the rows of q.

    Returns (dq, dk, dv) in the accumulator dtype (float32, float64 for fp64), dk/dv at H_kv heads.
    When dq/dk/dv are given they are accumulated into in place (ring backward) and returned.
    """
    check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check_backward(dout, q, out, lse)
    acc = acc_dtype(q.dtype)
    scale = _scale(softmax_scale, q.shape[-1])

    def run(mod):  # one scratch run, for auto's one-time measurement
        grads = [torch.empty(t.shape, dtype=acc, device=q.device) for t in (q, k, v)]
        mod.backward(dout.contiguous(), q, k, v, out.contiguous(), lse.to(acc).contiguous(), *grads, cu_seqlens_q,
                     cu_seqlens_k, scale, bool(causal), False)

    be = _attention_backend(backend, "backward", q, k, causal, cu_seqlens_q is not None, dq is not None, run)
    given = (dq is not None, dk is not None, dv is not None)
    if any(given) and not all(given):
        raise ValueError("dq, dk and dv must be given together (to accumulate into) or not at all")
    accumulate = all(given)
    if accumulate:
        for name, t, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            if tuple(t.shape) != tuple(ref.shape) or t.dtype != acc or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {acc} tensor of shape {tuple(ref.shape)}, "
                                 f"got {t.dtype} {tuple(t.shape)}")
    else:
        dq = torch.empty(q.shape, dtype=acc, device=q.device)
        dk = torch.empty(k.shape, dtype=acc, device=q.device)
        dv = torch.empty(v.shape, dtype=acc, device=q.device)
    be.backward(dout.contiguous(), q, k, v, out.contiguous(), lse.to(acc).contiguous(), dq, dk, dv,
                cu_seqlens_q, cu_seqlens_k, scale, bool(causal), accumulate)
    return dq, dk, dv


def merge_attention(out, lse, out_block, lse_block, *, backend="auto"):
    """Merge a block result into the running (out, lse) in place; returns (out, lse).

    out (B,S,H,D) and lse (B,H,S) are the float32 (or float64) accumulators; out_block may be any
    float dtype of the same shape, lse_block (B,H,S).
    """
    for name, t, nd in (("out", out, 4), ("lse", lse, 3), ("out_block", out_block, 4), ("lse_block", lse_block, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    B, S, H, _ = out.shape
    if out_block.shape != out.shape:
        raise ValueError(f"out_block shape {tuple(out_block.shape)} must equal out shape {tuple(out.shape)}")
    for name, t in (("lse", lse), ("lse_block", lse_block)):
        if tuple(t.shape) != (B, H, S):
            raise ValueError(f"{name} must have shape (B, H, S)={(B, H, S)}, got {tuple(t.shape)}")
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype != out.dtype:
        raise ValueError(f"out and lse must be float32 (or float64) accumulators, got {out.dtype} and {lse.dtype}")
    if not (out.is_contiguous() and lse.is_contiguous()):
        raise ValueError("out and lse must be contiguous to be merged into in place")
    devices = {t.device for t in (out, lse, out_block, lse_block)}
    if len(devices) != 1:
        raise ValueError(f"out, lse, out_block, lse_block must be on one device, got {sorted(map(str, devices))}")
    be = _backend(backend, "merge", out.device)
    be.merge(out, lse, out_block.contiguous(), lse_block.to(lse.dtype).contiguous())
    return out, lse


def zigzag_permute(x, ring_size, *, dim=1, backend="auto"):
    """Reorder `dim` into zigzag order: chunks [0, 2R-1, 1, 2R-2, ...] so that a contiguous split over
    `ring_size` ranks gives rank r chunks r and 2R-1-r (equal causal work per rank)."""
    return _zigzag(x, ring_size, dim, False, backend)


def zigzag_unpermute(x, ring_size, *, dim=1, backend="auto"):
    """Inverse of `zigzag_permute`."""
    return _zigzag(x, ring_size, dim, True, backend)


def _zigzag(x, ring_size, dim, inverse, backend):
    if not isinstance(ring_size, int) or ring_size < 1:
        raise ValueError(f"ring_size must be a positive int, got {ring_size!r}")
    dim = dim % x.dim()
    if x.shape[dim] % (2 * ring_size):
        raise ValueError(f"x.shape[{dim}]={x.shape[dim]} must be divisible by 2*ring_size={2 * ring_size}; "
                         f"pad the sequence first (shard_sequence does)")
    be = _backend(backend, "zigzag", x.device)
    return be.zigzag_permute(x.contiguous(), ring_size, dim, inverse)


def varlen_index(cu_seqlens, total, *, backend="auto"):
    """(seq_id, position) int32 per packed token from int32 cu_seqlens, with no host sync on GPU."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of N+1 offsets")
    be = _backend(backend, "varlen", cu_seqlens.device)
    return be.varlen_index(cu_seqlens.contiguous(), int(total))


def __getattr__(name):
    # flash_attention is built on the functions above; loading it on first use keeps the import one-way
    # (ops/flash.py imports this package, never the reverse).
    if name == "flash_attention":
        from .flash import flash_attention

        return flash_attention
    raise AttributeError(f"module 'longvila_engine.ops' has no attribute {name!r}")
