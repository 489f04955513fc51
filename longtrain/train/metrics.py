"""FLOPs per step, MFU and memory: the numbers users judge a run by.

Model FLOPs count what the model needs, not what the schedule re-does (activation recomputation
is not counted): 6 x (matmul parameters) per token for forward + backward, plus attention's two
S x S matmuls per head and layer (4 S^2 D flops forward, 3x for forward + backward), halved when
causal because the masked half is skipped by the kernels.
"""

from __future__ import annotations

import torch

from longtrain.models.presets import LlamaArgs


def matmul_params(a: LlamaArgs) -> int:
    """Weights that take part in a matmul per token (embedding lookup excluded, LM head included)."""
    e, hd = a.hidden_size, a.hd
    attn = e * a.num_attention_heads * hd * 2 + e * a.num_key_value_heads * hd * 2  # q, o + k, v
    mlp = 3 * e * a.intermediate_size
    return a.num_hidden_layers * (attn + mlp) + e * a.vocab_size


def train_flops(a: LlamaArgs, n_seqs: int, seq_len: int, causal: bool = True) -> float:
    """Forward + backward FLOPs of `n_seqs` sequences of `seq_len` tokens."""
    dense = 6.0 * matmul_params(a) * n_seqs * seq_len
    attn_fwd = 4.0 * seq_len * seq_len * a.num_attention_heads * a.hd * a.num_hidden_layers * n_seqs
    return dense + 3.0 * attn_fwd * (0.5 if causal else 1.0)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # CPU: the process's peak resident set (Linux reports KiB)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
