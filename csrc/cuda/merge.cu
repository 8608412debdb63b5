// CUDA kernel of merge_attn: the in-place log-sum-exp merge of a block result (out_block, lse_block)
// into the running (out, lse), per row lse' = logaddexp(lse, lse_b), out' = out*w_a + out_b*w_b.
// The per-row weights and per-element update are lv::merge_weights / lv::merge_element, the same
// code the CPU operator runs. Raw pointers only; bindings.cpp checks the tensors.
//
// Not here: the merge fused into the attention forward (resume=true), which lives with the attention
// kernels; this kernel is for merges of results computed elsewhere (flash backends, decoding).
#include <cuda_runtime.h>

#include "launchers.h"
#include "lv_math.h"

namespace {

constexpr int kThreads = 256;
// Rows per block. A block first computes its rows' weights once (one thread per row) into shared
// memory, then all threads stream the rows' elements (one contiguous span of out); this keeps the
// exp/log off the per-element path, which matters for float64 and small head_dim.
constexpr int kRowsPerBlock = 64;
static_assert(kRowsPerBlock <= kThreads, "one thread per row computes the weights");

template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
    merge_attn_kernel(T* __restrict__ out, T* __restrict__ lse, const TB* __restrict__ out_block,
                      const T* __restrict__ lse_block, long long rows, int seq_len, int num_heads, int head_dim) {
  __shared__ lv::MergeWeights<T> weights[kRowsPerBlock];
  const long long row0 = static_cast<long long>(blockIdx.x) * kRowsPerBlock;
  const long long left = rows - row0;
  const int num_rows = left < kRowsPerBlock ? static_cast<int>(left) : kRowsPerBlock;
  if (static_cast<int>(threadIdx.x) < num_rows) {
    // Rows run (b, s, h) in out's memory order; lse is (B, H, S), so the row's entry is strided.
    const long long r = row0 + threadIdx.x;
    const long long h = r % num_heads;
    const long long bs = r / num_heads;
    const long long s = bs % seq_len;
    const long long b = bs / seq_len;
    const long long l = (b * num_heads + h) * seq_len + s;
    const lv::MergeWeights<T> w = lv::merge_weights(lse[l], lse_block[l]);
    weights[threadIdx.x] = w;
    lse[l] = w.lse;
  }
  __syncthreads();
  if (head_dim == 0) return;
  // The block's rows are one contiguous span of num_rows * head_dim elements. The row of element i is
  // tracked incrementally (i advances by kThreads each step) to keep integer division off the loop.
  T* o = out + row0 * head_dim;
  const TB* ob = out_block + row0 * head_dim;
  const int count = num_rows * head_dim;
  const int step_rows = kThreads / head_dim;
  const int step_cols = kThreads % head_dim;
  int row = static_cast<int>(threadIdx.x) / head_dim;
  int col = static_cast<int>(threadIdx.x) % head_dim;
  for (int i = threadIdx.x; i < count; i += kThreads) {
    o[i] = lv::merge_element(o[i], ob[i], weights[row]);
    row += step_rows;
    col += step_cols;
    if (col >= head_dim) {
      col -= head_dim;
      ++row;
    }
  }
}

template <typename T, typename TB>
const char* launch(void* out, void* lse, const void* out_block, const void* lse_block, long long rows,
                   int seq_len, int num_heads, int head_dim, cudaStream_t stream) {
  const long long blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  merge_attn_kernel<T, TB><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      static_cast<T*>(out), static_cast<T*>(lse), static_cast<const TB*>(out_block),
      static_cast<const T*>(lse_block), rows, seq_len, num_heads, head_dim);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* launch_block_dtype(void* out, void* lse, const void* out_block, const void* lse_block,
                               int block_dtype, long long rows, int seq_len, int num_heads, int head_dim,
                               cudaStream_t stream) {
  switch (block_dtype) {
    case LV_FLOAT32:
      return launch<T, float>(out, lse, out_block, lse_block, rows, seq_len, num_heads, head_dim, stream);
    case LV_FLOAT64:
      return launch<T, double>(out, lse, out_block, lse_block, rows, seq_len, num_heads, head_dim, stream);
    case LV_FLOAT16:
      return launch<T, lv::half_bits>(out, lse, out_block, lse_block, rows, seq_len, num_heads, head_dim,
                                      stream);
    case LV_BFLOAT16:
      return launch<T, lv::bf16_bits>(out, lse, out_block, lse_block, rows, seq_len, num_heads, head_dim,
                                      stream);
    default:
      return "lv_merge_attn_launch: unsupported out_block dtype";
  }
}

}  // namespace

extern "C" const char* lv_merge_attn_launch(void* out, void* lse, const void* out_block, const void* lse_block,
                                            int acc_dtype, int block_dtype, long long batch, long long seq_len,
                                            long long num_heads, long long head_dim, void* stream) {
  const long long rows = batch * seq_len * num_heads;
  if (rows == 0) return nullptr;
  // The kernel indexes a block's span (kRowsPerBlock * head_dim) and the row coordinates in int.
  const long long int_max = 2147483647LL;
  if (seq_len > int_max || num_heads > int_max || head_dim > int_max / kRowsPerBlock) {
    return "lv_merge_attn_launch: seq_len, num_heads or head_dim too large for the kernel's int indices";
  }
  if ((rows + kRowsPerBlock - 1) / kRowsPerBlock > int_max) return "lv_merge_attn_launch: too many rows";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int S = static_cast<int>(seq_len), H = static_cast<int>(num_heads), D = static_cast<int>(head_dim);
  if (acc_dtype == LV_FLOAT32) {
    return launch_block_dtype<float>(out, lse, out_block, lse_block, block_dtype, rows, S, H, D, s);
  }
  if (acc_dtype == LV_FLOAT64) {
    return launch_block_dtype<double>(out, lse, out_block, lse_block, block_dtype, rows, S, H, D, s);
  }
  return "lv_merge_attn_launch: out/lse must be float32 or float64";
}
