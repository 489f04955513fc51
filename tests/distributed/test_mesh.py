"""The dp x sp mesh on real gloo processes: group membership, reductions, and data sharding by group."""

import os

import pytest
import torch.distributed as dist

from longtrain.data import ResumableSampler
from longtrain.parallel.mesh import check_sp_degree, init_mesh
from ranks import spawn_ranks

pytestmark = pytest.mark.slow


def _worker(rank, world, port, sp, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        mesh = init_mesh("cpu", "gloo", timeout_s=60, sp_degree=sp)
        members = {}
        for name, group in (("sp", mesh.sp_group), ("dp", mesh.dp_group)):
            out = [None] * dist.get_world_size(group)
            dist.all_gather_object(out, rank, group=group)
            members[name] = out
        s = ResumableSampler(64, global_batch_size=2 * mesh.dp_size, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size,
                             seed=3)
        idx = next(iter(s))
        q.put((rank, mesh.dp_rank, mesh.sp_rank, members, idx))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world,sp", [(4, 2), (3, 3), (3, 1)])
def test_mesh_groups_and_data_sharding(world, sp):
    got = sorted(spawn_ranks(_worker, world, sp))
    for rank, dp_rank, sp_rank, members, idx in got:
        assert (dp_rank, sp_rank) == divmod(rank, sp)  # sp groups are runs of consecutive ranks
        assert members["sp"] == list(range(dp_rank * sp, dp_rank * sp + sp))
        assert members["dp"] == list(range(sp_rank, world, sp))
    by_dp = {}
    for rank, dp_rank, _, _, idx in got:
        by_dp.setdefault(dp_rank, []).append(idx)
    for idxs in by_dp.values():  # every rank of an sp group reads the same sequences
        assert all(i == idxs[0] for i in idxs)
    firsts = [v[0] for v in by_dp.values()]
    assert len({tuple(f) for f in firsts}) == len(firsts)  # dp groups read different ones


def test_sp_degree_must_divide_the_ranks():
    with pytest.raises(ValueError, match=r"parallel.sp.degree=3 does not divide the 4 ranks: use one of \[1, 2, 4\]"):
        check_sp_degree(3, 4)
