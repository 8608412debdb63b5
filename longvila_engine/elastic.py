"""Restart, preemption and data position for the trainer under torchrun's elastic agent.

torchrun (`--max-restarts N`, static or c10d rendezvous) is the supervisor: when a worker dies it stops
the others and starts every worker again with TORCHELASTIC_RESTART_COUNT + 1. This module holds what a
worker needs to survive that:

- `init_default_group`: the default process group on a per-attempt prefix of the launcher's store.
  With TORCHELASTIC_USE_AGENT_STORE=True every worker is a client of the agent's TCPStore, and that
  store outlives an attempt. torch's env:// init uses it without a per-attempt prefix, so the restarted
  workers read the dead attempt's keys (gloo peer addresses, group counters) and hang in
  init_process_group (static rendezvous) or fail with "connectFullMesh ... Connection refused"
  (c10d rendezvous). `attempt<N>/` keys start clean every attempt (issue 15; PyTorch issue 167288 is
  the NCCL form of the same). Without the agent store (plain env://, no torchrun) it is torch's init.
- `Preemption`: SIGTERM (what SLURM and Kubernetes send, and what torchrun forwards) only sets a flag;
  every rank all-reduces the flag (MAX) at each step boundary so all ranks stop after the same step,
  save, and exit 0. A watchdog thread ends the process with 143 if that has not happened within the
  grace period (a rank stuck in a collective with a dead peer must not outlive the launcher's patience).
- `DataPosition`: the sampler position (epoch, next sample index) and every rank's torch RNG state,
  stored in the checkpoint's meta.json so a resumed run draws exactly the samples (and random numbers)
  an uninterrupted one would have.
- `resume_path`: what `--resume` means (auto / latest / none / a step directory).
- `failed_collective`: the innermost collective in a traceback, for the one-line failure report.
- `run_trainer`: the one failure and preemption path of both trainers' `main()` (`train.py`, and
  `train_vlm.py` behind `--task vlm`): SIGTERM handled by `Preemption`, any other failure reported with
  rank, step and collective, then `os._exit(1)`.

Deliberately not here: a supervisor of our own (torchrun's agent is it), the training loops (`train.py`,
`train_vlm.py`), checkpoint I/O (`checkpoint.py`).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

__all__ = [
    "restart_count",
    "init_default_group",
    "Preemption",
    "DataPosition",
    "resume_path",
    "failed_collective",
    "run_trainer",
]


def restart_count() -> int:
    """TORCHELASTIC_RESTART_COUNT: 0 on the first attempt and outside torchrun."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _need_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(
            f"environment variable {name} is not set; launch with torchrun (or set RANK, WORLD_SIZE, "
            f"MASTER_ADDR, MASTER_PORT for env:// initialisation)"
        )
    return value


def init_default_group(backend: str, timeout: datetime.timedelta) -> None:
    """init_process_group on `attempt<N>/` of torchrun's agent store, or plain env:// without one."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(_need_env("RANK")), int(_need_env("WORLD_SIZE"))
    agent_store = dist.TCPStore(
        _need_env("MASTER_ADDR"), int(_need_env("MASTER_PORT")), is_master=False, timeout=timeout
    )
    store = dist.PrefixStore(f"attempt{restart_count()}", agent_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class Preemption:
    """SIGTERM -> stop at the next step boundary on every rank, within `grace_s` seconds.

    `install()` replaces the SIGTERM handler; `should_stop(device)` is collective (every rank calls it
    once per step boundary) and returns True on every rank once any rank has been signalled. Until
    `arm()` (the training loop has started) and after `disarm()`, SIGTERM exits `exit_code` at once:
    there is no step boundary to reach, and a rank stuck at start-up must not make torchrun wait.
    `stop_after(step, ...)` is the whole step boundary of a training loop: the poll, the checkpoint, the
    report. `name` is the program in that report.
    """

    def __init__(self, grace_s: float = 30.0, describe=lambda: "", exit_code: int = 143,
                 name: str = "longvila_engine.train"):
        if not grace_s > 0:
            raise ValueError(f"preemption grace must be > 0 seconds, got {grace_s}; pass e.g. 30")
        self.grace_s, self.describe, self.exit_code = float(grace_s), describe, exit_code
        self.name = name
        self.signalled_at: float | None = None
        self.armed = False
        self.done = threading.Event()

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def install(self) -> Preemption:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        if not self.armed:
            print(
                f"{self.describe()} SIGTERM outside the training loop (the launcher stops every rank when "
                f"one fails, or the job was preempted before its first step); exiting {self.exit_code}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(self.exit_code)
        if self.signalled_at is not None:
            return
        self.signalled_at = time.monotonic()
        print(
            f"{self.describe()} SIGTERM received: stopping at the next step boundary, saving a checkpoint "
            f"and exiting 0 (grace {self.grace_s:g} s)",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self) -> None:
        if self.done.wait(self.grace_s):
            return
        print(
            f"{self.describe()} preemption grace of {self.grace_s:g} s expired before the checkpoint was "
            f"saved (a peer may be gone); exiting {self.exit_code}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(self.exit_code)

    @property
    def requested(self) -> bool:
        return self.signalled_at is not None

    def should_stop(self, device) -> bool:
        """Collective over the default group: True on every rank if any rank was signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag[0] > 0)
        if stop and self.signalled_at is None:
            self.signalled_at = time.monotonic()  # a peer was signalled: the same grace applies here
            threading.Thread(target=self._watchdog, daemon=True).start()
        return stop

    def finished(self) -> None:
        """The checkpoint is saved: the watchdog stands down."""
        self.done.set()

    def stop_after(self, step: int, device, progress: dict, rank: int, checkpoint_dir: str | None, save) -> bool:
        """The step boundary after `step` (collective, every rank): False to go on. Once any rank was
        signalled: `save()` (when there is a `checkpoint_dir`; pass None when `step` is saved already),
        the watchdog stands down, rank 0 reports, and True: leave the loop and exit 0."""
        progress["where"] = f"step {step} (end-of-step stop-flag all_reduce)"
        if not self.should_stop(device):
            return False
        progress["where"] = f"preemption checkpoint {step}"
        if checkpoint_dir and save is not None:
            save()
        self.finished()
        if rank == 0:
            what = f"checkpoint step {step} saved in {checkpoint_dir}" if checkpoint_dir \
                else "no --checkpoint-dir, nothing saved"
            print(
                f"[{self.name}] preempted by SIGTERM: every rank stopped after step {step}; {what}; exiting 0",
                file=sys.stderr,
                flush=True,
            )
        return True


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


@dataclasses.dataclass
class DataPosition:
    """Where the sampler stands: the next global sample index, its epoch, and the RNG of every rank.

    `rng` holds the distinct torch RNG states (base64) and `rng_of_rank[r]` indexes them, so a world
    whose ranks share one state stores it once.
    """

    sample_index: int = 0
    epoch: int = 0
    samples_per_epoch: int | None = None
    rng: list = dataclasses.field(default_factory=list)
    rng_of_rank: list = dataclasses.field(default_factory=list)

    @staticmethod
    def epoch_of(sample_index: int, samples_per_epoch: int | None) -> int:
        return sample_index // samples_per_epoch if samples_per_epoch else 0

    @classmethod
    def capture(cls, sample_index: int, samples_per_epoch: int | None) -> DataPosition:
        """Collective when distributed: gathers every rank's RNG state (CPU, plus CUDA when present)."""
        mine = {"cpu": _encode(torch.get_rng_state())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mine["cuda"] = _encode(torch.cuda.get_rng_state())
        states = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        distinct, index = [], []
        for s in states:
            if s not in distinct:
                distinct.append(s)
            index.append(distinct.index(s))
        return cls(sample_index, cls.epoch_of(sample_index, samples_per_epoch), samples_per_epoch, distinct, index)

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | None) -> DataPosition | None:
        if not meta or "sample_index" not in meta:
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in meta.items() if k in fields})

    def restore_rng(self, rank: int) -> bool:
        """Set this rank's RNG to the saved one (rank 0's when the world grew); False if none saved."""
        if not self.rng:
            return False
        i = self.rng_of_rank[rank] if rank < len(self.rng_of_rank) else self.rng_of_rank[0]
        state = self.rng[i]
        torch.set_rng_state(_decode(state["cpu"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(_decode(state["cuda"]))
        return True


def resume_path(resume: str | None, checkpoint_dir: str | None) -> tuple[str | None, list]:
    """(checkpoint to load or None, [(path, reason) skipped as not intact]) for a `--resume` value.

    'auto' (the default) and 'latest': the newest intact checkpoint in `checkpoint_dir`, None if there
    is none (or no directory, for 'auto'). 'none': None. Anything else: that step directory.
    """
    if resume in (None, "none"):
        return None, []
    if resume not in ("auto", "latest"):
        return resume, []
    if not checkpoint_dir:
        if resume == "latest":
            raise ValueError("--resume latest needs --checkpoint-dir DIR (or pass a step directory)")
        return None, []
    from . import checkpoint

    finder = getattr(checkpoint, "latest_intact_checkpoint", None)
    if finder is not None:
        path, skipped = finder(checkpoint_dir)
        return path, list(skipped or [])
    return checkpoint.latest_checkpoint(checkpoint_dir), []


_COMM_FILES = ("torch/distributed/distributed_c10d.py", "longvila_engine/comm/", "tensor_parallel/mappings.py")


def failed_collective(tb) -> str | None:
    """'<collective> (<file>:<line>[, called from <engine file>:<line>])' for the innermost collective
    frame of a traceback (torch.distributed, the engine's comm wrappers), or None if there is none."""
    found, caller = None, None
    for frame in traceback.extract_tb(tb):
        path = frame.filename.replace(os.sep, "/")
        where = path.split("site-packages/")[-1] if "site-packages/" in path else path
        if "longvila_engine/" in where:
            where = "longvila_engine/" + where.split("longvila_engine/")[-1]
        if any(part in path for part in _COMM_FILES) or frame.name in ("all_reduce", "wait", "barrier"):
            if found is None or "longvila_engine/" in where or "distributed_c10d" in where:
                found = (frame.name, f"{where}:{frame.lineno}")
        elif "longvila_engine/" in where and found is None:
            caller = f"{where}:{frame.lineno}"
    if found is None:
        return None
    return f"{found[0]} ({found[1]}" + (f", called from {caller})" if caller else ")")


def run_trainer(name: str, parse_args, train, argv=None, *, quiet: tuple = ()) -> int:
    """A trainer's `main()`: `train(parse_args(argv), progress, preemption)` on this rank, and 0.

    `train` keeps `progress['rank']` and `progress['where']` (the step, or what it is doing) current and
    calls `preemption.arm()` when its loop starts and `preemption.stop_after(...)` after every step.
    SIGTERM (a scheduler's preemption, or torchrun stopping the survivors of a failure): stop at the next
    step boundary with a checkpoint and exit 0; exit 143 if that takes longer than `--preempt-grace`.
    Any other exception on a rank (its own, or a collective that failed because a peer died or timed
    out) is printed with its traceback and one line `[name rank R] FAILED during <where>, in collective
    <c>: ...`, and the process leaves with `os._exit(1)` (no teardown that could block on a dead peer).
    Exceptions of a `quiet` type are the user's own message (a bad sample): no traceback, no peer hint.
    """
    progress: dict = {}

    def describe():
        return f"[{name} rank {progress.get('rank', '?')}] during {progress.get('where', 'start-up')}:"

    preemption = Preemption(describe=describe, name=name).install()
    try:
        args = parse_args(argv)
        preemption.grace_s = args.preempt_grace
        train(args, progress, preemption)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: B036 - any failure must end this rank, never hang it
        rank = progress.get("rank", os.environ.get("RANK", "?"))
        where = progress.get("where", "start-up")
        own = isinstance(exc, quiet) or "injected" in str(exc)
        if not isinstance(exc, quiet):
            traceback.print_exc()
        peer = (
            ""
            if own
            else " (if this is a collective error, another rank failed or timed out; its log has the cause)"
        )
        collective = failed_collective(exc.__traceback__)
        where += f", in collective {collective}" if collective else ""
        print(
            f"[{name} rank {rank}] FAILED during {where}: {type(exc).__name__}: {exc}{peer}. Exiting non-zero.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def leave_process(exit_code: int | None) -> None:
    """End a trainer process without interpreter teardown (the `__main__` of the trainers).

    Under torch 2.13 the static destructors of c10d/gloo objects occasionally abort a rank that has
    finished and destroyed its process group ("terminate called without an active exception", about 1
    run in 10 on 4 gloo ranks), which turns a completed run into a failed one for torchrun. Every file
    the trainer wrote is closed by then; only the standard streams need flushing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(exit_code or 0))
