"""Ahead-of-time compile of every Triton kernel of this package for real GPUs, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, then the ptxas bundled with triton) for the same variant, tile sizes and warps
that the launchers use (each kernel file's `aot_specs`), so a kernel that does not compile, or that
spills, for sm_80 or sm_90 shows up on a CPU-only machine.

Registers, spills and warnings: `CompiledKernel.n_regs`/`n_spills` are filled only when the cubin is
loaded through the CUDA driver, and triton drops the ptxas log when ptxas succeeds. So the PTX triton
made is assembled once more with the ptxas that ships with triton, with triton's own flags (`-v
-lineinfo --regAllocOptLevel=2 --gpu-name=sm_90a`), and its log is read: "Used N registers", "N bytes
spill stores/loads", and the performance warnings, among them C7515 ("wgmma.mma_async instructions
are serialized"), which ptxas prints as info, not as a warning, and which triton never shows.
`AotResult.problems` lists what `scripts/aot_triton.py` fails on: any spill (but in the configs
measured faster with their spills on a GPU, attention_bwd.SPILLS_MEASURED_FASTER), C7515 on sm_90, and a
kernel compiled with tensor descriptors (`TMA` constexpr, the sm_90 forward) whose PTX has no TMA copy
(`cp.async.bulk.tensor`): the table's `tma` column counts those instructions in the PTX.

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


SERIALIZED = "C7515"  # ptxas: wgmma.mma_async instructions are serialized
TMA_COPY = "cp.async.bulk.tensor"  # PTX of a TMA (tensor descriptor) copy


@dataclass(frozen=True)
class AotResult:
    name: str
    arch: int
    dtype: str
    head_dim: int
    n_regs: int
    n_spills: int  # bytes of spill stores + spill loads per thread
    shared: int  # bytes of shared memory per program
    stages: int
    warps: int
    block: str  # "BLOCK_MxBLOCK_N"
    ptxas_notes: tuple  # ptxas performance lines (C-coded), verbatim
    seconds: float
    tma_copies: int = 0  # TMA copy instructions (cp.async.bulk.tensor) in the PTX
    wants_tma: bool = False  # compiled with tensor descriptors (constexpr TMA=True)
    spills_measured: bool = False  # spills accepted: measured faster on a GPU (attention_bwd.SPILLS_MEASURED_FASTER)

    @property
    def problems(self) -> list[str]:
        """What the AOT step fails on: a spill anywhere (but in a config measured faster with its
        spills on a GPU), a serialized wgmma on sm_90, a descriptor kernel without TMA copies."""
        found = [f"{self.n_spills} bytes of register spills"] if self.n_spills and not self.spills_measured else []
        if self.arch == 90 and any(SERIALIZED in note for note in self.ptxas_notes):
            found.append("wgmma serialized (ptxas C7515)")
        if self.wants_tma and not self.tma_copies:
            found.append(f"tensor descriptors compiled without TMA ({TMA_COPY} not in the PTX)")
        return found


def kernel_specs(dtype: str, head_dim: int, all_variants: bool = False, arch: int = 90) -> list:
    """[(name, kernel, types, constexprs, options)] for every kernel, in launch order, with `arch`'s
    configs: the ring's hot path variant of each and its non-causal twin, or with `all_variants` every
    causal/varlen/resume-or-accumulate variant."""
    return (attention_fwd.aot_specs(dtype, head_dim, all_variants, arch)
            + attention_bwd.aot_specs(dtype, head_dim, all_variants, arch))


def kernel_names(all_variants: bool = False) -> list[str]:
    return [spec[0] for spec in kernel_specs(DTYPES[0], HEAD_DIMS[0], all_variants)]


def _signature(kernel, types: dict, constexprs: dict):
    """Full signature (unnamed scalars are int32) and the 16-divisibility hints the JIT would infer
    for pointers of torch allocations and for the strides of contiguous (B, S, H, D) tensors."""
    signature = {arg: "constexpr" if arg in constexprs else types.get(arg, "i32") for arg in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if signature[arg].startswith("*") or arg.startswith("stride_")}
    return signature, attrs


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, tuple]:
    """(registers per thread, spill store + load bytes per thread, performance notes) of the single
    kernel in `ptx`, from `ptxas -v` run with triton's flags."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [triton.knobs.nvidia.ptxas.path, "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={gpu}",
               src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not (regs and spills):
        raise RuntimeError(f"could not read registers and spills from the ptxas log:\n{log}")
    notes = tuple(line.split(":", 1)[-1].strip() for line in log.splitlines() if re.search(r"\(C\d{4}\)", line))
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2)), notes


def compile_kernel(name: str, arch: int, dtype: str, head_dim: int) -> AotResult:
    """Compile one kernel (a name from `kernel_names`) for sm_<arch> and `dtype` ("fp16", "bf16",
    "fp32"); raises whatever triton raises when it does not compile."""
    if attention_fwd.process_interprets():
        raise RuntimeError("this process imported triton with TRITON_INTERPRET=1, where kernels cannot be "
                           "compiled; run the AOT compile in a process without it")
    specs = {spec[0]: spec for spec in kernel_specs(dtype, head_dim, all_variants=True, arch=arch)}
    if name not in specs:
        raise ValueError(f"unknown kernel {name!r}; choose one of {sorted(specs)}")
    _, kernel, types, constexprs, options = specs[name]
    signature, attrs = _signature(kernel, types, constexprs)
    start = time.perf_counter()
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", arch, 32),
                              options=dict(options))
    regs, spills, notes = ptxas_report(compiled.asm["ptx"], arch)
    block = "x".join(str(constexprs[key]) for key in ("BLOCK_M", "BLOCK_N") if key in constexprs)
    return AotResult(name, arch, dtype, head_dim, regs, spills, compiled.metadata.shared, options["num_stages"],
                     options["num_warps"], block, notes, time.perf_counter() - start,
                     tma_copies=compiled.asm["ptx"].count(TMA_COPY), wants_tma=bool(constexprs.get("TMA", False)),
                     spills_measured=attention_bwd.spills_measured_faster(
                         arch, name.split("[", 1)[0].removeprefix("attn_bwd_"), constexprs, options))


def format_row(r: AotResult) -> str:
    verdict = "FAIL: " + "; ".join(r.problems) if r.problems else (
        "ok (spills measured faster on a GPU)" if r.n_spills else "ok")
    return (f"{r.name:<36} sm_{r.arch:<3} {r.dtype:<5} {r.head_dim:>4} {r.block:>7} {r.warps:>5} {r.stages:>6} "
            f"{r.n_regs:>5} {r.n_spills:>7} {r.shared:>8} {r.tma_copies:>4} {r.seconds:>6.1f}  {verdict}")


HEADER = (f"{'kernel':<36} {'arch':<6} {'dtype':<5} {'D':>4} {'tile':>7} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spills':>7} {'shared':>8} {'tma':>4} {'sec':>6}  verdict")
