// Causal tiles of the CPU attention kernels (csrc/cpu/attention_fwd.cpp, attention_bwd.cpp): which
// part of a tile the diagonal crosses each row strip of a GEMM needs, and the float tile GEMM that
// computes only that part. The bf16 one is in attention_cpu_bf16.h; the micro-kernels are in
// attention_cpu.h.
#pragma once

#include "attention_cpu.h"

namespace lv {
namespace cpu {

// Causal tiles. With off = (the tile's first query position) - (its first key position), tile row i
// sees tile column c iff c <= i + off. Where the diagonal crosses a tile, a GEMM on it needs, per
// 6-row strip of its M rows, only part of the tile:
//   kCols       M = query rows, N = keys (S = Q K^T, dP = dO V^T): columns up to the strip's last row;
//   kDepth      M = query rows, K = keys (O += P V, dQ += dS K): depth up to the same bound;
//   kDepthFrom  M = keys, K = query rows (dV += P^T dO, dK += dS^T Q): depth from the first row that
//               sees the strip's first key.
// A strip computes the same products as the whole-tile GEMM, minus some of those whose operand is
// a masked (zero) P or dS entry, so the result is unchanged; kCols leaves the columns it skips
// unwritten (callers zero P and dS there before any later GEMM reads them). Depth kinds accumulate.
// About (tile rows)/S of a causal pass is such waste otherwise: 5% of the forward at S=4K with
// 192-row tiles, 19% at 1K. `pack` is the number of k rows per depth unit (2 for bf16 pair words).
enum class Causal { kCols, kDepth, kDepthFrom };
struct StripRange {
  int64_t n, k0, k1;
};
inline StripRange causal_strip(Causal kind, int64_t off, int64_t i, int64_t mr, int64_t N, int64_t K, int64_t panel,
                               int64_t pack) {
  StripRange r{N, 0, K};
  const int64_t seen = std::max<int64_t>(0, i + mr + off);  // keys the strip's last row sees
  if (kind == Causal::kCols) {
    r.n = std::min(N, round_up(seen, panel));
  } else if (kind == Causal::kDepth) {
    r.k1 = std::min(K, ceil_div(seen, pack));
  } else {
    r.k0 = std::min(K, std::max<int64_t>(0, i - off) / pack);
  }
  return r;
}
// Runs strip(mr, i, range) over the row strips of an M-row causal tile that have work.
template <typename F>
inline void over_causal_strips(Causal kind, int64_t off, int64_t M, int64_t N, int64_t K, int64_t panel,
                               int64_t pack, F&& strip) {
  over_row_strips(M, [&](auto mr, int64_t i) {
    const StripRange s = causal_strip(kind, off, i, decltype(mr)::value, N, K, panel, pack);
    if (s.n > 0 && s.k1 > s.k0) strip(mr, i, s);
  });
}
// Whether a tile at offset `off` with `cols` keys has rows that do not see all of them.
inline bool crosses_diagonal(bool causal, int64_t off, int64_t cols) { return causal && off + 1 < cols; }

// gemm_tile on a causal tile (arguments as there; `kind` and `off` as above). The strips run one
// after the other over their panels; the diagonal tiles are few, so the B panel reuse across strips
// that gemm_tile_simd arranges matters less here. The BLAS route takes the whole tile.
template <typename T>
inline void gemm_tile_causal(Causal kind, int64_t off, int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a,
                             int64_t cs_a, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t P = kPanel<T>;
  if (std::is_same_v<T, float> && gemm_use_blas()) {
    gemm_tile<T>(M, N, K, A, rs_a, cs_a, B, ldb, C, ldc, accumulate);
    return;
  }
  over_causal_strips(kind, off, M, N, K, P, 1, [&](auto mr, int64_t i, const StripRange& s) {
    constexpr int MR = decltype(mr)::value;
    const T* a = A + i * rs_a + s.k0 * cs_a;
    const T* b = B + s.k0 * ldb;
    T* c = C + i * ldc;
    int64_t j = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      for (; j + 2 * P <= s.n; j += 2 * P) {
        micro_tile_wide<MR>(s.k1 - s.k0, a, rs_a, cs_a, b + j, ldb, c + j, ldc, accumulate);
      }
    }
#endif
    for (; j < s.n; j += P) micro_tile<T, MR>(s.k1 - s.k0, a, rs_a, cs_a, b + j, ldb, c + j, ldc, accumulate);
  });
}

}  // namespace cpu
}  // namespace lv
