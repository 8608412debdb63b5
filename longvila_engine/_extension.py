"""Loads the compiled extension lazily and remembers why it failed.

Importing `longvila_engine` never imports the extension: the first call that needs an operator does,
through `require_extension()`, which raises the stored reason with the fix. Loading it also registers
the operators' fake (meta) implementations (`longvila_engine.ops._fake`).
"""
from __future__ import annotations

import importlib

_state: dict = {"loaded": None, "error": None}

_FIX = (
    "Build it with `pip install -e . --no-build-isolation` from the repository root (needs a C++17 "
    "compiler with OpenMP and the torch it was built against), or pass backend='reference'."
)


def extension_available() -> bool:
    """True when `longvila_engine._C` imported and registered its operators."""
    if _state["loaded"] is None:
        try:
            # torch first: it loads libc10/libtorch that the extension links against.
            importlib.import_module("torch")
            importlib.import_module("longvila_engine._C")
            # Fakes need the schemas that importing _C registers; registering them once, here, keeps
            # torch.compile able to trace every operator without a second import hook.
            importlib.import_module("longvila_engine.ops._fake")
            _state["loaded"] = True
        except Exception as exc:  # keep the reason for require_extension
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return bool(_state["loaded"])


def require_extension() -> None:
    """Raise a RuntimeError with the import failure and the fix unless the extension loaded."""
    if not extension_available():
        raise RuntimeError(f"longvila_engine C++ extension is unavailable ({_state['error']}). {_FIX}")


def cuda_kernels_available() -> bool:
    """True when the extension was built with the CUDA kernels (CUDA torch and CUDA_HOME at build)."""
    if not extension_available():
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("longvila_engine::merge_attn", "CUDA")
