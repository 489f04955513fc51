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


def host_peak_rss_gib() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory so far: CUDA's allocated bytes; on CPU the process's peak RSS stands in."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_peak_rss_gib()


def memory_record(device: torch.device, swap_streams=None) -> dict:
    """The memory fields of a step record, all peaks since the process started (a few counters read,
    no device sync): device memory allocated (`peak_mem_gib`) and, on CUDA, reserved by the caching
    allocator; the process's peak RSS; and the host buffers of the activation swap pool (pinned on
    CUDA; allocated at the first step and reused: the bytes it holds now, which change only when a
    shape does), when it has one."""
    rec = {"peak_mem_gib": peak_memory_gib(device)}
    if device.type == "cuda":
        rec["peak_mem_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    rec["host_peak_rss_gib"] = host_peak_rss_gib()
    if swap_streams is not None:
        rec["swap_host_gib"] = swap_streams.stats.host_bytes_pinned / 2**30
    return rec
