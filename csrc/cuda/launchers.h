// Host entry points of the memory-bound CUDA kernels (merge.cu, zigzag.cu, varlen.cu), called by
// bindings.cpp. Raw pointers, sizes and the stream as a void* (a cudaStream_t): neither side needs the
// other's headers, so the .cu files compile with a bare nvcc (scripts/check_cuda.sh) and only
// bindings.cpp sees torch.
//
// Every launcher checks what it can without touching device memory, launches on `stream` and returns
// nullptr on success or a static message (its own, or the CUDA error string). Nothing here allocates
// or synchronises.
#pragma once

extern "C" {

// Element types of floating-point buffers, as the launchers take them.
enum LvDtype { LV_FLOAT32 = 0, LV_FLOAT64 = 1, LV_FLOAT16 = 2, LV_BFLOAT16 = 3 };

// In-place log-sum-exp merge of (out_block, lse_block) into (out, lse). out (B,S,H,D) and lse (B,H,S)
// are contiguous in acc_dtype (LV_FLOAT32 or LV_FLOAT64); out_block (B,S,H,D) contiguous in any
// LvDtype; lse_block (B,H,S) contiguous in acc_dtype.
const char* lv_merge_attn_launch(void* out, void* lse, const void* out_block, const void* lse_block,
                                 int acc_dtype, int block_dtype, long long batch, long long seq_len,
                                 long long num_heads, long long head_dim, void* stream);

// Zigzag reorder of a contiguous buffer viewed as (outer, len, inner) elements, inner_bytes = inner *
// element size; len divisible by 2 * ring_size. inverse != 0 undoes the permutation. in and out must
// not overlap.
const char* lv_zigzag_permute_launch(const void* in, void* out, long long outer, long long len,
                                     long long inner_bytes, long long ring_size, int inverse, void* stream);

// Per-token sequence index and in-sequence position from cu_seqlens (num_seqs + 1 int32 offsets) for
// `total` packed tokens; seq_id and position hold `total` int32 each.
const char* lv_varlen_index_launch(const int* cu_seqlens, int num_seqs, int* seq_id, int* position, int total,
                                   void* stream);

}  // extern "C"
