"""How `backend="auto"` picks an attention backend: measured once per shape class, cached per process.

The candidates come from `longvila_engine.ops` (CUDA: `triton` and `aten`; CPU: `cpu` and `aten`),
the first one being the default. With several candidates, the first call of a shape class times each
one on the caller's own tensors (one warm-up, then the best of `REPEATS` runs, writing into scratch
buffers) and keeps the fastest; a challenger must beat the default by `MARGIN` so that noise on a busy
machine does not flip the choice between two equal backends. Later calls of the class read the cache.

A shape class is (op, device, dtype, causal, head dim, GQA or not, varlen or not, resume or not,
S_q, S_k and B*H rounded up to powers of two).

Overrides, strongest first: `set_auto_backend(name)` (None clears it), then the environment variable
LONGVILA_ATTN_BACKEND. They apply to forward/backward only and must name one of the candidates.
What this does not do: persist choices across processes, or measure under FakeTensorMode or
torch.compile tracing or CUDA graph capture (there it takes the default candidate, running nothing).
"""
from __future__ import annotations

import os
import time

import torch

ENV = "LONGVILA_ATTN_BACKEND"
REPEATS = 3
MARGIN = 0.9  # a challenger is chosen when its time is below MARGIN x the default's

_override: str | None = None
_cache: dict[tuple, str] = {}


def set_auto_backend(name: str | None) -> None:
    """Force what `auto` picks for attention forward/backward in this process (None: measure again)."""
    global _override
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name must be a backend name or None, got {name!r}")
    _override = name


def auto_choices() -> dict[tuple, str]:
    """A copy of the measured choices so far: {shape class: backend}."""
    return dict(_cache)


def clear_cache() -> None:
    _cache.clear()


def _bucket(n: int) -> int:
    return 0 if n <= 1 else (int(n) - 1).bit_length()


def shape_class(op: str, q, k, causal: bool, varlen: bool, resume: bool) -> tuple:
    batch, seqlen_q, num_heads, head_dim = q.shape
    return (op, q.device.type, q.dtype, bool(causal), head_dim, k.shape[2] != num_heads, bool(varlen),
            bool(resume), _bucket(seqlen_q), _bucket(k.shape[1]), _bucket(batch * num_heads))


def _tracing(t) -> bool:
    """Fake, meta or traced tensors, or a CUDA graph being captured: nothing may run or synchronise."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(t, FakeTensor) or t.device.type == "meta" or torch.compiler.is_compiling():
        return True
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _time(run, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()  # warm-up (compiles a Triton kernel the first time)
    sync()
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def choose(candidates: list[str], key: tuple, sample, run) -> str:
    """The backend for one call. `candidates` is non-empty, default first; `run(name)` executes the op
    on that backend into scratch outputs; `sample` is one input tensor (device, tracing check)."""
    forced = _override or os.environ.get(ENV) or None
    if forced is not None:
        if forced not in candidates:
            source = "set_auto_backend" if _override else ENV
            raise ValueError(f"{source}={forced!r} cannot run this call (on {sample.device}, {sample.dtype}); "
                             f"candidates here: {candidates}. Clear it or pick one of them")
        return forced
    if len(candidates) == 1 or _tracing(sample):
        return candidates[0]
    if key not in _cache:
        times = {name: _time(lambda name=name: run(name), sample.device) for name in candidates}
        best = min(candidates[1:], key=times.__getitem__)
        _cache[key] = best if times[best] < MARGIN * times[candidates[0]] else candidates[0]
    return _cache[key]
