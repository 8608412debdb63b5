"""A CPU stand-in for the private `flash_attn.flash_attn_interface` block calls ring-flash-attn makes.

ring-flash-attn (zhuzilin/ring-flash-attention, installed `--no-deps`) imports
`_flash_attn_forward` / `_flash_attn_backward` (and the varlen pair) from the CUDA package
`flash_attn`. `install()` registers a small module under that name in `sys.modules` whose calls run
torch's CPU flash op (`aten._scaled_dot_product_flash_attention_for_cpu` and its backward), so the
peer's ring loop, merge and communication run unchanged on CPU ranks. It must run before
`ring_flash_attn` is imported; `import_ring_flash_attn()` does both.

Conventions of the flash-attn >= 2.6 interface that the peer reads: tensors are (B, S, H, D); the
forward returns (out, lse, S_dmask, rng_state) with lse (B, H, S) float32 natural log; the backward
writes dq/dk/dv into the buffers it is given. Dropout, sliding windows, softcap, ALiBi and varlen are
not served (ValueError / NotImplementedError), nor the peer's Hugging Face adapter (its transformers
imports fail on current releases): the benchmarks never ask for them.

Deliberately not here: timing (bench_sp_attention.py), anything the engine itself imports.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import torch

__all__ = ["install", "import_ring_flash_attn"]

_aten = torch.ops.aten
MODULE = "flash_attn.flash_attn_interface"


def _bhsd(x):
    return x.transpose(1, 2)


def _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes):
    if dropout_p or softcap or alibi_slopes is not None or (window_size_left, window_size_right) != (-1, -1):
        raise ValueError("the CPU flash_attn shim serves dropout 0, no window, no softcap and no ALiBi only")


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
    _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal,
                                                                 scale=softmax_scale)
    return _bhsd(out), lse, None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    grads = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), softmax_lse, 0.0, causal, scale=softmax_scale)
    for buf, g in zip((dq, dk, dv), grads):
        buf.copy_(_bhsd(g))
    return dq, dk, dv


def _not_served(*args, **kwargs):
    raise NotImplementedError("the CPU flash_attn shim serves the dense block calls only (no varlen, no "
                              "Hugging Face adapter)")


def install() -> None:
    """Register `flash_attn` and `flash_attn.flash_attn_interface` (shim) in sys.modules, once."""
    if MODULE in sys.modules:
        return
    pkg = types.ModuleType("flash_attn")
    # A spec and a path, so that importlib.util.find_spec() on the name (transformers probes it) works.
    pkg.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    pkg.__path__ = []
    pkg.__version__ = "0.0.0+cpu-shim"
    iface = types.ModuleType(MODULE)
    iface.__spec__ = importlib.machinery.ModuleSpec(MODULE, None)
    iface._flash_attn_forward = _flash_attn_forward
    iface._flash_attn_backward = _flash_attn_backward
    iface._flash_attn_varlen_forward = _not_served
    iface._flash_attn_varlen_backward = _not_served
    pkg.flash_attn_interface = iface
    sys.modules["flash_attn"] = pkg
    sys.modules[MODULE] = iface


def import_ring_flash_attn():
    """The `ring_flash_attn` package over the shim; ImportError with the install line when missing."""
    install()
    # Its Hugging Face adapter imports transformers names that newer releases dropped; the benchmarks
    # call the ring functions only, so the adapter module is stood in for before the package loads.
    if "ring_flash_attn.adapters" not in sys.modules:
        adapters = types.ModuleType("ring_flash_attn.adapters")
        adapters.substitute_hf_flash_attn = adapters.update_ring_flash_attn_params = _not_served
        sys.modules["ring_flash_attn.adapters"] = adapters
    try:
        import ring_flash_attn
    except ImportError as e:
        raise ImportError(f"ring-flash-attn is not importable ({e}); install it with "
                          f"`pip install --no-deps ring-flash-attn`") from e
    return ring_flash_attn
