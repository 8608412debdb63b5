"""`RingExchange`: one asynchronous step of passing tensors around the ring (docs/design.md section 5).

`start(tensors)` posts, in one `dist.batch_isend_irecv`, a send of every tensor to the next ring rank
and a receive of a same-shaped tensor from the previous one, and returns at once; `wait()` blocks
until both directions finished and returns the received tensors. The attention loop posts the next
block before computing the current one, so the transfer hides behind the compute:

    for step in range(ring_size):
        if step + 1 < ring_size: exchange.start([k, v])    # next block in flight
        compute(k, v)                                     # current block
        if step + 1 < ring_size: k, v = exchange.wait()

Each exchange object owns one message stream (a tag range): ring attention uses one for K/V and a
second, concurrent one for the dK/dV accumulators that ride home in backward. Bytes sent and time
waited are recorded on `groups.stats` under the axis ('ring' by default).

Deliberately not here: what is computed between start and wait, host synchronisation (none: the
work objects are only waited on, never polled -- a gloo P2P work reports "not completed" until
wait() is called), barriers, and collectives other than point-to-point.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["RingExchange"]


class RingExchange:
    """Send a list of tensors to ring rank r+1 (or r-1) while receiving the same shapes from r-1 (r+1).

    | arg | meaning |
    |---|---|
    | groups | `ParallelGroups`; the group of `axis` is the ring |
    | axis | group axis to ring over ('ring'; 'sp' or others work too) |
    | direction | +1: send to the next rank, receive from the previous (K/V flow); -1: the reverse |
    | tag | first P2P tag of this stream; tensor i of a call uses tag + i. Two exchanges in flight at
    once on the same group must use disjoint tag ranges |
    | double_buffer | receive into two alternating sets of buffers, allocated once, instead of fresh
    ones per start: what wait() returns is then overwritten by the next-but-one start, which suits a
    ring loop that computes on and forwards each received tensor during the next step only |

    One `start` may be in flight at a time per object; `wait` must follow before the next `start`.
    The sent tensors are kept alive (and must not be written to) until `wait` returns.
    """

    def __init__(self, groups, *, axis: str = "ring", direction: int = 1, tag: int = 0,
                 double_buffer: bool = False):
        if direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {direction!r}")
        self.axis = axis
        self.group = groups.group(axis)
        self.size = groups.size(axis)
        self.rank = groups.index(axis)
        self.stats = groups.stats
        self.intra_node = groups.is_intra_node(axis)
        self.send_to = (self.rank + direction) % self.size
        self.recv_from = (self.rank - direction) % self.size
        self.tag = int(tag)
        self._works = None
        self._sent = None
        self._received = None
        self._sets = [None, None] if double_buffer else None
        self._starts = 0

    @property
    def in_flight(self) -> bool:
        return self._works is not None

    def start(self, tensors) -> None:
        """Post the sends of `tensors` and the receives of same-shaped buffers; returns immediately."""
        if self._works is not None:
            raise RuntimeError("RingExchange.start() called twice without wait(): one step at a time")
        if self.size == 1:
            raise ValueError(f"a ring of one rank has no neighbour to exchange with (axis {self.axis!r})")
        sent = [t.contiguous() for t in tensors]
        if self._sets is None:
            received = [torch.empty_like(t) for t in sent]
        else:  # start n receives into set n % 2, allocated on first use
            turn = self._starts % 2
            if self._sets[turn] is None or [(b.shape, b.dtype) for b in self._sets[turn]] != \
                    [(t.shape, t.dtype) for t in sent]:
                self._sets[turn] = [torch.empty_like(t) for t in sent]
            received = self._sets[turn]
        self._starts += 1
        sends = [dist.P2POp(dist.isend, t, group=self.group, group_peer=self.send_to, tag=self.tag + i)
                 for i, t in enumerate(sent)]
        recvs = [dist.P2POp(dist.irecv, t, group=self.group, group_peer=self.recv_from, tag=self.tag + i)
                 for i, t in enumerate(received)]
        # Even ranks send first, odd ranks receive first. batch_isend_irecv posts every op
        # asynchronously, so no order can deadlock it on NCCL (one ncclGroup) or gloo (async pairs);
        # the order still matters where a backend serialises the list (a blocking fallback, MPI, a
        # rendezvous-size message on some transports): alternating parity makes each rank's first op
        # meet the matching first op of its neighbour instead of every rank blocking in a send. With a
        # ring of two, next and previous are the same peer, and the pairing is what keeps it sane.
        ops = sends + recvs if self.rank % 2 == 0 else recvs + sends
        self._works = dist.batch_isend_irecv(ops)
        for t in sent:
            self.stats.record(self.axis, t.numel() * t.element_size(), self.intra_node)
        self._sent, self._received = sent, received

    def wait(self) -> list[torch.Tensor]:
        """Block until this step's sends and receives completed; return the received tensors."""
        if self._works is None:
            raise RuntimeError("RingExchange.wait() without a start() in flight")
        with self.stats.waiting(self.axis):
            for work in self._works:
                work.wait()
        received = self._received
        self._works, self._sent, self._received = None, None, None
        return received
