// CUDA kernel of varlen_index: for every packed token, the index of its sequence and its position in
// that sequence, from int32 cu_seqlens. One thread per token runs the binary search of
// lv::varlen_seq_of (the code the CPU operator runs), so the sequence count never has to reach the
// host: no .item(), no synchronisation. Raw pointers only.
//
// It does not validate cu_seqlens values (that would need them on the host); lv::varlen_seq_of stays
// in bounds for any values, so malformed input gives wrong indices, never a fault.
#include <cuda_runtime.h>

#include "launchers.h"
#include "lv_math.h"

namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    varlen_index_kernel(const int* __restrict__ cu_seqlens, int num_seqs, int* __restrict__ seq_id,
                        int* __restrict__ position, int total) {
  // 64-bit so that the last block of a near-2^31 total cannot wrap.
  const long long t = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= total) return;
  const int token = static_cast<int>(t);
  const int s = lv::varlen_seq_of(cu_seqlens, num_seqs, token);
  seq_id[token] = s;
  position[token] = token - cu_seqlens[s];
}

}  // namespace

extern "C" const char* lv_varlen_index_launch(const int* cu_seqlens, int num_seqs, int* seq_id, int* position,
                                              int total, void* stream) {
  if (total <= 0) return nullptr;
  if (num_seqs < 1) return "lv_varlen_index_launch: tokens but no sequence in cu_seqlens";
  const unsigned int blocks = static_cast<unsigned int>((static_cast<long long>(total) + kThreads - 1) / kThreads);
  varlen_index_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(cu_seqlens, num_seqs, seq_id,
                                                                                   position, total);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
