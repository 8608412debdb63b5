"""Triton forward attention kernel for one block, with the fused ring merge in its epilogue.

One program owns BLOCK_M query rows of one (sequence, head) and streams the visible keys in BLOCK_N
tiles with the online softmax (running max and sum, in log2 units so the inner loop uses exp2). Its
epilogue either writes the block result (out float32, natural-log lse) or merges it into a running
float32 (out, lse) in place: the ring step needs no second pass over memory.

Features: GQA/MQA (query head h reads key/value head h // group), causal masking aligned top-left,
packed varlen (B == 1, int32 cu_seqlens; a tile map built with torch ops on the device says which
sequence and which row block each program owns, so nothing synchronises with the host), any head dim
(padded to a power of two inside the kernel). Rows that see no key get lse = -inf and out = 0.
On sm_90 with 16-bit inputs (constexpr TMA) Q, K and V are loaded through tensor descriptors made on
the device, so the TMA engine issues the pipelined K/V prefetch; they need global scratch at launch,
from a torch allocator the launcher installs with `triton.set_allocator` when none is set.

What it does not do: float64 (the backend refuses it), dropout, bias, sliding windows, or any
autotuning: configs are fixed per head dim and dtype width (`fwd_config`) so the ahead-of-time compile in
`aot.py` reports exactly what runs.

This file also holds the small launch helpers that `attention_bwd.py` shares (choosing the compiled
or the interpreted form of a kernel, the varlen tile map, the dot settings per dtype).

Legend: B batch, S sequence, H query heads, H_kv key/value heads, D head dim.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------
# Launch helpers shared with attention_bwd.py
# ---------------------------------------------------------------------------------------------------

_TWINS: dict = {}


def process_interprets() -> bool:
    """True when this process imported triton with TRITON_INTERPRET=1.

    Measured on triton 3.7.1: the flag is read when a function is decorated with @triton.jit, and
    triton's own language helpers (tl.zeros, tl.sum, tl.max, ...) are decorated when `import triton`
    runs. So the mode is fixed per process by the first import: with it set, kernels can only be
    interpreted (compiling one fails on the interpreted helpers); without it, nothing can be
    interpreted (an interpreted kernel cannot call the compiled helpers). Setting the variable later
    changes nothing but `triton.knobs`.
    """
    return isinstance(tl.zeros, InterpretedFunction)


def runs_interpreted(device: torch.device) -> bool:
    """Whether kernels for tensors on `device` run in Triton's interpreter: CPU tensors only, and only
    when triton was imported interpreting. CUDA tensors are refused in an interpreting process (the
    interpreter would copy them to the host and run every tile op in Python: a silent 1000x slowdown)."""
    if device.type == "cuda":
        if process_interprets():
            raise RuntimeError(
                "triton was imported with TRITON_INTERPRET=1 in this process, so its kernels can only be "
                "interpreted on the CPU; refusing CUDA tensors. Unset TRITON_INTERPRET before python starts")
        return False
    if process_interprets():
        return True
    if device.type != "cuda":
        raise RuntimeError(
            f"the triton backend needs CUDA tensors, got tensors on {device}; CPU tensors run only in "
            f"Triton's interpreter, which needs TRITON_INTERPRET=1 set before triton is first imported "
            f"in the process (use backend='cpu' or backend='reference' on CPU)")
    return False


def runner(kernel, device: torch.device):
    """The form of `kernel` that runs on `device` in this process.

    `@triton.jit` made a compiled (JITFunction) or an interpreted (InterpretedFunction) kernel from
    TRITON_INTERPRET when this module was imported, but what counts is the process mode (see
    `process_interprets`); when they disagree the kernel gets a twin of the other kind, made from the
    same Python function and kept. Our kernels call no @triton.jit function of their own, which is
    what makes the twin valid.
    """
    interpret = runs_interpreted(device)
    if interpret == isinstance(kernel, InterpretedFunction):
        return kernel
    key = (kernel.fn, interpret)
    if key not in _TWINS:
        _TWINS[key] = InterpretedFunction(kernel.fn) if interpret else JITFunction(kernel.fn)
    return _TWINS[key]


def device_guard(device: torch.device):
    """Launch context: kernels for CUDA tensors run on those tensors' device, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def compiled_form(kernel) -> JITFunction:
    """The JITFunction of a kernel, for ahead-of-time compiles (in a process that does not interpret)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def dot_options(dtype: torch.dtype, interpreted: bool) -> dict:
    """Constexprs that fix how tl.dot runs for this input dtype.

    PRECISION: float32 inputs use "ieee" so a GPU does not silently drop to tf32 (the 1e-5 contract).
    DOT_F32: under the interpreter, 16-bit operands are widened to float32 before tl.dot, because its
    bf16 dot is silently wrong (upstream bug). It changes nothing numerically: a product of two 16-bit
    floats is exact in float32, and tensor cores accumulate in float32 too; P is still rounded to the
    input dtype first, as the GPU path does.
    """
    if dtype == torch.float64:
        raise ValueError("the triton attention kernels take float16, bfloat16 or float32; got float64 "
                         "(use backend='cpu' or backend='reference' for float64)")
    return {"PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_F32": bool(interpreted and dtype != torch.float32)}


def segment_tiles(cu_seqlens: torch.Tensor, block: int, total_rows: int):
    """Tile map for packed varlen: which sequence and row block each program along grid axis 0 owns.

    Sequence i needs ceil(len_i / block) tiles; their sum is at most ceil(total / block) + N, which is
    the grid size, so it is known without reading cu_seqlens on the host. Returns (tile_seq,
    tile_block, grid0): int32 tensors of grid0 entries; programs whose tile_seq == N have no work.
    """
    num_seqs = cu_seqlens.numel() - 1
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    tile_cu = torch.zeros(num_seqs + 1, dtype=torch.int32, device=cu_seqlens.device)
    tile_cu[1:] = torch.cumsum(torch.div(lens + (block - 1), block, rounding_mode="floor"), 0)
    grid0 = triton.cdiv(total_rows, block) + num_seqs
    t = torch.arange(grid0, dtype=torch.int32, device=cu_seqlens.device)
    tile_seq = torch.searchsorted(tile_cu[1:].contiguous(), t, right=True, out_int32=True)
    tile_block = t - tile_cu[tile_seq.long()]
    return tile_seq, tile_block, grid0


def nonempty(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a one-element stand-in when it is empty (zero keys): the kernel then never reads it,
    and a launcher is not handed the null pointer of an empty CUDA allocation."""
    return t if t.numel() > 0 else torch.zeros(1, dtype=t.dtype, device=t.device)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (and to 16, the smallest tl.dot side)."""
    return max(16, triton.next_power_of_2(head_dim))


# ---------------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, TileSeq, TileBlock,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    seqlen_q, seqlen_k, num_heads, group, num_seqs, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, RESUME: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    # qk_scale = softmax_scale * log2(e): scores live in log2 units until the epilogue.
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    # 64-bit head index: head strides of a (B, H, S, D) view times H overflow int32 at long S.
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
    k_base = K + b64 * stride_kb + kvh * stride_kh
    v_base = V + b64 * stride_vb + kvh * stride_vh
    if TMA:
        # Tensor descriptors (TMA on sm_90) over this (sequence, head)'s rows: the copy engine fetches
        # whole tiles into shared memory and fills rows past the sequence end with zeros, as the masked
        # loads do. Made on the device, so each program writes its descriptors to global scratch
        # (the launcher provides an allocator). The launcher takes this path only when HEAD_DIM ==
        # BLOCK_D and every base offset and row stride is a multiple of 16 bytes (`_tma_eligible`).
        q_desc = tl.make_tensor_descriptor(Q + b64 * stride_qb + h * stride_qh + tl.cast(q_start, tl.int64) * stride_qs,
                                           shape=[q_len, HEAD_DIM], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base + tl.cast(k_start, tl.int64) * stride_ks, shape=[k_len, HEAD_DIM],
                                           strides=[stride_ks, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base + tl.cast(k_start, tl.int64) * stride_vs, shape=[k_len, HEAD_DIM],
                                           strides=[stride_vs, 1], block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([block * BLOCK_M, 0])
    else:
        q_rows = (q_start + offs_m).to(tl.int64)
        q_ptrs = Q + b64 * stride_qb + h * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, hi) can be visible; tiles below `full` are visible to every row of the block. Two
    # phases (unrolled at compile time): the unmasked tiles first, in a loop with no mask code at all,
    # then the few masked ones (sequence end, causal diagonal). One loop with a branch on the mask
    # costs registers and, on sm_90, can keep the pipeliner from overlapping loads with wgmma.
    hi = k_len
    full = (k_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(k_len, (block + 1) * BLOCK_M)
        full = tl.minimum(full, ((block * BLOCK_M + 1) // BLOCK_N) * BLOCK_N)
    for masked in tl.static_range(2):
        lo_n = masked * full
        hi_n = full + masked * (hi - full)
        for start_n in range(lo_n, hi_n, BLOCK_N):
            offs_n = start_n + offs_n0
            if TMA:
                k = k_desc.load([start_n, 0])
                v = v_desc.load([start_n, 0])
            else:
                kv_rows = (k_start + offs_n).to(tl.int64)
                if masked:
                    kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
                else:
                    kv_mask = d_ok[None, :]
                k = tl.load(k_base + kv_rows[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
                v = tl.load(v_base + kv_rows[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if masked:
                keep = (offs_n < k_len)[None, :]
                if CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None])
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps exp2 at
            # 0 rather than NaN (-inf - -inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v.dtype)
            if DOT_F32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out_blk = acc / l_safe[:, None]
    lse_blk = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))

    o_rows = ((b64 * seqlen_q + q_start + offs_m) * num_heads + h) * HEAD_DIM
    o_ptrs = Out + o_rows[:, None] + offs_d[None, :]
    o_mask = m_ok[:, None] & d_ok[None, :]
    lse_ptrs = Lse + (b64 * num_heads + h) * seqlen_q + q_start + offs_m
    if RESUME:
        # Fused ring step: lse' = logaddexp(lse, lse_b); out' = out*exp(lse-lse') + out_b*exp(lse_b-lse').
        lse_old = tl.load(lse_ptrs, mask=m_ok, other=float("-inf"))
        out_old = tl.load(o_ptrs, mask=o_mask, other=0.0)
        top = tl.maximum(lse_old, lse_blk)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        lse_new = top_safe + tl.log(tl.exp(lse_old - top_safe) + tl.exp(lse_blk - top_safe))
        # Where lse' = -inf both inputs are -inf: subtracting 0 instead keeps both weights at exp(-inf) = 0.
        lse_ref = tl.where(lse_new == float("-inf"), 0.0, lse_new)
        w_old = tl.exp(lse_old - lse_ref)
        w_blk = tl.exp(lse_blk - lse_ref)
        out_blk = out_old * w_old[:, None] + out_blk * w_blk[:, None]
        lse_blk = lse_new
    tl.store(o_ptrs, out_blk, mask=o_mask)
    tl.store(lse_ptrs, lse_blk, mask=m_ok)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


_ARCHS: dict = {}


def device_arch(device: torch.device) -> int:
    """The config family for a CUDA device: 90 for Hopper (sm_90, wgmma), else 80 (mma.sync tiles,
    also used on newer GPUs until they get their own table)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCHS:
        _ARCHS[index] = 90 if torch.cuda.get_device_capability(index)[0] == 9 else 80
    return _ARCHS[index]


def fwd_config(head_dim: int, interpreted: bool, fp32: bool = False, arch: int = 80) -> dict:
    """Tile sizes and launch settings per architecture and head dim. Fixed, not autotuned, so AOT
    reports what runs.

    Interpreted runs use 32x32 tiles: each tile op costs Python time there (16x16 tiles ran twice as
    long), and sequences of 33-70 rows still cross several tiles (partial tiles, the causal diagonal,
    the unmasked fast path). GPU tiles are the largest found that do not spill in any variant
    (`scripts/aot_triton.py --variants`), with 3 stages so the loads of the next K/V tiles are in
    flight while the current ones are multiplied: on sm_90, 128x128 tiles at D = 64 (158 registers)
    and 128x64 at D = 128 (221); on sm_80 mma.sync needs more registers, so D = 128 takes 128x32
    (128x64 spilled there). float32 inputs (tests, the 1e-5 contract) need smaller tiles.

    "TMA": True (sm_90, 16-bit inputs) loads Q, K and V through tensor descriptors, so the 3-stage
    K/V prefetch is issued by the TMA copy engine (`cp.async.bulk.tensor`) instead of by every thread;
    the launcher still falls back to plain pointers where a descriptor is not allowed
    (`_tma_eligible`). The output stays on pointers: a TMA store would stage the float32 128xD tile
    in shared memory (64 KiB at D = 128) on top of the K/V stages.
    """
    if interpreted:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 1, "num_stages": 1}
    small_d = block_d(head_dim) <= 64
    if fp32:
        return {"BLOCK_M": 64, "BLOCK_N": 64 if small_d else 32, "num_warps": 8, "num_stages": 2}
    if arch == 90:
        if small_d:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "TMA": True}
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": True}
    if small_d:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}


def attention_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    """Launch the forward kernel; writes out (B,S_q,H,D) float32 and lse (B,H,S_q) float32 in place.

    With resume=True the block is merged into the (out, lse) already there. q/k/v may be strided
    views; their last dim must be contiguous or they are copied. Goes through the custom operator
    `longvila_engine::triton_attn_fwd`, so FakeTensorMode and torch.compile see it (its fake does nothing).
    """
    triton_attn_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, float(softmax_scale), bool(causal),
                    bool(resume))


@torch.library.custom_op("longvila_engine::triton_attn_fwd", mutates_args=("out", "lse"))
def triton_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], softmax_scale: float,
                    causal: bool, resume: bool) -> None:
    with device_guard(q.device):
        _launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume)


@triton_attn_fwd.register_fake
def _triton_attn_fwd_fake(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    return None  # writes out/lse in place: no new tensor, nothing to compute


def _launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()
    interpreted = runs_interpreted(q.device)
    arch = 80 if interpreted else device_arch(q.device)
    cfg = fwd_config(head_dim, interpreted, fp32=q.dtype == torch.float32, arch=arch)
    varlen = cu_seqlens_q is not None
    if varlen:
        tile_seq, tile_block, grid0 = segment_tiles(cu_seqlens_q, cfg["BLOCK_M"], seqlen_q)
        num_seqs = cu_seqlens_q.numel() - 1
        cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    else:
        grid0 = triton.cdiv(seqlen_q, cfg["BLOCK_M"])
        num_seqs = batch
        tile_seq = tile_block = cu_q = cu_k = torch.zeros(1, dtype=torch.int32, device=q.device)
    if grid0 == 0 or batch * num_heads == 0:
        return
    tma = _tma_eligible(cfg, head_dim, q, k, v)
    if tma and not interpreted:
        _ensure_scratch_allocator()
    runner(_attn_fwd_kernel, q.device)[(grid0, batch * num_heads)](
        q, nonempty(k), nonempty(v), out, lse, cu_q, cu_k, tile_seq, tile_block,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        seqlen_q, seqlen_k, num_heads, num_heads // num_kv_heads, num_seqs,
        float(softmax_scale) * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        CAUSAL=bool(causal), VARLEN=varlen, RESUME=bool(resume),
        **dot_options(q.dtype, interpreted), TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _tma_eligible(cfg: dict, head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether this launch may load through tensor descriptors: the config asks for it (sm_90, 16-bit),
    the head dim is a power of two (no padded columns), K/V are not empty, and what TMA requires of
    each (sequence, head) view holds for every tensor: a 16-byte aligned base and row, head and batch
    strides that are multiples of 16 bytes (so every base offset the kernel forms is aligned too)."""
    if not cfg.get("TMA", False) or head_dim != block_d(head_dim):
        return False
    for t in tensors:
        size = t.element_size()
        if t.numel() == 0 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def _torch_scratch(size: int, alignment: int, stream):
    """Global-memory scratch for a launch, from torch's caching allocator (on the current device,
    which the launch's device guard set; its allocations are aligned far beyond the 128 bytes a
    tensor descriptor needs)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Descriptors made on the device (`tl.make_tensor_descriptor`) live in per-program global scratch,
    which triton asks of the allocator set with `triton.set_allocator` at each launch (none is set by
    default: the launch would raise). Installs `_torch_scratch` unless the caller already set one."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_torch_scratch)


def aot_specs(dtype: str, head_dim: int, all_variants: bool = False, arch: int = 90):
    """What `aot.py` compiles for this file: [(name, kernel, signature types, constexprs, options)].

    By default the ring's hot path, "attn_fwd": causal, dense (not varlen), resuming a running result,
    and its non-causal twin "attn_fwd[full]" (the ring's past blocks); with `all_variants` also every
    other (causal, varlen, resume) combination, named by its flags. `dtype` is a triton type name
    ("fp16", "bf16", "fp32"); `arch` picks the config family. Scalars not in the types map are int32.
    """
    cfg = fwd_config(head_dim, interpreted=False, fp32=dtype == "fp32", arch=arch)
    kernel = compiled_form(_attn_fwd_kernel)
    types = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": "*fp32", "Lse": "*fp32",
             "CuQ": "*i32", "CuK": "*i32", "TileSeq": "*i32", "TileBlock": "*i32", "qk_scale": "fp32"}
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    specs = []
    for causal, varlen, resume in variant_flags(all_variants):
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), "BLOCK_M": cfg["BLOCK_M"],
                      "BLOCK_N": cfg["BLOCK_N"], "CAUSAL": causal, "VARLEN": varlen, "RESUME": resume,
                      "DOT_F32": False, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                      "TMA": bool(cfg.get("TMA", False)) and head_dim == block_d(head_dim)}
        name = variant_name("attn_fwd", (causal, varlen, resume), ("full", "dense", "write"))
        specs.append((name, kernel, types, constexprs, options))
    return specs


def variant_flags(all_variants: bool):
    """(CAUSAL, VARLEN, RESUME-or-ACCUMULATE) combinations: the ring's hot path (the causal diagonal
    block) and its non-causal twin (every past block) first."""
    hot = (True, False, True)
    if not all_variants:
        return [hot, (False, False, True)]
    return [hot] + [f for f in ((c, v, r) for c in (True, False) for v in (False, True) for r in (True, False))
                    if f != hot]


def variant_name(base: str, flags, off_names) -> str:
    """`base` for the hot path, else `base[...]` naming the flags that differ from it."""
    hot = (True, False, True)
    diff = [off if not f else on for f, h, off, on in zip(flags, hot, off_names, ("causal", "varlen", "resume"))
            if f != h]
    return base if not diff else f"{base}[{','.join(diff)}]"
