"""Attention block kernels returning (out, lse) with an explicit backward, and the LSE merge.

See kernels.py for the layout legend and merge.py for the merge formula.
"""

from longtrain.attention.kernels import (
    KERNELS,
    BlockKernel,
    CpuFlashKernel,
    CudnnKernel,
    FlashKernel,
    MathKernel,
    block_attention,
    block_attention_with_lse,
    get_kernel,
)
from longtrain.attention.merge import merge_partials

__all__ = [
    "KERNELS",
    "BlockKernel",
    "CpuFlashKernel",
    "CudnnKernel",
    "FlashKernel",
    "MathKernel",
    "block_attention",
    "block_attention_with_lse",
    "get_kernel",
    "merge_partials",
]
