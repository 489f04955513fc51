"""Merge two partial attention results of the same queries over disjoint key sets.

Layout legend: out_BHSD = (batch, q_heads, S_q, head_dim); lse_BHS = (batch, q_heads, S_q), natural log.

Ring attention computes each query block against one key block at a time and folds the partial
(out, lse) pairs together with this function; the final (out, lse) is what every block's backward uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def merge_partials(out1_BHSD: Tensor, lse1_BHS: Tensor, out2_BHSD: Tensor, lse2_BHS: Tensor) -> tuple[Tensor, Tensor]:
    """Return (out_BHSD, lse_BHS) in float32 (float64 when an input is float64) for the union of the key sets.

    Exact form: l = logaddexp(l1, l2), o = exp(l1 - l) * o1 + exp(l2 - l) * o2. We use the equivalent
        o = o1 - sigmoid(l2 - l1) * (o1 - o2),    l = l1 - logsigmoid(l1 - l2)
    because it only ever looks at the *difference* of the two LSEs: sigmoid is bounded in [0, 1] and torch
    evaluates sigmoid/logsigmoid stably for large |x|, so nothing overflows even when LSEs are in the
    hundreds (float32 exp overflows past 88), and no running max has to be tracked. Everything is done in
    float32 whatever the inputs: merging in bf16 loses precision at every ring step, and the loss compounds
    with the ring size.

    An LSE of -inf means "this side saw no key" (e.g. a fully masked block): the result is then exactly the
    other side. The formula alone would give NaN there (-inf - -inf), so those rows are selected explicitly.
    This function is forward-only (ring attention has its own backward); it is not meant for autograd.
    """
    if out1_BHSD.shape != out2_BHSD.shape or lse1_BHS.shape != lse2_BHS.shape:
        raise ValueError(
            f"merge_partials needs matching shapes, got out {tuple(out1_BHSD.shape)} vs {tuple(out2_BHSD.shape)}, "
            f"lse {tuple(lse1_BHS.shape)} vs {tuple(lse2_BHS.shape)}"
        )
    if lse1_BHS.shape != out1_BHSD.shape[:-1]:
        raise ValueError(
            f"lse shape {tuple(lse1_BHS.shape)} must be out's shape without head_dim {tuple(out1_BHSD.shape[:-1])}"
        )
    acc = torch.promote_types(torch.promote_types(out1_BHSD.dtype, out2_BHSD.dtype), torch.float32)
    o1, o2 = out1_BHSD.to(acc), out2_BHSD.to(acc)
    l1, l2 = lse1_BHS.to(acc), lse2_BHS.to(acc)

    out = o1 - torch.sigmoid(l2 - l1).unsqueeze(-1) * (o1 - o2)
    lse = l1 - F.logsigmoid(l1 - l2)

    empty1, empty2 = torch.isneginf(l1), torch.isneginf(l2)
    # Side 2 empty: sigmoid(-inf) = 0 already gives o1, but 0 * (o1 - o2) is NaN if o2 holds inf/NaN garbage.
    out = torch.where(empty2.unsqueeze(-1), o1, out)
    lse = torch.where(empty2, l1, lse)
    # Side 1 empty (checked last, so both-empty yields side 2 with lse -inf rather than NaN).
    out = torch.where(empty1.unsqueeze(-1), o2, out)
    lse = torch.where(empty1, l2, lse)
    return out, lse
