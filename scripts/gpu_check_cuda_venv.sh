#!/usr/bin/env bash
# `make gpu-check` where .venv holds a CPU-only torch (a machine whose pip finds the +cpu wheel first):
# runs scripts/gpu_check.py with the CUDA torch of `make cuda-build` (build/cuda-venv) on a copy of
# the tracked tree (build/cuda-tree) that carries that build's extension, so the source tree's CPU
# extension is neither used nor overwritten. Installs the test dependencies into build/cuda-venv once
# (stamp file). Results go to benchmarks/results/gpu_check/ of the real tree. Arguments are passed on
# to gpu_check.py. Needs `make cuda-build` first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${CUDA_VENV:-build/cuda-venv}"
VPY="$ROOT/$VENV/bin/python"
SO=$(ls build/cuda-ext/longvila_engine/_C*.so 2>/dev/null | head -1 || true)
if [[ ! -x "$VPY" || -z "$SO" ]]; then
  echo "gpu-check: no CUDA build found ($VENV, build/cuda-ext); run make cuda-build first"
  exit 1
fi
DEPS_STAMP="$VENV/.installed-test-deps"
if [[ ! -f "$DEPS_STAMP" ]]; then
  # torch is already the CUDA build; nothing below asks for another one.
  "$VPY" -m pip install -q "triton==${TRITON_VERSION:-3.7.1}" "transformers==${TRANSFORMERS_VERSION:-5.23.0}" \
    pytest tqdm numpy matplotlib "av==${AV_VERSION:-18.1.0}"
  touch "$DEPS_STAMP"
fi
TREE=build/cuda-tree
rm -rf "$TREE" && mkdir -p "$TREE"
git ls-files -z | xargs -0 cp --parents -t "$TREE"
# _C and the CPU kernel variants (_cpu_<isa>*.so, with a native build's .requires list).
cp build/cuda-ext/longvila_engine/*.so* "$TREE/longvila_engine/"
cd "$TREE"
exec "$VPY" scripts/gpu_check.py --out "$ROOT/benchmarks/results/gpu_check" "$@"
