"""`init_parallel`: the only place that creates process groups, and the `ParallelGroups` it returns.

Under NCCL the process is bound to cuda:LOCAL_RANK first (or a conflicting device choice is refused).
Every rank then checks that all ranks passed the same layout (one all-gather on the default group),
so a mismatch fails loudly on every rank instead of hanging in a later collective. Every group gets
the timeout. Nothing here is global: the returned object is passed down explicitly.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..comm.counters import CommStats
from .layout import AXES, COMPOSITE, ParallelLayout

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class _PerAxis:
    """Read-only view of one axis of a `ParallelGroups` (a class attribute, so IDEs list the names)."""

    def __init__(self, axis: str):
        self.axis = axis

    def __set__(self, obj, value):
        raise AttributeError(f"ParallelGroups axis attributes are read-only ({self.axis})")


class _GroupOf(_PerAxis):
    def __get__(self, obj, owner=None) -> dist.ProcessGroup | None:
        return self if obj is None else obj.group(self.axis)


class _RankOf(_PerAxis):
    def __get__(self, obj, owner=None) -> int:
        return self if obj is None else obj.index(self.axis)


class _SizeOf(_PerAxis):
    def __get__(self, obj, owner=None) -> int:
        return self if obj is None else obj.size(self.axis)


class _RanksOf(_PerAxis):
    def __get__(self, obj, owner=None) -> list[int]:
        return self if obj is None else obj.ranks(self.axis)


@dataclass
class ParallelGroups:
    """Process groups of one layout, seen from one rank.

    Per axis in ('tp', 'ulysses', 'ring', 'dp', 'sp', 'dp_sp'): the group (e.g. `ring`, None in a
    single process), `<axis>_rank`, `<axis>_size` and `<axis>_ranks` (global ranks, ordered by index
    in the group). `stats` holds the traffic counters every communication wrapper updates.
    `ParallelGroups.single()` is the one-process object: every axis of size 1, no process group.
    """

    layout: ParallelLayout
    rank: int
    world_size: int
    timeout: datetime.timedelta
    backend: str
    stats: CommStats = field(default_factory=CommStats, repr=False)
    _groups: dict = field(default_factory=dict, repr=False)
    _device: torch.device | None = field(default=None, repr=False)

    tp, tp_rank, tp_size, tp_ranks = _GroupOf("tp"), _RankOf("tp"), _SizeOf("tp"), _RanksOf("tp")
    ulysses, ulysses_rank = _GroupOf("ulysses"), _RankOf("ulysses")
    ulysses_size, ulysses_ranks = _SizeOf("ulysses"), _RanksOf("ulysses")
    ring, ring_rank, ring_size, ring_ranks = _GroupOf("ring"), _RankOf("ring"), _SizeOf("ring"), _RanksOf("ring")
    dp, dp_rank, dp_size, dp_ranks = _GroupOf("dp"), _RankOf("dp"), _SizeOf("dp"), _RanksOf("dp")
    sp, sp_rank, sp_size, sp_ranks = _GroupOf("sp"), _RankOf("sp"), _SizeOf("sp"), _RanksOf("sp")
    dp_sp, dp_sp_rank = _GroupOf("dp_sp"), _RankOf("dp_sp")
    dp_sp_size, dp_sp_ranks = _SizeOf("dp_sp"), _RanksOf("dp_sp")

    @classmethod
    def single(cls, device=None) -> ParallelGroups:
        """The groups of one process on `device` (default CPU): every axis of size 1, no collective.
        One object per device, so models and batches built apart still share it."""
        device = torch.device("cpu" if device is None else device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in _SINGLE:
            groups = cls(layout=ParallelLayout(gpus_per_node=1), rank=0, world_size=1, timeout=DEFAULT_TIMEOUT,
                         backend="none", _device=device)
            for axis in (*AXES, *COMPOSITE):
                groups._groups[axis] = (None, [0])
            _SINGLE[key] = groups
        return _SINGLE[key]

    def group(self, axis: str):
        return self._groups[axis][0]

    def ranks(self, axis: str) -> list[int]:
        return self._groups[axis][1]

    def size(self, axis: str) -> int:
        return len(self._groups[axis][1])

    def index(self, axis: str) -> int:
        return self._groups[axis][1].index(self.rank)

    def is_intra_node(self, axis: str) -> bool:
        return self.layout.is_intra_node(self._groups[axis][1])

    @property
    def device(self) -> torch.device:
        """Device collectives run on: the current CUDA device under NCCL, else CPU (or the device of
        `single(device)`)."""
        if self._device is not None:
            return self._device
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_SINGLE: dict[str, ParallelGroups] = {}


def as_groups(groups, device=None) -> ParallelGroups:
    """`groups` itself, or `ParallelGroups.single(device)` for None (public functions accept None for
    one process and normalise it here, at entry)."""
    return ParallelGroups.single(device) if groups is None else groups


def _check_same_layout(groups: ParallelGroups) -> None:
    """One agreement over the whole world (the default group, held as the axis 'world')."""
    from ..comm.counted import agree

    fields = dict(zip(("dp", "ring", "ulysses", "tp", "gpus_per_node"), groups.layout.as_tuple()))
    agree(groups, "world", fields, None, "init_parallel: ranks disagree on the ParallelLayout",
          mismatch_hint="pass the same layout on every rank")


def _bind_cuda_device() -> torch.device:
    """The CUDA device of this process under NCCL: cuda:LOCAL_RANK (issue #12).

    NCCL runs on the current device, so a process left on cuda:0 while its LOCAL_RANK is 3 makes every
    rank of the node share one GPU (or hang). When the current device is not LOCAL_RANK's: if it is
    still the default (0, nothing was chosen), bind it; if the user picked another one, raise.
    """
    local_rank = os.environ.get("LOCAL_RANK")
    current = torch.cuda.current_device()
    if local_rank is None:
        return torch.device("cuda", current)
    local_rank = int(local_rank)
    if current != local_rank:
        if current != 0:
            raise ValueError(f"the current CUDA device is cuda:{current} but LOCAL_RANK={local_rank}: NCCL would "
                             f"put this rank on another process's GPU. Call torch.cuda.set_device({local_rank}) "
                             f"(or leave the device unset and init_parallel binds it)")
        torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_parallel(layout: ParallelLayout, timeout: datetime.timedelta | float | None = None) -> ParallelGroups:
    """Create the groups of `layout` (torch.distributed must be initialised, as torchrun or tests do).

    `timeout` (timedelta or seconds, default 10 minutes) applies to every group created here.
    """
    if not isinstance(layout, ParallelLayout):
        raise ValueError(f"layout must be a ParallelLayout, got {type(layout).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: launch with torchrun and call "
                         "torch.distributed.init_process_group(...) before init_parallel")
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    world, rank = dist.get_world_size(), dist.get_rank()
    backend = dist.get_backend()
    if backend == "nccl":
        _bind_cuda_device()
    groups = ParallelGroups(layout=layout, rank=rank, world_size=world, timeout=timeout, backend=backend)
    groups._groups["world"] = (None, list(range(world)))  # None: the default group
    # Agree on the layout before any other collective; then the world-size check is the same everywhere.
    _check_same_layout(groups)
    layout.check_world_size(world)
    for axis in (*AXES, *COMPOSITE):
        mine = None
        for ranks in layout.all_groups(axis):
            # Every rank must take part in creating every group, in the same order.
            pg = dist.new_group(ranks=ranks, timeout=timeout)
            if rank in ranks:
                mine = (pg, ranks)
        groups._groups[axis] = mine
    return groups
