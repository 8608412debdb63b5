// Argument checks (TORCH_CHECK) for the memory-bound operators merge_attn, zigzag_permute and
// varlen_index, shared by the CPU implementation (csrc/cpu/elementwise.cpp) and the CUDA bindings
// (csrc/cuda/bindings.cpp) so both devices reject the same inputs with the same messages.
//
// Only shape, dtype, layout and device are checked here: nothing reads tensor values, because on a
// GPU that would be a host synchronisation. The CPU file checks cu_seqlens values itself.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace lv {

inline bool is_accumulator_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double;
}

inline bool is_float_dtype(c10::ScalarType t) {
  return is_accumulator_dtype(t) || t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

inline void check_on(const char* name, const at::Tensor& t, c10::DeviceType device_type,
                     const at::Tensor& first) {
  TORCH_CHECK(t.device().type() == device_type, "longvila_engine: ", name, " must be a ",
              c10::DeviceTypeName(device_type), " tensor, got ", t.device());
  TORCH_CHECK(t.device() == first.device(), "longvila_engine: ", name, " is on ", t.device(),
              " but the first operand is on ", first.device());
  TORCH_CHECK(t.layout() == c10::kStrided, "longvila_engine: ", name, " must be a dense (strided) tensor");
}

// merge_attn(out, lse, out_block, lse_block): out (B,S,H,D) and lse (B,H,S) are the float32/float64
// accumulators updated in place; out_block (B,S,H,D) of any float dtype; lse_block like lse.
inline void check_merge_args(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_block,
                             const at::Tensor& lse_block, c10::DeviceType device_type) {
  check_on("out", out, device_type, out);
  check_on("lse", lse, device_type, out);
  check_on("out_block", out_block, device_type, out);
  check_on("lse_block", lse_block, device_type, out);
  TORCH_CHECK(out.dim() == 4, "merge_attn: out must be (B, S, H, D), got ", out.sizes());
  TORCH_CHECK(is_accumulator_dtype(out.scalar_type()), "merge_attn: out must be float32 or float64, got ",
              out.scalar_type());
  const int64_t B = out.size(0), S = out.size(1), H = out.size(2);
  const std::vector<int64_t> lse_shape{B, H, S};
  TORCH_CHECK(lse.sizes() == c10::IntArrayRef(lse_shape), "merge_attn: lse must be (B, H, S) = ",
              c10::IntArrayRef(lse_shape), ", got ", lse.sizes());
  TORCH_CHECK(lse_block.sizes() == c10::IntArrayRef(lse_shape), "merge_attn: lse_block must be (B, H, S) = ",
              c10::IntArrayRef(lse_shape), ", got ", lse_block.sizes());
  TORCH_CHECK(out_block.sizes() == out.sizes(), "merge_attn: out_block must have out's shape ", out.sizes(),
              ", got ", out_block.sizes());
  TORCH_CHECK(lse.scalar_type() == out.scalar_type() && lse_block.scalar_type() == out.scalar_type(),
              "merge_attn: lse and lse_block must have out's dtype ", out.scalar_type(), ", got ",
              lse.scalar_type(), " and ", lse_block.scalar_type());
  TORCH_CHECK(is_float_dtype(out_block.scalar_type()),
              "merge_attn: out_block must be float16, bfloat16, float32 or float64, got ",
              out_block.scalar_type());
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && out_block.is_contiguous() &&
                  lse_block.is_contiguous(),
              "merge_attn: out, lse, out_block and lse_block must be contiguous");
}

// zigzag_permute(x, ring_size, dim, inverse): returns `dim` wrapped to [0, x.dim()).
inline int64_t check_zigzag_args(const at::Tensor& x, int64_t ring_size, int64_t dim,
                                 c10::DeviceType device_type) {
  check_on("x", x, device_type, x);
  TORCH_CHECK(x.dim() >= 1, "zigzag_permute: x must have at least one dimension");
  TORCH_CHECK(ring_size >= 1, "zigzag_permute: ring_size must be >= 1, got ", ring_size);
  TORCH_CHECK(dim >= -x.dim() && dim < x.dim(), "zigzag_permute: dim ", dim, " is out of range for a ",
              x.dim(), "-D tensor");
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK(x.size(d) % (2 * ring_size) == 0, "zigzag_permute: x.shape[", d, "]=", x.size(d),
              " must be divisible by 2*ring_size=", 2 * ring_size);
  TORCH_CHECK(x.is_contiguous(), "zigzag_permute: x must be contiguous");
  TORCH_CHECK(!x.is_quantized(), "zigzag_permute: quantized tensors are not supported");
  return d;
}

// varlen_index(cu_seqlens, total): int32 (N+1) offsets; the outputs are int32, so total must fit.
inline void check_varlen_args(const at::Tensor& cu_seqlens, int64_t total, c10::DeviceType device_type) {
  check_on("cu_seqlens", cu_seqlens, device_type, cu_seqlens);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
              "varlen_index: cu_seqlens must be a 1-D tensor of N+1 offsets, got ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == c10::ScalarType::Int, "varlen_index: cu_seqlens must be int32, got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.is_contiguous(), "varlen_index: cu_seqlens must be contiguous");
  TORCH_CHECK(cu_seqlens.numel() - 1 <= std::numeric_limits<int>::max(),
              "varlen_index: too many sequences for int32 indices");
  TORCH_CHECK(total >= 0 && total <= std::numeric_limits<int>::max(), "varlen_index: total must be in [0, 2^31), got ",
              total);
  TORCH_CHECK(total == 0 || cu_seqlens.numel() >= 2, "varlen_index: total=", total,
              " tokens but cu_seqlens holds no sequence");
}

}  // namespace lv
