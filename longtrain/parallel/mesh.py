"""Process groups from the torchrun environment (gloo on CPU, NCCL on GPU)."""

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
    dp_rank: int
    dp_size: int
    dp_group: object | None  # None when running as a single process

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


def init_mesh(device: str = "auto", backend: str = "auto", timeout_s: int = 600, need_group: bool = False) -> Mesh:
    """Join the process group torchrun (or our launcher) describes in the environment, if any.
    `need_group`: create a one-rank group when running alone (DeepSpeed always wants one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dev.type == "cpu" and local_world > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    group = None
    if world == 1 and need_group and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    if world > 1 or need_group:
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("launch.backend=nccl needs CUDA devices: use launch.backend=gloo (or auto) on CPU")
        if not dist.is_initialized():
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
        group = dist.group.WORLD if world > 1 else None
    return Mesh(rank=rank, world_size=world, local_rank=local_rank, device=dev, dp_rank=rank, dp_size=world,
                dp_group=group)


def all_reduce_sum(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    if mesh.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=mesh.dp_group)
    return t
