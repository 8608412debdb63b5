"""Builds the C++ extension everywhere and the CUDA kernels only where CUDA exists.

Two kinds of library come out of it:
- `longvila_engine._C`: the operator schemas (csrc/ops.cpp), the host op cpu_supports and, in a CUDA
  build, the CUDA kernels. Compiled with no -march/-m instruction-set flag, so it loads on any x86-64.
- `longvila_engine._cpu_<isa>`: the CPU kernels (csrc/cpu/*.cpp), once per instruction-set variant
  (longvila_engine/_cpu_isa.py), each a separate shared library; the package loads the best one this
  CPU runs (longvila_engine/_extension.py). LONGVILA_CPU_ISAS=avx512bf16,avx2 builds only those
  (faster developer builds); LONGVILA_NATIVE=1 adds a `native` variant (-march=native), preferred
  by the loader on the build machine.

The CUDA sources are free of torch headers (raw pointers, stream passed as an integer) so that
`nvcc -c` checks them on machines with a CPU torch too (see scripts/check_cuda.sh).
"""
import glob
import importlib.util
import os
import re
import subprocess
import warnings

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_isa_table():
    """longvila_engine/_cpu_isa.py by path: the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("_lv_cpu_isa", os.path.join(HERE, "longvila_engine", "_cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


isa = _load_isa_table()
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-DNDEBUG"]
include_dirs = [os.path.join(HERE, "csrc", "include")]
kernel_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
cpu_variants = isa.parse_build_list(os.environ.get("LONGVILA_CPU_ISAS"),
                                    native=os.environ.get("LONGVILA_NATIVE", "0") == "1")


def nvcc_major(cuda_home):
    """Major version of CUDA_HOME's nvcc ("release 13.0" -> 13), or None if it cannot be run."""
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.", text)
    return int(found.group(1)) if found else None


def native_features():
    """The loader's feature names that `-march=native` turns on here, from the compiler's macros."""
    cxx = os.environ.get("CXX", "c++")
    try:
        macros = subprocess.run([cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"LONGVILA_NATIVE=1: could not ask {cxx} what -march=native enables ({exc}); "
                           f"set CXX to a working C++ compiler or build without LONGVILA_NATIVE") from exc
    defined = set(re.findall(r"#define (__[A-Z0-9_]+__) ", macros))
    return [f for f in isa.KNOWN_FEATURES if f"__{f.upper()}__" in defined]


with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("LONGVILA_NO_CUDA") != "1"
if with_cuda:
    # torch refuses to build against an nvcc of another CUDA major version; rather than lose the CPU
    # operators too, build them alone and say how to get the CUDA ones.
    torch_major, toolkit_major = int(torch.version.cuda.split(".")[0]), nvcc_major(CUDA_HOME)
    if toolkit_major != torch_major:
        warnings.warn(
            f"longvila_engine: building the CPU-only extension: torch was built with CUDA {torch.version.cuda} "
            f"but {CUDA_HOME}/bin/nvcc is CUDA {toolkit_major if toolkit_major is not None else '(not runnable)'}. "
            f"For the CUDA kernels, point CUDA_HOME at a CUDA {torch_major}.x toolkit (or install a torch wheel "
            f"built for the toolkit's CUDA version), then rebuild.",
            stacklevel=1)
        print("WARNING: CUDA toolchain mismatch, building the CPU-only extension (see the warning above)")
        with_cuda = False
if with_cuda:
    archs = os.environ.get("LONGVILA_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    core = CUDAExtension(
        "longvila_engine._C",
        ["csrc/ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))],
        include_dirs=include_dirs,
        define_macros=[("LONGVILA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *gencode]},
        extra_link_args=["-fopenmp"],
    )
else:
    core = CppExtension("longvila_engine._C", ["csrc/ops.cpp"], include_dirs=include_dirs,
                        extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])

# One library per variant, so that no code compiled for one instruction set (inline functions of the
# ATen and std headers included) can be merged by the linker into another variant's library.
variant_of = {}
kernels = []
for name in cpu_variants:
    ext = CppExtension(f"longvila_engine.{isa.library_stem(name)}", kernel_sources, include_dirs=include_dirs,
                       define_macros=[("LV_CPU_ISA", name)],  # a bare word: C++ stringizes it
                       extra_compile_args=[*cxx_flags, *isa.FLAGS[name]], extra_link_args=["-fopenmp"])
    variant_of[ext.name] = name
    kernels.append(ext)


class Build(BuildExtension.with_options(use_ninja=True)):
    """Each kernel variant compiles the same sources: a build directory (and ninja file) of its own
    keeps their objects apart, so a rebuild recompiles only what changed."""

    def build_extension(self, ext):
        name = variant_of.get(ext.name)
        if name is None:
            return super().build_extension(ext)
        temp = self.build_temp
        self.build_temp = os.path.join(temp, isa.library_stem(name))
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = temp
        if name == "native":
            # Beside the library: the features the loader must find before it takes this variant.
            with open(self.get_ext_fullpath(ext.name) + isa.NATIVE_REQUIRES_SUFFIX, "w") as fh:
                fh.write(" ".join(native_features()) + "\n")
        return None

    # The native feature list travels with its library: --inplace copies, editable installs, outputs.
    def _requires_pairs(self):
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if variant_of.get(ext.name) == "native":
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                yield regular_file + isa.NATIVE_REQUIRES_SUFFIX, inplace_file + isa.NATIVE_REQUIRES_SUFFIX

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for regular, inplace in self._requires_pairs():
            self.copy_file(regular, inplace, level=self.verbose)

    def get_outputs(self):
        return [*super().get_outputs(), *(regular for regular, _ in self._requires_pairs())]

    def get_output_mapping(self):
        return {**super().get_output_mapping(), **dict(self._requires_pairs())}


setup(ext_modules=[core, *kernels], cmdclass={"build_ext": Build})
