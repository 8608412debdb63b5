// longvila_engine::cpu_peak_gflops: the single-thread arithmetic peak of this CPU as the CPU kernels
// use it, measured by a register-only loop of independent multiply-add chains (no memory traffic):
// "fp32" the float FMAs of the GEMM micro-kernels, "bf16_dot" the AVX512-BF16 pair dot products
// (0 where the build or the CPU lacks them). benchmarks/bench_kernels.py divides measured GFLOP/s by
// it, so "the kernel runs at x% of what the FMA units can do" is a number, not a guess.
#include <torch/library.h>

#include <chrono>
#include <string>

#include "attention_cpu_bf16.h"

namespace lv {
namespace cpu {
namespace {

// 12 independent accumulators: enough to cover an FMA latency of 4-6 cycles at 2 issues per cycle.
template <typename Step>
double chains_gflops(Step step, double flops_per_call) {
  using clock = std::chrono::steady_clock;
  int64_t calls = 1 << 16;
  for (;;) {
    const auto t0 = clock::now();
    const float sink = step(calls);
    const double dt = std::chrono::duration<double>(clock::now() - t0).count();
    if (sink == 12345.678f) return 0;  // keeps the loop from being optimised away
    if (dt > 0.05) return flops_per_call * static_cast<double>(calls) / dt / 1e9;
    calls *= 4;
  }
}

double fp32_peak() {
  using V = Vec<float>;
  return chains_gflops(
      [](int64_t n) {
        V a0 = splat(1.0f), a1 = splat(1.1f), a2 = splat(1.2f), a3 = splat(1.3f), a4 = splat(1.4f),
          a5 = splat(1.5f), a6 = splat(1.6f), a7 = splat(1.7f), a8 = splat(1.8f), a9 = splat(1.9f),
          a10 = splat(2.0f), a11 = splat(2.1f);
        const V b = splat(0.9999999f), c = splat(1e-7f);
        for (int64_t i = 0; i < n; ++i) {
          a0 = fmadd(a0, b, c); a1 = fmadd(a1, b, c); a2 = fmadd(a2, b, c); a3 = fmadd(a3, b, c);
          a4 = fmadd(a4, b, c); a5 = fmadd(a5, b, c); a6 = fmadd(a6, b, c); a7 = fmadd(a7, b, c);
          a8 = fmadd(a8, b, c); a9 = fmadd(a9, b, c); a10 = fmadd(a10, b, c); a11 = fmadd(a11, b, c);
        }
        return hsum<float>(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11);
      },
      12.0 * 2 * kWidth<float>);
}

double bf16_dot_peak() {
#if defined(LV_CPU_BF16_DOT)
  if (!bf16_dot_enabled()) return 0;
  return chains_gflops(
      [](int64_t n) {
        __m512 a[12];
        for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(0.1f * static_cast<float>(i));
        const __m512bh b = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // (1.0, 1.0) in bf16
        const __m512bh c = (__m512bh)_mm512_set1_epi32(0x33d633d6);  // (1e-7, 1e-7) roughly
        for (int64_t i = 0; i < n; ++i) {
#pragma GCC unroll 12
          for (int j = 0; j < 12; ++j) a[j] = _mm512_dpbf16_ps(a[j], (j & 1) ? b : c, (j & 1) ? c : b);
        }
        __m512 s = a[0];
        for (int j = 1; j < 12; ++j) s = _mm512_add_ps(s, a[j]);
        return _mm512_reduce_add_ps(s);
      },
      12.0 * 4 * 16);
#else
  return 0;
#endif
}

double cpu_peak_gflops(std::string kind) {
  if (kind == "fp32") return fp32_peak();
  if (kind == "bf16_dot") return bf16_dot_peak();
  TORCH_CHECK(false, "cpu_peak_gflops: kind must be 'fp32' or 'bf16_dot', got '", kind, "'");
  return 0;
}

}  // namespace
}  // namespace cpu
}  // namespace lv

TORCH_LIBRARY_FRAGMENT(longvila_engine, m) { m.def("cpu_peak_gflops(str kind) -> float", &lv::cpu::cpu_peak_gflops); }
