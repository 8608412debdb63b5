"""`ParallelLayout`: the four parallel axes and pure rank arithmetic (docs/design.md section 3).

Ranks vary fastest along `tp`, then `ulysses`, then `ring`, then `dp`, so tensor-parallel and Ulysses
groups sit inside a node and the ring crosses nodes. Everything here is arithmetic on integers: it
creates no process group and is tested for worlds up to 256 without processes. Group creation lives
in `groups.py`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

# Fastest-varying first.
AXES = ("tp", "ulysses", "ring", "dp")
# Composite axes: the sequence-parallel group and the gradient-averaging group.
COMPOSITE = {"sp": ("ulysses", "ring"), "dp_sp": ("ulysses", "ring", "dp")}


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the parallel axes; world size = dp * ring * ulysses * tp.

    | axis | meaning | typical placement |
    |---|---|---|
    | tp | tensor parallel (heads and FFN split) | inside a node |
    | ulysses | all-to-all sequence parallel (heads scattered) | inside a node |
    | ring | ring (context) parallel, K/V passed around | across nodes |
    | dp | data parallel | across nodes |
    """

    dp: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    gpus_per_node: int = 8

    def __post_init__(self):
        for name in (*AXES, "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelLayout.{name}={value!r} must be an integer >= 1")
        inner = self.ulysses * self.tp
        if self.gpus_per_node % inner:
            msg = (f"ulysses*tp={self.ulysses}*{self.tp}={inner} does not divide gpus_per_node="
                   f"{self.gpus_per_node}: Ulysses/TP groups would straddle nodes")
            if self.world_size > self.gpus_per_node:
                raise ValueError(msg + "; choose ulysses*tp among the divisors of gpus_per_node "
                                 f"({[d for d in range(1, self.gpus_per_node + 1) if self.gpus_per_node % d == 0]})")
            warnings.warn(msg + " (fine while the job fits in one node)", stacklevel=2)

    @property
    def world_size(self) -> int:
        return self.dp * self.ring * self.ulysses * self.tp

    @property
    def sp_size(self) -> int:
        return self.ring * self.ulysses

    def size(self, axis: str) -> int:
        if axis in COMPOSITE:
            n = 1
            for a in COMPOSITE[axis]:
                n *= getattr(self, a)
            return n
        if axis not in AXES:
            raise ValueError(f"axis={axis!r} is unknown; choose one of {AXES + tuple(COMPOSITE)}")
        return getattr(self, axis)

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ValueError(
                f"world size {world_size} does not match the layout dp*ring*ulysses*tp = {self.dp}*{self.ring}*"
                f"{self.ulysses}*{self.tp} = {self.world_size}; launch {self.world_size} processes or change the layout"
            )

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.dp, self.ring, self.ulysses, self.tp, self.gpus_per_node)

    # --- rank arithmetic -------------------------------------------------------------------------
    def _strides(self) -> dict[str, int]:
        stride, out = 1, {}
        for axis in AXES:
            out[axis] = stride
            stride *= getattr(self, axis)
        return out

    def coords(self, rank: int) -> dict[str, int]:
        """Index of `rank` along each axis, e.g. {'tp': 0, 'ulysses': 3, 'ring': 1, 'dp': 0}."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside the world of {self.world_size}")
        strides = self._strides()
        return {axis: (rank // strides[axis]) % getattr(self, axis) for axis in AXES}

    def rank_of(self, coords: dict[str, int]) -> int:
        strides = self._strides()
        return sum(coords.get(axis, 0) * strides[axis] for axis in AXES)

    def _axes(self, axis: str) -> tuple[str, ...]:
        if axis in COMPOSITE:
            return COMPOSITE[axis]
        if axis not in AXES:
            raise ValueError(f"axis={axis!r} is unknown; choose one of {AXES + tuple(COMPOSITE)}")
        return (axis,)

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """Global ranks of the `axis` group containing `rank`, ordered by index within the group.

        For composite axes ('sp', 'dp_sp') the index is ulysses-fastest, matching the sequence order
        of the shards (docs/design.md section 4).
        """
        moving = self._axes(axis)
        base = self.coords(rank)
        ranks = [base]
        for a in moving:  # fastest first, so earlier axes vary fastest in the result
            ranks = [dict(c, **{a: i}) for i in range(getattr(self, a)) for c in ranks]
        return [self.rank_of(c) for c in ranks]

    def all_groups(self, axis: str) -> list[list[int]]:
        """Every `axis` group of the world, in a deterministic order (all ranks create them alike)."""
        seen, groups = set(), []
        for rank in range(self.world_size):
            ranks = self.group_ranks(axis, rank)
            if ranks[0] not in seen:
                seen.add(ranks[0])
                groups.append(ranks)
        return groups

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def is_intra_node(self, ranks) -> bool:
        """True when all `ranks` share a node (their traffic rides NVLink, not the network)."""
        return len({self.node_of(r) for r in ranks}) <= 1

    def num_nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)
