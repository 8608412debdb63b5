"""Layout-free, crash-safe training checkpoints with torch.distributed.checkpoint (DCP).

What is saved: the DENSE model and AdamW state. Each tp-sharded tensor (parameter, exp_avg, exp_avg_sq)
is wrapped as a DTensor over a 1-D device mesh of this rank's tp group with `Shard(tp_dim)`, so DCP
records it as chunks of the full tensor with their global offsets; replicated tensors are saved
plainly. Ranks holding identical data (the dp and sp replicas of a tp shard) are de-duplicated by
DCP's planner, so every byte is written once. Loading builds the same structure for the *current*
layout and DCP reads whichever chunks overlap this rank's shard: a checkpoint saved at tp=2 x ring=4
loads at tp=4 or tp=1 x ring=2 x ulysses=2 (sequence-parallel axes hold no state at all).

Crash safety: a checkpoint is written to `<root>/.tmp-step_<N>`, then rank 0 writes `meta.json` into
it, renames it to `<root>/step_<N>` (one `os.replace` of the directory) and finally replaces the
`<root>/latest` marker (write a temporary file, fsync, `os.replace`). A crash at any point leaves the
previous `latest` pointing at a complete checkpoint; a leftover `.tmp-*` directory is ignored and
removed by the next save.

Not here: the training loop (`train.py`).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_state"]

LATEST = "latest"
META = "meta.json"
_MESHES: dict = {}


def _tp_mesh(groups):
    """A 1-D DeviceMesh over this rank's tp group (built once per groups object)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = id(groups)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(groups.tp, groups.device.type)
    return _MESHES[key]


def _wrap(local: torch.Tensor, param, groups):
    """A DTensor view of this rank's shard when the parameter is tp-sharded, else the tensor itself."""
    dim = getattr(param, "tp_dim", None)
    if groups is None or dim is None or groups.tp_size == 1:
        return local
    from torch.distributed.tensor import DTensor, Shard

    full = torch.Size(param.tp_full_shape)
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(
        local, _tp_mesh(groups), [Shard(dim)], run_check=False, shape=full, stride=stride
    )


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero AdamW state (as its first step would) so a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state[p]
            if "exp_avg" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def checkpoint_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, groups, step: int = 0
) -> dict:
    """The flat DCP state dict: 'model/<name>', 'optim/<name>/{exp_avg,exp_avg_sq,step}', 'trainer/step'.

    Tensors share storage with the live parameters and optimizer state (loading fills them in place).
    """
    state = {"trainer/step": torch.tensor(int(step), dtype=torch.int64)}
    if optimizer is not None:
        ensure_optimizer_state(optimizer)
    for name, p in model.named_parameters():
        state[f"model/{name}"] = _wrap(p.detach(), p, groups)
        if optimizer is None:
            continue
        st = optimizer.state[p]
        state[f"optim/{name}/exp_avg"] = _wrap(st["exp_avg"], p, groups)
        state[f"optim/{name}/exp_avg_sq"] = _wrap(st["exp_avg_sq"], p, groups)
        state[f"optim/{name}/step"] = st["step"]
    return state


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    root: str, step: int, model, optimizer, groups, *, meta: dict | None = None, before_publish=None
) -> str:
    """Save (collectively, every rank calls it) and atomically publish `<root>/step_<step>`; returns it.

    `meta` (JSON-able) is stored in meta.json next to the layout and step. `before_publish` (a callable,
    for fault-injection tests) runs on every rank after the data is written and before publishing.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step_{int(step):08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for entry in os.listdir(root):  # leftovers of an interrupted save
            if entry.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    import torch.distributed.checkpoint as dcp  # ~2 s of imports: only when checkpointing

    dcp.save(checkpoint_state(model, optimizer, groups, step), checkpoint_id=tmp)
    if before_publish is not None:
        before_publish()
    _barrier()  # every rank's data is on disk
    if rank == 0:
        info = {"step": int(step), "format": "longvila_engine dense DCP v1", **(meta or {})}
        if groups is not None:
            info["layout"] = {
                "dp": groups.layout.dp,
                "ring": groups.layout.ring,
                "ulysses": groups.layout.ulysses,
                "tp": groups.layout.tp,
            }
        _write_atomic(os.path.join(tmp, META), json.dumps(info, indent=1, sort_keys=True))
        if os.path.exists(final):  # re-saving a step: move the old copy out of the way first
            old = os.path.join(root, f".tmp-old-{name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), name + "\n")
    _barrier()
    return final


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint `<root>/latest` names, if complete; else the newest complete `step_*`; else None."""
    if not os.path.isdir(root):
        return None
    marker = os.path.join(root, LATEST)
    if os.path.exists(marker):
        with open(marker) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.exists(os.path.join(path, META)):
            return path
    complete = sorted(
        e for e in os.listdir(root) if e.startswith("step_") and os.path.exists(os.path.join(root, e, META))
    )
    return os.path.join(root, complete[-1]) if complete else None


def load_checkpoint(path: str, model, optimizer, groups) -> dict:
    """Load a checkpoint saved under any layout into this rank's shards, in place; returns meta.json.

    Raises ValueError when `path` is not a complete checkpoint.
    """
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise ValueError(
            f"{path} is not a complete checkpoint (no {META}); pass a published step_* directory"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    import torch.distributed.checkpoint as dcp

    state = checkpoint_state(model, optimizer, groups)
    targets = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()}
    dcp.load(state, checkpoint_id=path)
    with torch.no_grad():  # DCP loads in place; copy back in case a tensor was replaced rather than filled
        for key, value in state.items():
            loaded = value.to_local() if hasattr(value, "to_local") else value
            if loaded.data_ptr() != targets[key].data_ptr():
                targets[key].copy_(loaded)
    meta["step"] = int(targets["trainer/step"])
    return meta
