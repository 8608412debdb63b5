"""ParallelLayout rank arithmetic (pure, no processes) and init_parallel on real gloo groups."""
import pytest
import torch
import torch.distributed as dist
from dist_pool import groups_for

from longvila_engine import ParallelLayout


def test_two_nodes_of_eight():
    layout = ParallelLayout(ring=2, ulysses=8)
    assert layout.world_size == 16
    assert layout.group_ranks("ulysses", 5) == list(range(8))
    assert layout.group_ranks("ring", 0) == [0, 8]
    assert layout.all_groups("ring") == [[i, i + 8] for i in range(8)]
    assert layout.is_intra_node(layout.group_ranks("ulysses", 9))
    assert not layout.is_intra_node(layout.group_ranks("ring", 3))


@pytest.mark.parametrize("dims", [(1, 1, 1, 1), (2, 4, 8, 1), (4, 8, 4, 2), (1, 32, 8, 1), (2, 2, 1, 8), (8, 2, 2, 2)])
def test_rank_arithmetic_partitions_the_world(dims):
    dp, ring, ulysses, tp = dims
    layout = ParallelLayout(dp=dp, ring=ring, ulysses=ulysses, tp=tp)
    world = layout.world_size
    assert world <= 256
    for axis in ("tp", "ulysses", "ring", "dp", "sp", "dp_sp"):
        groups = layout.all_groups(axis)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(world)), axis
        assert all(len(g) == layout.size(axis) for g in groups)
    for rank in range(world):
        c = layout.coords(rank)
        assert layout.rank_of(c) == rank
        # tp fastest, then ulysses, ring, dp
        assert rank == c["tp"] + tp * (c["ulysses"] + ulysses * (c["ring"] + ring * c["dp"]))
        sp = layout.group_ranks("sp", rank)
        assert sp.index(rank) == c["ulysses"] + ulysses * c["ring"]


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="ring=0"):
        ParallelLayout(ring=0)
    with pytest.raises(ValueError, match="does not divide gpus_per_node"):
        ParallelLayout(ulysses=3, ring=4)  # spans nodes, Ulysses groups would straddle them
    with pytest.warns(UserWarning, match="fits in one node"):
        ParallelLayout(ulysses=3)
    with pytest.raises(ValueError, match="does not match the layout"):
        ParallelLayout(ring=2).check_world_size(4)


def _groups_case(layout):
    groups = groups_for(layout)
    rank = dist.get_rank()
    out = {}
    for axis in ("tp", "ulysses", "ring", "dp", "sp", "dp_sp"):
        t = torch.tensor([rank], dtype=torch.int64)
        gathered = [torch.empty_like(t) for _ in range(groups.size(axis))]
        dist.all_gather(gathered, t, group=groups.group(axis))
        out[axis] = ([int(x) for x in gathered], groups.index(axis))
    return out


def _mismatched_layout():
    from longvila_engine.parallel import init_parallel

    layout = ParallelLayout(ring=4) if dist.get_rank() else ParallelLayout(ulysses=4)
    init_parallel(layout, timeout=20)


def test_groups_on_four_ranks(pool):
    layout = ParallelLayout(ring=2, ulysses=2)
    results = pool.run(_groups_case, layout)
    for rank, res in enumerate(results):
        for axis, (members, index) in res.items():
            assert members == layout.group_ranks(axis, rank)
            assert members[index] == rank


def test_ranks_disagreeing_on_layout_fail_everywhere(pool):
    with pytest.raises(AssertionError, match="disagree on the ParallelLayout"):
        pool.run(_mismatched_layout)
