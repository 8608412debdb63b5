// The AVX512-BF16 route of the CPU attention kernels (csrc/cpu/attention_fwd.cpp, attention_bwd.cpp):
// a tile GEMM on bf16 pair words and the packing of bf16 operands into them. The float32 building
// blocks (vectors, micro-kernels, exp2, packing, checks) are in attention_cpu.h, causal tiles in
// attention_cpu_causal.h.
#pragma once

#include "attention_cpu_causal.h"

namespace lv {
namespace cpu {

// Whether bf16 inputs use the AVX512-BF16 pair dot products (defined in attention_fwd.cpp).
bool bf16_dot_enabled();

// ---------------------------------------------------------------------------------------------
// bf16 GEMM on tiles by pair dot products (AVX512-BF16: vdpbf16ps), for bf16 inputs on CPUs that
// have it (Zen 4, Cooper Lake, Sapphire Rapids and later): each instruction does two multiply-adds
// per float32 lane, twice the float32 FMA rate, with products of bf16 exact in float32 and the sums
// accumulated in float32. Operands are 32-bit words holding two bf16 values of consecutive k
// (element 2kk in the low half, 2kk+1 in the high half):
//   A word (i, kk) at A[i*rs_a + kk*cs_a]: (a[i][2kk], a[i][2kk+1]);
//   B word (kk, j) at B[kk*ldb + j]:       (b[2kk][j], b[2kk+1][j]);
// C[M x N] float (=, or += when accumulate); N a multiple of kPanel<float>. Operands computed in
// float32 (P, dS) are rounded to bf16 before these products, as flash attention does on GPUs; the
// low-precision tolerance rule of the tests bounds the result. The same 6 x 2-vector register block
// as micro_tile. Built when the compiler targets AVX512-BF16 (setup.py: -march=native).
#if defined(__AVX512BF16__) && defined(__AVX512F__) && (LV_FLOAT_VEC_BYTES == 64)
#define LV_CPU_BF16_DOT 1
inline __m512 dot2(__m512 c, uint32_t a, __m512bh b) {
  return _mm512_dpbf16_ps(c, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), b);
}

template <int MR>
__attribute__((noinline)) void micro_tile_bf16(int64_t K2, const uint32_t* A, int64_t rs_a, int64_t cs_a,
                                               const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                               bool accumulate) {
  static_assert(MR >= 1 && MR <= 6, "register block is at most 6 rows");
  __m512 c[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    c[i][0] = accumulate ? _mm512_loadu_ps(C + i * ldc) : _mm512_setzero_ps();
    c[i][1] = accumulate ? _mm512_loadu_ps(C + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < K2; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + kk * ldb);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + kk * ldb + 16);
    const uint32_t* a = A + kk * cs_a;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      c[i][0] = dot2(c[i][0], a[i * rs_a], b0);
      c[i][1] = dot2(c[i][1], a[i * rs_a], b1);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(C + i * ldc, c[i][0]);
    _mm512_storeu_ps(C + i * ldc + 16, c[i][1]);
  }
}

inline void gemm_tile_bf16(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t rs_a, int64_t cs_a,
                           const uint32_t* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  constexpr int P = kPanel<float>;
  for (int64_t j = 0; j < N; j += P) {
    over_row_strips(M, [&](auto mr, int64_t i) {
      micro_tile_bf16<decltype(mr)::value>(K2, A + i * rs_a, rs_a, cs_a, B + j, ldb, C + i * ldc + j, ldc,
                                           accumulate);
    });
  }
}

// gemm_tile_bf16 on a causal tile (attention_cpu_causal.h: Causal); depth counts pair words, 2 k rows each.
inline void gemm_tile_bf16_causal(Causal kind, int64_t off, int64_t M, int64_t N, int64_t K2, const uint32_t* A,
                                  int64_t rs_a, int64_t cs_a, const uint32_t* B, int64_t ldb, float* C, int64_t ldc,
                                  bool accumulate) {
  constexpr int P = kPanel<float>;
  over_causal_strips(kind, off, M, N, K2, P, 2, [&](auto mr, int64_t i, const StripRange& s) {
    for (int64_t j = 0; j < s.n; j += P) {
      micro_tile_bf16<decltype(mr)::value>(s.k1 - s.k0, A + i * rs_a + s.k0 * cs_a, rs_a, cs_a, B + s.k0 * ldb + j,
                                           ldb, C + i * ldc + j, ldc, accumulate);
    }
  });
}

// n floats (n a multiple of 32) rounded to nearest-even bf16, in order, into n/2 words.
inline void round_row_bf16(uint32_t* dst, const float* src, int64_t n) {
  for (int64_t c = 0; c < n; c += 32) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + c + 16), _mm512_loadu_ps(src + c));
    _mm512_storeu_si512(dst + c / 2, (__m512i)h);
  }
}
// Words (x0[c], x1[c]) for c < n (n a multiple of 16), both rows rounded to bf16; x1 may be null
// (zeros): the pair rows of a transposed operand (P^T, dS^T), read with rs_a = 1.
inline void pair_rows_bf16(uint32_t* dst, const float* x0, const float* x1, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) {
    const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x0 + c)));
    const __m512i hi = x1 ? _mm512_slli_epi32(
                                _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x1 + c))), 16)
                          : _mm512_setzero_si512();
    _mm512_storeu_si512(dst + c, _mm512_or_si512(lo, hi));
  }
}
#endif

// Bits of bf16 values (exact copies of bf16 inputs; no arithmetic on this side).
inline uint32_t bf16_pair(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
// Row r of a (rows x cols) bf16 matrix (row stride src_ld elements) as words of consecutive column
// pairs: dst[r*ld + cc] = (x[r][2cc], x[r][2cc+1]), zero past cols, for cc < ld.
inline void pack_bf16_rows(uint32_t* dst, int64_t ld, const uint16_t* src, int64_t src_ld, int64_t rows,
                           int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* x = src + r * src_ld;
    uint32_t* d = dst + r * ld;
    for (int64_t cc = 0; cc < ld; ++cc) {
      const int64_t c = 2 * cc;
      d[cc] = bf16_pair(c < cols ? x[c] : 0, c + 1 < cols ? x[c + 1] : 0);
    }
  }
}
// The transposed word matrix: dst[cc*ld + r] = (x[r][2cc], x[r][2cc+1]) for r < rows, zero for
// rows <= r < ld; cc < ceil(cols/2). For K^T (and V^T) blocks of the score GEMMs.
inline void pack_bf16_transposed(uint32_t* dst, int64_t ld, const uint16_t* src, int64_t src_ld, int64_t rows,
                                 int64_t cols) {
  const int64_t c2 = ceil_div(cols, 2);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* x = src + r * src_ld;
    for (int64_t cc = 0; cc < c2; ++cc) {
      const int64_t c = 2 * cc;
      dst[cc * ld + r] = bf16_pair(x[c], c + 1 < cols ? x[c + 1] : 0);
    }
  }
  for (int64_t cc = 0; cc < c2; ++cc) {
    for (int64_t r = rows; r < ld; ++r) dst[cc * ld + r] = 0;
  }
}
// Row pairs: dst[rr*ld + c] = (x[2rr][c], x[2rr+1][c]) for c < cols, zero for cols <= c < ld and for
// rows past `rows`; rr < ceil(rows/2). For the B operands whose k is a row index (V, K, Q, dO).
inline void pack_bf16_row_pairs(uint32_t* dst, int64_t ld, const uint16_t* src, int64_t src_ld, int64_t rows,
                                int64_t cols) {
  for (int64_t rr = 0; rr < ceil_div(rows, 2); ++rr) {
    const uint16_t* x0 = src + 2 * rr * src_ld;
    const uint16_t* x1 = 2 * rr + 1 < rows ? x0 + src_ld : nullptr;
    uint32_t* d = dst + rr * ld;
    for (int64_t c = 0; c < cols; ++c) d[c] = bf16_pair(x0[c], x1 ? x1[c] : 0);
    for (int64_t c = cols; c < ld; ++c) d[c] = 0;
  }
}

}  // namespace cpu
}  // namespace lv
