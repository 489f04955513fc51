"""Llama-family model in plain PyTorch, its size presets, tiled loss and HF weight I/O."""

from __future__ import annotations

import torch

from longtrain.models.hf_io import load_hf_weights, read_hf_config, save_hf
from longtrain.models.llama import LlamaForCausalLM
from longtrain.models.presets import PRESETS, LlamaArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def model_args(preset: str, pretrained: str | None = None, **overrides) -> LlamaArgs:
    """The shape: from an HF folder when `pretrained` is set, else from a preset; then overrides."""
    args = read_hf_config(pretrained) if pretrained else PRESETS[preset]
    return args.with_overrides(**overrides)


def build_model(args: LlamaArgs, *, device: torch.device, dtype: torch.dtype, attention_kernel: str = "auto",
                pretrained: str | None = None, init_std: float = 0.02, seed: int = 0) -> LlamaForCausalLM:
    """Build on the meta device (no host copy of a large model), materialise on `device`, then
    load HF weights or initialise from `seed` (the same values on every rank)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(args, attention_kernel=attention_kernel)
    model.to_empty(device=device)
    if args.tie_word_embeddings:  # to_empty re-creates parameters: restore the tie
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype)
    if pretrained:
        load_hf_weights(model, pretrained)
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(init_std, generator=gen)
    return model


__all__ = ["DTYPES", "PRESETS", "LlamaArgs", "LlamaForCausalLM", "build_model", "load_hf_weights", "model_args",
           "read_hf_config", "save_hf"]
