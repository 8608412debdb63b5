"""Ahead-of-time compile of every Triton kernel of this package for real GPUs, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, then the ptxas bundled with triton) for the same variant, tile sizes and warps
that the launchers use (each kernel file's `aot_specs`), so a kernel that does not compile, or that
spills, for sm_80 or sm_90 shows up on a CPU-only machine.

Register and spill counts: `CompiledKernel.n_regs`/`n_spills` are filled only when the cubin is
loaded through the CUDA driver, so here they are read from the cubin itself with the cuobjdump that
ships with triton (`-res-usage`). n_regs is REG (what CU_FUNC_ATTRIBUTE_NUM_REGS returns). n_spills
follows triton's definition, per-thread local memory / 4 (32-bit words); ptxas puts spills in the
stack frame (STACK), not in LOCAL, so both are counted: a kernel reported with 32 registers, LOCAL 0
and STACK 3400 had, per `ptxas -v`, 9032 bytes of spill stores.

What it does not do: run or time anything, autotune, or write a loadable library; it must run in a
process that did not import triton with TRITON_INTERPRET=1 (see attention_fwd.process_interprets).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import triton

from . import attention_bwd, attention_fwd

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16")
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class AotResult:
    name: str
    arch: int
    dtype: str
    head_dim: int
    n_regs: int
    n_spills: int
    shared: int
    seconds: float


def kernel_specs(dtype: str, head_dim: int, all_variants: bool = False) -> list:
    """[(name, kernel, types, constexprs, options)] for every kernel, in launch order: the ring's hot
    path variant of each, or with `all_variants` every causal/varlen/resume-or-accumulate variant."""
    return (attention_fwd.aot_specs(dtype, head_dim, all_variants)
            + attention_bwd.aot_specs(dtype, head_dim, all_variants))


def kernel_names(all_variants: bool = False) -> list[str]:
    return [spec[0] for spec in kernel_specs(DTYPES[0], HEAD_DIMS[0], all_variants)]


def _signature(kernel, types: dict, constexprs: dict):
    """Full signature (unnamed scalars are int32) and the 16-divisibility hints the JIT would infer
    for pointers of torch allocations and for the strides of contiguous (B, S, H, D) tensors."""
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if signature[arg].startswith("*") or arg.startswith("stride_")}
    return signature, attrs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack + local bytes per thread) of the single kernel in `cubin`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path], check=True,
                              capture_output=True, text=True).stdout
    found = {key: re.search(rf"\b{key}:(\d+)", text) for key in ("REG", "STACK", "LOCAL")}
    if not all(found.values()):
        raise RuntimeError(f"could not read the resource usage from cuobjdump:\n{text}")
    regs, stack, local = (int(found[key].group(1)) for key in ("REG", "STACK", "LOCAL"))
    return regs, stack + local


def compile_kernel(name: str, arch: int, dtype: str, head_dim: int) -> AotResult:
    """Compile one kernel (a name from `kernel_names`) for sm_<arch> and `dtype` ("fp16", "bf16",
    "fp32"); raises whatever triton raises when it does not compile."""
    if attention_fwd.process_interprets():
        raise RuntimeError("this process imported triton with TRITON_INTERPRET=1, where kernels cannot be "
                           "compiled; run the AOT compile in a process without it")
    specs = {spec[0]: spec for spec in kernel_specs(dtype, head_dim, all_variants=True)}
    if name not in specs:
        raise ValueError(f"unknown kernel {name!r}; choose one of {sorted(specs)}")
    _, kernel, types, constexprs, options = specs[name]
    signature, attrs = _signature(kernel, types, constexprs)
    start = time.perf_counter()
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", arch, 32),
                              options=dict(options))
    regs, local = _resource_usage(compiled.asm["cubin"])
    return AotResult(name, arch, dtype, head_dim, regs, local // 4, compiled.metadata.shared,
                     time.perf_counter() - start)


def format_row(r: AotResult) -> str:
    return (f"{r.name:<36} sm_{r.arch:<3} {r.dtype:<5} {r.head_dim:>4} {r.n_regs:>5} {r.n_spills:>7} "
            f"{r.shared:>8} {r.seconds:>6.1f}")


HEADER = f"{'kernel':<36} {'arch':<6} {'dtype':<5} {'D':>4} {'regs':>5} {'spills':>7} {'shared':>8} {'sec':>6}"
