"""`init_parallel`: the only place that creates process groups, and the `ParallelGroups` it returns.

Every rank first checks that all ranks passed the same layout (one all-gather on the default group),
so a mismatch fails loudly on every rank instead of hanging in a later collective. Every group gets
the timeout. Nothing here is global: the returned object is passed down explicitly.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..comm.counters import CommStats
from .layout import AXES, COMPOSITE, ParallelLayout

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class ParallelGroups:
    """Process groups of one layout, seen from one rank.

    Attributes per axis in ('tp', 'ulysses', 'ring', 'dp', 'sp', 'dp_sp'): the group (e.g. `ring`),
    `<axis>_rank`, `<axis>_size` and `<axis>_ranks` (global ranks, ordered by index in the group).
    `stats` holds the traffic counters every communication wrapper updates.
    """

    layout: ParallelLayout
    rank: int
    world_size: int
    timeout: datetime.timedelta
    backend: str
    stats: CommStats = field(default_factory=CommStats, repr=False)
    _groups: dict = field(default_factory=dict, repr=False)

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

    def __getattr__(self, name):
        # ring, ring_rank, ring_size, ring_ranks, ... for every axis.
        groups = self.__dict__.get("_groups", {})
        if name in groups:
            return groups[name][0]
        for suffix, fn in (("_rank", self.index), ("_size", self.size), ("_ranks", self.ranks)):
            if name.endswith(suffix) and name[: -len(suffix)] in groups:
                return fn(name[: -len(suffix)])
        raise AttributeError(f"ParallelGroups has no attribute {name!r}")

    @property
    def device(self) -> torch.device:
        """Device collectives run on: the current CUDA device under NCCL, else CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _check_same_layout(layout: ParallelLayout, device: torch.device) -> None:
    mine = torch.tensor(layout.as_tuple(), dtype=torch.int64, device=device)
    world = dist.get_world_size()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    seen = {}
    for rank, t in enumerate(gathered):
        seen.setdefault(tuple(t.tolist()), []).append(rank)
    if len(seen) > 1:
        names = "(dp, ring, ulysses, tp, gpus_per_node)"
        detail = "; ".join(f"ranks {ranks} passed {key}" for key, ranks in seen.items())
        raise ValueError(f"ranks disagree on the ParallelLayout {names}: {detail}. Pass the same layout on every rank")


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
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    # Agree on the layout before any other collective; then the world-size check is the same everywhere.
    _check_same_layout(layout, device)
    layout.check_world_size(world)
    groups = ParallelGroups(layout=layout, rank=rank, world_size=world, timeout=timeout, backend=backend)
    for axis in (*AXES, *COMPOSITE):
        mine = None
        for ranks in layout.all_groups(axis):
            # Every rank must take part in creating every group, in the same order.
            pg = dist.new_group(ranks=ranks, timeout=timeout)
            if rank in ranks:
                mine = (pg, ranks)
        groups._groups[axis] = mine
    return groups
