// Declares every longvila_engine operator once. Implementations live per device in
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(longvila_engine, CPU, m)) and csrc/cuda/*.cpp (CUDA).
// Fake (meta) implementations are registered from Python (longvila_engine/ops/_fake.py).
//
// Shapes (B batch, S sequence, H query heads, Hk key/value heads, D head dim):
//   q (B,Sq,H,D)  k,v (B,Sk,Hk,D)  out (B,Sq,H,D) accumulator dtype  lse (B,H,Sq) accumulator dtype
// The accumulator dtype is float64 for float64 inputs and float32 otherwise.
// Varlen: B == 1 and cu_seqlens_q / cu_seqlens_k are int32 (N+1) prefix sums of the packed lengths.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The module only carries the operator registrations; importing it runs the static registrars.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(longvila_engine, m) {
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
