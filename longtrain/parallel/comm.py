"""Point-to-point communication of the sequence-parallel methods: the only way they talk.

`P2PComm.post(sends, recvs)` posts one batch of sends and receives with any peers of the group
(asynchronously: NCCL runs them on its own stream, so they overlap the block kernel the caller runs
next) and returns the receive buffers; `wait()` must come before those buffers are read or the sent
tensors are modified. A second `post` before `wait` is refused: it would reuse buffers still in
flight. Sent tensors and receive buffers stay referenced until `wait`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class P2PComm:
    def __init__(self, group, name: str, device: torch.device | None = None):
        self.group = group or dist.group.WORLD
        self.name, self.device = name, device
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self._reqs: list | None = None
        self._inflight = None

    def post(self, sends: list[tuple[Tensor, int]], recvs: list[tuple[tuple, torch.dtype, int]]) -> list[Tensor]:
        """sends: (tensor, peer); recvs: (shape, dtype, peer); peers are group ranks (taken mod N).
        Returns the receive buffers, in order."""
        if self._reqs is not None:
            raise RuntimeError(f"P2PComm({self.name}).post called while a previous batch is in flight: wait() first")
        send = [(t.contiguous(), p) for t, p in sends]
        recv = [(torch.empty(shape, dtype=dt, device=self.device), p) for shape, dt, p in recvs]
        g = lambda p: dist.get_global_rank(self.group, p % self.world)  # noqa: E731
        ops = [dist.P2POp(dist.isend, t, g(p), self.group) for t, p in send]
        ops += [dist.P2POp(dist.irecv, t, g(p), self.group) for t, p in recv]
        self._reqs = dist.batch_isend_irecv(ops) if ops else []
        self._inflight = (send, recv)  # keep both alive until wait()
        return [t for t, _ in recv]

    def wait(self) -> None:
        if self._reqs is None:
            return
        for r in self._reqs:
            r.wait()
        self._reqs = self._inflight = None
