"""Triton backward attention kernels for one block: delta preprocessing, dK/dV, dQ.

Given dout, q, k, v and the final (out, lse) of the rows of q (after every ring step), three kernels
recompute the probabilities block by block, P = exp(S - lse), never storing the score matrix:

1. `_attn_bwd_preprocess_kernel`: delta = rowsum(dout * out) per (row, head), and lse rescaled to
   log2 units with -inf (a row that saw no key) turned into +inf, so that exp2(s - lse) is exactly 0
   there without a test in the inner loops.
2. `_attn_bwd_dkdv_kernel`: one program per (key tile, key/value head) loops over the query heads
   of its GQA group and, for each, over the query tiles that can see its keys. It is the only writer
   of its dK/dV rows, so the sum over the group needs no atomics and is deterministic.
3. `_attn_bwd_dq_kernel`: one program per (query tile, query head) loops over the visible key tiles
   and writes its dQ rows; a second kernel rather than atomics, so results are reproducible.

Gradients are float32 and either overwrite or are added to the given dq/dk/dv (`accumulate`, the
ring backward). Same features as the forward: GQA/MQA, top-left causal, packed varlen with empty
sequences, any head dim. Not here: float64, dropout, bias, deterministic-vs-fast switches.

Legend: B batch, S sequence, H query heads, H_kv key/value heads, D head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_fwd import (
    LOG2E,
    block_d,
    compiled_form,
    device_arch,
    device_guard,
    dot_options,
    nonempty,
    runner,
    runs_interpreted,
    segment_tiles,
    variant_flags,
    variant_name,
)

# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out, DO, Lse, Delta, LseLog2,
    seqlen_q, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Out and DO are contiguous (B, S_q, H, D); Lse, Delta, LseLog2 contiguous (B, H, S_q).
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    rows = ((b.to(tl.int64) * seqlen_q + offs_m) * num_heads + h) * HEAD_DIM
    mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(Out + rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_ptr = (b.to(tl.int64) * num_heads + h) * seqlen_q + offs_m
    lse = tl.load(Lse + row_ptr, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Delta + row_ptr, delta, mask=m_ok)
    tl.store(LseLog2 + row_ptr, lse2, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LseLog2, Delta, DK, DV, CuQ, CuK, TileSeq, TileBlock,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    seqlen_q, seqlen_k, num_heads, num_kv_heads, group, num_seqs, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # DO is contiguous (B, S_q, H, D); DK/DV contiguous (B, S_k, H_kv, D); LseLog2/Delta (B, H, S_q).
    # The tile is worked on transposed (keys along rows): S^T = K Q^T, so dV = P^T dO and dK = dS^T Q
    # come out with keys along rows, the layout of this program's accumulators.
    tile = tl.program_id(0)
    bkh = tl.program_id(1)
    b = bkh // num_kv_heads
    kvh = (bkh % num_kv_heads).to(tl.int64)  # 64-bit, as in the forward
    if VARLEN:
        seq = tl.load(TileSeq + tile)
        if seq >= num_seqs:
            return
        block = tl.load(TileBlock + tile)
        q_start = tl.load(CuQ + seq)
        q_len = tl.load(CuQ + seq + 1) - q_start
        k_start = tl.load(CuK + seq)
        k_len = tl.load(CuK + seq + 1) - k_start
    else:
        block = tile
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k

    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < k_len
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    kv_rows = (k_start + offs_n).to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + kvh * stride_kh + kv_rows[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + kv_rows[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Keys past k_len were loaded as zeros: they only feed dK/dV rows that are never stored, so the
    # loops mask only what changes stored values: the causal triangle (query i sees key j <= i).
    # Causal: query tiles [lo, diag_end) cross the diagonal and are masked (BLOCK_N is a multiple of
    # BLOCK_M, so they are the first BLOCK_N / BLOCK_M tiles); the rest run in a second loop with no
    # mask code (two phases unrolled at compile time, as in the forward).
    lo = 0
    diag_end = 0
    if CAUSAL:
        lo = block * BLOCK_N
        diag_end = tl.minimum(q_len, lo + BLOCK_N)
    for g in range(0, group):
        h = kvh * group + g
        q_base = Q + b64 * stride_qb + h * stride_qh
        do_base = DO + (b64 * seqlen_q * num_heads + h) * HEAD_DIM
        row_base = (b64 * num_heads + h) * seqlen_q + q_start
        for unmasked in tl.static_range(1 - CAUSAL, 2):  # non-causal: the unmasked phase alone
            lo_m = lo + unmasked * (diag_end - lo)
            hi_m = diag_end + unmasked * (q_len - diag_end)
            for start_m in range(lo_m, hi_m, BLOCK_M):
                offs_m = start_m + offs_m0
                m_ok = offs_m < q_len
                q_rows = (q_start + offs_m).to(tl.int64)
                q_mask = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + q_rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_base + q_rows[:, None] * (num_heads * HEAD_DIM) + offs_d[None, :],
                             mask=q_mask, other=0.0)
                # Rows past q_len read lse = +inf: their probabilities are exactly 0.
                lse2 = tl.load(LseLog2 + row_base + offs_m, mask=m_ok, other=float("inf"))
                delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)
                do = do.to(Q.dtype.element_ty)
                if DOT_F32:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                p_t = tl.exp2(s_t - lse2[None, :])
                if not unmasked:
                    p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                ds_t = p_t * (dp_t - delta[None, :])
                p_lo = p_t.to(Q.dtype.element_ty)
                ds_lo = ds_t.to(Q.dtype.element_ty)
                if DOT_F32:
                    p_lo = p_lo.to(tl.float32)
                    ds_lo = ds_lo.to(tl.float32)
                dv += tl.dot(p_lo, do, input_precision=PRECISION)
                dk += tl.dot(ds_lo, q, input_precision=PRECISION)

    dk = dk * sm_scale
    g_rows = ((b64 * seqlen_k + k_start + offs_n) * num_kv_heads + kvh) * HEAD_DIM
    dk_ptrs = DK + g_rows[:, None] + offs_d[None, :]
    dv_ptrs = DV + g_rows[:, None] + offs_d[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=kv_mask, other=0.0)
        dv += tl.load(dv_ptrs, mask=kv_mask, other=0.0)
    tl.store(dk_ptrs, dk, mask=kv_mask)
    tl.store(dv_ptrs, dv, mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LseLog2, Delta, DQ, CuQ, CuK, TileSeq, TileBlock,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    seqlen_q, seqlen_k, num_heads, group, num_seqs, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ACCUMULATE: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    # DO and DQ are contiguous (B, S_q, H, D); LseLog2/Delta (B, H, S_q).
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    # 64-bit head index (as in the forward: head strides of a (B, H, S, D) view are large).
    h = (bh % num_heads).to(tl.int64)
    kvh = h // group
    if VARLEN:
        seq = tl.load(TileSeq + tile)
        if seq >= num_seqs:
            return
        block = tl.load(TileBlock + tile)
        q_start = tl.load(CuQ + seq)
        q_len = tl.load(CuQ + seq + 1) - q_start
        k_start = tl.load(CuK + seq)
        k_len = tl.load(CuK + seq + 1) - k_start
    else:
        block = tile
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_rows = (q_start + offs_m).to(tl.int64)
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
                mask=q_mask, other=0.0)
    g_rows = ((b64 * seqlen_q + q_start + offs_m) * num_heads + h) * HEAD_DIM
    do = tl.load(DO + g_rows[:, None] + offs_d[None, :], mask=q_mask, other=0.0).to(Q.dtype.element_ty)
    row_ptr = (b64 * num_heads + h) * seqlen_q + q_start + offs_m
    lse2 = tl.load(LseLog2 + row_ptr, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row_ptr, mask=m_ok, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys past k_len load as zeros and so add nothing to dS K; only the causal triangle is masked.
    # Causal: key tiles [0, full) lie left of the diagonal for every row of this block and run in a
    # loop with no mask code; [full, hi) cross it (two phases unrolled at compile time).
    hi = k_len
    full = k_len
    if CAUSAL:
        hi = tl.minimum(k_len, (block + 1) * BLOCK_M)
        full = tl.minimum(hi, ((block * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
    for masked in tl.static_range(1 + CAUSAL):  # non-causal: the unmasked phase alone
        lo_n = masked * full
        hi_n = full + masked * (hi - full)
        for start_n in range(lo_n, hi_n, BLOCK_N):
            offs_n = start_n + offs_n0
            kv_rows = (k_start + offs_n).to(tl.int64)
            kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
            k = tl.load(k_base + kv_rows[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + kv_rows[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            if masked:
                p = tl.where(offs_n[None, :] <= offs_m[:, None], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
            if DOT_F32:
                ds = ds.to(tl.float32)
            dq += tl.dot(ds, k, input_precision=PRECISION)

    dq = dq * sm_scale
    dq_ptrs = DQ + g_rows[:, None] + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=q_mask, other=0.0)
    tl.store(dq_ptrs, dq, mask=q_mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


# Configs that spill registers and were measured faster than every spill-free candidate on a real
# GPU, so the AOT gate (kernels/triton/aot.py) accepts their spills: (arch, kernel, BLOCK_D, BLOCK_M,
# BLOCK_N, warps, stages). H200, triton 3.6.0, bf16, B=1, H=16, S=16K, whole backward (dK/dV
# swapped alone), median of 5, 2026-11-29 (benchmarks/tune_triton_bwd.py; results in
# benchmarks/results/gpu/tune_triton_bwd_2026-11-29.json):
# - D=128 dK/dV 64x64, 4 warps, 2 stages (2240 bytes of spills): 7.83 ms causal, 13.9 ms full, against
#   24.2 / 39.1 ms for the spill-free 16x64, 8 warps it replaced (3.1x / 2.8x);
# - D=64 dK/dV 32x128, 4 warps, 3 stages (2240 bytes): 4.64 / 7.44 ms, against 5.25 / 9.51 ms for the
#   spill-free 32x128, 8 warps.
SPILLS_MEASURED_FASTER = frozenset({(90, "dkdv", 128, 64, 64, 4, 2), (90, "dkdv", 64, 32, 128, 4, 3)})


def spills_measured_faster(arch: int, kernel: str, constexprs: dict, options: dict) -> bool:
    """Whether this compiled variant's spills were measured to pay (SPILLS_MEASURED_FASTER)."""
    key = (arch, kernel, constexprs.get("BLOCK_D"), constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N"),
           options.get("num_warps"), options.get("num_stages"))
    return key in SPILLS_MEASURED_FASTER


def bwd_config(head_dim: int, interpreted: bool, fp32: bool = False, arch: int = 80) -> dict:
    """Tile sizes per kernel, architecture and head dim; fixed (not autotuned) so AOT reports what runs.

    dK/dV keeps two (BLOCK_N, D) float32 accumulators and wants long key tiles with short query
    tiles (BLOCK_N a multiple of BLOCK_M: the masked diagonal tiles are then the first ones); dQ is
    the mirror image. The largest tiles found with no spill in any fp16/bf16 variant
    (`scripts/aot_triton.py --variants` prints registers and spills), except where a spilling one was
    measured faster on a GPU (SPILLS_MEASURED_FASTER). sm_90: dQ in 128-row tiles at both head dims
    with 3 stages; dK/dV in 4 warps, 64x64 at D = 128 and 32x128 at D = 64, measured on an H200.
    sm_80: 128-row dQ tiles spill at D = 128 (mma.sync needs more registers than wgmma), so 64.
    float32 inputs (tests, the 1e-5 contract) get smaller tiles; their dK/dV at D = 64 still spills a
    few words.
    """
    def cfg(block_m, block_n, warps, stages):
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}

    pre = {"BLOCK_M": 32 if interpreted else 64, "num_warps": 1 if interpreted else 4, "num_stages": 1}
    if interpreted:
        return {"pre": pre, "dkdv": cfg(32, 32, 1, 1), "dq": cfg(32, 32, 1, 1)}
    small_d = block_d(head_dim) <= 64
    if fp32:
        return {"pre": pre, "dkdv": cfg(32, 64, 8, 2), "dq": cfg(64, 32, 8, 2) if small_d else cfg(32, 32, 4, 2)}
    if arch == 90:
        if small_d:
            return {"pre": pre, "dkdv": cfg(32, 128, 4, 3), "dq": cfg(128, 64, 8, 3)}
        return {"pre": pre, "dkdv": cfg(64, 64, 4, 2), "dq": cfg(128, 32, 8, 3)}
    if small_d:
        return {"pre": pre, "dkdv": cfg(32, 128, 8, 2), "dq": cfg(128, 32, 8, 2)}
    return {"pre": pre, "dkdv": cfg(32, 64, 8, 2), "dq": cfg(64, 64, 8, 2)}


def _launch_opts(cfg: dict) -> dict:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                  accumulate):
    """Launch the three backward kernels; writes (or adds to, with `accumulate`) dq, dk, dv in place.

    dout/out (B,S_q,H,D) any float dtype, lse (B,H,S_q) float32, dq/dk/dv contiguous float32. Goes
    through the custom operator `longvila_engine::triton_attn_bwd` (with a fake, for FakeTensorMode).
    """
    triton_attn_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, float(softmax_scale),
                    bool(causal), bool(accumulate))


@torch.library.custom_op("longvila_engine::triton_attn_bwd", mutates_args=("dq", "dk", "dv"))
def triton_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], softmax_scale: float,
                    causal: bool, accumulate: bool) -> None:
    with device_guard(q.device):
        _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                    accumulate)


@triton_attn_bwd.register_fake
def _triton_attn_bwd_fake(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                          accumulate):
    return None  # writes dq/dk/dv in place


def _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                accumulate):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    dout, out, lse = dout.contiguous(), out.contiguous(), lse.contiguous()
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    for t in (dq, dk, dv):
        assert t.dtype == torch.float32 and t.is_contiguous()
    assert lse.dtype == torch.float32
    device = q.device
    interpreted = runs_interpreted(device)
    arch = 80 if interpreted else device_arch(device)
    cfg = bwd_config(head_dim, interpreted, fp32=q.dtype == torch.float32, arch=arch)
    assert cfg["dkdv"]["BLOCK_N"] % cfg["dkdv"]["BLOCK_M"] == 0, "dK/dV masks the first BLOCK_N // BLOCK_M tiles"
    dots = dot_options(q.dtype, interpreted)
    bd = block_d(head_dim)
    group = num_heads // num_kv_heads
    if batch * num_heads == 0:  # nothing to launch; dk/dv may still have rows (zero query heads)
        if not accumulate:
            for t in (dq, dk, dv):
                t.zero_()
        return

    delta = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=device)
    lse_log2 = torch.empty_like(delta)
    if seqlen_q > 0:
        pre = cfg["pre"]
        runner(_attn_bwd_preprocess_kernel, device)[(triton.cdiv(seqlen_q, pre["BLOCK_M"]), batch * num_heads)](
            out, dout, lse, delta, lse_log2, seqlen_q, num_heads,
            HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=pre["BLOCK_M"], **_launch_opts(pre))

    varlen = cu_seqlens_q is not None
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    qk_scale = float(softmax_scale) * LOG2E
    common = {"HEAD_DIM": head_dim, "BLOCK_D": bd, "CAUSAL": bool(causal), "VARLEN": varlen,
              "ACCUMULATE": bool(accumulate), **dots}

    c = cfg["dkdv"]
    if varlen:
        tile_seq, tile_block, grid0 = segment_tiles(cu_seqlens_k, c["BLOCK_N"], seqlen_k)
        num_seqs = cu_seqlens_q.numel() - 1
    else:
        tile_seq = tile_block = dummy
        grid0, num_seqs = triton.cdiv(seqlen_k, c["BLOCK_N"]), batch
    if grid0 > 0:
        runner(_attn_bwd_dkdv_kernel, device)[(grid0, batch * num_kv_heads)](
            nonempty(q), k, v, nonempty(dout), nonempty(lse_log2), nonempty(delta), dk, dv,
            cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy, tile_seq, tile_block,
            *strides, seqlen_q, seqlen_k, num_heads, num_kv_heads, group, num_seqs, qk_scale,
            float(softmax_scale), BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **common, **_launch_opts(c))

    c = cfg["dq"]
    if varlen:
        tile_seq, tile_block, grid0 = segment_tiles(cu_seqlens_q, c["BLOCK_M"], seqlen_q)
    else:
        grid0 = triton.cdiv(seqlen_q, c["BLOCK_M"])
    if grid0 > 0:
        runner(_attn_bwd_dq_kernel, device)[(grid0, batch * num_heads)](
            q, nonempty(k), nonempty(v), dout, lse_log2, delta, dq,
            cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy, tile_seq, tile_block,
            *strides, seqlen_q, seqlen_k, num_heads, group, num_seqs, qk_scale, float(softmax_scale),
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **common, **_launch_opts(c))


def aot_specs(dtype: str, head_dim: int, all_variants: bool = False, arch: int = 90):
    """What `aot.py` compiles for this file: [(name, kernel, signature types, constexprs, options)].

    By default the ring's hot path: causal, dense, accumulating into running gradients, dout in the
    input dtype, and its non-causal twin; with `all_variants` every (causal, varlen, accumulate)
    combination of dK/dV and dQ. Scalars not named in the types map are int32.
    """
    cfg = bwd_config(head_dim, interpreted=False, fp32=dtype == "fp32", arch=arch)
    bd = block_d(head_dim)
    io = f"*{dtype}"
    pre_types = {"Out": io, "DO": io, "Lse": "*fp32", "Delta": "*fp32", "LseLog2": "*fp32"}
    main_types = {"Q": io, "K": io, "V": io, "DO": io, "LseLog2": "*fp32", "Delta": "*fp32",
                  "DK": "*fp32", "DV": "*fp32", "DQ": "*fp32", "CuQ": "*i32", "CuK": "*i32",
                  "TileSeq": "*i32", "TileBlock": "*i32", "qk_scale": "fp32", "sm_scale": "fp32"}
    specs = [("attn_bwd_preprocess", compiled_form(_attn_bwd_preprocess_kernel), pre_types,
              {"HEAD_DIM": head_dim, "BLOCK_D": bd, "BLOCK_M": cfg["pre"]["BLOCK_M"]}, _launch_opts(cfg["pre"]))]
    for name, kernel, key in (("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, "dkdv"),
                              ("attn_bwd_dq", _attn_bwd_dq_kernel, "dq")):
        c = cfg[key]
        for causal, varlen, accumulate in variant_flags(all_variants):
            constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": bd, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"],
                          "CAUSAL": causal, "VARLEN": varlen, "ACCUMULATE": accumulate, "DOT_F32": False,
                          "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
            specs.append((variant_name(name, (causal, varlen, accumulate), ("full", "dense", "write")),
                          compiled_form(kernel), main_types, constexprs, _launch_opts(c)))
    return specs
