"""The instruction-set variants of the CPU kernel library: one table for setup.py and the loader.

Each variant is csrc/cpu/*.cpp compiled with its own flags into its own shared library,
`longvila_engine/_cpu_<name>*.so`. At import, `longvila_engine._extension` loads the first variant of
`ORDER` that was built and whose `FEATURES` this CPU has (checked by `longvila_engine::cpu_supports`,
which asks the CPU through `__builtin_cpu_supports`). The names in FEATURES are those that operator
accepts (GCC's names).

This module imports nothing outside the standard library: setup.py loads it by path, before the
package can be imported.
"""
from __future__ import annotations

_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd", *_AVX2]

# name -> compiler flags. GCC's generic tuning may split auto-vectorised loops into 256-bit halves
# on AVX-512 targets; the explicit intrinsics and vector types of the kernels do not depend on it.
FLAGS = {
    "avx512bf16": [*_AVX512, "-mavx512bf16"],
    "avx512": list(_AVX512),
    "avx2": list(_AVX2),
    "base": [],
    "native": ["-march=native"],
}

_AVX2_FEATURES = ("avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "popcnt")
_AVX512_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", *_AVX2_FEATURES)

# name -> CPU features it needs at run time. `native` needs what the build machine had; setup.py
# writes that list next to its library (NATIVE_REQUIRES_SUFFIX), since only the build knows it.
FEATURES = {
    "avx512bf16": (*_AVX512_FEATURES, "avx512bf16"),
    "avx512": _AVX512_FEATURES,
    "avx2": _AVX2_FEATURES,
    "base": (),
}

# Every name cpu_supports accepts (csrc/ops.cpp maps each to a __builtin_cpu_supports literal).
KNOWN_FEATURES = (*_AVX512_FEATURES, "avx512bf16")

# Preference, best first. `native` only exists when built with LONGVILA_NATIVE=1.
ORDER = ("native", "avx512bf16", "avx512", "avx2", "base")

# Built when LONGVILA_CPU_ISAS is unset.
DEFAULT_BUILD = ("avx512bf16", "avx512", "avx2", "base")

NATIVE_REQUIRES_SUFFIX = ".requires"


def library_stem(name: str) -> str:
    """The extension's module name inside the package: `_cpu_avx2` for 'avx2'."""
    return f"_cpu_{name}"


def parse_build_list(value: str | None, native: bool) -> list[str]:
    """The variants setup.py builds: LONGVILA_CPU_ISAS (comma-separated) or DEFAULT_BUILD, plus
    `native` when LONGVILA_NATIVE=1. Raises ValueError naming an unknown entry and the fix."""
    if value is None or not value.strip():
        names = list(DEFAULT_BUILD)
    else:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in FLAGS]
        if unknown:
            raise ValueError(
                f"LONGVILA_CPU_ISAS={value!r} names unknown variant(s) {unknown}; use a comma-separated "
                f"subset of {list(FLAGS)}, e.g. LONGVILA_CPU_ISAS=avx512bf16,avx2, or unset it to build "
                f"{list(DEFAULT_BUILD)}")
    if native and "native" not in names:
        names.insert(0, "native")
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen
