"""Checks that need more than the schema (tokenizer, model shape, data, checkpoints), run before any
process is launched or device touched, so a bad recipe costs no GPU time."""

from __future__ import annotations

import json
from pathlib import Path

from longtrain.config import Config, ConfigError
from longtrain.models import model_args
from longtrain.parallel.sp_attention import DOC_MASK_METHODS


def model_shape(cfg: Config):
    """The model's shape: the preset's or the HF folder's, with the recipe's overrides."""
    m = cfg.model
    return model_args(m.preset, m.pretrained, vocab_size=m.vocab_size,
                      max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_word_embeddings,
                      num_hidden_layers=m.num_hidden_layers)


def preflight(cfg: Config) -> None:
    from longtrain.data import build_dataset, load_tokenizer
    from longtrain.train.checkpoint import check_model_shape, find_resume

    m, d = cfg.model, cfg.data
    import torch

    from longtrain.attention import get_kernel
    from longtrain.models import DTYPES

    t = cfg.train
    import os

    from longtrain.parallel.mesh import check_sp_degree

    try:
        check_sp_degree(cfg.parallel.sp.degree, int(os.environ.get("WORLD_SIZE", cfg.launch.nproc)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from longtrain.memory.arena import configure_cuda_allocator

    configure_cuda_allocator(cfg)  # before the kernel probe below starts CUDA
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible: use train.device=cpu (or auto)")
    device = torch.device("cuda" if t.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        get_kernel(t.attention_kernel, device, torch.bfloat16 if t.precision == "bf16" else DTYPES[m.dtype])
    except ValueError as e:
        raise ConfigError(f"train.attention_kernel={t.attention_kernel!r}: {e}") from None
    try:
        tok = load_tokenizer(d.tokenizer)
        args = model_shape(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sp = cfg.parallel.sp
    if sp.method == "ulysses" and sp.degree > 1 and args.num_attention_heads % sp.degree:
        raise ConfigError(f"parallel.sp.method=ulysses scatters heads: parallel.sp.degree={sp.degree} does not divide "
                          f"the model's {args.num_attention_heads} query heads; use ring or token_ring, or a degree "
                          f"in {[x for x in range(1, args.num_attention_heads + 1) if args.num_attention_heads % x == 0]}")
    if sp.method == "ring_bidir" and sp.degree > 1 and args.num_key_value_heads % 2:
        raise ConfigError(f"parallel.sp.method=ring_bidir splits the KV heads in two, the model has "
                          f"{args.num_key_value_heads}: use parallel.sp.method=ring")
    if d.document_mask and d.source not in ("needle", "keymap") and sp.degree > 1 and sp.method not in DOC_MASK_METHODS:
        raise ConfigError(f"data.document_mask=true masks packed documents, which parallel.sp.method={sp.method} "
                          f"does not support: use parallel.sp.method=ring (or ring_bidir), or "
                          f"data.document_mask=false to let packed documents attend to each other")
    act = cfg.memory.activation
    if act.policy in ("swap", "auto") or act.layers:  # the host budget and layer fit, before any GPU time
        from longtrain.memory.swap_plan import SwapPlanError, plan_for_recipe

        try:
            plan_for_recipe(cfg, args, torch.device("cpu"),
                            int(os.environ.get("LOCAL_WORLD_SIZE", cfg.launch.nproc)), fwd_ms=None)
        except SwapPlanError as e:
            raise ConfigError(str(e)) from None
    if args.vocab_size < tok.vocab_size:
        raise ConfigError(f"model vocab_size={args.vocab_size} is smaller than the tokenizer's {tok.vocab_size} ids: "
                          f"set model.vocab_size={tok.vocab_size} or more")
    from longtrain.config.load import stage_data

    datas = [("data", d)] + [(f"stages[{i}].data", stage_data(cfg, i)) for i in range(len(cfg.stages))]
    for where, sd in datas:
        if sd.source in ("needle", "keymap"):  # cheap sources: build one sample now so a too-short seq_len fails here
            try:
                build_dataset(sd.source, tokenizer=tok, seq_len=sd.seq_len, split="train", num_samples=1,
                              needle_kwargs=dict(n_keys=sd.needle.n_keys, value_digits=sd.needle.value_digits,
                                                 loss_on=sd.needle.loss_on),
                              keymap_kwargs=dict(task=sd.keymap.task, n_keys=sd.keymap.n_keys), seed=sd.seed)[0]
            except ValueError as e:
                raise ConfigError(f"{where}.seq_len={sd.seq_len}: {e}") from None
    try:
        path = find_resume(cfg.checkpoint.resume, Path(cfg.train.output_dir) / "checkpoints")
        if path is not None:
            check_model_shape(path, json.loads((path / "meta.json").read_text()), args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
