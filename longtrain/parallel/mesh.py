"""Process groups from the torchrun environment: a 2-D mesh of data-parallel x sequence-parallel ranks.

Ranks that share one sequence (an sp group) are neighbours (rank = dp_rank * sp + sp_rank), so on a
node they sit on GPUs joined by NVLink; the dp groups stride across them. Built with torch's
DeviceMesh; gloo on CPU, NCCL on GPU. Engines shard states over *all* ranks (dp x sp): every rank
holds a full copy of the parameters' gradients' contribution from its tokens.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Mesh:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp_rank: int = 0
    dp_size: int = 1
    sp_rank: int = 0
    sp_size: int = 1
    world_group: object | None = None  # None when running as a single process
    dp_group: object | None = None  # ranks holding different sequences (same sp_rank)
    sp_group: object | None = None  # ranks sharing one sequence

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA GPU is visible: use train.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check_sp_degree(sp: int, world: int) -> None:
    if sp < 1 or world % sp:
        ok = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"parallel.sp.degree={sp} does not divide the {world} ranks: use one of {ok}")


def init_mesh(device: str = "auto", backend: str = "auto", timeout_s: int = 600, need_group: bool = False,
              sp_degree: int = 1) -> Mesh:
    """Join the process group torchrun (or our launcher) describes in the environment, if any, and
    split it into dp x sp. `need_group`: create a one-rank group when running alone (DeepSpeed wants one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_sp_degree(sp_degree, world)
    dev = pick_device(device, local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dev.type == "cpu" and local_world > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world == 1 and need_group and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(k, v)
    mesh = Mesh(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world == 1 and not need_group:
        return mesh
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("launch.backend=nccl needs CUDA devices: use launch.backend=gloo (or auto) on CPU")
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    if world == 1:
        return mesh
    from torch.distributed.device_mesh import init_device_mesh

    dm = init_device_mesh(dev.type, (world // sp_degree, sp_degree), mesh_dim_names=("dp", "sp"))
    mesh.world_group = dist.group.WORLD
    mesh.dp_group, mesh.sp_group = dm.get_group("dp"), dm.get_group("sp")
    mesh.dp_rank, mesh.sp_rank = dm.get_local_rank("dp"), dm.get_local_rank("sp")
    mesh.dp_size, mesh.sp_size = world // sp_degree, sp_degree
    return mesh


def all_reduce_sum(t: torch.Tensor, mesh: Mesh, group=None) -> torch.Tensor:
    """Sum over every rank (default) or over `group`."""
    if mesh.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group or mesh.world_group)
    return t
