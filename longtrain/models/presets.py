"""Named model shapes. Real checkpoints bring their own shape through `model.pretrained`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(frozen=True)
class LlamaArgs:
    """The shape of a Llama-family decoder; field names follow HF `LlamaConfig`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: Optional[int] = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default=None, hash=False, compare=True)  # HF dict, e.g. {"rope_type": "llama3", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2 has them)
    model_type: str = "llama"

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def with_overrides(self, **kw) -> "LlamaArgs":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


_LLAMA3_ROPE_8K = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

PRESETS: dict[str, LlamaArgs] = {
    # Fits the built-in byte tokenizer (259 ids); trains on CPU in seconds. Used by tests.
    "debug": LlamaArgs(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # The quickstart model: learns the needle task's filler distribution on CPU in a minute.
    "tiny": LlamaArgs(vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # Llama-3.2-1B shape.
    "1b": LlamaArgs(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                    rope_scaling={**_LLAMA3_ROPE_8K, "factor": 32.0}, max_position_embeddings=131072,
                    tie_word_embeddings=True),
    # Llama-2-7B shape (MHA: 32 query and 32 KV heads).
    "llama2-7b": LlamaArgs(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    # Llama-3.1-8B shape (GQA 32/8, Llama-3 RoPE scaling).
    "llama3-8b": LlamaArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                           rope_scaling={**_LLAMA3_ROPE_8K, "factor": 8.0}, max_position_embeddings=131072),
}
