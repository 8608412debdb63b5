// CUDA implementations of merge_attn, zigzag_permute and varlen_index (schemas in csrc/ops.cpp):
// checks the tensors (lv_elementwise_checks.h, shared with the CPU operators), allocates outputs,
// and calls the raw-pointer launchers of merge.cu / zigzag.cu / varlen.cu on the current stream of
// the tensors' device. Compiled only in a CUDA build (setup.py), by the host compiler.
//
// It holds no kernels and reads no tensor values (that would synchronise with the host).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "launchers.h"
#include "lv_elementwise_checks.h"

namespace {

// The caller's stream on the device the guard made current: kernels queue behind the work that
// produced their inputs, with no device-wide synchronisation.
void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

void check_launch(const char* error, const char* op) {
  TORCH_CHECK(error == nullptr, op, ": CUDA kernel launch failed: ", error);
}

int lv_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return LV_FLOAT32;
    case at::kDouble:
      return LV_FLOAT64;
    case at::kHalf:
      return LV_FLOAT16;
    case at::kBFloat16:
      return LV_BFLOAT16;
    default:
      break;
  }
  TORCH_CHECK(false, "longvila_engine: no CUDA kernel for dtype ", t);
  return -1;
}

void merge_attn_cuda(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_block,
                     const at::Tensor& lse_block) {
  lv::check_merge_args(out, lse, out_block, lse_block, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(lv_merge_attn_launch(out.data_ptr(), lse.data_ptr(), out_block.const_data_ptr(),
                                    lse_block.const_data_ptr(),
                                    lv_dtype(out.scalar_type()), lv_dtype(out_block.scalar_type()), out.size(0),
                                    out.size(1), out.size(2), out.size(3), current_stream()),
               "merge_attn");
}

at::Tensor zigzag_permute_cuda(const at::Tensor& x, int64_t ring_size, int64_t dim, bool inverse) {
  const int64_t d = lv::check_zigzag_args(x, ring_size, dim, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= x.size(i);
  for (int64_t i = d + 1; i < x.dim(); ++i) inner *= x.size(i);
  check_launch(lv_zigzag_permute_launch(x.const_data_ptr(), y.data_ptr(), outer, x.size(d),
                                        inner * static_cast<int64_t>(x.element_size()), ring_size,
                                        inverse ? 1 : 0, current_stream()),
               "zigzag_permute");
  return y;
}

std::tuple<at::Tensor, at::Tensor> varlen_index_cuda(const at::Tensor& cu_seqlens, int64_t total) {
  lv::check_varlen_args(cu_seqlens, total, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(cu_seqlens.device());
  at::Tensor seq_id = at::empty({total}, cu_seqlens.options());
  at::Tensor position = at::empty({total}, cu_seqlens.options());
  check_launch(lv_varlen_index_launch(cu_seqlens.const_data_ptr<int>(), static_cast<int>(cu_seqlens.numel() - 1),
                                      seq_id.data_ptr<int>(), position.data_ptr<int>(), static_cast<int>(total),
                                      current_stream()),
               "varlen_index");
  return {seq_id, position};
}

}  // namespace

TORCH_LIBRARY_IMPL(longvila_engine, CUDA, m) {
  m.impl("merge_attn", &merge_attn_cuda);
  m.impl("zigzag_permute", &zigzag_permute_cuda);
  m.impl("varlen_index", &varlen_index_cuda);
}
