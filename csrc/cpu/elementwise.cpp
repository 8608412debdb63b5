// CPU (C++/OpenMP) implementations of the memory-bound operators declared in csrc/ops.cpp:
// merge_attn (in-place log-sum-exp merge), zigzag_permute and varlen_index. The per-element math
// (merge weights, 16-bit widening, zigzag chunk maps, the varlen binary search) comes from
// lv_math.h, the same definitions the CUDA kernels in csrc/cuda run, so these CPU tests cover them.
//
// It does no attention, registers no autograd and no fake kernels (Python does that), and takes no
// strided views: callers pass contiguous tensors (longvila_engine.ops makes them so).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "lv_elementwise_checks.h"
#include "lv_math.h"

namespace {

// Below this much work the OpenMP fork/join costs more than the loop itself.
constexpr int64_t kParallelElements = 1 << 15;
// Zigzag copies are split into pieces of at most this many bytes so that a few long chunks (small
// ring, one batch) still spread over all threads.
constexpr int64_t kCopyPieceBytes = 1 << 18;

static_assert(sizeof(lv::half_bits) == sizeof(at::Half), "half_bits must alias at::Half");
static_assert(sizeof(lv::bf16_bits) == sizeof(at::BFloat16), "bf16_bits must alias at::BFloat16");

// Rows are (b, s, h) in out's memory order, so each row's D values are contiguous; lse is (B, H, S),
// so a row's lse entry sits at (b*H + h)*S + s. Each row owns its lse entry: no two threads touch it.
template <typename T, typename TB>
void merge_rows(T* out, T* lse, const TB* out_block, const T* lse_block, int64_t B, int64_t S, int64_t H,
                int64_t D) {
  const int64_t rows = B * S * H;
#pragma omp parallel for schedule(static) if (rows * D >= kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r % H;
    const int64_t s = (r / H) % S;
    const int64_t b = r / (H * S);
    const int64_t l = (b * H + h) * S + s;
    const lv::MergeWeights<T> w = lv::merge_weights(lse[l], lse_block[l]);
    T* o = out + r * D;
    const TB* ob = out_block + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] = lv::merge_element(o[d], ob[d], w);
    lse[l] = w.lse;
  }
}

template <typename T>
void merge_typed(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_block,
                 const at::Tensor& lse_block) {
  const int64_t B = out.size(0), S = out.size(1), H = out.size(2), D = out.size(3);
  T* o = out.data_ptr<T>();
  T* l = lse.data_ptr<T>();
  const T* lb = lse_block.data_ptr<T>();
  switch (out_block.scalar_type()) {
    case at::kFloat:
      merge_rows(o, l, out_block.data_ptr<float>(), lb, B, S, H, D);
      break;
    case at::kDouble:
      merge_rows(o, l, out_block.data_ptr<double>(), lb, B, S, H, D);
      break;
    case at::kHalf:
      merge_rows(o, l, reinterpret_cast<const lv::half_bits*>(out_block.data_ptr<at::Half>()), lb, B, S, H, D);
      break;
    case at::kBFloat16:
      merge_rows(o, l, reinterpret_cast<const lv::bf16_bits*>(out_block.data_ptr<at::BFloat16>()), lb, B, S,
                 H, D);
      break;
    default:
      TORCH_CHECK(false, "merge_attn: unsupported out_block dtype ", out_block.scalar_type());
  }
}

void merge_attn_cpu(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& out_block,
                    const at::Tensor& lse_block) {
  lv::check_merge_args(out, lse, out_block, lse_block, c10::DeviceType::CPU);
  if (lse.numel() == 0) return;  // no rows; with D == 0 and rows left, lse still merges
  if (out.scalar_type() == at::kDouble) {
    merge_typed<double>(out, lse, out_block, lse_block);
  } else {
    merge_typed<float>(out, lse, out_block, lse_block);
  }
}

// The tensor is viewed as (outer, 2R chunks, chunk * inner elements): every chunk of every outer
// slice is one contiguous run of bytes, moved whole, so any dtype works through its element size.
at::Tensor zigzag_permute_cpu(const at::Tensor& x, int64_t ring_size, int64_t dim, bool inverse) {
  const int64_t d = lv::check_zigzag_args(x, ring_size, dim, c10::DeviceType::CPU);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= x.size(i);
  for (int64_t i = d + 1; i < x.dim(); ++i) inner *= x.size(i);
  const int64_t chunks = 2 * ring_size;
  const int64_t run_bytes = (x.size(d) / chunks) * inner * static_cast<int64_t>(x.element_size());
  const int64_t runs = outer * chunks;
  const int64_t piece = std::min(run_bytes, kCopyPieceBytes);
  const int64_t pieces_per_run = (run_bytes + piece - 1) / piece;
  const int64_t items = runs * pieces_per_run;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(y.data_ptr());
#pragma omp parallel for schedule(static) if (runs * run_bytes >= kParallelElements * 4)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t run = item / pieces_per_run;
    const int64_t offset = (item % pieces_per_run) * piece;
    const int64_t o = run / chunks;
    const int64_t p = run % chunks;
    // Forward: output chunk p reads original chunk zigzag_src_chunk(p). Inverse: output (original)
    // chunk p reads the permuted chunk it was sent to, zigzag_dst_chunk(p).
    const int64_t c = inverse ? lv::zigzag_dst_chunk(p, ring_size) : lv::zigzag_src_chunk(p, ring_size);
    std::memcpy(dst + run * run_bytes + offset, src + (o * chunks + c) * run_bytes + offset,
                static_cast<size_t>(std::min(piece, run_bytes - offset)));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> varlen_index_cpu(const at::Tensor& cu_seqlens, int64_t total) {
  lv::check_varlen_args(cu_seqlens, total, c10::DeviceType::CPU);
  const int* cu = cu_seqlens.data_ptr<int>();
  const int n = static_cast<int>(cu_seqlens.numel() - 1);
  // On the host the values are free to check; the CUDA path cannot without a synchronisation and
  // relies on lv::varlen_seq_of staying in bounds instead.
  TORCH_CHECK(cu[0] == 0, "varlen_index: cu_seqlens must start at 0, got ", cu[0]);
  for (int i = 0; i < n; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i], "varlen_index: cu_seqlens must not decrease, got ", cu[i], " then ",
                cu[i + 1], " at index ", i);
  }
  TORCH_CHECK(total <= cu[n], "varlen_index: total=", total, " exceeds the packed length cu_seqlens[-1]=", cu[n]);
  at::Tensor seq_id = at::empty({total}, cu_seqlens.options());
  at::Tensor position = at::empty({total}, cu_seqlens.options());
  int* seq = seq_id.data_ptr<int>();
  int* pos = position.data_ptr<int>();
  const int count = static_cast<int>(total);
#pragma omp parallel for schedule(static) if (total >= kParallelElements)
  for (int t = 0; t < count; ++t) {
    const int s = lv::varlen_seq_of(cu, n, t);
    seq[t] = s;
    pos[t] = t - cu[s];
  }
  return {seq_id, position};
}

}  // namespace

TORCH_LIBRARY_IMPL(longvila_engine, CPU, m) {
  m.impl("merge_attn", &merge_attn_cpu);
  m.impl("zigzag_permute", &zigzag_permute_cpu);
  m.impl("varlen_index", &varlen_index_cpu);
}
