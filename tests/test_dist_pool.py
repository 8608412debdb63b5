"""The shared process pools of tests/dist_pool.py: one pool per world size, reused, restartable."""
import pytest
import torch.distributed as dist
from dist_pool import DistPools


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise RuntimeError("rank one fails on purpose")
    return dist.get_rank()


def test_one_pool_per_world_size_reused_and_restartable(dist_pools):
    pool = dist_pools.get(2)
    assert dist_pools.get(2) is pool
    assert pool.run(_rank_and_world) == [(0, 2), (1, 2)]
    first_pids = [p.pid for p in pool.procs]
    assert pool.run(_rank_and_world) == [(0, 2), (1, 2)]
    assert [p.pid for p in pool.procs] == first_pids  # same ranks, no respawn
    assert 2 in dist_pools.world_sizes()
    with pytest.raises(AssertionError, match="rank one fails on purpose"):
        pool.run(_fail_on_rank_one)
    assert pool.procs == []  # a failure kills the ranks ...
    assert pool.run(_rank_and_world) == [(0, 2), (1, 2)]  # ... and the next use restarts them


def test_rejects_a_world_size_below_one():
    with pytest.raises(ValueError, match="world_size"):
        DistPools().get(0)
