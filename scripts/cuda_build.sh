#!/usr/bin/env bash
# `make cuda-build`: builds the WHOLE extension (_C: schemas + CUDA kernels + csrc/cuda/bindings.cpp;
# the CPU kernel libraries _cpu_<isa>*.so, one per instruction-set variant) against a CUDA torch with nvcc, imports it on this machine (no GPU needed), and checks that every
# operator has a CUDA kernel registered, except those that are served on CUDA by Triton/aten instead.
#
# The CUDA torch lives in its own venv (build/cuda-venv, about 4.7 GB), never in .venv, so the CPU
# test environment is untouched. The registry's `torch==X` for Linux is the CUDA build; pip's
# configured find-links folder holds the +cpu wheel of the same version, so the install runs with
# `--isolated` and an empty PIP_FIND_LINKS (the site-wide cert and constraints still apply).
# A stamp file keeps the venv between runs; ninja keeps the objects (build/cuda-tmp), so a rerun with
# unchanged sources takes seconds. The .so goes to build/cuda-ext, never into the source tree.
#
# Environment: CUDA_TORCH_VERSION (default 2.13.0), CUDA_VENV (default build/cuda-venv), CUDA_HOME,
# LONGVILA_CUDA_ARCHS (setup.py's, default "80;90"), MAX_JOBS. Without nvcc: SKIPPED, exit 0, unless
# LONGVILA_REQUIRE_NVCC=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
TORCH_VERSION="${CUDA_TORCH_VERSION:-2.13.0}"
VENV="${CUDA_VENV:-build/cuda-venv}"
STAMP="$VENV/.installed-torch-$TORCH_VERSION"
LIB_DIR="build/cuda-ext"
TMP_DIR="build/cuda-tmp"
start=$(date +%s)

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "cuda-build: SKIPPED, nvcc not found (set NVCC or CUDA_HOME)"
  [[ "${LONGVILA_REQUIRE_NVCC:-0}" == "1" ]] && exit 1
  exit 0
fi
# torch derives CUDA_HOME from nvcc's directory; a wrapper script in /usr/local/bin would give
# /usr/local, which has no cuda_runtime.h. Take the toolkit that holds the headers.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for cand in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")" /usr/local/cuda; do
    if [[ -f "$cand/include/cuda_runtime.h" ]]; then CUDA_HOME="$cand"; break; fi
  done
fi
if [[ -z "${CUDA_HOME:-}" || ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
  echo "cuda-build: FAILED, no CUDA toolkit with include/cuda_runtime.h found for $NVCC (set CUDA_HOME)"
  exit 1
fi
export CUDA_HOME
echo "cuda-build: $("$CUDA_HOME/bin/nvcc" --version | tail -1), CUDA_HOME=$CUDA_HOME"

if [[ ! -f "$STAMP" ]]; then
  mkdir -p "$(dirname "$VENV")"
  free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 { print int($4 / 1048576) }')
  if (( free_gb < 8 )); then
    echo "cuda-build: FAILED, $free_gb GB free where $VENV goes; the CUDA torch venv needs about 6 GB"
    exit 1
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  PIP_ARGS=(--isolated -q --disable-pip-version-check)
  CERT="${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}"
  [[ -n "$CERT" ]] && PIP_ARGS+=(--cert "$CERT")
  echo "cuda-build: installing torch==$TORCH_VERSION (CUDA build) into $VENV"
  PIP_FIND_LINKS= "$VENV/bin/python" -m pip install "${PIP_ARGS[@]}" "torch==$TORCH_VERSION" setuptools wheel ninja numpy
  touch "$STAMP"
fi
VPY="$VENV/bin/python"
torch_cuda=$("$VPY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
if [[ -z "$torch_cuda" ]]; then
  echo "cuda-build: FAILED, $VENV has a CPU-only torch ($("$VPY" -c 'import torch; print(torch.__version__)')); rm -rf $VENV and rerun"
  exit 1
fi

echo "cuda-build: building longvila_engine._C and the CPU kernel variants against torch $("$VPY" -c 'import torch; print(torch.__version__)')"
mkdir -p "$LIB_DIR" "$TMP_DIR"
log="$TMP_DIR/build.log"
# --force: distutils would skip on source timestamps alone and miss header edits; ninja still rebuilds
# only what changed (it tracks header dependencies).
if ! MAX_JOBS="${MAX_JOBS:-2}" "$VPY" setup.py -q build_ext --force --build-lib "$LIB_DIR" --build-temp "$TMP_DIR" >"$log" 2>&1; then
  grep -E "error|FAILED" "$log" | head -40 || tail -40 "$log"
  echo "cuda-build: FAILED (full log: $log)"
  exit 1
fi
grep -q "LONGVILA_WITH_CUDA" "$TMP_DIR/build.ninja" || { echo "cuda-build: FAILED, setup.py built without CUDA (see $log)"; exit 1; }

# Import through the package's own loader: a copy of the Python sources next to the CUDA .so.
tar --exclude='*.so' --exclude='*.so.requires' --exclude=__pycache__ -cf - longvila_engine | tar -xf - -C "$LIB_DIR"
PYTHONPATH="$LIB_DIR" "$VPY" scripts/cuda_build_check.py --json build/cuda-build.json
echo "cuda-build: ok in $(( $(date +%s) - start )) s"
