"""How one sequence is split over the ranks of an sp group: the single source of truth for the data
path, the model and the tests.

Layouts (N = sp degree, S = global sequence length):
  contiguous  rank r holds tokens [r*S/N, (r+1)*S/N). Needs S % N == 0. Under causal attention the
              last rank does N times the work of the first (unbalanced), but any N works.
  zigzag      the sequence is cut into 2N chunks; rank r holds chunk r followed by chunk 2N-1-r.
              Needs S % 2N == 0. Every rank then does the same causal work at every ring step.
Local tokens keep increasing global positions in both layouts, so a top-left causal mask on a
rank's own tokens is the global causal mask restricted to them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


def check_layout(s_global: int, n: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"sequence layout {layout!r} is not one of {list(LAYOUTS)}")
    parts = 2 * n if layout == "zigzag" else n
    if s_global % parts:
        lo = s_global // parts * parts
        raise ValueError(f"sequence length {s_global} is not divisible by {parts} ({layout} layout over {n} ranks "
                         f"needs a multiple of {parts}): use {lo or parts} or {lo + parts}")


def shard_positions(s_global: int, rank: int, n: int, layout: str) -> Tensor:
    """Global positions of the tokens rank `rank` holds, in local order."""
    check_layout(s_global, n, layout)
    if layout == "contiguous":
        c = s_global // n
        return torch.arange(rank * c, (rank + 1) * c)
    c = s_global // (2 * n)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * n - 1 - rank) * c, (2 * n - rank) * c)])


def _rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: Tensor, dim: int, group=None, layout: str = "zigzag", *, rank: int | None = None,
                   world: int | None = None) -> Tensor:
    """This rank's part of a full-sequence tensor (a copy, contiguous). `rank`/`world` may be given
    instead of a group (single-process tests and data preparation)."""
    if rank is None or world is None:
        rank, world = _rank_world(group)
    idx = shard_positions(x.shape[dim], rank, world, layout).to(x.device)
    return x.index_select(dim, idx).contiguous()


def unshard_sequence(x_local: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """The full-sequence tensor from every rank's part (all-gather, then back into global order)."""
    rank, world = _rank_world(group)
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    s_global = x_local.shape[dim] * world
    out = torch.empty((*x_local.shape[:dim], s_global, *x_local.shape[dim + 1:]), dtype=x_local.dtype,
                      device=x_local.device)
    for r, part in enumerate(parts):
        out.index_copy_(dim, shard_positions(s_global, r, world, layout).to(x_local.device), part)
    return out
