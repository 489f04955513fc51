"""Per-document masks for packed sequences, as dense sub-blocks of the block kernels.

A packed sequence holds several documents back to back; a token must attend only to earlier tokens
of its own document. The data path marks them with `doc_ids` (B, S): non-decreasing along the global
sequence (packing.py). Every layout keeps a rank's tokens in increasing global order (sharding.py),
so on each rank, and in any slice of its rows, the tokens of one document form ONE contiguous run.

That makes the mask block-sparse in the simplest way: a (query rows x key rows) block of attention
restricted to "same document" is a set of dense sub-blocks, one per document present on both sides:
  causal block (the diagonal: the same rows as queries and keys)   each run x itself, causal
  off-diagonal block (all keys precede all queries, or non-causal) each shared document: its query
                                                                   run x its key run, no mask
So any block kernel (math, CPU flash, flash, cuDNN) computes a document mask exactly with no mask
tensor and no wasted work; rows whose document has no key in a block are simply not touched (their
partial LSE stays -inf). The cost is one kernel call per document per block: fine for the long
documents long-context training packs; many tiny documents mean many small calls.

`Documents` holds the runs of every rank's shard (host lists, built once per step and reused by every
layer, see `documents_for`): `blocks(b, q_rank, k_rank, q_rows, k_rows, causal)` refines one block.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

Run = tuple[int, int, int]  # (doc id, start row, end row) of one document's contiguous rows
UNSHARDED = "unsharded"  # the `group` of a sequence that is not split over ranks


def doc_runs(doc_ids_S: np.ndarray) -> list[Run]:
    """Contiguous runs of equal ids; refuses ids that go back down (not a packed sequence)."""
    ids = np.asarray(doc_ids_S)
    if ids.size == 0:
        return []
    step = np.diff(ids)
    if (step < 0).any():
        i = int(np.flatnonzero(step < 0)[0])
        raise ValueError(f"doc_ids must be non-decreasing along the sequence (packed documents); "
                         f"found {int(ids[i])} then {int(ids[i + 1])} at rows {i}, {i + 1}")
    starts = np.concatenate(([0], np.flatnonzero(step) + 1))
    ends = np.concatenate((starts[1:], [ids.size]))
    return [(int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _clip(runs: list[Run], rows: slice, n: int) -> list[Run]:
    """The runs inside rows [a, b) of an n-row shard, renumbered from a."""
    a, b, _ = rows.indices(n)
    return [(d, max(s, a) - a, min(e, b) - a) for d, s, e in runs if s < b and e > a]


def _shifted(r: slice, n: int, start: int, end: int) -> slice:
    a = r.indices(n)[0]
    return slice(a + start, a + end)


class Documents:
    """Document runs of each rank's shard of an sp group (one rank when not sharded), per batch row."""

    def __init__(self, runs: list[list[list[Run]]], s_local: int):
        self.runs = runs  # runs[rank][b]
        self.s_local = s_local

    @classmethod
    def from_doc_ids(cls, doc_ids_BS: Tensor, group=UNSHARDED) -> "Documents | None":
        """Runs of every rank's `doc_ids_BS` (this rank's shard), all-gathered over the sp `group`
        (None: the default group); UNSHARDED: the whole sequence is here.
        None when every sequence is a single document: then plain causal attention is the same thing."""
        if group is not UNSHARDED and dist.get_world_size(group) > 1:
            parts = [torch.empty_like(doc_ids_BS) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, doc_ids_BS.contiguous(), group=group)
        else:
            parts = [doc_ids_BS]
        host = np.stack([p.cpu().numpy() for p in parts])  # (ranks, B, S_local)
        # One document per sequence (every rank's rows the same id): nothing to mask.
        if (host == host[:1, :, :1]).all():
            return None
        # Runs along the global order need the shards in global order: each shard is increasing, and
        # document ids only matter by equality, so per-shard runs are enough.
        return cls([[doc_runs(row) for row in shard] for shard in host], host.shape[2])

    def blocks(self, b: int, q_rank: int, k_rank: int, q_rows: slice, k_rows: slice,
               causal: bool) -> list[tuple[slice, slice, bool]]:
        """Refine the block (q_rank's q_rows) x (k_rank's k_rows) of batch row b into per-document
        dense sub-blocks (query rows, key rows, causal?) in the shard's row numbers."""
        n = self.s_local
        q_runs = _clip(self.runs[q_rank][b], q_rows, n)
        if causal:
            # The diagonal block: queries and keys are the same rows (top-left aligned causal).
            assert q_rank == k_rank and q_rows.indices(n) == k_rows.indices(n), (q_rank, k_rank, q_rows, k_rows)
            return [(_shifted(q_rows, n, s, e), _shifted(k_rows, n, s, e), True) for _, s, e in q_runs]
        k_runs = {d: (s, e) for d, s, e in _clip(self.runs[k_rank][b], k_rows, n)}
        return [(_shifted(q_rows, n, s, e), _shifted(k_rows, n, *k_runs[d]), False)
                for d, s, e in q_runs if d in k_runs]


_last: tuple = (None, None, None)


def documents_for(doc_ids_BS: Tensor | None, group=UNSHARDED) -> Documents | None:
    """`Documents.from_doc_ids`, cached for the last tensor seen: every layer of a step passes the same
    doc_ids tensor, so the host copy (and, under sp, the all-gather) happens once per step. The cache
    holds a reference to that tensor, so its identity cannot be reused by another one meanwhile."""
    global _last
    if doc_ids_BS is None:
        return None
    if _last[0] is doc_ids_BS and _last[1] is group:
        return _last[2]
    docs = Documents.from_doc_ids(doc_ids_BS, group)
    _last = (doc_ids_BS, group, docs)
    return docs
