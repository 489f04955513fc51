"""Unsharded float64 references the attention tests compare against, and packed-document test data."""

import torch

from longtrain.attention import block_attention_with_lse


def random_doc_ids(b: int, s: int, g: torch.Generator, n_docs: int | None = None) -> torch.Tensor:
    """Packed-document ids (b, s): non-decreasing, different per batch row, `n_docs` (default s/6)
    documents starting at random places, so they start and end inside shards, span shards, and some
    shards hold several; the last document is one token long."""
    rows = []
    for _ in range(b):
        starts = torch.zeros(s, dtype=torch.long)
        starts[torch.randperm(s - 1, generator=g)[: max(1, n_docs or s // 6)] + 1] = 1
        starts[s - 1] = 1  # a one-token document at the end
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def attention_reference(q, k, v, dout, causal, doc_ids=None):
    """Unsharded float64 attention; with doc_ids, a dense mask (same document, and causal) on the scores:
    computed independently of the sub-block decomposition under test."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if doc_ids is None:
        out, lse = block_attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                            kernel="math")
        out = out.transpose(1, 2)
    else:
        g = q.shape[2] // k.shape[2]
        kx, vx = (t.repeat_interleave(g, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kx) / q.shape[-1] ** 0.5
        allowed = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        if causal:
            allowed = allowed & torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vx)
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad
