"""Builds the C++ CPU extension everywhere and the CUDA kernels only where CUDA exists.

The CUDA sources are free of torch headers (raw pointers, stream passed as an integer) so that
`nvcc -c` checks them on machines with a CPU torch too (see scripts/check_cuda.sh).
"""
import glob
import os
import re
import subprocess
import warnings

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-DNDEBUG"]
if os.environ.get("LONGVILA_NATIVE", "1") == "1":
    cxx_flags.append("-march=native")
include_dirs = [os.path.join(HERE, "csrc", "include")]


def nvcc_major(cuda_home):
    """Major version of CUDA_HOME's nvcc ("release 13.0" -> 13), or None if it cannot be run."""
    try:
        text = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.", text)
    return int(found.group(1)) if found else None


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
    ext = CUDAExtension(
        "longvila_engine._C",
        cpu_sources + sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
        include_dirs=include_dirs,
        define_macros=[("LONGVILA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", *gencode]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "longvila_engine._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args=cxx_flags,
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
