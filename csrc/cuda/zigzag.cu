// CUDA kernel of zigzag_permute: reorders the 2R chunks of one dimension of a contiguous buffer into
// zigzag order [0, 2R-1, 1, 2R-2, ...] (or back). The chunk maps are lv::zigzag_src_chunk /
// lv::zigzag_dst_chunk, the same code the CPU operator runs. Raw pointers only.
//
// The kernel is a dtype-blind gather of fixed-width units: the buffer is viewed as (outer, 2R, run)
// units, where a run is one chunk times everything after the dimension, and the launcher picks the
// widest unit (16 down to 1 bytes) that divides a run and both pointers' alignment. It does not handle
// strided input (the caller makes it contiguous) or in-place permutes.
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "lv_math.h"

namespace {

constexpr int kThreads = 256;
// Grid-stride loop: enough blocks to fill any current GPU many times over, few enough that the
// 32-bit index path below cannot overflow (u + stride stays under 2^32 when units <= 2^31).
constexpr long long kMaxBlocks = 1LL << 16;

template <typename U, typename I>
__global__ void __launch_bounds__(kThreads)
    zigzag_kernel(const U* __restrict__ in, U* __restrict__ out, I units, I run, I ring_size, bool inverse) {
  const I chunks = 2 * ring_size;
  const I slice = chunks * run;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  for (I u = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x; u < units; u += stride) {
    const I o = u / slice;
    const I rem = u - o * slice;
    const I p = rem / run;
    const I k = rem - p * run;
    // Forward: output chunk p reads original chunk zigzag_src_chunk(p). Inverse: output (original)
    // chunk p reads the permuted chunk it was sent to, zigzag_dst_chunk(p).
    const I c = inverse ? lv::zigzag_dst_chunk(p, ring_size) : lv::zigzag_src_chunk(p, ring_size);
    out[u] = in[o * slice + c * run + k];
  }
}

template <typename U>
const char* launch(const void* in, void* out, long long outer, long long run_bytes, long long ring_size,
                   bool inverse, cudaStream_t stream) {
  const long long run = run_bytes / static_cast<long long>(sizeof(U));
  const long long units = outer * 2 * ring_size * run;
  const long long wanted = (units + kThreads - 1) / kThreads;
  const unsigned int blocks = static_cast<unsigned int>(wanted < kMaxBlocks ? wanted : kMaxBlocks);
  // 32-bit integer division is several times cheaper than 64-bit on the GPU; most tensors fit.
  if (units <= (1LL << 31)) {
    zigzag_kernel<U, unsigned int><<<blocks, kThreads, 0, stream>>>(
        static_cast<const U*>(in), static_cast<U*>(out), static_cast<unsigned int>(units),
        static_cast<unsigned int>(run), static_cast<unsigned int>(ring_size), inverse);
  } else {
    zigzag_kernel<U, unsigned long long><<<blocks, kThreads, 0, stream>>>(
        static_cast<const U*>(in), static_cast<U*>(out), static_cast<unsigned long long>(units),
        static_cast<unsigned long long>(run), static_cast<unsigned long long>(ring_size), inverse);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

extern "C" const char* lv_zigzag_permute_launch(const void* in, void* out, long long outer, long long len,
                                                long long inner_bytes, long long ring_size, int inverse,
                                                void* stream) {
  if (ring_size < 1 || len % (2 * ring_size) != 0) {
    return "lv_zigzag_permute_launch: len must be a multiple of 2 * ring_size";
  }
  const long long run_bytes = (len / (2 * ring_size)) * inner_bytes;
  if (outer == 0 || run_bytes == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool inv = inverse != 0;
  // Widest unit that divides a run and keeps every access aligned (a tensor may start at any element
  // of its storage, so the pointers are checked too, not assumed).
  const unsigned long long addr_bits =
      static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(in) | reinterpret_cast<uintptr_t>(out)) |
      static_cast<unsigned long long>(run_bytes);
  if (addr_bits % 16 == 0) return launch<uint4>(in, out, outer, run_bytes, ring_size, inv, s);
  if (addr_bits % 8 == 0) return launch<uint2>(in, out, outer, run_bytes, ring_size, inv, s);
  if (addr_bits % 4 == 0) return launch<unsigned int>(in, out, outer, run_bytes, ring_size, inv, s);
  if (addr_bits % 2 == 0) return launch<unsigned short>(in, out, outer, run_bytes, ring_size, inv, s);
  return launch<unsigned char>(in, out, outer, run_bytes, ring_size, inv, s);
}
