"""`apply_sequence_parallel`: swap every layer's attention core for the sequence-parallel one.

The rest of the model is per token and needs no change: each rank embeds, projects, normalises and
scores its own tokens; RoPE uses the global positions the data path hands each rank
(`sharding.shard_sequence` of the position ids); the loss is summed over local tokens and the
trainer reduces it over all ranks.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from longtrain.models.llama import CoreAttention
from longtrain.parallel.sp_attention import sp_attention

log = logging.getLogger(__name__)


class SPCoreAttention(nn.Module):
    """Drop-in for `CoreAttention`: the same (B, S_local, H, D) in and out, attention over the whole sequence."""

    def __init__(self, inner: CoreAttention, group, method: str, layout: str):
        super().__init__()
        self.kernel, self.causal = inner.kernel, inner.causal
        self.group, self.method, self.layout = group, method, layout

    def forward(self, q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
        return sp_attention(q_BSHD, k_BSHD, v_BSHD, group=self.group, method=self.method, causal=self.causal,
                            layout=self.layout, kernel=self.kernel, doc_ids=doc_ids_BS)

    def extra_repr(self) -> str:
        return f"method={self.method}, layout={self.layout}, kernel={self.kernel}, causal={self.causal}"


def apply_sequence_parallel(model: nn.Module, group, degree: int, method: str, layout: str) -> nn.Module:
    n = 0
    for mod in model.modules():
        attn = getattr(mod, "self_attn", None)
        if attn is not None and isinstance(attn.core, CoreAttention):
            attn.core = SPCoreAttention(attn.core, group, method, layout)
            n += 1
    log.info("sequence parallel: %s attention over %d ranks (%s layout) in %d layers", method, degree, layout, n)
    return model
