"""Parameter, gradient and optimizer-state sharding with PyTorch FSDP2 over the `dp_sp` ranks.

`shard_model(model, groups)` applies `torch.distributed.fsdp.fully_shard` to every TransformerBlock
and then to the root (embedding, final norm, output head), over a 1-D DeviceMesh made from the
engine's own `dp_sp` process group. Tensor parallelism stays the engine's: each tp rank's local slice
(plain tensors, `tp_dim` / `tp_full_shape` metadata) is what FSDP shards, dim 0, over dp_sp. The tp
metadata is copied onto the sharded parameters, so clipping and checkpoints still know which
parameters are tp shards.

| unit's parameters | forward | backward |
|---|---|---|
| gathered | all-gather over dp_sp | all-gather again if resharded after forward |
| gradients | - | reduce-scatter over dp_sp, divided by dp |

Gradient semantics (docs/design.md section 6): a replica's loss is the SUM of its sp ranks' losses and
replicas average, so the gradient is sum over dp_sp divided by dp. FSDP2 divides by the mesh size
(dp*sp) by default; `set_gradient_divide_factor(dp)` makes it divide by dp instead. Gloo has no
PREMUL_SUM, so off NCCL the reduce-scatter is a plain sum and FSDP scales before/after it. The root
unit (embedding, head) is not resharded after forward: backward needs it at once.

Mixed precision: `mixed_precision_policy(torch.bfloat16)` computes in bf16 with float32 master
weights (the sharded parameters and the optimizer state stay float32) and float32 gradient
reduction; float32 runs use no policy at all, so CPU runs are exact.

Meta-device init (`materialize`, `shard_rows`): a model built on the meta device is sharded first,
then `to_empty` gives each rank storage for its shards only, which `hf_weights.load_sharded` fills
with the rows it reads from safetensors, so no rank ever holds its whole tp slice.

Not here: the optimizer (`train.py`), checkpoints of sharded state (`checkpoint.py`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "dp_sp_mesh",
    "mixed_precision_policy",
    "shard_model",
    "materialize",
    "shard_rows",
    "is_sharded",
    "reshard",
    "local_tensor",
    "state_bytes",
    "format_state_bytes",
]

_MESHES: dict = {}
_TP_ATTRS = ("tp_dim", "tp_full_shape", "init_std")


def dp_sp_mesh(groups):
    """The 1-D DeviceMesh over this rank's dp_sp group (built once per groups object)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = id(groups)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(groups.dp_sp, groups.device.type)
    return _MESHES[key]


def mixed_precision_policy(compute_dtype: torch.dtype | None):
    """FSDP2 policy: `compute_dtype` parameters in forward/backward, float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None or compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def shard_model(
    model: torch.nn.Module,
    groups,
    *,
    reshard_after_forward: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """FSDP2-shard `model` (an engine `Transformer`, or any module with `.layers`) over dp_sp, in place.

    Every rank of the job calls it (the mesh and the shards are collective state). Returns the model,
    whose class is now also an `FSDPModule`.
    """
    from torch.distributed.fsdp import fully_shard

    if groups is None or not dist.is_initialized():
        raise ValueError("shard_model needs initialised process groups (groups=None is one process)")
    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
    meta = {
        name: {a: getattr(p, a) for a in _TP_ATTRS if hasattr(p, a)} for name, p in model.named_parameters()
    }
    mesh = dp_sp_mesh(groups)
    policy = mixed_precision_policy(compute_dtype)
    units = list(getattr(model, "layers", []))
    for block in units:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root's forward ends the step: resharding it after forward would only re-gather it for backward.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(float(groups.dp_size))
        if groups.backend != "nccl":  # gloo has no PREMUL_SUM: plain sums, then FSDP scales
            unit.set_force_sum_reduction_for_comms(True)
    model._tp_param_meta = meta  # `materialize` puts it back on the parameters that `to_empty` replaces
    _restore_tp_meta(model)
    return model


def _restore_tp_meta(model: torch.nn.Module) -> None:
    meta = getattr(model, "_tp_param_meta", {})
    for name, p in model.named_parameters():
        for attr, value in meta.get(name, {}).items():
            setattr(p, attr, value)


def materialize(model: torch.nn.Module, device) -> torch.nn.Module:
    """Give a model sharded on the meta device (`shard_model` of a `Transformer(..., device="meta")`)
    uninitialised storage on `device`, shard by shard (`to_empty`: this rank allocates only its shards).

    The tp metadata is put back on the new sharded parameters. Buffers come back uninitialised too:
    every module holding one must define `reset_buffers()` (non-persistent caches such as RoPE tables
    are recomputed there); the engine's Transformer has none (RoPE is computed per forward).
    """
    model.to_empty(device=device)
    _restore_tp_meta(model)
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)):
            reset = getattr(module, "reset_buffers", None)
            if reset is None:
                raise ValueError(
                    f"{type(module).__name__} has buffers but no reset_buffers(): they would stay "
                    f"uninitialised after to_empty"
                )
            reset()
    return model


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """[start, end) of the dim-0 rows of the (tp-local) parameter that this rank's FSDP2 shard holds.

    FSDP2 shards dim 0 as torch.chunk does: ceil(n / world) rows per rank, the last ranks shorter or
    empty. A plain (unsharded) tensor holds all its rows.
    """
    if not hasattr(param, "to_local"):
        return 0, (param.shape[0] if param.dim() else 1)
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)
    if len(placements) != 1 or placements[0] != Shard(0):
        raise ValueError(f"expected a parameter sharded on dim 0 over one mesh axis, got {placements}")
    n = param.shape[0]
    world = param.device_mesh.size()
    chunk = -(-n // world)
    start = min(param.device_mesh.get_local_rank() * chunk, n)
    end = min(start + chunk, n)
    local = param.to_local()
    if local.shape[0] != end - start:
        raise AssertionError(f"FSDP2 shard of {n} rows over {world}: expected {end - start}, holds {local.shape[0]}")
    return start, end


def is_sharded(model: torch.nn.Module) -> bool:
    """True when `model` was sharded by FSDP2 (its parameters are DTensors over dp_sp)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Put a sharded model's parameters back into their sharded DTensors (after a forward without
    backward the root keeps its gathered ones registered); a no-op for other models."""
    if is_sharded(model):
        for module in model.modules():
            if is_sharded(module):
                module.reshard()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's data of a parameter, gradient or optimizer tensor (the DTensor's local shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this rank holds in parameters, gradients and optimizer state, measured from the tensors.

    Gradients that do not exist yet are counted at the parameter's size and dtype (they will after the
    first backward), so the figure is the steady state, printable before step 1.
    """
    params = grads = optim = 0
    for p in model.parameters():
        local = local_tensor(p)
        params += local.numel() * local.element_size()
        g = local_tensor(p.grad) if p.grad is not None else local
        grads += g.numel() * g.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    local = local_tensor(value)
                    optim += local.numel() * local.element_size()
    return {"params": params, "grads": grads, "optimizer": optim}


def format_state_bytes(counts: dict, rank: int, sharded: bool) -> str:
    """One start-up line: params / grads / optimizer GiB on this rank."""
    gib = {k: v / 2**30 for k, v in counts.items()}
    how = "FSDP2-sharded over dp_sp" if sharded else "replicated over dp_sp"
    return (
        f"[rank {rank}] per-rank state ({how}): params {gib['params']:.4f} GiB / grads {gib['grads']:.4f} GiB "
        f"/ optimizer {gib['optimizer']:.4f} GiB (bytes {counts['params']} / {counts['grads']} / "
        f"{counts['optimizer']})"
    )
