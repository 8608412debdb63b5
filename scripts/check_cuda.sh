#!/usr/bin/env bash
# Compiles every csrc/**/*.cu with `nvcc -c` for sm_80 and sm_90a into a temporary directory and
# prints each kernel's registers, spills and shared memory (ptxas -v), so CUDA sources are checked on
# machines with a CPU-only torch and no GPU. Exits non-zero if any file fails to compile.
#
# It does not build the extension, link, or run anything: the .cu files are torch-free by design
# (csrc/cuda/launchers.h), and csrc/cuda/bindings.cpp is compiled only by a CUDA build of setup.py.
# Without nvcc it says so and exits 0, unless LONGVILA_REQUIRE_NVCC=1.
# Environment: NVCC (compiler), LONGVILA_CHECK_ARCHS (default "80 90a").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  NVCC="$CUDA_HOME/bin/nvcc"
fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: SKIPPED, nvcc not found (set NVCC or CUDA_HOME)"
  [[ "${LONGVILA_REQUIRE_NVCC:-0}" == "1" ]] && exit 1
  exit 0
fi

mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files under csrc"
  exit 0
fi

GENCODE=()
for arch in ${LONGVILA_CHECK_ARCHS:-80 90a}; do
  GENCODE+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "check_cuda: $("$NVCC" --version | tail -1), archs: ${LONGVILA_CHECK_ARCHS:-80 90a}"
status=0
for src in "${SOURCES[@]}"; do
  obj="$TMP/$(echo "$src" | tr '/' '_').o"
  log="$TMP/$(basename "$src").log"
  # --threads 0: one ptxas per architecture in parallel, which is most of the time spent.
  if ! "$NVCC" -c -O3 -std=c++17 --threads 0 "${GENCODE[@]}" -Icsrc/include -Xptxas -v \
      -o "$obj" "$src" >"$log" 2>&1; then
    echo "FAILED: $src"
    grep -v 'ptxas info' "$log" || true
    status=1
    continue
  fi
  echo "== $src"
  # Anything other than ptxas's resource report (warnings) is shown as is.
  grep -v -e 'ptxas info' -e 'bytes stack frame' "$log" || true
  # ptxas prints, per kernel and architecture: the entry name, then stack/spills, then registers/smem.
  awk '
    /Compiling entry function/ {
      match($0, /function .[^'"'"']+/); name = substr($0, RSTART + 10, RLENGTH - 10)
      match($0, /for .sm_[0-9a-z]+/); arch = substr($0, RSTART + 5, RLENGTH - 5)
      spill = "?"
    }
    /bytes spill stores/ {
      for (i = 1; i <= NF; i++) { if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) == "stores,") st = $i;
                                  if ($(i + 1) == "bytes" && $(i + 2) == "spill" && $(i + 3) == "loads") ld = $i }
      spill = st "/" ld
    }
    /Used [0-9]+ registers/ && name != "" {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      smem = "0"; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
      printf "%s\t%s\t%s\t%s\t%s\n", arch, regs, spill, smem, name
      name = ""
    }
  ' "$log" | c++filt | awk -F'\t' '{ printf "  %-7s regs %3s  spill st/ld %-5s  smem %5s  %s\n", $1, $2, $3, $4, $5 }'
done

if [[ $status -ne 0 ]]; then
  echo "check_cuda: FAILED"
else
  echo "check_cuda: ok (${#SOURCES[@]} files)"
fi
exit $status
