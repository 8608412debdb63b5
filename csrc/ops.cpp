// Declares every longvila_engine operator once. Implementations live per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(longvila_engine, CPU, m)) and csrc/cuda/*.cpp (CUDA).
// This file is compiled for baseline x86-64 (no -march/-m flag, setup.py) so that it loads on any CPU;
// the CPU kernels are separate libraries, one per instruction set, and longvila_engine/_extension.py
// loads the one this CPU runs, asking cpu_supports below which features it has.
// Fake (meta) implementations are registered from Python (longvila_engine/ops/_fake.py).
//
// Shapes (B batch, S sequence, H query heads, Hk key/value heads, D head dim):
//   q (B,Sq,H,D)  k,v (B,Sk,Hk,D)  out (B,Sq,H,D) accumulator dtype  lse (B,H,Sq) accumulator dtype
// The accumulator dtype is float64 for float64 inputs and float32 otherwise.
// Varlen: B == 1 and cu_seqlens_q / cu_seqlens_k are int32 (N+1) prefix sums of the packed lengths.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// The module only carries the operator registrations; importing it runs the static registrars.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// Whether this CPU (and the OS, which must save the wider registers) supports `feature`, one of the
// names of longvila_engine/_cpu_isa.py. __builtin_cpu_supports takes only string literals, hence the
// table. Unknown names are an error, not a "no": a typo must not silently demote the kernels.
bool cpu_supports(const std::string& feature) {
  __builtin_cpu_init();
#define LV_FEATURE(name) \
  if (feature == name) return __builtin_cpu_supports(name) != 0;
  LV_FEATURE("avx2")
  LV_FEATURE("fma")
  LV_FEATURE("f16c")
  LV_FEATURE("bmi")
  LV_FEATURE("bmi2")
  LV_FEATURE("lzcnt")
  LV_FEATURE("popcnt")
  LV_FEATURE("avx512f")
  LV_FEATURE("avx512bw")
  LV_FEATURE("avx512vl")
  LV_FEATURE("avx512dq")
  LV_FEATURE("avx512cd")
  LV_FEATURE("avx512bf16")
#undef LV_FEATURE
  TORCH_CHECK(false, "cpu_supports: unknown feature '", feature,
              "'; known: avx2 fma f16c bmi bmi2 lzcnt popcnt avx512f avx512bw avx512vl avx512dq avx512cd "
              "avx512bf16 (add a name to csrc/ops.cpp and longvila_engine/_cpu_isa.py together)");
  return false;
}

}  // namespace

TORCH_LIBRARY(longvila_engine, m) {
  // Host query, no tensors: does this CPU run instructions of `feature` (e.g. "avx512bf16")?
  m.def("cpu_supports(str feature) -> bool", &cpu_supports);
  // Block forward. resume=false: out/lse are overwritten with this block's result.
  // resume=true: the block's result is merged into the running (out, lse) in place:
  //   lse' = logaddexp(lse, lse_b); out' = out*exp(lse-lse') + out_b*exp(lse_b-lse').
  // Rows with no visible key get lse = -inf and out = 0.
  m.def(
      "attn_fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, float softmax_scale, bool causal, bool resume) -> ()");
  // Block backward against the final (out, lse). dq/dk/dv are in the accumulator dtype;
  // accumulate=true adds into them, false overwrites. dk/dv are at the K/V head count.
  m.def(
      "attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) dq, "
      "Tensor(b!) dk, Tensor(c!) dv, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, float softmax_scale, "
      "bool causal, bool accumulate) -> ()");
  // In-place merge of a block result (out_block, lse_block) into the running (out, lse).
  m.def("merge_attn(Tensor(a!) out, Tensor(b!) lse, Tensor out_block, Tensor lse_block) -> ()");
  // Zigzag reorder along `dim`: the sequence is cut in 2R chunks and laid out as
  // [0, 2R-1, 1, 2R-2, ..., R-1, R], so a contiguous split over R ranks gives rank r chunks r, 2R-1-r.
  // inverse=true undoes it.
  m.def("zigzag_permute(Tensor x, int ring_size, int dim, bool inverse) -> Tensor");
  // Per-token sequence index and position within its sequence from int32 cu_seqlens (N+1), for
  // `total` packed tokens, without a host synchronisation.
  m.def("varlen_index(Tensor cu_seqlens, int total) -> (Tensor, Tensor)");
}
