"""Loads the compiled extension lazily and remembers why it failed.

Importing `longvila_engine` never imports the extension: the first call that needs an operator does,
through `require_extension()`, which raises the stored reason with the fix. Loading it also registers
the operators' fake (meta) implementations (`longvila_engine.ops._fake`).

The extension is two libraries: `_C` (operator schemas, CUDA kernels; compiled for baseline x86-64)
and one CPU kernel library out of several instruction-set variants (`_cpu_<isa>*.so`, see
`_cpu_isa.py`). After `_C`, the loader takes the best variant that was built and that this CPU runs,
exactly one per process; LONGVILA_CPU_ISA=<name> forces one. A LONGVILA_CPU_ISA this process cannot
honour is the user's setting, not a missing build: it raises `CpuIsaError` (a ValueError) from every
`extension_available()` / `require_extension()` call instead of reading as "no extension", which
would let backend='auto' fall back to aten without a word.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os

from . import _cpu_isa

_state: dict = {"loaded": None, "error": None, "config_error": None, "isa": None}

_FIX = (
    "Build it with `pip install -e . --no-build-isolation` from the repository root (needs a C++17 "
    "compiler with OpenMP and the torch it was built against), or pass backend='reference'."
)
ISA_ENV = "LONGVILA_CPU_ISA"


class CpuIsaError(ValueError):
    """LONGVILA_CPU_ISA names a variant this process cannot load (unknown, not built, or not runnable)."""


def built_variants(package_dir: str) -> dict:
    """{variant: library path} of the CPU kernel libraries in `package_dir`, best first."""
    found = {}
    for name in _cpu_isa.ORDER:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(package_dir, _cpu_isa.library_stem(name) + suffix)
            if os.path.isfile(path):
                found[name] = path
                break
    return found


def variant_features(name: str, path: str) -> tuple | None:
    """CPU features `name` needs; None for a `native` build without its list (setup.py writes it)."""
    if name != "native":
        return tuple(_cpu_isa.FEATURES[name])
    try:
        with open(path + _cpu_isa.NATIVE_REQUIRES_SUFFIX) as fh:
            return tuple(fh.read().split())
    except OSError:
        return None


def choose_variant(built: dict, supports, override: str | None) -> str:
    """The variant to load: `override` if given (CpuIsaError unless it is built and runnable), else the
    best built variant whose features `supports(feature) -> bool` confirms (RuntimeError if none)."""
    missing = {}
    for name, path in built.items():
        needs = variant_features(name, path)
        missing[name] = ["(no feature list: rebuild it)"] if needs is None else [f for f in needs if not supports(f)]
    runnable = [n for n in built if not missing[n]]
    where = f"built: {list(built) or 'none'}; this CPU runs: {runnable or 'none of them'}"
    if override:
        fix = (f"Fix: unset {ISA_ENV} to take the best one"
               + (f" ({runnable[0]})" if runnable else "") + f", or set it to one of {runnable}.")
        if override not in _cpu_isa.ORDER:
            raise CpuIsaError(f"{ISA_ENV}={override!r} is no CPU kernel variant (known: {list(_cpu_isa.ORDER)}); "
                              f"{where}. {fix}")
        if override not in built:
            if override == "native":
                how = "LONGVILA_NATIVE=1 pip install -e . --no-build-isolation"
            else:
                keep = ",".join(n for n in _cpu_isa.ORDER if n != "native" and (n in built or n == override))
                how = f"LONGVILA_CPU_ISAS={keep} pip install -e . --no-build-isolation"
            raise CpuIsaError(f"{ISA_ENV}={override!r}: that variant was not built; {where}. {fix} To build it: "
                              f"{how}.")
        if missing[override]:
            raise CpuIsaError(f"{ISA_ENV}={override!r}: this CPU lacks {missing[override]}, which that variant was "
                              f"compiled for; {where}. {fix}")
        return override
    if not runnable:
        raise RuntimeError(f"no CPU kernel library this CPU can run ({where}; missing features: {missing}). "
                           f"Rebuild with the portable variants: unset LONGVILA_CPU_ISAS or include avx2 and base")
    return runnable[0]


def _load_cpu_kernels(package_dir: str) -> str:
    import torch

    supports = torch.ops.longvila_engine.cpu_supports
    name = choose_variant(built_variants(package_dir), supports, os.environ.get(ISA_ENV, "").strip() or None)
    torch.ops.load_library(built_variants(package_dir)[name])
    return name


def extension_available() -> bool:
    """True when `longvila_engine._C` and a CPU kernel library loaded and registered their operators.
    Raises CpuIsaError when LONGVILA_CPU_ISA cannot be honoured."""
    if _state["config_error"] is not None:
        raise CpuIsaError(_state["config_error"])
    if _state["loaded"] is None:
        try:
            # torch first: it loads libc10/libtorch that the extension links against.
            importlib.import_module("torch")
            core = importlib.import_module("longvila_engine._C")
            _state["isa"] = _load_cpu_kernels(os.path.dirname(os.path.abspath(core.__file__)))
            # Fakes need the schemas that importing _C registers; registering them once, here, keeps
            # torch.compile able to trace every operator without a second import hook.
            importlib.import_module("longvila_engine.ops._fake")
            _state["loaded"] = True
        except CpuIsaError as exc:
            _state["loaded"] = False
            _state["config_error"] = str(exc)
            raise CpuIsaError(str(exc)) from None
        except Exception as exc:  # keep the reason for require_extension
            _state["loaded"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return bool(_state["loaded"])


def require_extension() -> None:
    """Raise a RuntimeError with the import failure and the fix unless the extension loaded (a
    CpuIsaError, a ValueError, for a LONGVILA_CPU_ISA that cannot be honoured)."""
    if not extension_available():
        raise RuntimeError(f"longvila_engine C++ extension is unavailable ({_state['error']}). {_FIX}")


def cpu_isa() -> str | None:
    """The CPU kernel variant this process loaded (e.g. 'avx512bf16'), None if none is loaded."""
    return _state["isa"] if extension_available() else None


def cuda_kernels_available() -> bool:
    """True when the extension was built with the CUDA kernels (CUDA torch and CUDA_HOME at build)."""
    if not extension_available():
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("longvila_engine::merge_attn", "CUDA")
