// CPU kernel of longvila_engine::attn_fwd: blocked online-softmax attention (flash style) with
// OpenMP over (segment, head, query block), writing or resuming a running (out, lse).
//
// Memory is O(S*D): per thread one query tile, one score tile and one output tile; K^T and V are
// packed once per call (converted to the accumulator type, zero padded; bf16 words for the
// AVX512-BF16 route). Causal tiles that are
// fully masked are never visited and the diagonal tile is cut to the columns its rows can see.
// Not here: the backward (attention_bwd.cpp), the merge/zigzag/varlen-index operators, and any
// dropout, bias or sliding window (the operator schema has none).
//
// Legend: B batch, S sequence, H query heads, Hk key/value heads, D head dim (Dp: padded to the
// micro-kernel panel), Bq/Bk query/key tile rows, T accumulator type.
#include <ATen/Parallel.h>
#include <omp.h>
#include <cstdlib>
#include <string>
#include <torch/library.h>

#include "attention_cpu_bf16.h"
#include "lv_math.h"

namespace lv {
namespace cpu {

// Read once per process: LONGVILA_CPU_GEMM=blas sends float tiles to MKL's sgemm (attention_cpu.h);
// unset, or anything else, keeps the micro-kernel.
bool gemm_use_blas() {
  static const bool use = [] {
    const char* v = std::getenv("LONGVILA_CPU_GEMM");
    return v != nullptr && std::string(v) == "blas";
  }();
  return use;
}

// bf16 inputs take the pair-dot-product GEMMs when the build has them and the CPU runs them (the
// build targets the machine it is built on; a build moved to an AVX-512 CPU without AVX512-BF16 takes
// the float32 route), unless
// LONGVILA_CPU_BF16=fp32 asks for the float32 route (both are held to the same tolerance rule).
bool bf16_dot_enabled() {
#if defined(LV_CPU_BF16_DOT)
  static const bool use = [] {
    const char* v = std::getenv("LONGVILA_CPU_BF16");
    if (v != nullptr && std::string(v) == "fp32") return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return use;
#else
  return false;
#endif
}

// What this build's CPU kernels run here, as "key=value" words (longvila_engine.ops.cpu.kernel_info).
std::string cpu_info() {
  std::string info = "vector_bits=" + std::to_string(LV_FLOAT_VEC_BYTES * 8);
#if defined(__AVX512F__)
  info += " fp32_block=6x64";
#else
  info += " fp32_block=6x" + std::to_string(kPanel<float>);
#endif
#if defined(LV_CPU_BF16_DOT)
  info += " bf16_dot_built=1";
#else
  info += " bf16_dot_built=0";
#endif
  info += std::string(" bf16_dot=") + (bf16_dot_enabled() ? "1" : "0");
  info += std::string(" gemm=") + (gemm_use_blas() ? "blas" : "micro_kernel");
  // The instruction-set variant of this library (setup.py passes it as a bare word to stringize).
#define LV_ISA_STR2(x) #x
#define LV_ISA_STR(x) LV_ISA_STR2(x)
#if defined(LV_CPU_ISA)
  info += " isa=" LV_ISA_STR(LV_CPU_ISA);
#else
  info += " isa=unknown";
#endif
#undef LV_ISA_STR
#undef LV_ISA_STR2
  return info;
}

namespace {

// 192 query rows = 32 micro-kernel strips of 6: each packed K^T/V block serves twice the rows of 96,
// about 5% faster (fp32, S=4096, 1 thread, 2026-11-29; 288 and 384 were no faster). 128 keys
// amortise the P*V accumulator traffic. A thread's working set (Q, S, O tiles and one packed K^T/V
// block: about 420 KiB at D = 128) stays within a 1 MiB L2.
constexpr int64_t kBlockQ = 192;
constexpr int64_t kBlockK = 128;

struct FwdItem {
  int64_t seg;
  int64_t head;
  int64_t qblock;
  int64_t cost;  // key blocks visited, to schedule the heavy causal items first
};

// kDot (T = float, bf16 q/k/v, built with AVX512-BF16): the two GEMMs take bf16 operands through pair
// dot products (attention_cpu_bf16.h): Q, K^T and V packed as bf16 words, P rounded to bf16 for P*V. The
// softmax, the running (max, sum, out) and the output stay float32.
template <typename T, bool kDot>
void attn_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const std::vector<Segment>& segs, double softmax_scale, bool causal,
                     bool resume) {
  constexpr int64_t P = kPanel<T>;
  constexpr int64_t W = kWidth<T>;
  const int64_t Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hk = k.size(2), group = H / Hk;
  const int64_t Dp = round_up(D, P);
  const at::ScalarType st = q.scalar_type();
  const int64_t es = q.element_size();
  const char* q_ptr = static_cast<const char*>(q.data_ptr());
  const char* k_ptr = static_cast<const char*>(k.data_ptr());
  const char* v_ptr = static_cast<const char*>(v.data_ptr());
  T* out_ptr = out.data_ptr<T>();
  T* lse_ptr = lse.data_ptr<T>();
  const T scale2 = static_cast<T>(softmax_scale * kLog2e);
  const int nthreads = at::get_num_threads();

  // K^T (D x Bk) and V (Bk x Dp) of every (key block, kv head), packed once: each block is then
  // read by every query block of its segment and every head of its group.
  const int64_t D2 = ceil_div(D, 2);  // bf16 words per row of Q or K (kDot)
  const int64_t kt_elems = kDot ? D2 * kBlockK : D * kBlockK;
  const int64_t blk_elems = kt_elems + (kDot ? kBlockK / 2 : kBlockK) * Dp;
  std::vector<int64_t> kb_base(segs.size() + 1, 0);
  std::vector<std::pair<int64_t, int64_t>> kblocks;  // (segment, block within segment)
  for (size_t s = 0; s < segs.size(); ++s) {
    const int64_t nkb = ceil_div(segs[s].k_len, kBlockK);
    kb_base[s + 1] = kb_base[s] + nkb;
    for (int64_t j = 0; j < nkb; ++j) kblocks.emplace_back(static_cast<int64_t>(s), j);
  }
  const int64_t n_pack = static_cast<int64_t>(kblocks.size()) * Hk;
  at::Tensor packed = at::empty({std::max<int64_t>(n_pack * blk_elems, 1)},
                                out.options().dtype(kDot ? at::kInt : out.scalar_type()));
  T* pk = kDot ? nullptr : packed.data_ptr<T>();
  uint32_t* pkw = kDot ? reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()) : nullptr;
  const int64_t kv_row_bytes = Hk * D * es;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> tmp(D);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < n_pack; ++it) {
      const auto& kb = kblocks[it / Hk];
      const int64_t hk = it % Hk;
      const Segment& sg = segs[kb.first];
      const int64_t c0 = kb.second * kBlockK;
      const int64_t kc = std::min(kBlockK, sg.k_len - c0);
      const int64_t off = ((sg.b * Sk + sg.k0 + c0) * Hk + hk) * D * es;
      if constexpr (kDot) {
        uint32_t* dst = pkw + it * blk_elems;
        const auto* k16 = reinterpret_cast<const uint16_t*>(k_ptr + off);
        pack_bf16_transposed(dst, kBlockK, k16, Hk * D, kc, D);
        pack_bf16_row_pairs(dst + kt_elems, Dp, reinterpret_cast<const uint16_t*>(v_ptr + off), Hk * D, kc, D);
      } else {
        T* dst = pk + it * blk_elems;
        pack_transposed(dst, kBlockK, k_ptr + off, kv_row_bytes, st, kc, D, tmp.data());
        pack_rows(dst + kt_elems, Dp, v_ptr + off, kv_row_bytes, st, kc, D);
      }
    }
  }

  std::vector<FwdItem> items;
  for (size_t s = 0; s < segs.size(); ++s) {
    const int64_t nkb = ceil_div(segs[s].k_len, kBlockK);
    const int64_t nqb = ceil_div(segs[s].q_len, kBlockQ);
    for (int64_t i = 0; i < nqb; ++i) {
      const int64_t row_end = std::min(segs[s].q_len, (i + 1) * kBlockQ);
      const int64_t cost = causal ? std::min(nkb, ceil_div(row_end, kBlockK)) : nkb;
      for (int64_t h = 0; h < H; ++h) items.push_back({static_cast<int64_t>(s), h, i, cost});
    }
  }
  // Longest first, so dynamic scheduling does not end on one thread holding a long diagonal item.
  std::stable_sort(items.begin(), items.end(), [](const FwdItem& a, const FwdItem& b) { return a.cost > b.cost; });
  const int64_t n_items = static_cast<int64_t>(items.size());

#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> q_buf(kDot ? 0 : kBlockQ * D), s_buf(kBlockQ * kBlockK), o_buf(kBlockQ * Dp), m_run(kBlockQ);
    // kDot: the Q tile and the rounded P tile as bf16 words.
    std::vector<uint32_t> q_w(kDot ? kBlockQ * D2 : 0), p_w(kDot ? kBlockQ * kBlockK / 2 : 0);
    // Row sums of P kept lane-wise and reduced once per row at the end (l = hsum(l_vec)).
    std::vector<Vec<T>> l_vec(kBlockQ);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const FwdItem& item = items[it];
      const Segment& sg = segs[item.seg];
      const int64_t h = item.head, hk = h / group;
      const int64_t rs = item.qblock * kBlockQ;
      const int64_t qc = std::min(kBlockQ, sg.q_len - rs);
      // Packed even when q is already in T: rows of q sit H*D elements apart, and broadcasting from
      // 6 rows at a power-of-two stride lands in a handful of L1 sets and thrashes them.
      const char* q_src = q_ptr + ((sg.b * Sq + sg.q0 + rs) * H + h) * D * es;
      if constexpr (kDot) {
        pack_bf16_rows(q_w.data(), D2, reinterpret_cast<const uint16_t*>(q_src), H * D, qc, D);
      } else {
        pack_rows(q_buf.data(), D, q_src, H * D * es, st, qc, D);
      }
      std::fill(m_run.begin(), m_run.begin() + qc, -std::numeric_limits<T>::infinity());
      std::fill(l_vec.begin(), l_vec.begin() + qc, Vec<T>{});
      std::fill(o_buf.begin(), o_buf.begin() + qc * Dp, T(0));

      for (int64_t j = 0; j < item.cost; ++j) {
        const int64_t cs = j * kBlockK;
        const int64_t kc = std::min(kBlockK, sg.k_len - cs);
        // Columns any row of this tile can see: the diagonal tile stops at the last row's key.
        const int64_t kv = causal ? std::min(kc, rs + qc - cs) : kc;
        const int64_t blk = (kb_base[item.seg] + j) * Hk + hk;
        // A tile the diagonal crosses: each row strip computes only the keys its last row sees.
        const int64_t off = rs - cs;
        const bool diag = crosses_diagonal(causal, off, kv);
        if constexpr (kDot) {
#if defined(LV_CPU_BF16_DOT)
          if (diag) {
            gemm_tile_bf16_causal(Causal::kCols, off, qc, round_up(kv, P), D2, q_w.data(), D2, 1,
                                  pkw + blk * blk_elems, kBlockK, s_buf.data(), kBlockK, false);
          } else {
            gemm_tile_bf16(qc, round_up(kv, P), D2, q_w.data(), D2, 1, pkw + blk * blk_elems, kBlockK, s_buf.data(),
                           kBlockK, false);
          }
#endif
        } else if (diag) {
          gemm_tile_causal<T>(Causal::kCols, off, qc, round_up(kv, P), D, q_buf.data(), D, 1, pk + blk * blk_elems,
                              kBlockK, s_buf.data(), kBlockK, false);
        } else {
          gemm_tile<T>(qc, round_up(kv, P), D, q_buf.data(), D, 1, pk + blk * blk_elems, kBlockK, s_buf.data(),
                       kBlockK, false);
        }
        for (int64_t r = 0; r < qc; ++r) {
          T* row = s_buf.data() + r * kBlockK;
          const int64_t nv = causal ? std::max<int64_t>(0, std::min(kv, rs + r - cs + 1)) : kv;
          if (nv == 0) {
            row_exp2<T>(row, 0, round_up(kv, P), scale2, T(0));  // zeros: the row sees no key here
            if constexpr (kDot) std::fill_n(p_w.data() + r * kBlockK / 2, round_up(kv, P) / 2, 0u);
            continue;
          }
          const T m_new = std::max(m_run[r], row_max_scaled<T>(row, nv, scale2));
          if (m_new != m_run[r]) {
            // 0 on the first visible block (m = -inf); most later blocks leave the max unchanged and
            // skip the rescale of the row's sum and output.
            const T alpha = std::exp2(m_run[r] - m_new);
            m_run[r] = m_new;
            l_vec[r] *= splat(alpha);
            const Vec<T> va = splat(alpha);
            T* o = o_buf.data() + r * Dp;
            for (int64_t d = 0; d < Dp; d += W) storeu(o + d, loadu(o + d) * va);
          }
          // x = S*scale - m <= 0: exp2 without the cap at 127.
          l_vec[r] += row_exp2<T, false>(row, nv, round_up(kv, P), scale2, m_new);
#if defined(LV_CPU_BF16_DOT)
          if constexpr (kDot) round_row_bf16(p_w.data() + r * kBlockK / 2, row, round_up(kv, P));
#endif
        }
        // P is zero past each row's visible keys (up to round_up(kv, P)), so any depth bound past them holds.
        if constexpr (kDot) {
#if defined(LV_CPU_BF16_DOT)
          if (diag) {
            gemm_tile_bf16_causal(Causal::kDepth, off, qc, Dp, ceil_div(kv, 2), p_w.data(), kBlockK / 2, 1,
                                  pkw + blk * blk_elems + kt_elems, Dp, o_buf.data(), Dp, true);
          } else {
            gemm_tile_bf16(qc, Dp, ceil_div(kv, 2), p_w.data(), kBlockK / 2, 1, pkw + blk * blk_elems + kt_elems, Dp,
                           o_buf.data(), Dp, true);
          }
#endif
        } else if (diag) {
          gemm_tile_causal<T>(Causal::kDepth, off, qc, Dp, kv, s_buf.data(), kBlockK, 1,
                              pk + blk * blk_elems + kt_elems, Dp, o_buf.data(), Dp, true);
        } else {
          gemm_tile<T>(qc, Dp, kv, s_buf.data(), kBlockK, 1, pk + blk * blk_elems + kt_elems, Dp, o_buf.data(), Dp,
                       true);
        }
      }

      for (int64_t r = 0; r < qc; ++r) {
        const int64_t row = sg.q0 + rs + r;
        T* o = out_ptr + ((sg.b * Sq + row) * H + h) * D;
        T* ls = lse_ptr + (sg.b * H + h) * Sq + row;
        const T* ob = o_buf.data() + r * Dp;
        const T l_run = hsum<T>(l_vec[r]);
        const bool seen = l_run > T(0);
        const T lse_b = seen ? (m_run[r] + std::log2(l_run)) * static_cast<T>(kLn2)
                             : -std::numeric_limits<T>::infinity();
        const T inv = seen ? T(1) / l_run : T(0);
        if (!resume) {
          for (int64_t d = 0; d < D; ++d) o[d] = ob[d] * inv;
          *ls = lse_b;
        } else {
          // Same per-row merge as the merge_attn operator and the CUDA kernels.
          const lv::MergeWeights<T> w = lv::merge_weights<T>(*ls, lse_b);
          const T wb = w.w_b * inv;
          for (int64_t d = 0; d < D; ++d) o[d] = o[d] * w.w_a + ob[d] * wb;
          *ls = w.lse;
        }
      }
    }
  }
}

void attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
              const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
              double softmax_scale, bool causal, bool resume) {
  const std::vector<Segment> segs = check_qkv_segments(q, k, v, cu_seqlens_q, cu_seqlens_k);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  check_acc("out", out, {B, Sq, H, D}, acc);
  check_acc("lse", lse, {B, H, Sq}, acc);
  TORCH_CHECK(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);
  if (out.numel() == 0) return;
  if (acc == at::kDouble) {
    attn_fwd_kernel<double, false>(q, k, v, out, lse, segs, softmax_scale, causal, resume);
  } else if (bf16_dot_enabled() && q.scalar_type() == at::kBFloat16) {
    attn_fwd_kernel<float, true>(q, k, v, out, lse, segs, softmax_scale, causal, resume);
  } else {
    attn_fwd_kernel<float, false>(q, k, v, out, lse, segs, softmax_scale, causal, resume);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lv

TORCH_LIBRARY_IMPL(longvila_engine, CPU, m) { m.impl("attn_fwd", &lv::cpu::attn_fwd); }

// No tensor arguments, so a catch-all kernel rather than a CPU one.
TORCH_LIBRARY_FRAGMENT(longvila_engine, m) { m.def("cpu_info() -> str", &lv::cpu::cpu_info); }
