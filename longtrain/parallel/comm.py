"""Point-to-point exchange with ring neighbours, the only communication the ring methods use.

One `RingComm` per attention call. `exchange(tensors)` posts the sends to the next rank and the
receives from the previous one (asynchronously: NCCL runs them on its own stream, so they overlap
the block kernel the caller runs next) and returns the receive buffers; `wait()` must come before
those buffers are read or the sent tensors are modified. A second `exchange` before `wait` is
refused: it would reuse buffers still in flight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class RingComm:
    def __init__(self, group):
        group = group or dist.group.WORLD
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self._reqs: list | None = None

    def exchange(self, tensors: list[Tensor], to_prev: bool = False) -> list[Tensor]:
        """Send `tensors` one hop (to next, or to prev when `to_prev`), receive the same shapes from the
        other side. Returns fresh receive buffers (double buffering: the sent ones stay untouched)."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.exchange called while a previous exchange is in flight: wait() first")
        dst, src = (self.prev, self.next) if to_prev else (self.next, self.prev)
        send = [t.contiguous() for t in tensors]
        recv = [torch.empty_like(t) for t in send]
        ops = [dist.P2POp(dist.isend, t, dst, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, r, src, self.group) for r in recv]
        self._reqs = dist.batch_isend_irecv(ops)
        self._inflight = (send, recv)  # keep both alive until wait()
        return recv

    def wait(self) -> None:
        if self._reqs is None:
            return
        for r in self._reqs:
            r.wait()
        self._reqs = self._inflight = None
