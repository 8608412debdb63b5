"""Per-group traffic counters (docs/design.md section 9).

Every communication wrapper records the bytes this rank sent on a group axis and the seconds it
waited for completion; the layout labels the traffic intra-node (NVLink-like) or inter-node. The
counters live on the `ParallelGroups` object (`groups.stats`), never in module globals.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class CommStats:
    """Counters keyed by axis name ('ring', 'ulysses', 'tp', 'dp', 'sp', 'dp_sp')."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = defaultdict(int)
        self.calls = defaultdict(int)
        self.wait_s = defaultdict(float)
        self.intra_node: dict[str, bool] = {}

    def record(self, axis: str, nbytes: int, intra_node: bool) -> None:
        self.bytes_sent[axis] += int(nbytes)
        self.calls[axis] += 1
        self.intra_node[axis] = intra_node

    @contextmanager
    def waiting(self, axis: str):
        """Time spent blocked on `axis` communication (a wait(), or a blocking collective)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s[axis] += time.perf_counter() - t0

    def summary(self) -> dict:
        """{'ring': {'bytes': .., 'calls': .., 'wait_s': .., 'link': 'inter-node'}, ...}"""
        return {
            axis: {"bytes": self.bytes_sent[axis], "calls": self.calls[axis], "wait_s": self.wait_s[axis],
                   "link": "intra-node" if self.intra_node.get(axis, True) else "inter-node"}
            for axis in sorted(set(self.bytes_sent) | set(self.wait_s))
        }
