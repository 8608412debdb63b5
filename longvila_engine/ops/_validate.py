"""Argument checks shared by every backend: one place that turns bad input into a clear ValueError."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for out/lse/grads: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> int:
    """Validate int32 prefix sums of packed lengths; returns the number of sequences.

    Values are checked only for CPU tensors: on a GPU that would be a host synchronisation.
    """
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        shape = tuple(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D tensor of N+1 >= 2 offsets, got {shape}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}; pass cu_seqlens.to(torch.int32)")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the tensors are on {device}; move it there")
    if cu.device.type == "cpu":
        vals = cu.tolist()
        if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
            raise ValueError(
                f"{name}={vals} is malformed: it must start at 0, never decrease and end at the packed "
                f"length {total}"
            )
    return cu.numel() - 1


def check_qkv(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None) -> None:
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape (B, S_k, H_kv, D), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head_dim (dim 3)"
        )
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_heads} (q.shape[2]) must be a multiple of num_kv_heads={num_kv_heads} "
            f"(k.shape[2]) for GQA/MQA"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"q dtype {q.dtype} is not supported; use float16, bfloat16, float32 or float64")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (packed varlen) or not at all")
    if cu_seqlens_q is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed varlen input needs batch size 1, got q.shape[0]={q.shape[0]}")
        nq = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[1], q.device)
        nk = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[1], q.device)
        if nq != nk:
            raise ValueError(f"cu_seqlens_q holds {nq} sequences but cu_seqlens_k holds {nk}; they must match")


def check_out_lse(q, out, lse) -> None:
    """A running (out, lse) to resume from: accumulator dtype, (B,Sq,H,D) and (B,H,Sq), contiguous."""
    if (out is None) != (lse is None):
        raise ValueError("out and lse must be given together (to resume a running result) or not at all")
    if out is None:
        return
    B, S, H, D = q.shape
    want = acc_dtype(q.dtype)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (B, S, H, D):
        raise ValueError(f"out must have shape {(B, S, H, D)} like q, got {tuple(getattr(out, 'shape', ()))}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, S):
        raise ValueError(f"lse must have shape (B, H, S_q)={(B, H, S)}, got {tuple(getattr(lse, 'shape', ()))}")
    for name, t in (("out", out), ("lse", lse)):
        if t.dtype != want:
            raise ValueError(f"{name} must be {want} (the running accumulator for {q.dtype} inputs), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous to be updated in place")


def check_backward(dout, q, out, lse) -> None:
    _check_tensor("dout", dout, 4)
    _check_tensor("out", out, 4)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}"
        )
    B, S, H, _ = q.shape
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, H, S):
        raise ValueError(f"lse must have shape (B, H, S_q)={(B, H, S)}, got {tuple(getattr(lse, 'shape', ()))}")
    for name, t in (("dout", dout), ("out", out), ("lse", lse)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
