// Building blocks shared by the CPU attention forward (csrc/cpu/attention_fwd.cpp) and backward
// (csrc/cpu/attention_bwd.cpp): SIMD vector helpers, a register-blocked GEMM micro-kernel on
// tiles, a vectorised exp2, tile packing with dtype conversion, the list of (q, k) segments and the
// boundary checks. It holds no operator registration and no OpenMP region of its own.
//
// Legend: B batch, S sequence, H query heads, Hk key/value heads, D head dim, T accumulator type
// (float, or double for float64 inputs). Softmax runs in the log2 domain: exp(x) = exp2(x*log2(e)),
// so the scale folds into one multiply and lse converts back to natural log on output.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace lv {
namespace cpu {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---------------------------------------------------------------------------------------------
// Vectors through GCC/Clang vector extensions: float vectors are 512 bits wide when the build
// targets AVX-512 (setup.py compiles with -march=native unless LONGVILA_NATIVE=0), 256 bits
// otherwise; double stays 256 bits (the float64 path is held to 1e-10, not tuned for speed). A
// baseline build still compiles (as pairs of SSE ops). On the AMD EPYC with AVX-512 of 2026-11-29,
// where each 512-bit FMA is issued as two 256-bit halves, the wider block gained a few percent in
// fwd+bwd; CPUs with two full 512-bit FMA ports (Intel Xeon) are where it should matter (issue #13).
template <typename T>
struct VecTraits;
#if defined(__AVX512F__)
#define LV_FLOAT_VEC_BYTES 64
#else
#define LV_FLOAT_VEC_BYTES 32
#endif
template <>
struct VecTraits<float> {
  typedef float V __attribute__((vector_size(LV_FLOAT_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(LV_FLOAT_VEC_BYTES)));
  typedef int32_t IE;
  static constexpr int kWidth = LV_FLOAT_VEC_BYTES / 4;
};
template <>
struct VecTraits<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  typedef int64_t IE;
  static constexpr int kWidth = 4;
};
template <typename T>
using Vec = typename VecTraits<T>::V;
template <typename T>
using VecI = typename VecTraits<T>::I;
template <typename T>
constexpr int kWidth = VecTraits<T>::kWidth;
// The micro-kernel is two vectors wide; GEMM N extents and padded row lengths are multiples of it.
template <typename T>
constexpr int kPanel = 2 * VecTraits<T>::kWidth;

template <typename T>
inline Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // compiles to one unaligned vector load
  return v;
}
template <typename T>
inline void storeu(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Broadcast: through the intrinsic where there is one, because `Vec{} + x` is not an identity
// for x = -0 and the compiler then emits a real addition before the broadcast.
inline Vec<float> splat(float x) {
#if defined(__AVX512F__)
  return (Vec<float>)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (Vec<float>)_mm256_set1_ps(x);
#else
  return Vec<float>{x, x, x, x, x, x, x, x};
#endif
}
inline Vec<double> splat(double x) {
#if defined(__AVX__)
  return (Vec<double>)_mm256_set1_pd(x);
#else
  return Vec<double>{x, x, x, x};
#endif
}
// Mask of the lanes i < n of a vector, for row tails without a scalar loop.
template <typename T>
inline VecI<T> lanes_below(int64_t n) {
  using IE = typename VecTraits<T>::IE;
  VecI<T> iota;
  for (int i = 0; i < kWidth<T>; ++i) iota[i] = static_cast<IE>(i);
  return iota < (VecI<T>{} + static_cast<IE>(n));
}

// a*b + c fused: ISO C++ mode keeps GCC from contracting vector-extension expressions, so the FMA
// instruction is named explicitly where the target has it.
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
#if defined(__AVX512F__)
  return (Vec<float>)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
  return (Vec<float>)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
#if defined(__AVX2__) && defined(__FMA__)
  return (Vec<double>)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}

// Horizontal max/sum by halving the vector (log2(width) shuffle+op steps) rather than a serial
// lane-by-lane chain: they run once per row per key block in the forward's online softmax.
template <typename T>
inline T hmax(Vec<T> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_max_ps((__m512)v);
#endif
  T m = v[0];
  for (int i = 1; i < kWidth<T>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <typename T>
inline T hsum(Vec<T> v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_add_ps((__m512)v);
#endif
  T s = v[0];
  for (int i = 1; i < kWidth<T>; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---------------------------------------------------------------------------------------------
// GEMM on tiles: C[M x N] (=, or += when accumulate) A[M x K] * B[K x N].
// A is read by scalar broadcasts at A[i*rs_a + k*cs_a], so a transposed A (P^T, dS^T in the
// backward) costs nothing extra; B rows are contiguous (B[k*ldb + j]); N must be a multiple of
// kPanel<T> (callers pad B with zero columns). Registers hold a 6 x kPanel block of C: 12
// accumulators + 2 B vectors + 1 broadcast fit the 16 AVX2 registers (and half of AVX-512's 32).
// One row of the register block: c0/c1 += a * (b0, b1).
template <typename T>
inline void fma_row(const T* a, Vec<T> b0, Vec<T> b1, Vec<T>& c0, Vec<T>& c1) {
  const Vec<T> x = splat(*a);
  c0 = fmadd(x, b0, c0);
  c1 = fmadd(x, b1, c1);
}

template <typename T>
inline void load_row_pair(bool accumulate, const T* c, Vec<T>& c0, Vec<T>& c1) {
  c0 = accumulate ? loadu(c) : Vec<T>{};
  c1 = accumulate ? loadu(c + kWidth<T>) : Vec<T>{};
}

// The accumulators are twelve named variables, and the kernel is never inlined: inlined into a
// larger loop nest (or with an array of accumulators) GCC 12 keeps half of them on the stack and
// the kernel runs at a third of its speed. The call costs nothing next to 6*K*kPanel FMAs.
template <typename T, int MR>
__attribute__((noinline)) void micro_tile(int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B,
                                          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  static_assert(MR >= 1 && MR <= 6, "register block is at most 6 rows");
  constexpr int W = kWidth<T>;
  Vec<T> c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{}, c40{}, c41{}, c50{}, c51{};
  load_row_pair(accumulate, C, c00, c01);
  if constexpr (MR > 1) load_row_pair(accumulate, C + ldc, c10, c11);
  if constexpr (MR > 2) load_row_pair(accumulate, C + 2 * ldc, c20, c21);
  if constexpr (MR > 3) load_row_pair(accumulate, C + 3 * ldc, c30, c31);
  if constexpr (MR > 4) load_row_pair(accumulate, C + 4 * ldc, c40, c41);
  if constexpr (MR > 5) load_row_pair(accumulate, C + 5 * ldc, c50, c51);
  for (int64_t k = 0; k < K; ++k) {
    const Vec<T> b0 = loadu(B + k * ldb);
    const Vec<T> b1 = loadu(B + k * ldb + W);
    const T* a = A + k * cs_a;
    fma_row(a, b0, b1, c00, c01);
    if constexpr (MR > 1) fma_row(a + rs_a, b0, b1, c10, c11);
    if constexpr (MR > 2) fma_row(a + 2 * rs_a, b0, b1, c20, c21);
    if constexpr (MR > 3) fma_row(a + 3 * rs_a, b0, b1, c30, c31);
    if constexpr (MR > 4) fma_row(a + 4 * rs_a, b0, b1, c40, c41);
    if constexpr (MR > 5) fma_row(a + 5 * rs_a, b0, b1, c50, c51);
  }
  storeu(C, c00);
  storeu(C + W, c01);
  if constexpr (MR > 1) { storeu(C + ldc, c10); storeu(C + ldc + W, c11); }
  if constexpr (MR > 2) { storeu(C + 2 * ldc, c20); storeu(C + 2 * ldc + W, c21); }
  if constexpr (MR > 3) { storeu(C + 3 * ldc, c30); storeu(C + 3 * ldc + W, c31); }
  if constexpr (MR > 4) { storeu(C + 4 * ldc, c40); storeu(C + 4 * ldc + W, c41); }
  if constexpr (MR > 5) { storeu(C + 5 * ldc, c50); storeu(C + 5 * ldc + W, c51); }
}

// Runs strip(std::integral_constant<int, MR>, i) over the row strips of an M-row tile: 6-row strips,
// then one strip of the 1-5 rows left, so every micro-kernel is instantiated for a fixed row count.
template <typename F>
inline void over_row_strips(int64_t M, F&& strip) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6) strip(std::integral_constant<int, 6>{}, i);
  switch (M - i) {
    case 5: strip(std::integral_constant<int, 5>{}, i); break;
    case 4: strip(std::integral_constant<int, 4>{}, i); break;
    case 3: strip(std::integral_constant<int, 3>{}, i); break;
    case 2: strip(std::integral_constant<int, 2>{}, i); break;
    case 1: strip(std::integral_constant<int, 1>{}, i); break;
    default: break;
  }
}

#if defined(__AVX512F__)
// With AVX-512's 32 registers the float block can be 6 rows x 4 vectors (64 columns): 24
// accumulators + 4 B vectors + 1 broadcast, 4 B loads and 6 broadcasts per 24 FMAs instead of 2 and 6
// per 12. Accumulators as an array, fully unrolled in a noinline function, stay in registers (GCC 12,
// checked in the disassembly: no stack traffic in the k loop).
template <int MR>
__attribute__((noinline)) void micro_tile_wide(int64_t K, const float* A, int64_t rs_a, int64_t cs_a,
                                               const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  static_assert(MR >= 1 && MR <= 6, "register block is at most 6 rows");
  __m512 c[6][4];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) c[i][v] = accumulate ? _mm512_loadu_ps(C + i * ldc + 16 * v) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    const float* a = A + k * cs_a;
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i * rs_a]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) c[i][v] = _mm512_fmadd_ps(x, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
  }
}
#endif

template <typename T>
inline void gemm_tile_simd(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B,
                           int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int P = kPanel<T>;
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j + 2 * P <= N; j += 2 * P) {
      over_row_strips(M, [&](auto mr, int64_t i) {
        micro_tile_wide<decltype(mr)::value>(K, A + i * rs_a, rs_a, cs_a, B + j, ldb, C + i * ldc + j, ldc,
                                             accumulate);
      });
    }
  }
#endif
  for (; j < N; j += P) {
    over_row_strips(M, [&](auto mr, int64_t i) {
      micro_tile<T, decltype(mr)::value>(K, A + i * rs_a, rs_a, cs_a, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    });
  }
}

// Optional route for float tiles: the MKL sgemm that torch links (libtorch_cpu exports it; the float
// at::native::cpublas::gemm is not exported). MKL picks its kernel for the CPU it runs on (AVX-512
// where present, AVX2 elsewhere), so this is a dispatch on CPU features at run time without compiling
// this header twice; inside the kernels' OpenMP regions it runs single-threaded (MKL_DYNAMIC), as in
// torch's CPU flash attention, which calls the same BLAS per block. Off unless LONGVILA_CPU_GEMM=blas:
// on the AMD EPYC (AVX-512) it was tried on (2026-11-29, 1 thread, thread CPU time), per-tile sgemm
// made fp32 forward+backward 1.1-1.4x slower than the micro-kernel. double always keeps the latter.
bool gemm_use_blas();
#if AT_MKL_ENABLED()
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
#endif

// C[M x N] (=, or += when accumulate) A[M x K] * B[K x N], A and B as for micro_tile.
template <typename T>
inline void gemm_tile(int64_t M, int64_t N, int64_t K, const T* A, int64_t rs_a, int64_t cs_a, const T* B,
                      int64_t ldb, T* C, int64_t ldc, bool accumulate) {
#if AT_MKL_ENABLED()
  // Row-major C = A * B is column-major C^T = B^T * A^T; A is row-major (cs_a == 1) or transposed.
  if constexpr (std::is_same_v<T, float>) {
    if (M > 0 && N > 0 && K > 0 && (cs_a == 1 || rs_a == 1) && gemm_use_blas()) {
      const bool a_rows = cs_a == 1;
      const char ta = 'N', tb = a_rows ? 'N' : 'T';
      const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
      const int ld_b = static_cast<int>(ldb), ld_a = static_cast<int>(a_rows ? rs_a : cs_a);
      const int ld_c = static_cast<int>(ldc);
      const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &ld_b, A, &ld_a, &beta, C, &ld_c);
      return;
    }
  }
#endif
  gemm_tile_simd<T>(M, N, K, A, rs_a, cs_a, B, ldb, C, ldc, accumulate);
}

// ---------------------------------------------------------------------------------------------
// exp2 on a vector. float: 2^x = 2^n * 2^f with n = round(x), |f| <= 1/2, and 2^f from a degree-6
// polynomial (below). Inputs are clamped at -126, so anything smaller (-inf included) gives 2^-126
// instead of a subnormal (slow on some CPUs) or 0: the callers only pass x = score - (row max or
// lse) for visible keys, and such a term is < 1e-37 of the row's largest one; masked lanes are
// zeroed by the callers, not here. kCapHigh = false drops the cap at 127 where x <= 0 holds (the
// forward subtracts the running row max). double: libm, because float64 results are held to 1e-10
// and that path is not the one tuned for speed.
template <bool kCapHigh = true>
inline Vec<float> exp2v(Vec<float> x) {
  using V = Vec<float>;
  x = x > splat(-126.0f) ? x : splat(-126.0f);  // vmaxps
  if constexpr (kCapHigh) {
    // Never reached by a consistent (score, lse); keeps an inconsistent one finite.
    x = x < splat(127.0f) ? x : splat(127.0f);  // vminps
  }
#if defined(__AVX512F__)
  // n = round(x) in one instruction, and 2^n * p in one (vscalefps): 4 vector ops fewer per 16
  // lanes than the integer route below.
  const V n = (V)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const V f = x - n;
#else
  using I = VecI<float>;
  // Adding 1.5*2^23 rounds x to an integer held in the low mantissa bits (|x| < 2^22).
  const V magic = splat(12582912.0f);
  const V t = x + magic;
  const V f = x - (t - magic);
#endif
  // Degree 6, coefficients fitted for least maximum relative error on [-1/2, 1/2] (2e-9, below
  // float rounding; the Taylor series needs degree 7 for that).
  V p = splat(1.5353360544960603e-04f);
  p = fmadd(p, f, splat(1.3398874534212351e-03f));
  p = fmadd(p, f, splat(9.6184373640906e-03f));
  p = fmadd(p, f, splat(5.55033247075884e-02f));
  p = fmadd(p, f, splat(2.4022647913555023e-01f));
  p = fmadd(p, f, splat(6.931472028552755e-01f));
  p = fmadd(p, f, splat(1.0f));
#if defined(__AVX512F__)
  return (V)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  return (V)((I)p + (((I)t - (I)magic) << 23));
#endif
}
template <bool kCapHigh = true>
inline Vec<double> exp2v(Vec<double> x) {
  Vec<double> r;
  for (int i = 0; i < kWidth<double>; ++i) r[i] = std::exp2(x[i]);
  return r;
}

// Row maximum of s[c] * scale over c < n (n >= 1). Elements past n in the last vector are read
// (rows are padded to kPanel) but masked out. Rounding is monotone, so for scale >= 0 the maximum of
// the products is the product of the maximum (exactly), and for scale < 0 that of the minimum: the
// pass over the row needs no multiply.
template <typename T>
inline T row_max_scaled(const T* s, int64_t n, T scale) {
  constexpr int W = kWidth<T>;
  const bool up = scale >= T(0);
  const Vec<T> fill = splat(up ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity());
  Vec<T> m = fill;
  int64_t c = 0;
  if (up) {
    for (; c + W <= n; c += W) {
      const Vec<T> x = loadu(s + c);
      m = x > m ? x : m;
    }
  } else {
    for (; c + W <= n; c += W) {
      const Vec<T> x = loadu(s + c);
      m = x < m ? x : m;
    }
  }
  if (c < n) {
    const VecI<T> keep = lanes_below<T>(n - c);
    const Vec<T> x = keep ? loadu(s + c) : fill;
    m = up ? (x > m ? x : m) : (x < m ? x : m);
  }
  return (up ? hmax<T>(m) : -hmax<T>(-m)) * scale;
}

// In place p[c] = exp2(s[c]*scale - sub) for c < n and 0 for n <= c < n_zero (n_zero a multiple of
// the vector width, within the row's padding); returns the lane-wise sum of p over c < n (the
// forward keeps it per row as a vector and reduces it once, after the last key block).
template <typename T, bool kCapHigh = true>
inline Vec<T> row_exp2(T* s, int64_t n, int64_t n_zero, T scale, T sub) {
  constexpr int W = kWidth<T>;
  const Vec<T> vs = splat(scale);
  const Vec<T> vsub = splat(sub);
  Vec<T> acc{};
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const Vec<T> p = exp2v<kCapHigh>(fmadd(loadu(s + c), vs, -vsub));
    storeu(s + c, p);
    acc += p;
  }
  if (c < n) {
    const VecI<T> keep = lanes_below<T>(n - c);
    Vec<T> p = exp2v<kCapHigh>(fmadd(loadu(s + c), vs, -vsub));
    p = keep ? p : Vec<T>{};
    storeu(s + c, p);
    acc += p;
    c += W;
  }
  for (; c < n_zero; c += W) storeu(s + c, Vec<T>{});
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Conversion of one row of n elements of any supported input dtype into T. The dtype switch is per
// row, so operands of mixed dtypes (bf16 q with a float32 dout) need no template per combination.
template <typename T, typename S>
inline void convert_row_as(T* dst, const S* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]));
}
template <typename T>
inline void convert_row_as(T* dst, const double* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <typename T>
inline void load_row(T* dst, const void* src, at::ScalarType st, int64_t n) {
  switch (st) {
    case at::kFloat: convert_row_as(dst, static_cast<const float*>(src), n); break;
    case at::kDouble: convert_row_as(dst, static_cast<const double*>(src), n); break;
    case at::kBFloat16: convert_row_as(dst, static_cast<const c10::BFloat16*>(src), n); break;
    case at::kHalf: convert_row_as(dst, static_cast<const c10::Half*>(src), n); break;
    default: break;  // excluded by check_float_dtype at the boundary
  }
}

// Row-major copy of `rows` rows of `cols` elements (source row stride src_ld elements) into dst
// with row stride ld, converted to T, columns [cols, ld) zeroed.
template <typename T>
inline void pack_rows(T* dst, int64_t ld, const char* src, int64_t src_ld_bytes, at::ScalarType st, int64_t rows,
                      int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst + r * ld;
    load_row(d, src + r * src_ld_bytes, st, cols);
    for (int64_t c = cols; c < ld; ++c) d[c] = T(0);
  }
}

// Transposed copy: dst[c*ld + r] = src row r, column c, for r < rows, c < cols; columns
// [rows, ld) of dst zeroed. `tmp` holds one converted row (cols elements).
template <typename T>
inline void pack_transposed(T* dst, int64_t ld, const char* src, int64_t src_ld_bytes, at::ScalarType st,
                            int64_t rows, int64_t cols, T* tmp) {
  for (int64_t r = 0; r < rows; ++r) {
    load_row(tmp, src + r * src_ld_bytes, st, cols);
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = tmp[c];
  }
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t r = rows; r < ld; ++r) dst[c * ld + r] = T(0);
  }
}

// ---------------------------------------------------------------------------------------------
// One independent attention problem: rows [q0, q0+q_len) of batch b attend to keys
// [k0, k0+k_len). Dense input gives one per batch; packed varlen (B == 1) one per sequence.
struct Segment {
  int64_t b;
  int64_t q0;
  int64_t q_len;
  int64_t k0;
  int64_t k_len;
};

inline void check_float_dtype(const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float16, bfloat16, float32 or float64, got ", st);
}

inline void check_cpu_contiguous(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Shape, dtype and layout checks of q (B,Sq,H,D), k/v (B,Sk,Hk,D) and the optional cu_seqlens;
// returns the segments. cu_seqlens values are read here (they live on the CPU), so a malformed
// one is an error rather than an out-of-bounds read.
inline std::vector<Segment> check_qkv_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const c10::optional<at::Tensor>& cu_q,
                                               const c10::optional<at::Tensor>& cu_k) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, S, H, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_cpu_contiguous("q", q);
  check_cpu_contiguous("k", k);
  check_cpu_contiguous("v", v);
  check_float_dtype("q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "q ", q.sizes(), " and k ", k.sizes(),
              " must agree on batch and head_dim");
  TORCH_CHECK(q.size(3) > 0, "head_dim must be positive");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "num_heads=", q.size(2),
              " must be a multiple of num_kv_heads=", k.size(2));
  const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1);
  std::vector<Segment> segs;
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  if (!cu_q.has_value()) {
    for (int64_t b = 0; b < B; ++b) segs.push_back({b, 0, Sq, 0, Sk});
    return segs;
  }
  const at::Tensor& cq = *cu_q;
  const at::Tensor& ck = *cu_k;
  TORCH_CHECK(B == 1, "packed varlen input needs batch size 1, got ", B);
  for (const at::Tensor* t : {&cq, &ck}) {
    TORCH_CHECK(t->dim() == 1 && t->numel() >= 2 && t->scalar_type() == at::kInt,
                "cu_seqlens must be 1-D int32 with N+1 >= 2 offsets, got ", t->scalar_type(), " ", t->sizes());
    check_cpu_contiguous("cu_seqlens", *t);
  }
  TORCH_CHECK(cq.numel() == ck.numel(), "cu_seqlens_q and cu_seqlens_k must hold the same number of sequences");
  const int32_t* a = cq.data_ptr<int32_t>();
  const int32_t* c = ck.data_ptr<int32_t>();
  const int64_t n = cq.numel() - 1;
  TORCH_CHECK(a[0] == 0 && c[0] == 0 && a[n] == Sq && c[n] == Sk,
              "cu_seqlens must start at 0 and end at the packed lengths (", Sq, ", ", Sk, ")");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(a[i + 1] >= a[i] && c[i + 1] >= c[i], "cu_seqlens must not decrease");
    segs.push_back({0, a[i], a[i + 1] - a[i], c[i], c[i + 1] - c[i]});
  }
  return segs;
}

inline void check_acc(const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType acc) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, name, " must be ", acc, " (the accumulator dtype), got ", t.scalar_type());
  check_cpu_contiguous(name, t);
}

inline at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace cpu
}  // namespace lv
