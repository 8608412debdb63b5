"""Analytic step-time and memory model of one training step, per GPU (docs/design.md section 9).

It prices the work of one transformer training step (forward + backward, no activation
checkpointing) on a given layout of G GPUs with published kernel and link rates
(docs/design.md section 13). FLOPs come from `longvila_engine.ops.flops.attention_flops` (the function the
kernels' own accounting uses) and the dense-layer parameter count; bytes come from
`communication_bytes`, whose per-collective volumes are the ones the engine's counters record
(tests/test_costmodel.py holds them against `groups.stats` of a real gloo run).

What it models:
- dense GEMMs at `gemm_eff` of peak (FP8 or BF16);
- attention at the FlashAttention-3 rates of docs/design.md section 13, interpolated in the block length a ring
  step computes (a short block runs slower: that is most of ring-only's loss);
- ring steps as max(compute, transfer) + per-step latency (overlap with a side stream), the
  inter-node hop at the InfiniBand rate when the ring crosses nodes;
- Ulysses all-to-all and tensor-parallel all-reduces as exposed (not overlapped) time;
- memory: FSDP2-sharded float32 weights and AdamW state, the activations the engine saves and the
  step's largest temporaries, by the dry run's categories (`memory_breakdown`, held against
  longvila_engine/dryrun/ in tests/test_costmodel.py).

What it does not model: pipeline parallelism, data-parallel gradient reduction (overlapped and the
same for every layout), kernel launch gaps outside the ring, stragglers, or congestion between
concurrent rings on shared NICs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from longvila_engine.models.config import get_config
from longvila_engine.ops.flops import attention_flops


@dataclass(frozen=True)
class Hardware:
    """Rates per GPU. Sources: the figures table of docs/design.md section 13."""

    name: str
    peak_bf16: float  # dense tensor FLOP/s
    peak_fp8: float  # dense FP8 FLOP/s (used only for the FP8-GEMM calibration runs)
    hbm_bytes: float
    nvlink_busbw: float  # NCCL effective intra-node bus bandwidth, bytes/s per direction
    nvlink_p2p: float  # NCCL send/recv between two GPUs of a node, bytes/s
    ib_bw: float  # one NIC per GPU, NCCL effective bytes/s per direction
    lat_intra: float  # small-message send/recv latency, s
    lat_inter: float
    attn_fwd_causal: tuple  # ((block_len, FLOP/s), ...) FlashAttention forward, causal
    attn_fwd_full: tuple  # non-causal forward
    attn_bwd_full: tuple  # non-causal backward
    gpus_per_node: int = 8


# H100 SXM5: 989.4 TFLOP/s dense bf16 (datasheet); FP8 dense is twice that (datasheet, 3,958 sparse);
# NCCL NVLink-4 effective 370 GB/s (sjeaugey, nccl-tests#212); send/recv plateau ~180 GB/s
# (nccl-tests#268); NDR 400 Gb/s NIC per GPU, NCCL 46-48 GB/s (nccl-tests#290/#267);
# latencies 9.8 us / 32 us (nccl-tests#331/#214); FA3 Fig. 5/6 bar labels (arXiv:2407.08608).
H100 = Hardware(
    name="H100-SXM5",
    peak_bf16=989.4e12,
    peak_fp8=1978.9e12,
    hbm_bytes=80 * 2**30,
    nvlink_busbw=370e9,
    nvlink_p2p=180e9,
    ib_bw=47e9,
    lat_intra=9.8e-6,
    lat_inter=32e-6,
    attn_fwd_causal=((512, 292e12), (1024, 423e12), (2048, 521e12), (4096, 579e12), (8192, 602e12),
                     (16384, 616e12)),
    attn_fwd_full=((512, 467e12), (1024, 565e12), (2048, 625e12), (4096, 638e12), (8192, 646e12),
                   (16384, 648e12)),
    attn_bwd_full=((512, 316e12), (1024, 424e12), (2048, 501e12), (4096, 542e12), (8192, 559e12),
                   (16384, 561e12)),
)

# A100 SXM4 80GB: 312 TFLOP/s dense bf16, 2.04 TB/s (datasheet); NVLink-3 NCCL effective ~230 GB/s
# (nccl-tests#149). FlashAttention-2 reaches 50-73% of peak on A100 (FA2 paper): the H100 FA3 curve
# is scaled to 0.50-0.70 of the A100 peak by block length. The HDR 200 Gb/s NIC per GPU (25 GB/s,
# DGX A100 user guide) is not in docs/design.md section 13: treat A100 inter-node figures as indicative.
_A100_SCALE = 312e12 / 989.4e12
A100 = Hardware(
    name="A100-SXM4",
    peak_bf16=312e12,
    peak_fp8=312e12,  # no FP8 on A100
    hbm_bytes=80 * 2**30,
    nvlink_busbw=230e9,
    nvlink_p2p=120e9,
    ib_bw=23.5e9,
    lat_intra=9.8e-6,
    lat_inter=32e-6,
    attn_fwd_causal=tuple((s, r * _A100_SCALE * 0.95) for s, r in H100.attn_fwd_causal),
    attn_fwd_full=tuple((s, r * _A100_SCALE * 0.95) for s, r in H100.attn_fwd_full),
    attn_bwd_full=tuple((s, r * _A100_SCALE * 0.95) for s, r in H100.attn_bwd_full),
)

HARDWARE = {"h100": H100, "a100": A100}


def _interp(table, block_len):
    """Log-linear interpolation of a (block_len, rate) table, clamped at both ends."""
    if block_len <= table[0][0]:
        # Below the smallest measured size efficiency keeps falling roughly linearly with length.
        return table[0][1] * max(block_len, 1) / table[0][0]
    for (s0, r0), (s1, r1) in zip(table, table[1:]):
        if block_len <= s1:
            t = (math.log(block_len) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return r0 + t * (r1 - r0)
    return table[-1][1]


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @property
    def params_per_layer(self) -> int:
        h, d = self.hidden, self.head_dim
        attn = h * (self.heads + 2 * self.kv_heads) * d + self.heads * d * h
        return attn + 3 * h * self.ffn + 2 * h

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + 2 * self.vocab * self.hidden + self.hidden

    @classmethod
    def from_config(cls, name: str, cfg) -> "Model":
        """The shapes of an engine `models.ModelConfig`."""
        return cls(name, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.ffn_hidden_size, cfg.vocab_size)


# The engine's presets of the published configs (docs/design.md section 13, 'Model shapes').
MODELS = {name: Model.from_config(name, get_config(name)) for name in ("llama2_7b", "llama3_8b", "qwen2_7b")}


@dataclass(frozen=True)
class Strategy:
    """A layout of one model replica: G = ring * ulysses * tp GPUs."""

    name: str
    ring: int = 1
    ulysses: int = 1
    tp: int = 1

    @property
    def gpus(self) -> int:
        return self.ring * self.ulysses * self.tp


def strategies(gpus: int, model: Model, gpus_per_node: int = 8) -> dict[str, Strategy]:
    """The four layouts of docs/design.md section 3 for `gpus` GPUs (Ulysses-only when heads allow)."""
    inner = min(gpus_per_node, gpus)
    out = {
        "ring": Strategy("ring-only", ring=gpus),
        "megatron_cp_tp": Strategy("Megatron CP+TP", tp=inner, ring=gpus // inner),
        "mmsp_2d": Strategy("MM-SP 2D", ulysses=inner, ring=gpus // inner),
    }
    if model.heads % gpus == 0:
        out["ulysses"] = Strategy("Ulysses-only", ulysses=gpus)
    return out


@dataclass
class Calibration:
    """Free parameters fitted against published throughputs (see projection.calibrate)."""

    gemm_eff: float = 0.65  # fraction of dense peak the GEMMs reach
    attn_eff: float = 1.0  # multiplier on the FlashAttention-3 rates (kernel in a training step)
    ring_step_overhead: float = 20e-6  # launch + synchronisation per ring step, s


def communication_bytes(model: Model, seq_len: int, strat: Strategy, dtype_bytes: int = 2,
                        activation_checkpointing: bool = False) -> dict:
    """Bytes one GPU sends per layer, forward + backward, by collective.

    Matches what the engine's counters record: the ring sends its K/V block at the K/V head count
    (R-1 times forward, R-1 times backward, plus R shifts of the float32 dK/dV); Ulysses sends the
    (U-1)/U foreign part of q, k, v, out forward and of their gradients backward; TP all-reduces
    (ring algorithm, 2(t-1)/t of the buffer) the attention and MLP outputs forward and their input
    gradients backward.
    """
    tokens = seq_len / (strat.ring * strat.ulysses)  # per GPU before the all-to-all
    ring_tokens = seq_len / strat.ring  # per ring rank (what one ring step carries)
    kv_heads = model.kv_heads / strat.tp
    heads = model.heads / strat.tp
    d = model.head_dim
    kv_heads_ring = max(kv_heads / strat.ulysses, 1)  # replicated when U > H_kv
    heads_ring = heads / strat.ulysses
    kv_block = 2 * ring_tokens * kv_heads_ring * d * dtype_bytes
    ring_fwd = (strat.ring - 1) * kv_block
    # Backward: R-1 K/V shifts again, and R shifts of the float32 dK/dV accumulators (they travel with
    # their K/V; the R-th brings them home). Counted by the engine on the 'ring' axis (test_costmodel).
    ring_bwd = (strat.ring - 1) * kv_block + (strat.ring * kv_block * 4 / dtype_bytes if strat.ring > 1 else 0)
    u = strat.ulysses
    # K/V enter the all-to-all at max(H_kv, U) heads: replicated first when U > H_kv.
    a2a_elems = tokens * (2 * heads + 2 * max(kv_heads, u)) * d * (u - 1) / u
    a2a = 2 * a2a_elems * dtype_bytes  # forward and backward
    t = strat.tp
    tp_allreduce = 4 * (2 * (t - 1) / t) * (seq_len / strat.ring / strat.ulysses) * model.hidden * dtype_bytes
    if activation_checkpointing:  # the recomputed forward communicates again (the dry run counts it)
        ring_bwd += ring_fwd
        a2a *= 1.5
        tp_allreduce *= 1.5
    return {"ring_fwd": ring_fwd, "ring_bwd": ring_bwd, "ring_block": kv_block, "ulysses_a2a": a2a,
            "tp_allreduce": tp_allreduce, "heads_ring": heads_ring, "kv_heads_ring": kv_heads_ring}


def tp_head_bytes(model: Model, seq_len: int, strat: Strategy, dtype_bytes: int = 2) -> float:
    """Bytes one GPU sends on the tp axis per step outside the layers: the vocab-parallel embedding's
    forward all-reduce and the output head's input-gradient all-reduce (tokens x hidden each), the
    cross-entropy's per-token max and (sum-exp, target) all-reduces in float32, and the clipping norm's
    one float32."""
    t = strat.tp
    if t == 1:
        return 0.0
    tokens = seq_len / (strat.ring * strat.ulysses)
    return 2 * (t - 1) / t * (2 * tokens * model.hidden * dtype_bytes + 3 * tokens * 4 + 4)


def step_time(model: Model, seq_len: int, strat: Strategy, hw: Hardware, cal: Calibration,
              gemm_peak: float | None = None) -> dict:
    """Seconds per training step of one replica (batch 1, seq_len tokens), with the breakdown."""
    g = strat.gpus
    npn = hw.gpus_per_node
    peak = gemm_peak or hw.peak_bf16
    tokens_gpu = seq_len / g
    # Dense layers: 6 FLOPs per parameter per token (forward 2, backward 4), split over all GPUs.
    gemm_flops = 6 * model.params_per_layer * seq_len / g
    t_gemm = gemm_flops / (peak * cal.gemm_eff)
    comm = communication_bytes(model, seq_len, strat)
    heads_ring = comm["heads_ring"]
    ring_tokens = seq_len / strat.ring
    # Attention: zigzag gives each ring rank equal causal work; one ring step is one block pair.
    chunk = ring_tokens / 2  # zigzag chunk: the block length a kernel launch actually runs over
    fwd_total = attention_flops(seq_len, seq_len, 1, model.head_dim, causal=True) * heads_ring / strat.ring
    bwd_total = fwd_total * 2.5
    rate_fwd = _interp(hw.attn_fwd_full, chunk) * cal.attn_eff
    rate_bwd = _interp(hw.attn_bwd_full, chunk) * cal.attn_eff
    rate_diag = _interp(hw.attn_fwd_causal, chunk) * cal.attn_eff
    steps = strat.ring
    diag_share = 1.0 / (2 * steps) if steps > 1 else 1.0  # the diagonal (causal) block of step 0
    fwd_step = fwd_total * (1 - diag_share) / max(steps - 1, 1)
    bwd_step = bwd_total * (1 - diag_share) / max(steps - 1, 1)
    t_fwd_diag = fwd_total * diag_share / rate_diag
    t_bwd_diag = bwd_total * diag_share / (rate_bwd * rate_diag / rate_fwd)
    crosses = strat.ring > 1 and strat.gpus > npn
    ring_bw = hw.ib_bw if crosses else hw.nvlink_p2p
    ring_lat = hw.lat_inter if crosses else hw.lat_intra
    t_ring = t_fwd_diag + t_bwd_diag
    exposed_ring = 0.0
    if steps > 1:
        xfer_f = comm["ring_fwd"] / (steps - 1) / ring_bw + ring_lat
        xfer_b = comm["ring_bwd"] / (steps - 1) / ring_bw + ring_lat
        comp_f, comp_b = fwd_step / rate_fwd, bwd_step / rate_bwd
        per_f = max(comp_f, xfer_f) + cal.ring_step_overhead
        per_b = max(comp_b, xfer_b) + cal.ring_step_overhead
        t_ring += (steps - 1) * (per_f + per_b)
        exposed_ring = (steps - 1) * (per_f - comp_f + per_b - comp_b)
    a2a_bw = hw.nvlink_busbw if strat.ulysses * strat.tp <= npn else hw.ib_bw
    t_a2a = comm["ulysses_a2a"] / a2a_bw if strat.ulysses > 1 else 0.0
    t_tp = comm["tp_allreduce"] / hw.nvlink_busbw if strat.tp > 1 else 0.0
    per_layer = t_gemm + t_ring + t_a2a + t_tp
    # LM head + embedding: 6 * vocab * hidden FLOPs per token, split over G (vocab-parallel or SP).
    t_head = 6 * model.vocab * model.hidden * tokens_gpu / (peak * cal.gemm_eff)
    total = model.layers * per_layer + t_head
    return {"step_s": total, "gemm_s": model.layers * t_gemm, "attn_s": model.layers * (t_ring - exposed_ring),
            "ring_exposed_s": model.layers * exposed_ring, "a2a_s": model.layers * t_a2a,
            "tp_s": model.layers * t_tp, "head_s": t_head,
            "ring_overlapped": exposed_ring <= 0.05 * max(t_ring, 1e-30),
            "ring_link": "infiniband" if crosses else "nvlink"}


def model_flops(model: Model, seq_len: int, causal_attention: bool = True) -> float:
    """Model FLOPs of one training step (3x forward), the MFU convention of docs/design.md section 13."""
    dense = 6 * (model.layers * model.params_per_layer + model.vocab * model.hidden) * seq_len
    attn_fwd = attention_flops(seq_len, seq_len, model.heads, model.head_dim, causal=causal_attention)
    return dense + 3 * model.layers * attn_fwd


def activation_bytes_per_token(model: Model, dtype_bytes: int = 2, ulysses: int = 1, tp: int = 1) -> float:
    """Bytes of activations one decoder layer keeps for backward per local token (no checkpointing).

    What autograd keeps in one `models.Transformer` layer, checked against the dry run
    (longvila_engine/dryrun/, tests/test_costmodel.py): the attention-norm input and output, q/k/v in
    the ring layout (K/V at max(H_kv, U) heads per token: replicated when U > H_kv), the attention output
    and its float32 log-sum-exp, the O-projection input, the MLP-norm input and output, gate, up,
    silu(gate) and their product. RMSNorm keeps its input and a float32 rstd (CUDA's fused kernel); the
    RoPE rotation keeps nothing (cos/sin are shared by all layers). Heads and FFN columns are per tp rank.
    """
    h, d = model.hidden, model.head_dim
    heads, kv = model.heads / tp, model.kv_heads / tp
    kv_saved = max(kv, ulysses) if ulysses > 1 else kv
    norms = 4 * h
    attention = (heads + 2 * kv_saved) * d + 2 * heads * d
    mlp = 4 * model.ffn / tp
    return (norms + attention + mlp) * dtype_bytes + 4 * heads + 8


def attention_backward_bytes_per_token(model: Model, dtype_bytes: int = 2, ulysses: int = 1, tp: int = 1) -> float:
    """Working set of one layer's sequence-parallel attention backward per local token: the incoming
    gradient, dout, the float32 dq, three float32 dK/dV pairs (this step's, the accumulator, the one in
    flight on the ring) and dq/dk/dv cast back to the compute dtype."""
    h, d = model.hidden, model.head_dim
    heads = model.heads / tp
    kv = max(model.kv_heads / tp, ulysses) if ulysses > 1 else model.kv_heads / tp
    return (h + heads * d + (heads + 2 * kv) * d) * dtype_bytes + (heads * d + 3 * 2 * kv * d) * 4


def memory_breakdown(model: Model, seq_len: int, strat: Strategy, dp: int = 1, dtype_bytes: int = 2,
                     ce_chunk_bytes: int = 1 << 28) -> dict:
    """Peak bytes per GPU by the dry run's categories, at the start of backward (where it peaks).

    FSDP2 over dp*ring*ulysses ranks of float32 master weights (params 4 B, AdamW 8 B per parameter of
    this tp rank, gradients not yet reduce-scattered: 0 at the peak); activations of seq_len/(ring*U)
    tokens in every layer plus the embedding output and final-norm input; temporaries: the root's
    gathered embedding and head (compute dtype; kept from forward to backward), one block's all-gather
    buffer, the head's weight gradient in compute dtype and its float32 copy for the reduce-scatter, two
    chunks of float32 logits (`ce_chunk_bytes`, the cross-entropy's ~256 MB chunk) and the float32
    gradient of the final hidden states.
    """
    shard = dp * strat.ring * strat.ulysses
    tp = strat.tp
    params_rank = model.params / tp
    tokens = seq_len / (strat.ring * strat.ulysses)
    h, v = model.hidden, model.vocab / tp
    acts = model.layers * tokens * activation_bytes_per_token(model, dtype_bytes, strat.ulysses, tp)
    acts += tokens * (2 * h * dtype_bytes + 2 * model.head_dim * 4 + 24)
    head = (2 * v * h + h) * dtype_bytes + model.params_per_layer / tp * dtype_bytes
    # The peak is either where the output head's backward runs (its weight gradient, logits chunks) or
    # in the first layer's backward (its attention's float32 dq and dK/dV accumulators in flight).
    at_head = v * h * (dtype_bytes + 4) + 2 * min(ce_chunk_bytes, tokens * v * 4) + tokens * h * 4
    at_layer = tokens * attention_backward_bytes_per_token(model, dtype_bytes, strat.ulysses, tp)
    temps = head + max(at_head, at_layer)
    out = {"params": 4 * params_rank / shard, "grads": 0.0, "optimizer": 8 * params_rank / shard,
           "activations": acts, "temporaries": temps}
    out["total"] = sum(out.values())
    return out


def memory_per_gpu(model: Model, seq_len: int, gpus: int, dtype_bytes: int = 2, logits_chunk: int = 4096) -> dict:
    """Peak bytes per GPU of MM-SP 2D (ulysses min(8, G), ring G/ulysses) by `memory_breakdown`, with the
    old keys kept: state (params + optimizer), activations, logits (temporaries), total."""
    ulysses = min(8, gpus)
    b = memory_breakdown(model, seq_len, Strategy("MM-SP 2D", ring=gpus // ulysses, ulysses=ulysses),
                         dtype_bytes=dtype_bytes)
    return {"state": b["params"] + b["optimizer"] + b["grads"], "activations": b["activations"],
            "logits": b["temporaries"], "total": b["total"]}


def longest_sequence(model: Model, gpus: int, hw: Hardware, usable: float = 0.9) -> int:
    """Longest sequence (multiple of 1024 tokens) whose memory fits `usable` of HBM per GPU."""
    budget = usable * hw.hbm_bytes
    lo, hi = 0, 1 << 30
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        if mid <= lo:
            break
        if memory_per_gpu(model, mid, gpus)["total"] <= budget:
            lo = mid
        else:
            hi = mid
    return lo
