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

FSDP2: a sharded model's parameters and AdamW state are DTensors over the dp_sp mesh, each holding
1/(dp*sp) of this rank's tp slice (dim 0). They are saved as DTensors over a 2-D (tp, dp_sp) mesh,
placements (Shard(tp_dim) or Replicate, Shard(0)): the same global tensors as the replicated format,
so a checkpoint written with FSDP loads without it and back, under any layout.

Integrity: after the data is written, every file's size and SHA-256 go into meta.json (`files`),
hashed by all ranks in parallel. `verify_checkpoint(path)` re-reads them and names what is wrong
(missing, truncated, altered); `latest_intact_checkpoint(root)` returns the newest step that passes,
with the reasons it skipped the newer ones. Checkpoints from before the checksums (no `files` in
meta.json) are taken as they are.

Not here: the training loop (`train.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "latest_intact_checkpoint",
    "verify_checkpoint",
    "read_meta",
    "checkpoint_state",
    "ensure_optimizer_state",
]

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


def _tp_dp_sp_mesh(groups):
    """A 2-D DeviceMesh (tp, dp_sp) over the whole job (built once per groups object).

    Ranks vary fastest along tp, so rank = tp_rank + tp * dp_sp_rank (docs/design.md section 3); row t of
    the mesh is one dp_sp group, column j one tp group.
    """
    from torch.distributed.device_mesh import DeviceMesh

    key = (id(groups), "tp_dp_sp")
    if key not in _MESHES:
        tp, dp_sp = groups.tp_size, groups.dp_sp_size
        mesh = torch.arange(tp * dp_sp).view(dp_sp, tp).t().contiguous()
        assert mesh[groups.tp_rank].tolist() == list(groups.dp_sp_ranks), (mesh, groups.dp_sp_ranks)
        _MESHES[key] = DeviceMesh.from_group(
            [groups.tp, groups.dp_sp], groups.device.type, mesh=mesh, mesh_dim_names=("tp", "dp_sp")
        )
    return _MESHES[key]


def _wrap(local: torch.Tensor, param, groups):
    """The tensor DCP saves for this rank: a DTensor of the dense tensor, or the tensor itself.

    Plain tp-sharded tensors: Shard(tp_dim) over the tp mesh. FSDP2 DTensors (1/(dp*sp) of the tp
    slice, dim 0): (Shard(tp_dim) or Replicate, Shard(0)) over the (tp, dp_sp) mesh.
    """
    dim = getattr(param, "tp_dim", None)
    full = torch.Size(getattr(param, "tp_full_shape", tuple(param.shape)))
    if hasattr(local, "to_local"):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        tp_placement = Shard(dim) if (dim is not None and groups.tp_size > 1) else Replicate()
        return DTensor.from_local(
            local.to_local(),
            _tp_dp_sp_mesh(groups),
            [tp_placement, Shard(0)],
            run_check=False,
            shape=full,
            stride=torch.empty(full, device="meta").stride(),
        )
    if groups is None or dim is None or groups.tp_size == 1:
        return local
    from torch.distributed.tensor import DTensor, Shard

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
    from .fsdp import reshard

    reshard(model)  # the sharded parameters, not gathered copies a forward may have left behind
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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(directory: str) -> dict:
    """{file: {'bytes', 'sha256'}} of every data file in `directory`, hashed by all ranks in parallel."""
    names = sorted(e for e in os.listdir(directory) if e != META and os.path.isfile(os.path.join(directory, e)))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {
        n: {"bytes": os.path.getsize(os.path.join(directory, n)), "sha256": _sha256(os.path.join(directory, n))}
        for n in names[rank::world]
    }
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in sorted(part.items())}


def save_checkpoint(
    root: str, step: int, model, optimizer, groups, *, meta: dict | None = None, before_publish=None
) -> str:
    """Save (collectively, every rank calls it) and atomically publish `<root>/step_<step>`; returns it.

    `meta` (JSON-able) is stored in meta.json next to the layout, the step, the model's config (and
    its Hugging Face config when it came from one) and the files' checksums. `before_publish` (a
    callable, for fault-injection tests) runs on every rank after the data is written and before
    publishing.
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
    files = _checksums(tmp)
    if rank == 0:
        from .fsdp import is_sharded

        info = {
            "step": int(step),
            "format": "longvila_engine DCP v2",
            "sharding": "fsdp2" if is_sharded(model) else "replicated",
            "files": files,
        }
        config = getattr(model, "config", None)
        if dataclasses.is_dataclass(config):
            info["model_config"] = dataclasses.asdict(config)
        if getattr(model, "hf_config", None) is not None:
            info["hf_config"] = model.hf_config
        info.update(meta or {})
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
    """The checkpoint `<root>/latest` names, if complete; else the newest complete `step_*`; else None.

    Completeness only (meta.json present); `latest_intact_checkpoint` also verifies the checksums.
    """
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


def read_meta(path: str) -> dict:
    """meta.json of the checkpoint `path`; ValueError naming the file when it is missing or unreadable."""
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise ValueError(
            f"{path} is not a complete checkpoint (no {META}); pass a published step_* directory"
        )
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path} is damaged ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{meta_path} is damaged (no 'step' entry)")
    return meta


def verify_checkpoint(path: str, *, hashes: bool = True) -> list[str]:
    """What is wrong with the checkpoint `path` ([] when intact): each item names the bad file.

    Checks meta.json, then every recorded file's presence, size (a truncated file) and, with `hashes`,
    SHA-256 (an altered one). A checkpoint without recorded checksums (older format) only needs its
    meta.json.
    """
    try:
        meta = read_meta(path)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for name, want in sorted(meta.get("files", {}).items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
            continue
        size = os.path.getsize(file)
        if size != want["bytes"]:
            problems.append(f"{file} is truncated or extended: {size} bytes, {want['bytes']} recorded")
        elif hashes and _sha256(file) != want["sha256"]:
            problems.append(f"{file} is altered: its SHA-256 differs from the one recorded in {META}")
    return problems


def latest_intact_checkpoint(root: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest `<root>/step_*` that passes `verify_checkpoint`, or None; [(skipped path, reason)]).

    Newer damaged steps are skipped with the reason (which file, what is wrong), so the caller can say
    why it resumes from an older step. Unpublished `.tmp-*` directories are never considered. Local
    and collective-free: every rank may call it, or one rank and broadcast the answer.
    """
    if not os.path.isdir(root):
        return None, []
    steps = sorted((e for e in os.listdir(root) if e.startswith("step_")), reverse=True)
    skipped = []
    for entry in steps:
        path = os.path.join(root, entry)
        problems = verify_checkpoint(path)
        if not problems:
            return path, skipped
        skipped.append((path, "; ".join(problems)))
    return None, skipped


def load_checkpoint(path: str, model, optimizer, groups, *, verify: bool = False) -> dict:
    """Load a checkpoint saved under any layout into this rank's shards, in place; returns meta.json.

    FSDP2-sharded and replicated models load each other's checkpoints; `groups=None` loads the dense
    tensors in this process alone (no collective, as the export CLI does). File sizes are always
    checked against meta.json first (a truncated file fails here, on every rank, naming it); with
    `verify` the SHA-256 sums too (every file read once more). Raises ValueError when `path` is not a
    complete, readable checkpoint, naming the bad file when one is known.
    """
    meta = read_meta(path)
    problems = verify_checkpoint(path, hashes=verify)  # sizes always (one stat per file), hashes on request
    if problems:
        raise ValueError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    import torch.distributed.checkpoint as dcp

    state = checkpoint_state(model, optimizer, groups)
    targets = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()}
    # groups None (or a one-process groups object): this process reads alone, even inside a job.
    alone = groups is None or getattr(groups, "world_size", 1) == 1
    try:
        dcp.load(state, checkpoint_id=path, no_dist=alone)
    except Exception as exc:  # DCP wraps per-rank failures (EOFError, unpickling) in CheckpointException
        problems = verify_checkpoint(path)
        detail = "; ".join(problems) if problems else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        raise ValueError(f"checkpoint {path} could not be loaded: {detail}") from exc
    with torch.no_grad():  # DCP loads in place; copy back in case a tensor was replaced rather than filled
        for key, value in state.items():
            loaded = value.to_local() if hasattr(value, "to_local") else value
            if loaded.data_ptr() != targets[key].data_ptr():
                targets[key].copy_(loaded)
    meta["step"] = int(targets["trainer/step"])
    return meta
