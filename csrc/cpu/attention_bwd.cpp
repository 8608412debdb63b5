// CPU kernel of longvila_engine::attn_bwd: the flash-attention backward (recompute P from the final
// lse, then dV = P^T dO, dS = P*(dP - delta), dK = dS^T Q, dQ = dS K) with OpenMP over
// (segment, kv head, key-block chunk).
//
// Race freedom without atomics: a work item owns its key blocks, so it accumulates dK/dV for them
// over every head of its GQA group and every query block, and writes them once. dQ rows receive
// contributions from every key block: they accumulate in a contiguous (B, H, Sq, Dp) panel, one per
// chunk, where items of one (segment, kv head) split its key blocks into C strided chunks; the
// panels are summed into dq at the end. C is 1 whenever segments x kv heads already spread evenly
// over the threads (B*Hk = 8 on 2 threads), and only small head counts pay for extra panels.
// Q and dO are converted once into the same panel layout. Memory is O(S*D); nothing is O(S^2).
// Not here: the forward (attention_fwd.cpp) and the dtype casts of the Python wrapper.
//
// Legend: B batch, S sequence, H query heads, Hk key/value heads, D head dim (Dp: padded to the
// micro-kernel panel), Bq/Bk query/key tile rows, T accumulator type.
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include "attention_cpu_bf16.h"

namespace lv {
namespace cpu {
namespace {

// Square 96 tiles (6 micro-kernel strips of 16 columns, 16 of 6 rows): per thread the key-side
// tiles K^T, V^T, K, dK, dV and the S/P and dP/dS tiles come to about 310 KiB at D = 128, inside a
// 512 KiB L2 with room for the streamed Q, dO and dQ panel rows. Measured on 2 cores: 64 and 128
// were no faster, 48 slower.
constexpr int64_t kBlockQ = 96;
constexpr int64_t kBlockK = 96;
// Key blocks per pass over the query tiles (see the item loop). With 2, a thread's key-side buffers
// (K^T, V^T, K, dK, dV: about 240 KiB a block at D = 128) and tiles stay inside Zen 4's 1 MiB L2, and
// the backward was 3-6% faster than with 1 (S 1K-16K, D 64/128, fp32 and bf16, 1-2 threads,
// 2026-11-29); 4 was slower below S=16K.
constexpr int64_t kGroup = 2;

struct BwdItem {
  int64_t seg;
  int64_t kv_head;
  int64_t chunk;
  int64_t cost;  // (key block, query block) tiles, to schedule the heavy items first
};

// Number of chunks per (segment, kv head): the smallest that spreads evenly over the threads or
// gives every thread several items, capped by the key blocks there are to split.
int64_t choose_chunks(int64_t units, int64_t max_kblocks, int64_t nthreads) {
  int64_t c = 1;
  while (c < nthreads && c < max_kblocks && (units * c) % nthreads != 0 && units * c < 4 * nthreads) ++c;
  return c;
}

// kDot (T = float, bf16 q/k/v/dout, built with AVX512-BF16): the five GEMMs take bf16 operands through
// pair dot products (attention_cpu_bf16.h). Q, dO, K^T, V^T and K are bf16 words (exact copies of the
// inputs); P and dS are rounded to bf16 after the float32 softmax algebra, as on GPUs. Their
// transposes need no copy: a pair row (x[2rr][key], x[2rr+1][key]) read with rs_a = 1 serves dV and dK.
template <typename T, bool kDot>
void attn_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
                     const at::Tensor& dv, const std::vector<Segment>& segs, double softmax_scale, bool causal,
                     bool accumulate) {
  constexpr int64_t P = kPanel<T>;
  constexpr int64_t W = kWidth<T>;
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hk = k.size(2), group = H / Hk;
  const int64_t Dp = round_up(D, P);
  const at::ScalarType st = q.scalar_type();
  const int64_t es = q.element_size();
  const char* q_ptr = static_cast<const char*>(q.data_ptr());
  const char* k_ptr = static_cast<const char*>(k.data_ptr());
  const char* v_ptr = static_cast<const char*>(v.data_ptr());
  const char* do_ptr = static_cast<const char*>(dout.data_ptr());
  const char* o_ptr = static_cast<const char*>(out.data_ptr());
  const int64_t do_es = dout.element_size(), o_es = out.element_size();  // may differ from q's
  const T* lse_ptr = lse.data_ptr<T>();
  T* dq_ptr = dq.data_ptr<T>();
  T* dk_ptr = dk.data_ptr<T>();
  T* dv_ptr = dv.data_ptr<T>();
  const T scale = static_cast<T>(softmax_scale);
  const T scale2 = static_cast<T>(softmax_scale * kLog2e);
  const int nthreads = at::get_num_threads();

  // Per (b, h): q and dout converted to T in contiguous (Sq, Dp) panels, delta = rowsum(dout*out)
  // and lse in log2 units. Every key block re-reads all of its query rows, so they are packed once
  // here rather than gathered from the strided (B,S,H,D) layout once per key block.
  const int64_t panel = Sq * Dp;
  const int64_t D2 = ceil_div(D, 2);  // bf16 words per row (kDot)
  const int64_t wpanel = Sq * D2;
  at::Tensor work = at::empty({std::max<int64_t>(kDot ? 1 : 2 * B * H * panel, 1)}, dq.options());
  at::Tensor work_w = at::empty({std::max<int64_t>(kDot ? 2 * B * H * wpanel : 1, 1)}, dq.options().dtype(at::kInt));
  T* qp = kDot ? nullptr : work.data_ptr<T>();
  T* dop = kDot ? nullptr : qp + B * H * panel;
  uint32_t* qw = kDot ? reinterpret_cast<uint32_t*>(work_w.data_ptr<int32_t>()) : nullptr;
  uint32_t* dow = kDot ? qw + B * H * wpanel : nullptr;
  std::vector<T> delta(B * H * Sq), lse2(B * H * Sq);
  const at::ScalarType do_st = dout.scalar_type(), o_st = out.scalar_type();
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> o_row(D), do_row(D);
#pragma omp for schedule(static)
    for (int64_t bs = 0; bs < B * Sq; ++bs) {
      const int64_t bi = bs / Sq, row = bs % Sq;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t idx = (bi * H + h) * Sq + row;
        load_row(o_row.data(), o_ptr + (bs * H + h) * D * o_es, o_st, D);
        const T* dd;
        if constexpr (kDot) {
          pack_bf16_rows(qw + idx * D2, D2, reinterpret_cast<const uint16_t*>(q_ptr) + (bs * H + h) * D, 0, 1, D);
          pack_bf16_rows(dow + idx * D2, D2, reinterpret_cast<const uint16_t*>(do_ptr) + (bs * H + h) * D, 0, 1, D);
          load_row(do_row.data(), do_ptr + (bs * H + h) * D * do_es, do_st, D);
          dd = do_row.data();
        } else {
          T* qd = qp + idx * Dp;
          T* ddw = dop + idx * Dp;
          pack_rows(qd, Dp, q_ptr + (bs * H + h) * D * es, 0, st, 1, D);
          pack_rows(ddw, Dp, do_ptr + (bs * H + h) * D * do_es, 0, do_st, 1, D);
          dd = ddw;
        }
        T acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += dd[d] * o_row[d];
        delta[idx] = acc;
        lse2[idx] = lse_ptr[idx] * static_cast<T>(kLog2e);
      }
    }
  }

  int64_t units = 0, max_nkb = 0;
  for (const Segment& sg : segs) {
    const int64_t nkb = ceil_div(sg.k_len, kBlockK);
    units += nkb > 0 ? Hk : 0;
    max_nkb = std::max(max_nkb, nkb);
  }
  // dQ accumulates in (C, B, H, Sq, Dp) panels, one per chunk, so the tile GEMM adds into it in
  // place; the panels are summed into dq at the end.
  const int64_t C = choose_chunks(units, max_nkb, nthreads);
  at::Tensor dq_work = at::zeros({std::max<int64_t>(C * B * H * panel, 1)}, dq.options());
  T* dqp = dq_work.data_ptr<T>();

  std::vector<BwdItem> items;
  for (size_t s = 0; s < segs.size(); ++s) {
    const Segment& sg = segs[s];
    const int64_t nkb = ceil_div(sg.k_len, kBlockK);
    for (int64_t c = 0; c < std::min(C, nkb); ++c) {
      int64_t cost = 1;
      for (int64_t j = c; j < nkb; j += C) {
        const int64_t first = causal ? std::min(j * kBlockK, sg.q_len) : 0;
        cost += ceil_div(sg.q_len - first, kBlockQ);
      }
      for (int64_t hk = 0; hk < Hk; ++hk) items.push_back({static_cast<int64_t>(s), hk, c, cost});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const BwdItem& a, const BwdItem& b) { return a.cost > b.cost; });
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t kv_row_bytes = Hk * D * es;

#pragma omp parallel num_threads(nthreads)
  {
    constexpr int64_t G = kGroup;
    std::vector<T> kt(kDot ? 0 : G * D * kBlockK), vt(kDot ? 0 : G * D * kBlockK), kn(kDot ? 0 : G * kBlockK * Dp),
        dk_acc(G * kBlockK * Dp), dv_acc(G * kBlockK * Dp), s_buf(kBlockQ * kBlockK), dp_buf(kBlockQ * kBlockK),
        tmp(D);
    // kDot: K^T and V^T (D2 x Bk words), K row pairs (Bk/2 x Dp); per tile the Q and dO row pairs
    // (Bq/2 x Dp), P and dS pair rows (Bq/2 x Bk: P^T, dS^T) and dS rows (Bq x Bk/2: dS).
    std::vector<uint32_t> ktw(kDot ? G * D2 * kBlockK : 0), vtw(kDot ? G * D2 * kBlockK : 0),
        knw(kDot ? G * kBlockK / 2 * Dp : 0), qpw(kDot ? kBlockQ / 2 * Dp : 0), dopw(kDot ? kBlockQ / 2 * Dp : 0),
        ptw(kDot ? kBlockQ / 2 * kBlockK : 0), dstw(kDot ? kBlockQ / 2 * kBlockK : 0),
        dsw(kDot ? kBlockQ * kBlockK / 2 : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const BwdItem& item = items[it];
      const Segment& sg = segs[item.seg];
      const int64_t hk = item.kv_head;
      const int64_t nkb = ceil_div(sg.k_len, kBlockK);
      // The item's key blocks go kGroup at a time: one pass over the query tiles serves every block of
      // the group, so each Q, dO and dQ tile row is streamed once per group rather than once per block
      // (at S=16K a head's Q/dO panels no longer fit in cache).
      for (int64_t j0 = item.chunk; j0 < nkb; j0 += C * kGroup) {
        const int64_t ng = std::min<int64_t>(kGroup, ceil_div(nkb - j0, C));
        int64_t cs_g[kGroup], kc_g[kGroup];
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t cs = (j0 + g * C) * kBlockK;
          const int64_t kc = std::min(kBlockK, sg.k_len - cs);
          cs_g[g] = cs;
          kc_g[g] = kc;
          const int64_t k_off = ((sg.b * Sk + sg.k0 + cs) * Hk + hk) * D * es;
          if constexpr (kDot) {
            const auto* k16 = reinterpret_cast<const uint16_t*>(k_ptr + k_off);
            pack_bf16_transposed(ktw.data() + g * D2 * kBlockK, kBlockK, k16, Hk * D, kc, D);
            pack_bf16_transposed(vtw.data() + g * D2 * kBlockK, kBlockK,
                                 reinterpret_cast<const uint16_t*>(v_ptr + k_off), Hk * D, kc, D);
            pack_bf16_row_pairs(knw.data() + g * kBlockK / 2 * Dp, Dp, k16, Hk * D, kc, D);
          } else {
            pack_transposed(kt.data() + g * D * kBlockK, kBlockK, k_ptr + k_off, kv_row_bytes, st, kc, D,
                            tmp.data());
            pack_transposed(vt.data() + g * D * kBlockK, kBlockK, v_ptr + k_off, kv_row_bytes, st, kc, D,
                            tmp.data());
            pack_rows(kn.data() + g * kBlockK * Dp, Dp, k_ptr + k_off, kv_row_bytes, st, kc, D);
          }
          std::fill_n(dk_acc.begin() + g * kBlockK * Dp, kc * Dp, T(0));
          std::fill_n(dv_acc.begin() + g * kBlockK * Dp, kc * Dp, T(0));
        }
        // Causal: rows before the group's first key see none of it, so the first tile starts there
        // (tiles and key blocks are both 96 long, so every block's diagonal tile starts at its first key).
        const int64_t r_begin = causal ? cs_g[0] : 0;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t rs = r_begin; rs < sg.q_len; rs += kBlockQ) {
            const int64_t qc = std::min(kBlockQ, sg.q_len - rs);
            const int64_t stat0 = (sg.b * H + h) * Sq + sg.q0 + rs;
            const T* qn = kDot ? nullptr : qp + stat0 * Dp;
            const T* don = kDot ? nullptr : dop + stat0 * Dp;
            T* dq_tile = dqp + item.chunk * B * H * panel + stat0 * Dp;
            const int64_t q2 = ceil_div(qc, 2);
            if constexpr (kDot) {
              // Q and dO row pairs of this tile (B of dK, dV), shared by the group's blocks.
              pack_bf16_row_pairs(qpw.data(), Dp, reinterpret_cast<const uint16_t*>(qw + stat0 * D2), 2 * D2, qc, D);
              pack_bf16_row_pairs(dopw.data(), Dp, reinterpret_cast<const uint16_t*>(dow + stat0 * D2), 2 * D2, qc,
                                  D);
            }
            for (int64_t g = 0; g < ng; ++g) {
              const int64_t cs = cs_g[g], kc = kc_g[g];
              if (causal && rs + qc <= cs) continue;  // no row of this tile reaches block g
              const int64_t kv = causal ? std::min(kc, rs + qc - cs) : kc;  // keys some row here sees
              const int64_t kvw = round_up(kv, P);
              T* dk_g = dk_acc.data() + g * kBlockK * Dp;
              T* dv_g = dv_acc.data() + g * kBlockK * Dp;
              // A tile the diagonal crosses: every GEMM skips the strips' masked parts (Causal in
              // attention_cpu_causal.h); S and dP are then computed per row only up to its strip's bound.
              const int64_t off = rs - cs;
              const bool diag = crosses_diagonal(causal, off, kv);
              if constexpr (kDot) {
#if defined(LV_CPU_BF16_DOT)
                if (diag) {
                  gemm_tile_bf16_causal(Causal::kCols, off, qc, kvw, D2, qw + stat0 * D2, D2, 1,
                                        ktw.data() + g * D2 * kBlockK, kBlockK, s_buf.data(), kBlockK, false);
                  gemm_tile_bf16_causal(Causal::kCols, off, qc, kvw, D2, dow + stat0 * D2, D2, 1,
                                        vtw.data() + g * D2 * kBlockK, kBlockK, dp_buf.data(), kBlockK, false);
                } else {
                  gemm_tile_bf16(qc, kvw, D2, qw + stat0 * D2, D2, 1, ktw.data() + g * D2 * kBlockK, kBlockK,
                                 s_buf.data(), kBlockK, false);
                  gemm_tile_bf16(qc, kvw, D2, dow + stat0 * D2, D2, 1, vtw.data() + g * D2 * kBlockK, kBlockK,
                                 dp_buf.data(), kBlockK, false);
                }
#endif
              } else if (diag) {
                gemm_tile_causal<T>(Causal::kCols, off, qc, kvw, D, qn, Dp, 1, kt.data() + g * D * kBlockK, kBlockK,
                                    s_buf.data(), kBlockK, false);
                gemm_tile_causal<T>(Causal::kCols, off, qc, kvw, D, don, Dp, 1, vt.data() + g * D * kBlockK,
                                    kBlockK, dp_buf.data(), kBlockK, false);
              } else {
                gemm_tile<T>(qc, kvw, D, qn, Dp, 1, kt.data() + g * D * kBlockK, kBlockK, s_buf.data(), kBlockK,
                             false);
                gemm_tile<T>(qc, kvw, D, don, Dp, 1, vt.data() + g * D * kBlockK, kBlockK, dp_buf.data(), kBlockK,
                             false);
              }
              for (int64_t r = 0; r < qc; ++r) {
                T* p_row = s_buf.data() + r * kBlockK;
                T* ds_row = dp_buf.data() + r * kBlockK;
                const int64_t nv = causal ? std::max<int64_t>(0, std::min(kv, rs + r - cs + 1)) : kv;
                const T l2 = lse2[stat0 + r];
                // A row with no visible key, or whose final lse says it saw none, has P = 0 (as the
                // reference does for a non-finite lse).
                const int64_t n = std::isfinite(l2) ? nv : 0;
                row_exp2<T>(p_row, n, kvw, scale2, n > 0 ? l2 : T(0));
                // Columns the S and dP GEMMs wrote for this row's strip; dS is zero past them, as P is.
                const int64_t ncols =
                    diag ? causal_strip(Causal::kCols, off, r / 6 * 6, std::min<int64_t>(6, qc - r / 6 * 6), kvw, 0,
                                        P, 1).n
                         : kvw;
                const Vec<T> dl = splat(delta[stat0 + r]);
                const Vec<T> sc = splat(scale);
                int64_t c = 0;
                for (; c < ncols; c += W) storeu(ds_row + c, loadu(p_row + c) * (loadu(ds_row + c) - dl) * sc);
                for (; c < kvw; c += W) storeu(ds_row + c, Vec<T>{});
              }
              if constexpr (kDot) {
#if defined(LV_CPU_BF16_DOT)
                // Pair rows of P and dS (P^T, dS^T: A of dV, dK); dS rows for dQ.
                for (int64_t rr = 0; rr < q2; ++rr) {
                  const int64_t r0 = 2 * rr;
                  const bool two = r0 + 1 < qc;
                  pair_rows_bf16(ptw.data() + rr * kBlockK, s_buf.data() + r0 * kBlockK,
                                 two ? s_buf.data() + (r0 + 1) * kBlockK : nullptr, kvw);
                  pair_rows_bf16(dstw.data() + rr * kBlockK, dp_buf.data() + r0 * kBlockK,
                                 two ? dp_buf.data() + (r0 + 1) * kBlockK : nullptr, kvw);
                }
                for (int64_t r = 0; r < qc; ++r) {
                  round_row_bf16(dsw.data() + r * kBlockK / 2, dp_buf.data() + r * kBlockK, kvw);
                }
                if (diag) {
                  gemm_tile_bf16_causal(Causal::kDepthFrom, off, kv, Dp, q2, ptw.data(), 1, kBlockK, dopw.data(), Dp,
                                        dv_g, Dp, true);
                  gemm_tile_bf16_causal(Causal::kDepthFrom, off, kv, Dp, q2, dstw.data(), 1, kBlockK, qpw.data(), Dp,
                                        dk_g, Dp, true);
                  gemm_tile_bf16_causal(Causal::kDepth, off, qc, Dp, ceil_div(kv, 2), dsw.data(), kBlockK / 2, 1,
                                        knw.data() + g * kBlockK / 2 * Dp, Dp, dq_tile, Dp, true);
                } else {
                  gemm_tile_bf16(kv, Dp, q2, ptw.data(), 1, kBlockK, dopw.data(), Dp, dv_g, Dp, true);
                  gemm_tile_bf16(kv, Dp, q2, dstw.data(), 1, kBlockK, qpw.data(), Dp, dk_g, Dp, true);
                  gemm_tile_bf16(qc, Dp, ceil_div(kv, 2), dsw.data(), kBlockK / 2, 1,
                                 knw.data() + g * kBlockK / 2 * Dp, Dp, dq_tile, Dp, true);
                }
#endif
              } else if (diag) {
                gemm_tile_causal<T>(Causal::kDepthFrom, off, kv, Dp, qc, s_buf.data(), 1, kBlockK, don, Dp, dv_g, Dp,
                                    true);
                gemm_tile_causal<T>(Causal::kDepthFrom, off, kv, Dp, qc, dp_buf.data(), 1, kBlockK, qn, Dp, dk_g, Dp,
                                    true);
                gemm_tile_causal<T>(Causal::kDepth, off, qc, Dp, kv, dp_buf.data(), kBlockK, 1,
                                    kn.data() + g * kBlockK * Dp, Dp, dq_tile, Dp, true);
              } else {
                gemm_tile<T>(kv, Dp, qc, s_buf.data(), 1, kBlockK, don, Dp, dv_g, Dp, true);
                gemm_tile<T>(kv, Dp, qc, dp_buf.data(), 1, kBlockK, qn, Dp, dk_g, Dp, true);
                gemm_tile<T>(qc, Dp, kv, dp_buf.data(), kBlockK, 1, kn.data() + g * kBlockK * Dp, Dp, dq_tile, Dp,
                             true);
              }
            }
          }
        }
        for (int64_t g = 0; g < ng; ++g) {
          for (int64_t r = 0; r < kc_g[g]; ++r) {
            const int64_t off = ((sg.b * Sk + sg.k0 + cs_g[g] + r) * Hk + hk) * D;
            const T* gk = dk_acc.data() + (g * kBlockK + r) * Dp;
            const T* gv = dv_acc.data() + (g * kBlockK + r) * Dp;
            if (accumulate) {
              for (int64_t d = 0; d < D; ++d) {
                dk_ptr[off + d] += gk[d];
                dv_ptr[off + d] += gv[d];
              }
            } else {
              std::copy(gk, gk + D, dk_ptr + off);
              std::copy(gv, gv + D, dv_ptr + off);
            }
          }
        }
      }
    }
  }

  // dq (=, or += when accumulating) the sum of the chunk panels, back in (B, Sq, H, D) order.
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t bs = 0; bs < B * Sq; ++bs) {
    const int64_t bi = bs / Sq, row = bs % Sq;
    for (int64_t h = 0; h < H; ++h) {
      T* dst = dq_ptr + (bs * H + h) * D;
      const T* src = dqp + ((bi * H + h) * Sq + row) * Dp;
      if (!accumulate) std::fill(dst, dst + D, T(0));
      for (int64_t c = 0; c < C; ++c) {
        const T* sc = src + c * B * H * panel;
        for (int64_t d = 0; d < D; ++d) dst[d] += sc[d];
      }
    }
  }
}

void attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
              double softmax_scale, bool causal, bool accumulate) {
  const std::vector<Segment> segs = check_qkv_segments(q, k, v, cu_seqlens_q, cu_seqlens_k);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3);
  const at::ScalarType acc = acc_dtype(q.scalar_type());
  for (const auto& named : {std::make_pair("dout", &dout), std::make_pair("out", &out)}) {
    TORCH_CHECK(named.second->sizes() == q.sizes(), named.first, " must have q's shape ", q.sizes(), ", got ",
                named.second->sizes());
    check_float_dtype(named.first, *named.second);
    check_cpu_contiguous(named.first, *named.second);
  }
  check_acc("lse", lse, {B, H, Sq}, acc);
  check_acc("dq", dq, q.sizes(), acc);
  check_acc("dk", dk, k.sizes(), acc);
  check_acc("dv", dv, v.sizes(), acc);
  TORCH_CHECK(std::isfinite(softmax_scale), "softmax_scale must be finite, got ", softmax_scale);
  if (acc == at::kDouble) {
    attn_bwd_kernel<double, false>(dout, q, k, v, out, lse, dq, dk, dv, segs, softmax_scale, causal, accumulate);
  } else if (bf16_dot_enabled() && q.scalar_type() == at::kBFloat16 && dout.scalar_type() == at::kBFloat16) {
    attn_bwd_kernel<float, true>(dout, q, k, v, out, lse, dq, dk, dv, segs, softmax_scale, causal, accumulate);
  } else {
    attn_bwd_kernel<float, false>(dout, q, k, v, out, lse, dq, dk, dv, segs, softmax_scale, causal, accumulate);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace lv

TORCH_LIBRARY_IMPL(longvila_engine, CPU, m) { m.impl("attn_bwd", &lv::cpu::attn_bwd); }
