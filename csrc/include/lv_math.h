// Per-element math shared by the C++ CPU kernels and the CUDA kernels: one definition, so the CPU
// tests exercise exactly what the GPU runs. Plain C++ (no torch headers, no CUDA headers) so nvcc
// compiles it alone and the CPU build needs no CUDA toolkit.
//
// It holds scalar functions only: no loops over tensors, no launches, no allocation. The loops live
// in csrc/cpu (OpenMP) and csrc/cuda (kernels).
#pragma once
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define LV_HD __host__ __device__ __forceinline__
#else
#define LV_HD inline
#endif

namespace lv {

// exp/log by precision. Calling the unqualified C name with a float would pick exp(double) on the
// host but the float overload on the device; spelling expf/logf keeps CPU and GPU on the same
// precision path.
LV_HD float exp_of(float x) { return expf(x); }
LV_HD double exp_of(double x) { return exp(x); }
LV_HD float log_of(float x) { return logf(x); }
LV_HD double log_of(double x) { return log(x); }

// Weights of the log-sum-exp merge of two partial attention results for one row:
//   lse' = logaddexp(lse_a, lse_b); out' = out_a * w_a + out_b * w_b,
//   w_a = exp(lse_a - lse'), w_b = exp(lse_b - lse').
// A row that saw no key has lse = -inf; two empty rows stay empty (lse' = -inf, weights 0), never NaN.
template <typename T>
struct MergeWeights {
  T w_a;
  T w_b;
  T lse;
};

template <typename T>
LV_HD MergeWeights<T> merge_weights(T lse_a, T lse_b) {
  MergeWeights<T> r;
  const T hi = lse_a > lse_b ? lse_a : lse_b;
  if (hi == T(-INFINITY)) {
    r.w_a = T(0);
    r.w_b = T(0);
    r.lse = T(-INFINITY);
    return r;
  }
  // Shifting by the larger side keeps both exponents <= 0 (no overflow), and exp(-inf - finite) = 0,
  // so the smaller side may be -inf safely. When one side is -inf, sum == 1 exactly and the other
  // side's weight is exactly 1 and lse' exactly its lse, as logaddexp gives.
  const T ea = exp_of(lse_a - hi);
  const T eb = exp_of(lse_b - hi);
  const T sum = ea + eb;
  r.w_a = ea / sum;
  r.w_b = eb / sum;
  r.lse = hi + log_of(sum);
  return r;
}

// 16-bit floats as raw bits. The CPU side (c10::Half / c10::BFloat16) and the GPU side (__half /
// __nv_bfloat16) have different types for the same bits; both kernels read them as these structs
// and widen them here, so the conversion is one definition too. Widening to float is exact.
struct half_bits {
  unsigned short x;
};
struct bf16_bits {
  unsigned short x;
};

LV_HD float float_from_bits(unsigned int u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);  // the defined way to reinterpret bits in C++17
  return f;
#endif
}

LV_HD float widen(bf16_bits v) { return float_from_bits(static_cast<unsigned int>(v.x) << 16); }

// IEEE binary16 -> binary32: rebias the exponent (15 -> 127) and shift the mantissa (10 -> 23 bits).
// Subnormal halves are mantissa * 2^-24, which float holds exactly (float's own subnormals start far
// lower). Inf and NaN keep their sign and payload.
LV_HD float widen(half_bits v) {
  const unsigned int sign = static_cast<unsigned int>(v.x & 0x8000u) << 16;
  const unsigned int exponent = (v.x >> 10) & 0x1fu;
  const unsigned int mantissa = v.x & 0x3ffu;
  if (exponent == 0x1fu) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0u) return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
  return sign ? -magnitude : magnitude;
}

LV_HD float widen(float v) { return v; }
LV_HD double widen(double v) { return v; }

// One element of the merge: out' = out * w_a + block * w_b in the accumulator type T, the block
// value first converted to T (as the reference's out_block.to(out.dtype) does).
template <typename T, typename TB>
LV_HD T merge_element(T out, TB block, const MergeWeights<T>& w) {
  return out * w.w_a + static_cast<T>(widen(block)) * w.w_b;
}

// Zigzag at chunk granularity for 2R chunks: permuted chunk p holds original chunk p/2 (even p) or
// 2R-1-p/2 (odd p); original chunk c sits at permuted chunk 2c (c < R) or 2(2R-1-c)+1. Templated on
// the index type so GPU kernels can stay in 32-bit arithmetic when sizes allow.
template <typename I>
LV_HD I zigzag_src_chunk(I p, I ring_size) {
  return (p % 2 == 0) ? p / 2 : 2 * ring_size - 1 - p / 2;
}

template <typename I>
LV_HD I zigzag_dst_chunk(I c, I ring_size) {
  return (c < ring_size) ? 2 * c : 2 * (2 * ring_size - 1 - c) + 1;
}

// Zigzag source index: position `i` of the permuted sequence (length n = 2R * chunk) reads element
// zigzag_src(i) of the original.
LV_HD long long zigzag_src(long long i, long long chunk, long long ring_size) {
  return zigzag_src_chunk(i / chunk, ring_size) * chunk + i % chunk;
}

// Inverse: position `i` of the original sequence is found at zigzag_dst(i) in the permuted one.
LV_HD long long zigzag_dst(long long i, long long chunk, long long ring_size) {
  return zigzag_dst_chunk(i / chunk, ring_size) * chunk + i % chunk;
}

// Sequence index of packed token t from prefix sums cu[0..n]: the largest s in [0, n-1] with
// cu[s] <= t, skipping empty sequences (binary search; no host round trip). For well-formed cu
// (cu[0] = 0, non-decreasing) and 0 <= t < cu[n] this is the sequence holding t; for anything else
// it still returns an index in [0, n-1] (n >= 1), so a kernel never reads out of bounds.
LV_HD int varlen_seq_of(const int* cu, int n, int t) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace lv
