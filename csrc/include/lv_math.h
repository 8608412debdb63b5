// Per-element math shared by the C++ CPU kernels and the CUDA kernels: one definition, so the CPU
// tests exercise exactly what the GPU runs. Plain C++ (no torch headers) so nvcc compiles it alone.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define LV_HD __host__ __device__ __forceinline__
#else
#define LV_HD inline
#endif

namespace lv {

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
  if (hi == -INFINITY) {
    r.w_a = T(0);
    r.w_b = T(0);
    r.lse = -INFINITY;
    return r;
  }
  // exp(-inf - finite) = 0, so the smaller side may be -inf safely.
  const T ea = exp(lse_a - hi);
  const T eb = exp(lse_b - hi);
  const T sum = ea + eb;
  r.w_a = ea / sum;
  r.w_b = eb / sum;
  r.lse = hi + log(sum);
  return r;
}

// Zigzag source index: position `i` of the permuted sequence (length n = 2R * chunk) reads element
// zigzag_src(i) of the original. Permuted chunk p holds original chunk p/2 (even p) or 2R-1-p/2 (odd p).
LV_HD long long zigzag_src(long long i, long long chunk, long long ring_size) {
  const long long p = i / chunk;
  const long long c = (p % 2 == 0) ? p / 2 : 2 * ring_size - 1 - p / 2;
  return c * chunk + i % chunk;
}

// Inverse: position `i` of the original sequence is found at zigzag_dst(i) in the permuted one.
LV_HD long long zigzag_dst(long long i, long long chunk, long long ring_size) {
  const long long c = i / chunk;
  const long long p = (c < ring_size) ? 2 * c : 2 * (2 * ring_size - 1 - c) + 1;
  return p * chunk + i % chunk;
}

// Sequence index of packed token t from prefix sums cu[0..n]: the largest s with cu[s] <= t,
// skipping empty sequences (binary search; no host round trip).
LV_HD int varlen_seq_of(const int* cu, int n, int t) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace lv
