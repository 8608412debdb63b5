"""The trainer: `torchrun --nproc-per-node N -m longvila_engine.train --ring R --ulysses U --tp T ...`.

One step on one rank: build this dp replica's global batch (the same on every sp and tp rank of the
replica), cut this rank's shard (`models.local_batch`: labels shifted globally, then padded and
sharded), forward to the sp-normalised loss, backward, reduce gradients over `dp_sp`, clip by the
global norm, AdamW.

Gradient reduction, thought through: each sp rank's loss is (its token-loss sum) / (the replica's
global supervised-token count), so the replica's loss is the SUM of its sp ranks' losses and the
gradient of a replicated parameter is the sum of the sp ranks' gradients. Replicas average. Hence
one all-reduce SUM over `dp_sp` followed by a division by `dp` (not by dp*sp). tp ranks hold
different shards (or identical replicated tensors) and are never reduced here. With FSDP2
(`--fsdp`, `fsdp.py`: on by default when dp*sp > 1) parameters, gradients and AdamW state are sharded
over `dp_sp` instead, and the same sum / dp is FSDP's reduce-scatter with divide factor dp.

Gradient clipping: the global norm squares tp-sharded gradients summed over tp, replicated ones
counted once; after the dp_sp reduction every rank computes the same norm (under FSDP2 each rank
squares its shards and the two sums are all-reduced over dp_sp first).

Precision: `--dtype auto` is bf16 compute with float32 master weights and reductions on CUDA, float32
on CPU. Weights in and out: `--init-from` a Hugging Face directory, `--export-hf` at the end
(`models/hf_weights.py`).

Faults: every process group has `--timeout`. Any exception on a rank (its own, or a collective that
failed because a peer died or timed out) is printed with the rank and step, and the process leaves
with `os._exit(1)` (no teardown that could block on a dead peer), naming the collective it was in.
SIGTERM (preemption, or torchrun stopping the others) stops every rank at the next step boundary with a
checkpoint and exit 0, or exits 143 after `--preempt-grace`. Both are `elastic.run_trainer`, which the
video-text trainer (`--task vlm`) shares. Under `torchrun --max-restarts N` the restarted workers resume
by themselves (`--resume auto`, the default) from the newest intact checkpoint, data position and RNG
included (`elastic.py`). `--fail-at-step/--fail-rank/--fail-mode` inject faults
for tests, on the first attempt only.

Checkpoints: `checkpoint.py` (dense DCP, atomic publish, re-layout on load).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from . import elastic
from .checkpoint import ensure_optimizer_state, load_checkpoint, save_checkpoint
from .data.tokens import SyntheticTokens, TokenFile, build_data, global_batch
from .fsdp import format_state_bytes, is_sharded, local_tensor, shard_model, state_bytes
from .models import Transformer, get_config, local_batch
from .models.config import PRESETS
from .parallel import ParallelLayout, init_parallel
from .tensor_parallel.mappings import all_reduce

__all__ = [
    "parse_args",
    "init_distributed",
    "build_model",
    "build_optimizer",
    "SyntheticTokens",
    "TokenFile",
    "build_data",
    "global_batch",
    "average_gradients",
    "clip_grad_norm_",
    "train_step",
    "train",
    "main",
]


# --- setup ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m longvila_engine.train", description=__doc__.split("\n")[0])
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dp", type=int, default=None, help="default: world / (ring*ulysses*tp)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: LOCAL_WORLD_SIZE")
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="global sequences per step (default: dp)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm; 0 disables")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a tokenised .npy / .bin file")
    p.add_argument("--data-dtype", default="uint16", help="token dtype of a .bin file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bf16 compute with float32 master weights and reductions on CUDA, float32 on CPU; "
        "float32 / bfloat16: every parameter in that dtype",
    )
    p.add_argument(
        "--fsdp",
        default="auto",
        choices=["auto", "on", "off"],
        help="FSDP2-shard params, grads and optimizer state over dp_sp (auto: on when dp*sp > 1)",
    )
    p.add_argument(
        "--no-reshard-after-forward",
        dest="reshard_after_forward",
        action="store_false",
        help="FSDP: keep each block's gathered parameters from forward to backward (more memory, less traffic)",
    )
    p.add_argument("--init-from", default=None, help="a Hugging Face Llama/Qwen2/Mistral directory to start from")
    p.add_argument("--export-hf", default=None, help="write the trained model as a Hugging Face directory here")
    p.add_argument("--autocast", action="store_true", help="bf16 autocast with float32 parameters")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--tp-sequence-parallel", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--ce-chunk-size", type=int, default=None)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--save-every", type=int, default=0, help="save after every N steps (0: never)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default="auto",
        help="auto (default): the newest intact checkpoint in --checkpoint-dir if there is one, else start "
        "fresh (what a torchrun restart needs); latest: the same, --checkpoint-dir required; none: start "
        "fresh; or a step directory",
    )
    p.add_argument(
        "--preempt-grace",
        type=float,
        default=30.0,
        help="seconds from SIGTERM to a saved checkpoint and exit 0; past it the rank exits 143",
    )
    p.add_argument("--log-json", default=None, help="append one JSON line per step (rank 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a collective gives up")
    p.add_argument("--no-progress", action="store_true", help="no tqdm line")
    p.add_argument("--fail-at-step", type=int, default=None, help="fault injection (tests)")
    p.add_argument("--fail-rank", type=int, default=0)
    p.add_argument("--fail-mode", default="raise", choices=["raise", "kill", "hang", "save", "term"],
                   help="faults fire on the first torchrun attempt only (term: SIGTERM to this rank)")
    args = p.parse_args(argv)
    for name in ("ring", "ulysses", "tp", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resume == "latest" and not args.checkpoint_dir:
        raise ValueError("--resume without a path needs --checkpoint-dir")
    if not args.preempt_grace > 0:
        raise ValueError(f"--preempt-grace must be > 0 seconds, got {args.preempt_grace}; pass e.g. 30")
    return args


def init_distributed(args):
    """init_process_group (NCCL on cuda:LOCAL_RANK when CUDA is there, else gloo) and the groups."""
    timeout = datetime.timedelta(seconds=args.timeout)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        elastic.init_default_group("nccl" if use_cuda else "gloo", timeout)
    world = dist.get_world_size()
    inner = args.ring * args.ulysses * args.tp
    dp = args.dp if args.dp is not None else world // inner
    if dp < 1 or dp * inner != world:
        raise ValueError(
            f"world size {world} is not dp*ring*ulysses*tp with ring*ulysses*tp={inner}; "
            f"launch a multiple of {inner} processes or pass a matching --dp"
        )
    per_node = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    layout = ParallelLayout(dp=dp, ring=args.ring, ulysses=args.ulysses, tp=args.tp, gpus_per_node=per_node)
    return init_parallel(layout, timeout=timeout)


def resolve_dtypes(name: str, device) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, bf16 compute dtype or None) of `--dtype name` on `device`.

    auto: float32 master weights with bf16 compute on CUDA (FSDP2's MixedPrecisionPolicy, or autocast
    when not sharded), plain float32 on CPU so CPU runs stay exact.
    """
    if name == "auto":
        on_cuda = torch.device(device if device is not None else "cpu").type == "cuda"
        return torch.float32, (torch.bfloat16 if on_cuda else None)
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {name!r} is not one of auto, float32, bfloat16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name], None


def use_fsdp(args, groups) -> bool:
    """Whether `--fsdp` shards this job: on, or auto with more than one dp_sp rank."""
    mode = getattr(args, "fsdp", "off")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--fsdp {mode!r} is not one of auto, on, off")
    dp_sp = groups.dp_sp_size if groups is not None else 1
    if mode == "on" and (groups is None or groups.dp_sp is None):
        raise ValueError("--fsdp on needs a distributed launch (torchrun); use --fsdp auto or off in one process")
    return mode == "on" or (mode == "auto" and dp_sp > 1)


def build_model(args, groups) -> Transformer:
    """The Transformer of `--model` (or of the Hugging Face directory `--init-from`), FSDP2-sharded over
    dp_sp when `use_fsdp` says so."""
    device = groups.device if groups is not None else None
    param_dtype, compute_dtype = resolve_dtypes(args.dtype, device)
    if compute_dtype is not None and torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls that remain may use TF32
        torch.backends.cudnn.allow_tf32 = True
    options = dict(
        tp_sequence_parallel=args.tp_sequence_parallel,
        activation_checkpointing=args.activation_checkpointing,
        attention_backend=args.attention_backend,
        ce_chunk_size=args.ce_chunk_size,
        dtype=param_dtype,
        device=device,
    )
    fsdp = use_fsdp(args, groups)
    fsdp_options = dict(reshard_after_forward=getattr(args, "reshard_after_forward", True), compute_dtype=compute_dtype)
    if getattr(args, "init_from", None):
        if fsdp:  # built on meta, sharded, each rank reads only the rows its shards hold (hf_weights.load_sharded)
            return Transformer.from_hf(args.init_from, groups, max_seq_len=args.seq_len, fsdp=True,
                                       **fsdp_options, **options)  # fmt: skip
        model = Transformer.from_hf(args.init_from, groups, max_seq_len=args.seq_len, **options)
    else:
        model = Transformer(get_config(args.model), groups, seed=args.seed, **options)
    if fsdp:
        shard_model(model, groups, **fsdp_options)
    return model


def report_state_bytes(model, optimizer, rank: int) -> dict:
    """Print (rank 0) the one start-up line: params / grads / optimizer GiB held by this rank.

    Creates the (zero) AdamW state first, as its first step would, so the figure is the steady state.
    """
    ensure_optimizer_state(optimizer)
    counts = state_bytes(model, optimizer)
    if rank == 0:
        print(format_state_bytes(counts, rank, is_sharded(model)), file=sys.stderr, flush=True)
    return counts


def needs_autocast(args, model) -> bool:
    """bf16 autocast: asked for, or `--dtype auto` on CUDA without FSDP (FSDP casts by its policy)."""
    device = next(model.parameters()).device
    return bool(args.autocast) or (
        resolve_dtypes(args.dtype, device)[1] is not None and not is_sharded(model)
    )


def build_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW: fused on CUDA, foreach on CPU; no weight decay on 1-D tensors (norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).is_cuda
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kind)


# --- gradients -----------------------------------------------------------------------------------------
def average_gradients(model, groups, bucket_bytes: int = 1 << 27) -> None:
    """Sum gradients over `dp_sp` and divide by dp (see the module docstring), in flat buckets.

    A no-op for an FSDP2-sharded model: its reduce-scatter already did this during backward
    (`fsdp.shard_model` sets the divide factor to dp).
    """
    if is_sharded(model):
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # every rank must contribute the same buckets
            p.grad = torch.zeros_like(p)
    if groups is None or groups.dp_sp_size == 1:
        return
    dp = groups.dp_size
    bucket, size = [], 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        last = i == len(params) - 1
        if size >= bucket_bytes or last or params[i + 1].grad.dtype != p.grad.dtype:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            all_reduce(flat, groups, "dp_sp")
            if dp > 1:
                flat.div_(dp)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


def clip_grad_norm_(model, max_norm: float | None, groups) -> torch.Tensor:
    """Global L2 norm of the gradients over the tp shards; scale them to `max_norm` when above it.

    Squares of tp-sharded gradients are summed over tp, replicated ones counted once; under FSDP2 each
    rank holds 1/(dp*sp) of every gradient, so both sums are first all-reduced over dp_sp. Returns the
    norm before clipping (float32). No host synchronisation.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    local = [local_tensor(p.grad) for p in params]
    sharded = [g for p, g in zip(params, local) if getattr(p, "tp_dim", None) is not None]
    replicated = [g for p, g in zip(params, local) if getattr(p, "tp_dim", None) is None]
    device = local[0].device
    sq = torch.zeros(2, dtype=torch.float32, device=device)
    if sharded:
        sq[0] = torch.stack([n.float() for n in torch._foreach_norm(sharded)]).pow(2).sum()
    if replicated:
        sq[1] = torch.stack([n.float() for n in torch._foreach_norm(replicated)]).pow(2).sum()
    if is_sharded(model):
        all_reduce(sq, groups, "dp_sp")
    shard_sq = sq[:1].clone()
    all_reduce(shard_sq, groups, "tp")
    norm = (shard_sq[0] + sq[1]).sqrt()
    if max_norm and max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, coef.to(local[0].dtype))
    return norm


def train_step(
    model, optimizer, batch, groups, *, grad_clip: float | None = 1.0, autocast: bool = False, fault=None
) -> dict:
    """One optimizer step on this rank's LocalBatch; returns {'loss': replica-mean loss, 'grad_norm'}."""
    optimizer.zero_grad(set_to_none=True)
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(batch.input_ids, batch.positions, batch.labels, batch.cu_seqlens, plan=batch.plan)
    if fault is not None:
        fault()
    loss.backward()
    average_gradients(model, groups)
    norm = clip_grad_norm_(model, grad_clip, groups)
    optimizer.step()
    # The replica's loss is the sum over its sp ranks; log the mean over replicas.
    logged = loss.detach().float().reshape(1).clone()
    if groups is not None:
        all_reduce(logged, groups, "dp_sp")
        logged /= groups.dp_size
    return {"loss": float(logged[0]), "grad_norm": float(norm)}


# --- the loop ------------------------------------------------------------------------------------------
def _fault(args, rank: int, step: int, where: str):
    """The injected fault for (rank, step, where), or None. Only on torchrun's first attempt, so a
    restarted run gets past the step that failed."""
    if args.fail_at_step is None or rank != args.fail_rank or step != args.fail_at_step:
        return None
    if elastic.restart_count() > 0:
        return None
    if (args.fail_mode == "save") != (where == "save"):
        return None

    def fire():
        now = time.time()
        print(
            f"[rank {rank}] injecting fault mode={args.fail_mode} at step {step} (unix time {now:.3f})",
            file=sys.stderr,
            flush=True,
        )
        if args.fail_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if args.fail_mode == "term":  # as a scheduler's preemption: the step goes on, the rank stops after it
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if args.fail_mode == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected failure (--fail-mode {args.fail_mode}) on rank {rank} at step {step}")

    return fire


def resume_choice(args, rank: int) -> str | None:
    """The checkpoint `--resume` names (auto / latest / none / a step directory), the same on every rank;
    None to start from step 0. Both trainers' resume."""
    # Rank 0 picks (checksums read once) and tells the others, so every rank loads the same step.
    choice = [elastic.resume_path(args.resume, args.checkpoint_dir) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    path, skipped = choice[0]
    for bad_path, reason in skipped:
        if rank == 0:
            print(f"skipping checkpoint {bad_path}, not intact: {reason}", file=sys.stderr, flush=True)
    if path is None and skipped:  # every rank raises the same message (the choice was broadcast)
        reasons = "; ".join(f"{bad}: {why}" for bad, why in skipped)
        raise ValueError(
            f"no intact checkpoint to resume from in {args.checkpoint_dir}: {reasons}. Restore or remove the "
            f"damaged steps, or pass --resume none to start from step 0"
        )
    if path is None and rank == 0 and args.checkpoint_dir and args.resume != "none":
        print(f"no checkpoint in {args.checkpoint_dir}; starting from step 0", file=sys.stderr, flush=True)
    return path


def _resume(args, model, optimizer, groups, rank: int, batch_size: int) -> tuple[int, int]:
    """(first step, first sample index) after loading what `--resume` names; (0, 0) when starting fresh."""
    path = resume_choice(args, rank)
    if path is None:
        return 0, 0
    meta = load_checkpoint(path, model, optimizer, groups)
    start = int(meta["step"])
    position = elastic.DataPosition.from_meta(meta.get("data"))
    if position is None:  # a checkpoint from before data positions were saved
        sample_index, how = start * batch_size, "sample index step*batch (no data position saved)"
    else:
        sample_index = position.sample_index
        restored = position.restore_rng(rank)
        how = f"epoch {position.epoch}, sample {sample_index}, RNG {'restored' if restored else 'not saved'}"
    if rank == 0:
        print(
            f"resumed from {path} at step {start} ({how}; torchrun attempt {elastic.restart_count()})",
            file=sys.stderr,
            flush=True,
        )
    return start, sample_index


def _save(args, step: int, model, optimizer, groups, rank: int, sample_index: int, data) -> str:
    """Every rank: checkpoint `step` with the data position (next sample, epoch, every rank's RNG)."""
    position = elastic.DataPosition.capture(sample_index, len(data) if hasattr(data, "__len__") else None)
    return save_checkpoint(
        args.checkpoint_dir,
        step,
        model,
        optimizer,
        groups,
        meta={"model": args.model, "seed": args.seed, "data": position.to_meta()},
        before_publish=_fault(args, rank, step, "save"),
    )


def train(args, progress: dict | None = None, preemption: elastic.Preemption | None = None) -> list[dict]:
    """Run the whole job on this rank; returns the per-step records (rank 0 also logs them as JSON).

    `preemption` (main installs it on SIGTERM) is polled collectively after every step: once any rank
    was signalled, every rank saves a checkpoint of that step and returns (`Preemption.stop_after`)."""
    progress = {} if progress is None else progress
    preemption = preemption if preemption is not None else elastic.Preemption(args.preempt_grace)
    progress["where"] = "start-up"
    groups = init_distributed(args)
    rank = dist.get_rank()
    progress["rank"] = rank
    torch.manual_seed(args.seed)
    model = build_model(args, groups)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    report_state_bytes(model, optimizer, rank)
    data = build_data(args, model.config.vocab_size)
    batch_size = args.batch if args.batch is not None else groups.dp_size
    start, sample_index = _resume(args, model, optimizer, groups, rank, batch_size)
    from tqdm import tqdm

    bar = tqdm(
        total=args.steps,
        initial=start,
        disable=rank != 0 or args.no_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    log = open(args.log_json, "a") if (args.log_json and rank == 0) else None
    records = []
    preemption.arm()
    try:
        for step in range(start, args.steps):
            progress["where"] = f"step {step + 1}"
            ids = global_batch(data, sample_index, batch_size, groups).to(groups.device)
            batch = local_batch(ids, groups)
            t0 = time.perf_counter()
            out = train_step(
                model,
                optimizer,
                batch,
                groups,
                grad_clip=args.grad_clip,
                autocast=needs_autocast(args, model),
                fault=_fault(args, rank, step + 1, "step"),
            )
            elapsed = time.perf_counter() - t0
            sample_index += batch_size
            tokens = batch_size * args.seq_len
            record = {
                "step": step + 1,
                "loss": out["loss"],
                "grad_norm": out["grad_norm"],
                "lr": args.lr,
                "tokens": tokens,
                "step_time_s": elapsed,
                "tokens_per_s": tokens / max(elapsed, 1e-9),
                "attempt": elastic.restart_count(),
            }
            records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            saved = args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0
            if saved:
                progress["where"] = f"saving checkpoint {step + 1}"
                _save(args, step + 1, model, optimizer, groups, rank, sample_index, data)
            save = None if saved else functools.partial(_save, args, step + 1, model, optimizer, groups, rank,
                                                        sample_index, data)
            if preemption.stop_after(step + 1, groups.device, progress, rank, args.checkpoint_dir, save):
                break
    finally:
        if not preemption.requested:  # once preempted, a second SIGTERM changes nothing
            preemption.disarm()
        bar.close()
        if log is not None:
            log.close()
    if getattr(args, "export_hf", None) and not preemption.requested:
        progress["where"] = f"writing --export-hf {args.export_hf}"
        model.save_hf(args.export_hf)
        if rank == 0:
            print(f"wrote Hugging Face model to {args.export_hf}", file=sys.stderr, flush=True)
    return records


def main(argv=None) -> int:
    from .train_vlm import split_task

    task, argv = split_task(argv)  # --task vlm: the video-text trainer (train_vlm.py)
    if task == "vlm":
        from .train_vlm import main as vlm_main

        return vlm_main(argv)
    return elastic.run_trainer("longvila_engine.train", parse_args, train, argv)


if __name__ == "__main__":
    elastic.leave_process(main())
