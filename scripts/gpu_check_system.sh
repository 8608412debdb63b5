#!/usr/bin/env bash
# `make gpu-check` on a GPU machine whose own python already holds a CUDA torch (a cluster node, a
# CUDA container image) and which may have no package index: nothing is installed. Builds the
# extension in place with that python (CUDA kernels for the GPU's architecture, one CPU variant),
# then runs scripts/gpu_check.py inside what is left of the wall-clock budget.
#   PY=python3 GPU_CHECK_TOTAL_S=480 GPU_CHECK_OUT=benchmarks/results/gpu_check bash scripts/gpu_check_system.sh [gpu_check.py args]
# LONGVILA_CPU_ISAS (default avx2) picks the CPU kernel variants to build; TORCH_CUDA_ARCH_LIST
# defaults to the visible GPU's compute capability. LONGVILA_GIT_SHA names the revision where the
# tree carries no .git (a copied working tree).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
TOTAL="${GPU_CHECK_TOTAL_S:-480}"
OUT_DIR="${GPU_CHECK_OUT:-$ROOT/benchmarks/results/gpu_check}"
start=$(date +%s)
echo "gpu-check(system): $(date -u +%FT%TZ) python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi -L || { echo "gpu-check: refused, needs a CUDA GPU (nvidia-smi finds none)"; exit 2; }
"$PY" - <<'PY' || { echo "gpu-check: refused, needs a CUDA GPU seen by $PY's torch"; exit 2; }
import torch, sys
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)
PY
mkdir -p "$OUT_DIR"
(command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "nvcc: not on PATH"
grep -m1 "model name" /proc/cpuinfo || true
echo "cpu cores: $(nproc)"
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  export TORCH_CUDA_ARCH_LIST
fi
b0=$(date +%s)
LONGVILA_CPU_ISAS="${LONGVILA_CPU_ISAS:-avx2}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" setup.py -q build_ext --inplace >"$OUT_DIR/build.log" 2>&1
rc=$?
echo "gpu-check(system): build rc=$rc in $(( $(date +%s) - b0 )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST); log: build.log"
if [[ $rc -ne 0 ]]; then tail -40 "$OUT_DIR/build.log"; exit 1; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
left=$(( TOTAL - ($(date +%s) - start) ))
if (( left < 120 )); then left=120; fi
exec "$PY" scripts/gpu_check.py --out "$OUT_DIR" --budget-s "$left" "$@"
