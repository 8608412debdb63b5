"""The trainer: `torchrun --nproc-per-node N -m longvila_engine.train --ring R --ulysses U --tp T ...`.

One step on one rank: build this dp replica's global batch (the same on every sp and tp rank of the
replica), cut this rank's shard (`models.local_batch`: labels shifted globally, then padded and
sharded), forward to the sp-normalised loss, backward, reduce gradients over `dp_sp`, clip by the
global norm, AdamW.

Gradient reduction, thought through: each sp rank's loss is (its token-loss sum) / (the replica's
global supervised-token count), so the replica's loss is the SUM of its sp ranks' losses and the
gradient of a replicated parameter is the sum of the sp ranks' gradients. Replicas average. Hence
one all-reduce SUM over `dp_sp` followed by a division by `dp` (not by dp*sp). tp ranks hold
different shards (or identical replicated tensors) and are never reduced here.

Gradient clipping: the global norm squares tp-sharded gradients summed over tp, replicated ones
counted once; after the dp_sp reduction every rank computes the same norm.

Faults: every process group has `--timeout`. Any exception on a rank (its own, or a collective that
failed because a peer died or timed out) is printed with the rank and step, and the process leaves
with `os._exit(1)` (no teardown that could block on a dead peer); SIGTERM (torchrun stopping the
others) exits 143 with a message. `--fail-at-step/--fail-rank/--fail-mode` inject faults for tests.

Checkpoints: `checkpoint.py` (dense DCP, atomic publish, re-layout on load).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback

import torch
import torch.distributed as dist

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
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
        default=None,
        help="resume from the latest checkpoint in --checkpoint-dir, or from the given step dir",
    )
    p.add_argument("--log-json", default=None, help="append one JSON line per step (rank 0)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a collective gives up")
    p.add_argument("--no-progress", action="store_true", help="no tqdm line")
    p.add_argument("--fail-at-step", type=int, default=None, help="fault injection (tests)")
    p.add_argument("--fail-rank", type=int, default=0)
    p.add_argument("--fail-mode", default="raise", choices=["raise", "kill", "hang", "save"])
    args = p.parse_args(argv)
    for name in ("ring", "ulysses", "tp", "seq_len", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.resume and not args.checkpoint_dir and args.resume == "latest":
        raise ValueError("--resume without a path needs --checkpoint-dir")
    return args


def init_distributed(args):
    """init_process_group (NCCL on cuda:LOCAL_RANK when CUDA is there, else gloo) and the groups."""
    timeout = datetime.timedelta(seconds=args.timeout)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
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


def build_model(args, groups) -> Transformer:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return Transformer(
        get_config(args.model),
        groups,
        tp_sequence_parallel=args.tp_sequence_parallel,
        activation_checkpointing=args.activation_checkpointing,
        attention_backend=args.attention_backend,
        ce_chunk_size=args.ce_chunk_size,
        seed=args.seed,
        dtype=dtype,
        device=groups.device if groups is not None else None,
    )


def build_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW: fused on CUDA, foreach on CPU; no weight decay on 1-D tensors (norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).is_cuda
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kind)


# --- data ----------------------------------------------------------------------------------------------
class SyntheticTokens:
    """Deterministic learnable sequences over a fixed set of `alphabet` token ids: a random start, then
    next = succ[token] for one fixed random cycle through the set. The loss falls fast (first to the
    set's entropy, then towards 0 as the bigram is learned), which is what smoke tests need."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, alphabet: int = 32):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randperm(vocab_size, generator=gen)[: min(alphabet, vocab_size)]
        self.succ = {int(a): int(b) for a, b in zip(ids, ids.roll(-1))}
        self.ids = ids

    def sample(self, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        token = int(self.ids[int(torch.randint(0, len(self.ids), (1,), generator=gen))])
        out = []
        for _ in range(self.seq_len):
            out.append(token)
            token = self.succ[token]
        return torch.tensor(out, dtype=torch.long)


class TokenFile:
    """Windows of `seq_len` tokens at seeded offsets of a flat token file (.npy, or raw .bin of `dtype`)."""

    def __init__(self, path: str, vocab_size: int, seq_len: int, seed: int = 0, dtype: str = "uint16"):
        import numpy as np

        if not os.path.exists(path):
            raise ValueError(
                f"--data {path!r} does not exist (use 'synthetic' or a tokenised .npy/.bin file)"
            )
        self.tokens = (
            np.load(path, mmap_mode="r") if path.endswith(".npy") else np.memmap(path, dtype=dtype, mode="r")
        )
        self.tokens = self.tokens.reshape(-1)
        if self.tokens.shape[0] < seq_len:
            raise ValueError(f"{path} holds {self.tokens.shape[0]} tokens, fewer than --seq-len {seq_len}")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def sample(self, index: int) -> torch.Tensor:
        import numpy as np

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        start = int(torch.randint(0, self.tokens.shape[0] - self.seq_len + 1, (1,), generator=gen))
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len]).astype(np.int64))
        if int(window.max()) >= self.vocab_size or int(window.min()) < 0:
            raise ValueError(
                f"token ids in {index=} fall outside the model's vocabulary [0, {self.vocab_size})"
            )
        return window


def build_data(args):
    vocab = get_config(args.model).vocab_size
    if args.data == "synthetic":
        return SyntheticTokens(vocab, args.seq_len, args.seed)
    return TokenFile(args.data, vocab, args.seq_len, args.seed, args.data_dtype)


def global_batch(data, step: int, batch_size: int, groups) -> torch.Tensor:
    """(batch_size/dp, S) token ids of this dp replica at `step`: samples step*batch + dp_rank*local + i."""
    dp = groups.dp_size if groups is not None else 1
    if batch_size % dp:
        raise ValueError(f"--batch {batch_size} must be a multiple of dp={dp}")
    local = batch_size // dp
    first = step * batch_size + (groups.dp_rank if groups is not None else 0) * local
    return torch.stack([data.sample(first + i) for i in range(local)])


# --- gradients -----------------------------------------------------------------------------------------
def average_gradients(model, groups, bucket_bytes: int = 1 << 27) -> None:
    """Sum gradients over `dp_sp` and divide by dp (see the module docstring), in flat buckets."""
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

    Returns the norm before clipping (float32). No host synchronisation.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [
        p.grad for p in model.parameters() if p.grad is not None and getattr(p, "tp_dim", None) is not None
    ]
    replicated = [
        p.grad for p in model.parameters() if p.grad is not None and getattr(p, "tp_dim", None) is None
    ]
    device = grads[0].device
    sq = torch.zeros(2, dtype=torch.float32, device=device)
    if sharded:
        sq[0] = torch.stack([n.float() for n in torch._foreach_norm(sharded)]).pow(2).sum()
    if replicated:
        sq[1] = torch.stack([n.float() for n in torch._foreach_norm(replicated)]).pow(2).sum()
    shard_sq = sq[:1].clone()
    all_reduce(shard_sq, groups, "tp")
    norm = (shard_sq[0] + sq[1]).sqrt()
    if max_norm and max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


def train_step(
    model, optimizer, batch, groups, *, grad_clip: float | None = 1.0, autocast: bool = False, fault=None
) -> dict:
    """One optimizer step on this rank's LocalBatch; returns {'loss': replica-mean loss, 'grad_norm'}."""
    optimizer.zero_grad(set_to_none=True)
    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(batch.input_ids, batch.positions, batch.labels, batch.cu_seqlens)
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
    """The injected fault for (rank, step, where), or None."""
    if args.fail_at_step is None or rank != args.fail_rank or step != args.fail_at_step:
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
        if args.fail_mode == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected failure (--fail-mode {args.fail_mode}) on rank {rank} at step {step}")

    return fire


def train(args, progress: dict | None = None) -> list[dict]:
    """Run the whole job on this rank; returns the per-step records (rank 0 also logs them as JSON)."""
    progress = {} if progress is None else progress
    progress["where"] = "start-up"
    groups = init_distributed(args)
    rank = dist.get_rank()
    progress["rank"] = rank
    torch.manual_seed(args.seed)
    model = build_model(args, groups)
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    data = build_data(args)
    batch_size = args.batch if args.batch is not None else groups.dp_size
    start = 0
    if args.resume:
        path = latest_checkpoint(args.checkpoint_dir) if args.resume == "latest" else args.resume
        if path is None:
            if rank == 0:
                print(f"no checkpoint in {args.checkpoint_dir}; starting from step 0", file=sys.stderr)
        else:
            start = load_checkpoint(path, model, optimizer, groups)["step"]
            if rank == 0:
                print(f"resumed from {path} at step {start}", file=sys.stderr, flush=True)
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
    try:
        for step in range(start, args.steps):
            progress["where"] = f"step {step + 1}"
            ids = global_batch(data, step, batch_size, groups).to(groups.device)
            batch = local_batch(ids, groups)
            t0 = time.perf_counter()
            out = train_step(
                model,
                optimizer,
                batch,
                groups,
                grad_clip=args.grad_clip,
                autocast=args.autocast,
                fault=_fault(args, rank, step + 1, "step"),
            )
            elapsed = time.perf_counter() - t0
            tokens = batch_size * args.seq_len
            record = {
                "step": step + 1,
                "loss": out["loss"],
                "grad_norm": out["grad_norm"],
                "lr": args.lr,
                "tokens": tokens,
                "step_time_s": elapsed,
                "tokens_per_s": tokens / max(elapsed, 1e-9),
            }
            records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if args.checkpoint_dir and args.save_every and (step + 1) % args.save_every == 0:
                progress["where"] = f"saving checkpoint {step + 1}"
                save_checkpoint(
                    args.checkpoint_dir,
                    step + 1,
                    model,
                    optimizer,
                    groups,
                    meta={"model": args.model, "seed": args.seed},
                    before_publish=_fault(args, rank, step + 1, "save"),
                )
    finally:
        bar.close()
        if log is not None:
            log.close()
    return records


def _exit_on_sigterm(progress):
    def handler(signum, frame):
        print(
            f"[longvila_engine.train rank {progress.get('rank', '?')}] terminated by SIGTERM during "
            f"{progress.get('where', 'start-up')} (the launcher stops every rank when one fails); exiting",
            file=sys.stderr,
            flush=True,
        )
        os._exit(143)

    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    from .train_vlm import split_task

    task, argv = split_task(argv)  # --task vlm: the video-text trainer (train_vlm.py)
    if task == "vlm":
        from .train_vlm import main as vlm_main

        return vlm_main(argv)
    progress: dict = {}
    _exit_on_sigterm(progress)
    try:
        args = parse_args(argv)
        train(args, progress)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: B036 - any failure must end this rank, never hang it
        rank = progress.get("rank", os.environ.get("RANK", "?"))
        where = progress.get("where", "start-up")
        traceback.print_exc()
        peer = (
            ""
            if "injected" in str(exc)
            else " (if this is a collective error, another rank failed or timed out; its log has the cause)"
        )
        print(
            f"[longvila_engine.train rank {rank}] FAILED during {where}: {type(exc).__name__}: {exc}{peer}. "
            f"Exiting non-zero.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
