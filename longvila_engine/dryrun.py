"""Scale dry run: the trainer's own training step as one rank of a fake world, without GPUs or memory.

    python -m longvila_engine.dryrun --model llama3_8b --seq-len 2M --world 256 --ring 32 --ulysses 8
    python -m longvila_engine.dryrun --sweep [--json out.jsonl]

One call runs ONE training step of `longvila_engine.train` (its `build_model`, FSDP2 sharding of
`fsdp.shard_model`, `build_optimizer`, `local_batch`, `train_step`: forward with sequence-parallel
attention, loss, backward, FSDP reduce-scatter, clipping, AdamW) on rank `--rank` of a world of
`--world` ranks made of PyTorch's fake process group (collectives move no data; an all-gather hands
every rank its own input) under `FakeTensorMode` (tensors have shapes, dtypes and devices, no
storage). It measures, for that rank:

| what | tool |
|---|---|
| peak memory by category | `torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` (categories regrouped below) |
| FLOPs | `torch.utils.flop_counter.FlopCounterMode`, with formulas for the engine's attention ops |
| bytes per axis | `groups.stats` (the engine's own counters), FSDP's collectives from the dispatched c10d ops |
| attention backend of every call | the custom / aten attention ops dispatched |
| host syncs inside the step | `aten._local_scalar_dense` (`.item()`, `.tolist()`, `float()`) dispatched |

and prints them next to the cost model (benchmarks/costmodel.py) when it is importable.

Memory categories (FSDPMemTracker's, regrouped): params = sharded parameters; grads = sharded +
unsharded gradients; optimizer = AdamW state; activations = tensors made in forward and alive at the
peak; temporaries = everything else alive at the peak (backward temporaries, FSDP's all-gathered
unsharded parameters and its all-gather / reduce-scatter buffers, inputs). The peak is that of a
steady-state step: the optimizer state exists before the measured step (one AdamW step on zero
gradients first), as it does from step 2 of a real run.

Precision: `precision="gpu"` (default) is what the trainer does on CUDA: float32 sharded master weights
and optimizer state, bf16 compute through FSDP2's MixedPrecisionPolicy, float32 gradient reduction.
`precision="cpu"` is what it does on CPU (float32 everywhere): used to hold the dry run against real
gloo runs (tests/test_dryrun.py).

Depth: `layers=` runs the model with fewer decoder layers. Every category is then measured at two
depths and extrapolated linearly to the preset's depth (per-layer activations, parameters, gradients
and optimizer state are the same in every layer; the test checks the extrapolation against a full-depth
run). The sweep uses it to stay within minutes on 2 cores.

Deliberately not here: real kernels or data (nothing is computed), timing of the step (the fake step's
wall time is the dry run's own cost, not a GPU's), and a backward on fake CUDA tensors (this CPU torch
build cannot run autograd on them; see `fake_cuda_forward`).

Work-arounds, scoped to the dry run and reported in its output when used: the sequence-parallel
agreement all-gather, if a layer still makes one inside the step, is answered locally (in a fake world
every peer would report exactly this rank's fields anyway); the trainer's end-of-step `float(loss)`
(logging, after `optimizer.step()`) is reported as a host sync and the step counted complete.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

__all__ = [
    "DryRunConfig",
    "dry_run",
    "dry_run_extrapolated",
    "parse_tokens",
    "attention_flop_formulas",
    "fake_cuda_forward",
    "sweep",
    "main",
]

GiB = float(2**30)
HBM_BYTES = 80 * 2**30  # an 80 GB H100 / A100 (80 GiB of HBM)
USABLE = 0.9  # fits: peak <= 90% of HBM (72 GiB)
CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries")


def parse_tokens(text) -> int:
    """'2M' -> 2097152, '256K' -> 262144, '4096' -> 4096 (binary K/M)."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().upper()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
        digits = s[:-1] if mult > 1 else s
        try:
            value = int(float(digits) * mult)
        except ValueError:
            raise ValueError(f"seq_len={text!r} is not a token count; write e.g. 4096, 256K or 2M") from None
    if value < 1:
        raise ValueError(f"seq_len={text!r} must be >= 1 token")
    return value


@dataclasses.dataclass(frozen=True)
class DryRunConfig:
    """One dry-run configuration (world = dp * ring * ulysses * tp; dp is derived)."""

    model: str = "llama3_8b"
    seq_len: int = 2 * 2**20
    world: int = 256
    ring: int = 32
    ulysses: int = 8
    tp: int = 1
    rank: int = 0
    gpus_per_node: int = 8
    fsdp: str = "auto"
    activation_checkpointing: bool = False
    precision: str = "gpu"
    layers: int | None = None
    attention_backend: str = "auto"
    reshard_after_forward: bool = True

    def __post_init__(self):
        from .models.config import PRESETS

        if self.model not in PRESETS:
            raise ValueError(f"model={self.model!r} is unknown; choose one of {sorted(PRESETS)}")
        for name in ("seq_len", "world", "ring", "ulysses", "tp", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        inner = self.ring * self.ulysses * self.tp
        if self.world % inner:
            raise ValueError(f"world={self.world} is not a multiple of ring*ulysses*tp={inner}; pass a world "
                             f"that is, e.g. --world {inner}")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank} must be in [0, world={self.world})")
        if self.fsdp not in ("auto", "on", "off"):
            raise ValueError(f"fsdp={self.fsdp!r} must be auto, on or off")
        if self.precision not in ("gpu", "cpu"):
            raise ValueError(f"precision={self.precision!r} must be 'gpu' (fp32 master, bf16 compute) or "
                             f"'cpu' (fp32)")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise ValueError(f"layers={self.layers!r} must be None (the preset's depth) or an integer >= 1")

    @property
    def dp(self) -> int:
        return self.world // (self.ring * self.ulysses * self.tp)


# --- FLOP formulas for the engine's attention operators ----------------------------------------------------
def _pairs(q, k, causal, cu_q, cu_k) -> tuple[int, bool]:
    """(visible pairs per head, exact?) of one block call; fake cu_seqlens give the dense worst case."""
    from torch._subclasses.fake_tensor import FakeTensor

    from .ops.flops import visible_pairs

    B, S_q, S_k = q.shape[0], q.shape[1], k.shape[1]
    if cu_q is None:
        return B * visible_pairs(S_q, S_k, causal), True
    if isinstance(cu_q, FakeTensor) or isinstance(cu_k, FakeTensor):
        return visible_pairs(S_q, S_k, causal), False
    a, b = cu_q.tolist(), cu_k.tolist()
    return sum(visible_pairs(a[i + 1] - a[i], b[i + 1] - b[i], causal) for i in range(len(a) - 1)), True


INEXACT_CALLS = {"count": 0}


def _attn_fwd_flops(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, resume, *args,
                    out_val=None, **kwargs) -> int:
    # ops.flops rule: QK^T and PV, 4*D FLOPs per visible pair and query head.
    pairs, exact = _pairs(q, k, causal, cu_seqlens_q, cu_seqlens_k)
    INEXACT_CALLS["count"] += 0 if exact else 1
    return 4 * q.shape[3] * q.shape[2] * pairs


def _attn_bwd_flops(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal,
                    accumulate, *args, out_val=None, **kwargs) -> int:
    # ops.flops rule: flash-style backward recomputes QK^T: 10*D FLOPs per visible pair and query head.
    pairs, exact = _pairs(q, k, causal, cu_seqlens_q, cu_seqlens_k)
    INEXACT_CALLS["count"] += 0 if exact else 1
    return 10 * q.shape[3] * q.shape[2] * pairs


def attention_flop_formulas() -> dict:
    """{op packet: raw flop formula} for FlopCounterMode(custom_mapping=...): the engine's C++ attention
    operators (and the Triton ones where they are registered as torch.library ops with the same
    argument order), counted by the rule of `ops.flops.attention_flops`."""
    formulas = {}
    for fn in (_attn_fwd_flops, _attn_bwd_flops):
        fn._get_raw = True
    try:
        from ._extension import extension_available

        have_ext = extension_available()
    except Exception:  # noqa: BLE001 - no extension: nothing of ours to count
        have_ext = False
    if have_ext:
        ns = torch.ops.longvila_engine
        formulas[ns.attn_fwd] = _attn_fwd_flops
        formulas[ns.attn_bwd] = _attn_bwd_flops
    try:  # the Triton launchers' torch.library ops (same argument order as the C++ ones)
        from .kernels.triton import attention_bwd, attention_fwd  # noqa: F401

        formulas[torch.ops.longvila_engine.triton_attn_fwd] = _attn_fwd_flops
        formulas[torch.ops.longvila_engine.triton_attn_bwd] = _attn_bwd_flops
    except (ImportError, AttributeError, RuntimeError):  # no triton here, or an older tree without the ops
        pass
    return formulas


# --- what the step dispatched --------------------------------------------------------------------------------
_ATTENTION_OPS = {
    "longvila_engine::attn_fwd": "cpu",
    "longvila_engine::attn_bwd": "cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "aten",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "aten",
    "aten::_scaled_dot_product_flash_attention": "aten",
    "aten::_scaled_dot_product_flash_attention_backward": "aten",
    "aten::_scaled_dot_product_efficient_attention": "aten",
    "aten::_scaled_dot_product_efficient_attention_backward": "aten",
    "aten::_scaled_dot_product_cudnn_attention": "aten",
    "aten::_flash_attention_forward": "aten",
    "aten::_flash_attention_backward": "aten",
}
_COLLECTIVE_BYTES = {  # c10d op -> index of the argument whose bytes leave this rank (x (p-1)/p or p-1)
    "c10d::_allgather_base_": 1,
    "c10d::allgather_into_tensor_coalesced_": 1,
    "c10d::_reduce_scatter_base_": 1,
    "c10d::reduce_scatter_tensor_coalesced_": 1,
}


def _op_name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


def _attention_backend(name: str) -> str | None:
    if name in _ATTENTION_OPS:
        return _ATTENTION_OPS[name]
    if "triton" in name and ("attn" in name or "attention" in name):
        return "triton"
    return None


class _StepRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts, per op, the attention calls (by backend), host syncs (`_local_scalar_dense`, with where
    they came from) and the FSDP collectives' bytes, while passing every op through unchanged."""

    def __init__(self):
        super().__init__()
        self.attention: dict[str, int] = {}
        self.host_syncs: list[str] = []
        self.collective_bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        backend = _attention_backend(name)
        if backend is not None:
            key = f"{backend}: {name}"
            self.attention[key] = self.attention.get(key, 0) + 1
        if name == "aten::_local_scalar_dense":
            self.host_syncs.append(_caller())
        if name in _COLLECTIVE_BYTES:
            t = args[_COLLECTIVE_BYTES[name]]
            tensors = t if isinstance(t, (list, tuple)) else [t]
            nbytes = sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))
            self.collective_bytes[name] = self.collective_bytes.get(name, 0) + nbytes
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """file:line of the innermost engine frame on the stack (where a host sync came from)."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        if "longvila_engine" in frame.filename and os.path.abspath(frame.filename) != here:
            return f"{os.path.relpath(frame.filename, os.path.dirname(os.path.dirname(here)))}:{frame.lineno}"
    return "outside longvila_engine"


@contextlib.contextmanager
def _local_agreement(record: list):
    """Answer an in-step agreement all-gather locally (only where a layer still makes one).

    In a fake world every peer reports exactly this rank's fields (the fake all-gather copies the input
    to every output), so the agreement can only pass or raise this rank's own error; but its `.tolist()`
    of a fake tensor has no data. Plans made before the step (plan-once) never reach this."""
    patched = []
    try:
        from .attention import _agree
    except ImportError:
        yield
        return
    original = getattr(_agree, "agree", None)

    def agree_locally(groups, axis, fields, local_error, what):
        record.append(what)
        if local_error:
            raise ValueError(local_error)

    for name, module in list(sys.modules.items()):
        if name.startswith("longvila_engine.") and original is not None and getattr(module, "agree", None) is original:
            module.agree = agree_locally
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            module.agree = original


# --- RMSNorm as CUDA keeps it ---------------------------------------------------------------------------------
class _RMSNormSavingInput(torch.autograd.Function):
    """F.rms_norm with what CUDA's fused kernel (`aten::_fused_rms_norm`) keeps for backward: the input
    and a float32 rstd per row. On CPU, rms_norm is composite: autograd there keeps the float32 upcast
    of the input and the float32 normalised rows (2 x 4 bytes per element instead of 2 bytes): a CPU
    dispatch artefact that would inflate a GPU estimate by ~64 KB per token and layer at hidden 4096."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            x32 = x.to(acc)
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
            y = (x32 * rstd).to(x.dtype)
            if weight is not None:
                y = y * weight
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        g = dy.to(rstd.dtype) * (weight.to(rstd.dtype) if weight is not None else 1.0)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = None
        if weight is not None:
            dw = (dy.to(rstd.dtype) * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), None, dw, None


def _rms_norm_saving_input(x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        raise ValueError(f"normalized_shape={tuple(normalized_shape)}: the dry run's RMSNorm normalises the "
                         f"last dim only")
    return _RMSNormSavingInput.apply(x, normalized_shape, weight, eps)


@contextlib.contextmanager
def _cuda_rms_norm(enabled: bool):
    """Within the dry run (precision='gpu'): torch.nn.functional.rms_norm keeps what CUDA keeps."""
    import torch.nn.functional as F

    original = F.rms_norm
    if enabled:
        F.rms_norm = _rms_norm_saving_input
    try:
        yield
    finally:
        F.rms_norm = original


# --- the step ------------------------------------------------------------------------------------------------
def _train_args(cfg: DryRunConfig):
    from . import train

    argv = ["--model", cfg.model, "--seq-len", str(cfg.seq_len), "--ring", str(cfg.ring), "--ulysses",
            str(cfg.ulysses), "--tp", str(cfg.tp), "--gpus-per-node", str(cfg.gpus_per_node),
            "--attention-backend", cfg.attention_backend, "--dtype", "float32"]
    if cfg.activation_checkpointing:
        argv.append("--activation-checkpointing")
    args = train.parse_args(argv)
    args.fsdp = "off"  # sharded below, with the precision of the device the dry run stands for
    args.reshard_after_forward = cfg.reshard_after_forward
    return args


def _use_fsdp(cfg: DryRunConfig, groups) -> bool:
    return cfg.fsdp == "on" or (cfg.fsdp == "auto" and groups.dp_sp_size > 1)


def _shard(model, groups, cfg: DryRunConfig) -> None:
    compute = torch.bfloat16 if cfg.precision == "gpu" else None
    try:
        from .fsdp import shard_model
    except ImportError:  # before the FSDP module existed: the same per-block fully_shard
        shard_model = None
    if shard_model is not None:
        shard_model(model, groups, reshard_after_forward=cfg.reshard_after_forward, compute_dtype=compute)
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(groups)
    policy = (MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute
              else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for unit in [*model.layers, model]:
        unit.set_gradient_divide_factor(float(groups.dp_size))


_MESHES: dict = {}


def _mesh(groups):
    """The dp_sp DeviceMesh, made OUTSIDE FakeTensorMode (DeviceMesh reads its rank map with .tolist())."""
    try:
        from .fsdp import dp_sp_mesh

        return dp_sp_mesh(groups)
    except ImportError:
        from torch.distributed.device_mesh import DeviceMesh

        if id(groups) not in _MESHES:
            _MESHES[id(groups)] = DeviceMesh.from_group(groups.dp_sp, "cpu")
        return _MESHES[id(groups)]


def _regroup(snapshot: dict) -> dict:
    """FSDPMemTracker categories -> params / grads / optimizer / activations / temporaries (bytes)."""
    by_name = {getattr(k, "value", str(k)): int(v) for k, v in snapshot.items()}
    out = {
        "params": by_name.get("Sharded Param", 0) + by_name.get("Parameter", 0) + by_name.get("Buffer", 0),
        "grads": by_name.get("Sharded Grad", 0) + by_name.get("Unsharded Grad", 0) + by_name.get("Gradient", 0),
        "optimizer": by_name.get("OptState", 0) + by_name.get("Optstate", 0),
        "activations": by_name.get("Activation", 0),
    }
    out["total"] = by_name.get("Total", 0)
    out["temporaries"] = out["total"] - sum(out[k] for k in ("params", "grads", "optimizer", "activations"))
    out["detail"] = {k: v for k, v in by_name.items() if k != "Total"}
    return out


def _init_fake_world(cfg: DryRunConfig):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .parallel import ParallelLayout, init_parallel

    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised in this process; the dry run makes its own "
                         "fake world: run it in a fresh process (python -m longvila_engine.dryrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=cfg.rank, world_size=cfg.world)
    layout = ParallelLayout(dp=cfg.dp, ring=cfg.ring, ulysses=cfg.ulysses, tp=cfg.tp,
                            gpus_per_node=cfg.gpus_per_node)
    return init_parallel(layout, timeout=60)


def model_config(cfg: DryRunConfig):
    """The preset's ModelConfig, at `cfg.layers` decoder layers when given."""
    from .models import get_config

    config = get_config(cfg.model)
    return config if cfg.layers is None else config.replace(num_layers=cfg.layers)


def plan_batch(cfg: DryRunConfig, groups):
    """This rank's LocalBatch (and its plan) of one global sample, on real tensors: batch planning happens
    before the step and outside fake mode (the ids are S int64 values, 16 MB at 2M tokens)."""
    from .models import local_batch

    return local_batch(torch.zeros(1, cfg.seq_len, dtype=torch.long, device=groups.device), groups)


def build_state(cfg: DryRunConfig, groups):
    """(model, optimizer) as the trainer builds them (`train.build_model` options, `fsdp.shard_model`,
    `train.build_optimizer`), in steady state: AdamW's state exists (one step on zero gradients).

    Runs under FakeTensorMode in the dry run and on real tensors in the accuracy test, unchanged."""
    from . import train
    from .models import Transformer

    args = _train_args(cfg)
    model = Transformer(model_config(cfg), groups, tp_sequence_parallel=args.tp_sequence_parallel,
                        activation_checkpointing=args.activation_checkpointing,
                        attention_backend=args.attention_backend, ce_chunk_size=args.ce_chunk_size, seed=0,
                        dtype=torch.float32, device=groups.device)
    if _use_fsdp(cfg, groups):
        _shard(model, groups, cfg)
    optimizer = train.build_optimizer(model, 1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def run_step(model, optimizer, batch, groups) -> None:
    """The trainer's step (`train.train_step`, gradient clipping at 1.0)."""
    from . import train

    train.train_step(model, optimizer, batch, groups, grad_clip=1.0, autocast=False)


def dry_run(cfg: DryRunConfig, *, progress=None, count_flops: bool = True) -> dict:
    """Run one training step of `cfg` as rank cfg.rank of a fake world; return the measurements.

    Keys: config, memory (peak bytes by category + detail), fits, flops (counter total, by op,
    attention by the ops.flops rule), bytes (groups.stats per axis, FSDP collectives), attention
    (calls per backend op), host_syncs, agreement_calls_answered_locally, wall_s.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    t_start = time.perf_counter()
    groups = _init_fake_world(cfg)
    try:
        fsdp = _use_fsdp(cfg, groups)
        if fsdp:
            _mesh(groups)
        batch = plan_batch(cfg, groups)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        agreed_locally: list = []
        recorder = _StepRecorder()
        INEXACT_CALLS["count"] = 0
        with mode:
            model, optimizer = build_state(cfg, groups)
            fake_batch = type(batch)(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in batch))
            groups.stats.reset()
            tracker = FSDPMemTracker(model, optimizer) if fsdp else MemTracker()
            if not fsdp:
                tracker.track_external(model, optimizer)
            counter = (FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) if count_flops
                       else contextlib.nullcontext())
            logging_sync = None
            with _local_agreement(agreed_locally), _cuda_rms_norm(cfg.precision == "gpu"), tracker, counter, \
                    recorder:
                at_start = _regroup(next(iter(tracker.get_tracker_snapshot("current").values()), {}))["total"]
                try:
                    run_step(model, optimizer, fake_batch, groups)
                except DataDependentOutputException:
                    where = _caller_of_exception()
                    if not where.startswith("longvila_engine/train.py"):
                        raise
                    logging_sync = where
            snapshot = tracker.get_tracker_snapshot("peak")
        if progress is not None:
            progress.update(1)
        dev_snap = next(iter(snapshot.values())) if snapshot else {}
        memory = _regroup(dev_snap)
        flops = ({str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
                 if count_flops else {})
        result = {
            "config": dataclasses.asdict(cfg) | {"dp": cfg.dp, "num_layers": model_config(cfg).num_layers},
            "tokens_local": int(batch.input_ids.numel()),
            "memory": memory,
            "memory_at_start": at_start,
            "fits": memory["total"] <= USABLE * HBM_BYTES,
            "flops": {"total": int(counter.get_total_flops()) if count_flops else 0, "by_op": flops,
                      "attention_counted": sum(v for k, v in flops.items() if "longvila_engine" in k
                                               or "attention" in k),
                      "attention_rule": attention_rule_flops(cfg, model_config(cfg)),
                      "inexact_attention_calls": INEXACT_CALLS["count"]},
            "bytes": {"groups_stats": {k: v["bytes"] for k, v in groups.stats.summary().items()},
                      "fsdp_collectives": dict(recorder.collective_bytes)},
            "attention": dict(recorder.attention),
            "host_syncs": recorder.host_syncs + ([f"{logging_sync} (train_step logging, after optimizer.step)"]
                                                 if logging_sync else []),
            "agreement_calls_answered_locally": len(agreed_locally),
            "fsdp": fsdp,
        }
    finally:
        dist.destroy_process_group()
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _caller_of_exception() -> str:
    tb = traceback.extract_tb(sys.exc_info()[2])
    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))
    for frame in reversed(tb):
        if "longvila_engine" in frame.filename and os.path.abspath(frame.filename) != here:
            return f"{os.path.relpath(frame.filename, root)}:{frame.lineno}"
    return "outside longvila_engine"


def attention_rule_flops(cfg: DryRunConfig, config) -> int:
    """This rank's attention FLOPs of one step by the ops.flops rule (forward 4D + backward 10D per
    visible pair and head): zigzag gives every ring rank S(S+1)/(2R) causal pairs of the padded global
    sequence, on the H/(tp*U) heads Ulysses leaves it."""
    from .ops.flops import attention_flops

    heads = config.num_heads // (cfg.tp * cfg.ulysses)
    S = _padded(cfg)
    fwd_bwd = attention_flops(S, S, heads, config.head_dim, causal=True, mode="fwd_bwd") // cfg.ring
    recompute = attention_flops(S, S, heads, config.head_dim, causal=True, mode="fwd") // cfg.ring
    return config.num_layers * (fwd_bwd + (recompute if cfg.activation_checkpointing else 0))


def _padded(cfg: DryRunConfig) -> int:
    m = 2 * cfg.ring * cfg.ulysses
    return -(-cfg.seq_len // m) * m


# --- depth extrapolation -----------------------------------------------------------------------------------
def dry_run_extrapolated(cfg: DryRunConfig, depths=(2, 3), *, progress=None, count_flops=True) -> dict:
    """Measure at two depths and extrapolate every memory category, the FLOPs and the bytes linearly to
    the preset's depth: value(L) = value(a) + (L - a) * (value(b) - value(a)) / (b - a).

    Valid when the peak falls at the same point of the step at both depths and that point is where the
    activations of every layer are alive (the start of backward): then only per-layer terms differ.
    Checked: every category that is not per-layer (anything but activations, sharded parameters,
    optimizer state) agrees between the two runs to 1% of the peak, and the activations grow with depth.
    Otherwise (e.g. the peak sits at the final reduce-scatter while activations are small) the pair is
    moved deeper (a, a+1) -> (2a, 2a+1) until it holds, and the preset's full depth runs when no pair
    short of it does; `extrapolated_from_layers` says which pair was used (absent for a full run)."""
    full = get_preset_depth(cfg)
    a, b = depths
    per_layer = {"Activation", "Sharded Param", "OptState", "Parameter", "Optstate"}
    tried = []
    while b < full:
        runs = [dry_run(dataclasses.replace(cfg, layers=d), progress=progress, count_flops=count_flops)
                for d in (a, b)]
        da, db = runs[0]["memory"]["detail"], runs[1]["memory"]["detail"]
        moved = [k for k in set(da) | set(db) if k not in per_layer
                 and abs(da.get(k, 0) - db.get(k, 0)) > 0.01 * runs[1]["memory"]["total"]]
        grows = db.get("Activation", 0) > da.get("Activation", 0)
        if not moved and grows:
            break
        tried.append({"layers": [a, b], "moved": sorted(moved), "activations_grow": grows,
                      "wall_s": sum(r["wall_s"] for r in runs)})
        a, b = 2 * a, 2 * a + 1
    else:
        out = dry_run(dataclasses.replace(cfg, layers=None), progress=progress, count_flops=count_flops)
        out["extrapolation_refused"] = tried
        out["wall_s"] += sum(t["wall_s"] for t in tried)
        return out

    def line(va, vb):
        return int(round(va + (full - a) * (vb - va) / (b - a)))

    out = dict(runs[1])
    out["config"] = dict(runs[1]["config"], layers=None, num_layers=full)
    mem = {k: line(runs[0]["memory"][k], runs[1]["memory"][k]) for k in (*CATEGORIES, "total")}
    mem["detail"] = {k: line(da.get(k, 0), db.get(k, 0)) for k in db}
    out["memory"] = mem
    out["memory_at_start"] = line(runs[0]["memory_at_start"], runs[1]["memory_at_start"])
    out["fits"] = mem["total"] <= USABLE * HBM_BYTES
    fa, fb = runs[0]["flops"], runs[1]["flops"]
    out["flops"] = dict(fb, total=line(fa["total"], fb["total"]),
                        attention_counted=line(fa["attention_counted"], fb["attention_counted"]),
                        attention_rule=line(fa["attention_rule"], fb["attention_rule"]), by_op={})
    ba, bb = runs[0]["bytes"], runs[1]["bytes"]
    out["bytes"] = {"groups_stats": {k: line(ba["groups_stats"].get(k, 0), v) for k, v in bb["groups_stats"].items()},
                    "fsdp_collectives": {k: line(ba["fsdp_collectives"].get(k, 0), v)
                                         for k, v in bb["fsdp_collectives"].items()}}
    out["extrapolated_from_layers"] = [a, b]
    if tried:
        out["extrapolation_refused"] = tried
    out["wall_s"] = sum(r["wall_s"] for r in runs) + sum(t["wall_s"] for t in tried)
    return out


def get_preset_depth(cfg: DryRunConfig) -> int:
    from .models import get_config

    return get_config(cfg.model).num_layers


# --- cost model ------------------------------------------------------------------------------------------
def _costmodel():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks")
    if not os.path.exists(os.path.join(path, "costmodel.py")):
        return None
    if path not in sys.path:
        sys.path.insert(0, path)
    import costmodel

    return costmodel


def cost_model_view(result: dict) -> dict | None:
    """The cost model's figures for the same configuration (None when benchmarks/ is not there)."""
    cm = _costmodel()
    if cm is None:
        return None
    from .models import get_config

    c = result["config"]
    config = get_config(c["model"]).replace(num_layers=c["num_layers"])
    model = cm.Model.from_config(c["model"], config)
    strat = cm.Strategy("dry run", ring=c["ring"], ulysses=c["ulysses"], tp=c["tp"])
    dtype_bytes = 2 if c["precision"] == "gpu" else 4
    comm = cm.communication_bytes(model, c["seq_len"], strat, dtype_bytes=dtype_bytes,
                                  activation_checkpointing=c["activation_checkpointing"])
    L = c["num_layers"]
    view = {"bytes": {"ring": int(L * (comm["ring_fwd"] + comm["ring_bwd"])),
                      "ulysses": int(L * comm["ulysses_a2a"]),
                      "tp": int(L * comm["tp_allreduce"] + cm.tp_head_bytes(model, c["seq_len"], strat, dtype_bytes))},
            "model_flops_per_rank": int(cm.model_flops(model, c["seq_len"]) / c["world"] * c["dp"])}
    view["memory"] = cm.memory_breakdown(model, c["seq_len"], strat, dp=c["dp"], dtype_bytes=dtype_bytes)
    return view


# --- output -------------------------------------------------------------------------------------------------
def _gib(x) -> str:
    return f"{x / GiB:.2f}"


def report(result: dict, cost: dict | None = None) -> str:
    """Human-readable lines of one dry run."""
    c = result["config"]
    m = result["memory"]
    lines = [f"dry run: {c['model']} ({c['num_layers']} layers), seq {c['seq_len']}, world {c['world']} "
             f"(dp {c['dp']} x ring {c['ring']} x ulysses {c['ulysses']} x tp {c['tp']}), rank {c['rank']}, "
             f"fsdp {'on' if result['fsdp'] else 'off'}, precision {c['precision']}, activation checkpointing "
             f"{'on' if c['activation_checkpointing'] else 'off'}, {result['tokens_local']} tokens on this rank"
             + (f" [extrapolated from {result['extrapolated_from_layers']} layers]"
                if result.get("extrapolated_from_layers") else "")]
    lines.append("peak memory GiB: " + ", ".join(f"{k} {_gib(m[k])}" for k in CATEGORIES)
                 + f"; total {_gib(m['total'])} -> {'fits' if result['fits'] else 'does NOT fit'} 90% of 80 GiB "
                 f"({_gib(USABLE * HBM_BYTES)})")
    if cost is not None and "memory" in cost:
        cmm = cost["memory"]
        lines.append("cost model GiB:  " + ", ".join(f"{k} {_gib(v)}" for k, v in cmm.items()
                                                     if isinstance(v, (int, float))))
    f = result["flops"]
    lines.append(f"FLOPs (FlopCounterMode): total {f['total']:.4g}, attention {f['attention_counted']:.4g}; "
                 f"ops.flops rule for attention {f['attention_rule']:.4g}"
                 + (f"; cost model (3x forward) {cost['model_flops_per_rank']:.4g}" if cost else ""))
    b = result["bytes"]
    lines.append("bytes per axis (groups.stats): " + (", ".join(f"{k} {v:.4g}" for k, v in
                                                            sorted(b["groups_stats"].items())) or "none")
                 + ("; cost model: " + ", ".join(f"{k} {v:.4g}" for k, v in cost["bytes"].items()) if cost else "")
                 + "; FSDP collectives: " + (", ".join(f"{k} {v:.4g}" for k, v in b["fsdp_collectives"].items())
                                             or "none"))
    lines.append("attention calls: " + (", ".join(f"{k} x{v}" for k, v in sorted(result["attention"].items()))
                                        or "none"))
    syncs = result["host_syncs"]
    where = {w: syncs.count(w) for w in sorted(set(syncs))}
    lines.append("host syncs inside the step: " + ("none" if not syncs else f"{len(syncs)} ("
                                                   + ", ".join(f"{w} x{n}" for w, n in where.items()) + ")"))
    if result["agreement_calls_answered_locally"]:
        lines.append(f"agreement all-gathers inside the step (answered locally): "
                     f"{result['agreement_calls_answered_locally']}")
    lines.append(f"wall time of the dry run: {result['wall_s']:.1f} s")
    return "\n".join(lines)


_GRAD_ON_FAKE_CUDA = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():
    w = torch.empty(64, 64, device="cuda", requires_grad=True)
    y = torch.empty(8, 64, device="cuda") @ w
print("ok")
"""


def fake_cuda_forward() -> str:
    """Whether forwards on fake CUDA tensors run in this torch build; a one-line verdict.

    Without autograd (no tensor requires grad): RMSNorm, embedding, a matmul and the flash SDPA op that
    returns the log-sum-exp. With autograd recording (checked in a subprocess: it aborts the process
    with a C++ `c10::Error`, not a Python exception, in CPU-only builds)."""
    import subprocess

    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode():
            x = torch.empty(1, 128, 256, device="cuda", dtype=torch.bfloat16)
            h = F.rms_norm(x, (256,), torch.empty(256, device="cuda", dtype=torch.bfloat16), 1e-5)
            h = h + F.embedding(torch.zeros(1, 128, dtype=torch.long, device="cuda"),
                                torch.empty(512, 256, device="cuda", dtype=torch.bfloat16))
            q = (h @ torch.empty(256, 256, device="cuda", dtype=torch.bfloat16)).view(1, 128, 4, 64).transpose(1, 2)
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, True)[0]
        no_grad = f"yes without autograd (RMSNorm, embedding, matmul, flash SDPA -> {tuple(out.shape)} {out.device})"
    except Exception as exc:  # noqa: BLE001 - the verdict is the message
        no_grad = f"no, even without autograd: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        from . import ops

        recorder = _StepRecorder()
        with torch.no_grad(), FakeTensorMode(), recorder:
            q = torch.empty(1, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
            k = torch.empty(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16)
            ops.block_attention(q, k, k, causal=True)
        no_grad += f"; ops.block_attention(backend='auto') on CUDA dispatches to {sorted(recorder.attention)}"
    except Exception as exc:  # noqa: BLE001 - the verdict is the message
        no_grad += f"; ops.block_attention on fake CUDA failed: {type(exc).__name__}: {str(exc)[:120]}"
    proc = subprocess.run([sys.executable, "-c", _GRAD_ON_FAKE_CUDA], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0 and "ok" in proc.stdout:
        grad = "yes with autograd recording"
    else:
        why = next((ln.strip() for ln in proc.stderr.splitlines() if "what()" in ln), f"exit {proc.returncode}")
        grad = f"no with autograd recording (the process aborts: {why})"
    return f"{no_grad}; {grad}"


# --- sweep --------------------------------------------------------------------------------------------------
SWEEP_MODELS = ("llama2_7b", "llama3_8b", "qwen2_7b")
SWEEP_SEQ = (256 * 2**10, 512 * 2**10, 2**20, 2 * 2**20)
SWEEP_WORLDS = (8, 32, 128, 256)


def sweep(models=SWEEP_MODELS, seq_lens=SWEEP_SEQ, worlds=SWEEP_WORLDS, *, activation_checkpointing=False,
          json_path=None, show_progress=True) -> list[dict]:
    """The README table: every (model, S, world) at MM-SP 2D (ulysses 8, or `sweep_ulysses`; ring the rest),
    depth-extrapolated, memory only (FLOPs are not counted in the sweep: it halves its time)."""
    from tqdm import tqdm

    rows = []
    cases = [(m, s, w) for m in models for s in seq_lens for w in worlds]
    with tqdm(total=2 * len(cases), desc="dry run sweep (2 depths each)", disable=not show_progress,
              file=sys.stderr) as bar:
        for model, seq_len, world in cases:
            ulysses = sweep_ulysses(model)
            cfg = DryRunConfig(model=model, seq_len=seq_len, world=world, ring=world // ulysses, ulysses=ulysses,
                               activation_checkpointing=activation_checkpointing)
            result = dry_run_extrapolated(cfg, progress=bar, count_flops=False)
            result["cost_model"] = cost_model_view(result)
            rows.append(result)
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(result, default=str) + "\n")
    return rows


def sweep_ulysses(model: str) -> int:
    """The Ulysses size of the sweep's MM-SP 2D layout: 8 (one node), or the largest size <= 8 the head
    counts allow (qwen2_7b: 28 query heads, so 4)."""
    from .attention.ulysses import ulysses_sizes_for
    from .models import get_config

    config = get_config(model)
    return max(u for u in ulysses_sizes_for(config.num_heads, config.num_kv_heads) if u <= 8)


def sweep_table(rows: list[dict]) -> str:
    head = ("| model | seq | ranks (ring x U) | params | grads | optimizer | activations | temporaries | peak GiB "
            "| fits 72 GiB | cost model GiB | layers run |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        m, c = r["memory"], r["config"]
        cm = r.get("cost_model") or {}
        cm_total = cm.get("memory", {}).get("total")
        depth = r.get("extrapolated_from_layers")
        lines.append(f"| {c['model']} | {_tokens(c['seq_len'])} | {c['world']} ({c['ring']} x {c['ulysses']}) | "
                     + " | ".join(_gib(m[k]) for k in CATEGORIES)
                     + f" | {_gib(m['total'])} | {'yes' if r['fits'] else 'no'} | "
                     + (f"{_gib(cm_total)}" if cm_total is not None else "-")
                     + f" | {f'{depth[0]}, {depth[1]}' if depth else 'all'} |")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n / 2**20:.3g}M" if n >= 2**20 else f"{n // 1024}K"


# --- CLI ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longvila_engine.dryrun", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3_8b")
    p.add_argument("--seq-len", default="2M", help="global tokens: 4096, 256K, 2M")
    p.add_argument("--world", type=int, default=256)
    p.add_argument("--ring", type=int, default=32)
    p.add_argument("--ulysses", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--rank", type=int, default=0, help="the rank of the fake world to measure")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--fsdp", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--precision", default="gpu", choices=["gpu", "cpu"],
                   help="gpu: fp32 master weights, bf16 compute (the trainer on CUDA); cpu: fp32")
    p.add_argument("--layers", type=int, default=None,
                   help="run this many layers as they are (default: the preset's depth)")
    p.add_argument("--extrapolate", action="store_true",
                   help="measure at 2 and 3 layers and extrapolate linearly to the preset's depth")
    p.add_argument("--sweep", action="store_true", help="the README table (3 models x 4 lengths x 4 worlds)")
    p.add_argument("--json", default=None, help="append one JSON line per dry run")
    args = p.parse_args(argv)
    if args.sweep:
        rows = sweep(activation_checkpointing=args.activation_checkpointing, json_path=args.json)
        print(sweep_table(rows))
        print(longest_fitting(rows))
        print(f"fake CUDA forward in this torch build: {fake_cuda_forward()}")
        return 0
    cfg = DryRunConfig(model=args.model, seq_len=parse_tokens(args.seq_len), world=args.world, ring=args.ring,
                       ulysses=args.ulysses, tp=args.tp, rank=args.rank, gpus_per_node=args.gpus_per_node,
                       fsdp=args.fsdp, activation_checkpointing=args.activation_checkpointing,
                       precision=args.precision, layers=args.layers)
    result = dry_run_extrapolated(cfg) if args.extrapolate else dry_run(cfg)
    cost = cost_model_view(result)
    result["cost_model"] = cost
    print(report(result, cost))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
    return 0


def longest_fitting(rows: list[dict]) -> str:
    """Per model and rank count: the longest swept sequence whose measured peak fits 72 GiB, and the
    longest sequence by the straight line through that rank count's measured peaks (peak memory per
    rank is linear in the sequence at a fixed layout: activations grow with tokens, the rest is fixed)."""
    groups: dict = {}
    for r in rows:
        c = r["config"]
        groups.setdefault((c["model"], c["world"]), []).append((c["seq_len"], r["memory"]["total"]))
    budget = USABLE * HBM_BYTES
    lines = ["longest sequence that fits 72 GiB per rank (no activation checkpointing):",
             "| model | ranks | longest swept length that fits | by the line through the measured peaks |",
             "|---|---|---|---|"]
    for (model, world), points in sorted(groups.items()):
        fits = [s for s, total in points if total <= budget]
        line = "-"
        if len(points) >= 2:
            n = len(points)
            mx, my = sum(s for s, _ in points) / n, sum(t for _, t in points) / n
            slope = sum((s - mx) * (t - my) for s, t in points) / sum((s - mx) ** 2 for s, _ in points)
            longest = int((budget - (my - slope * mx)) / slope) // 1024 * 1024
            line = _tokens(longest) if longest > 0 else "none"
        lines.append(f"| {model} | {world} | {_tokens(max(fits)) if fits else 'none'} | {line} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
