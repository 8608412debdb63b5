"""The step of the scale dry run: the trainer's own training step as one rank of a fake world, without GPUs or memory.

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

Work-around, scoped to the dry run and reported in its output: the trainer's end-of-step `float(loss)`
(logging, after `optimizer.step()`) is reported as a host sync and the step counted complete. Batch
planning (its one agreement all-gather) runs on real tensors before the step (`plan_batch`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import traceback

import torch
import torch.distributed as dist

from .instruments import INEXACT_CALLS, _cuda_rms_norm, _StepRecorder, attention_flop_formulas, engine_frame

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
        from ..models.config import PRESETS

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



# --- the step ------------------------------------------------------------------------------------------------
def _train_args(cfg: DryRunConfig):
    from .. import train

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
        from ..fsdp import shard_model
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
        from ..fsdp import dp_sp_mesh

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

    from ..parallel import ParallelLayout, init_parallel

    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised in this process; the dry run makes its own "
                         "fake world: run it in a fresh process (python -m longvila_engine.dryrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=cfg.rank, world_size=cfg.world)
    layout = ParallelLayout(dp=cfg.dp, ring=cfg.ring, ulysses=cfg.ulysses, tp=cfg.tp,
                            gpus_per_node=cfg.gpus_per_node)
    return init_parallel(layout, timeout=60)


def model_config(cfg: DryRunConfig):
    """The preset's ModelConfig, at `cfg.layers` decoder layers when given."""
    from ..models import get_config

    config = get_config(cfg.model)
    return config if cfg.layers is None else config.replace(num_layers=cfg.layers)


def plan_batch(cfg: DryRunConfig, groups):
    """This rank's LocalBatch (and its plan) of one global sample, on real tensors: batch planning happens
    before the step and outside fake mode (the ids are S int64 values, 16 MB at 2M tokens)."""
    from ..models import local_batch

    return local_batch(torch.zeros(1, cfg.seq_len, dtype=torch.long, device=groups.device), groups)


def build_state(cfg: DryRunConfig, groups):
    """(model, optimizer) as the trainer builds them (`train.build_model` options, `fsdp.shard_model`,
    `train.build_optimizer`), in steady state: AdamW's state exists (one step on zero gradients).

    Runs under FakeTensorMode in the dry run and on real tensors in the accuracy test, unchanged."""
    from .. import train
    from ..models import Transformer

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
    from .. import train

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
            with _cuda_rms_norm(cfg.precision == "gpu"), tracker, counter, \
                    recorder:
                at_start = _regroup(next(iter(tracker.get_tracker_snapshot("current").values()), {}))["total"]
                try:
                    run_step(model, optimizer, fake_batch, groups)
                except DataDependentOutputException:
                    where = engine_frame(traceback.extract_tb(sys.exc_info()[2]))
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
            # Agreement calls inside the step (the counters' "check" axis): plan-once makes this 0.
            "agreement_calls_answered_locally": groups.stats.summary().get("check", {}).get("calls", 0),
            "fsdp": fsdp,
        }
    finally:
        dist.destroy_process_group()
    result["wall_s"] = time.perf_counter() - t_start
    return result


def attention_rule_flops(cfg: DryRunConfig, config) -> int:
    """This rank's attention FLOPs of one step by the ops.flops rule (forward 4D + backward 10D per
    visible pair and head): zigzag gives every ring rank S(S+1)/(2R) causal pairs of the padded global
    sequence, on the H/(tp*U) heads Ulysses leaves it."""
    from ..ops.flops import attention_flops

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
    from ..models import get_config

    return get_config(cfg.model).num_layers


