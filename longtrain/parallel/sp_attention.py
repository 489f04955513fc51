"""`sp_attention`: attention of a whole sequence spread over an sp group, on this rank's shard.

    out_BSHD = sp_attention(q, k, v, group=g, method="ring", causal=True, layout="zigzag", kernel="auto")

q (batch, S_local, H, D), k/v (batch, S_local, Hkv, D) hold this rank's tokens in the layout's order
(sharding.py); the result is this rank's rows of softmax(QK^T/sqrt(D))V over all S_global keys,
differentiable w.r.t. q, k, v. Methods: ring (ring.py: K/V travel the ring), ring_bidir (ring.py: two
counter-rotating K/V rings, half the KV heads each), token_ring (token_ring.py:
queries travel, results return straight to their owner, both link directions busy), ulysses (ulysses.py:
all-to-all from sequence shards to head shards).

Packed documents: `doc_ids` (batch, S_local), this rank's shard of the data path's document ids, makes
every token attend only to its own document (attention/documents.py) under ring and ring_bidir.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.attention.documents import documents_for
from longtrain.parallel.ring import bidirectional_ring_attention, ring_attention
from longtrain.parallel.sharding import check_layout
from longtrain.parallel.token_ring import token_ring_attention
from longtrain.parallel.ulysses import ulysses_attention

DOC_MASK_METHODS = ("ring", "ring_bidir")  # the methods that take per-document masks
METHODS = {"ring": ring_attention, "ring_bidir": bidirectional_ring_attention, "token_ring": token_ring_attention,
           "ulysses": ulysses_attention}
_checked: set = set()


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, group, method: str, layout: str) -> None:
    """Refuse bad input on every rank (never a hang): once per process and shape, the ranks compare
    their shapes with one small all-gather."""
    if method not in METHODS:
        raise ValueError(f"sp method {method!r} is not one of {sorted(METHODS)}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"sp_attention wants q (B, S_local, H, D) and k, v (B, S_local, Hkv, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    n = dist.get_world_size(group)
    check_layout(q.shape[1] * n, n, layout)
    key = (id(group), tuple(q.shape), tuple(k.shape))
    if key in _checked:
        return
    mine = torch.tensor([*q.shape, *k.shape], dtype=torch.int64)
    shapes = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather_object(shapes, mine, group=group)  # tiny, once per shape: host objects, no device sync
    if any(not torch.equal(s, mine) for s in shapes):
        table = ", ".join(f"rank {i}: q {tuple(s[:4].tolist())} k {tuple(s[4:].tolist())}" for i, s in enumerate(shapes))
        raise ValueError(f"sp_attention inputs differ across the sp group ({table}): every rank must hold "
                         "the same number of tokens and heads")
    _checked.add(key)


def sp_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, group, method: str = "ring", causal: bool = True,
                          layout: str = "zigzag", kernel="auto", scale: float | None = None,
                          doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """As `sp_attention`, also returning this rank's LSE rows (B, H, S_local) fp32 (not differentiable)."""
    _check_inputs(q, k, v, group, method, layout)
    if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(f"doc_ids must be this rank's (batch, S_local) = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}")
    docs = documents_for(doc_ids, group)  # gathered over the group: the same answer on every rank
    if docs is None:
        return METHODS[method](q, k, v, group=group, causal=causal, layout=layout, kernel=kernel, scale=scale)
    if method not in DOC_MASK_METHODS:
        raise ValueError(f"sp method {method!r} does not take per-document masks and this batch packs several "
                         f"documents per sequence; use parallel.sp.method=ring (or ring_bidir), or "
                         f"data.document_mask=false to let documents attend to each other")
    return METHODS[method](q, k, v, group=group, causal=causal, layout=layout, kernel=kernel, scale=scale, docs=docs)


def sp_attention(q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
    return sp_attention_with_lse(q, k, v, **kw)[0]
