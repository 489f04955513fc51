"""`hft`: Half Fine-Tuning (arXiv 2404.18466). Each stage trains a random half of every layer.

Per stage, in each decoder layer, by category: 2 of the 4 attention matrices (q, k, v, o); of the
MLP's gate/up/down, 2 in one layer and 1 in the next, alternating (which layers get 2 is drawn per
stage); 1 of the 2 norms. Embeddings, LM head and final norm train (each configurable). Biases
follow their matrix. Frozen parameters have `requires_grad=False`, so they get no gradient and the
engine, rebuilt per stage, gives them no optimizer state: that is where HFT's time saving comes from.

The draw uses numpy's generator seeded with (finetune.hft.seed, stage): the same on every rank by
construction, checked anyway with an all-gather (a rank with another recipe would otherwise train a
different half silently). Each stage's selection is kept in the state and stored in checkpoints;
a resumed stage re-applies the stored selection instead of drawing again.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from longtrain.finetune.base import FinetuneMode, trainable_fraction

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def draw_selection(num_layers: int, seed: int, stage: int) -> list[str]:
    """Names (HF layout) of the layer modules stage `stage` trains."""
    rng = np.random.default_rng([seed, stage])
    phase = int(rng.integers(2))  # which layers (even or odd) train 2 MLP matrices this stage
    out = []
    for i in range(num_layers):
        pre = f"model.layers.{i}"
        out += [f"{pre}.self_attn.{n}" for n in sorted(rng.choice(ATTN, size=2, replace=False))]
        n_mlp = 2 if (i + phase) % 2 == 0 else 1
        out += [f"{pre}.mlp.{n}" for n in sorted(rng.choice(MLP, size=n_mlp, replace=False))]
        out.append(f"{pre}.{rng.choice(NORMS)}")
    return out


def _layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The selectable modules by name (activation-checkpoint wrappers looked through)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        layer = getattr(layer, "_checkpoint_wrapped_module", layer)
        for n in ATTN:
            out[f"model.layers.{i}.self_attn.{n}"] = getattr(layer.self_attn, n)
        for n in MLP:
            out[f"model.layers.{i}.mlp.{n}"] = getattr(layer.mlp, n)
        for n in NORMS:
            out[f"model.layers.{i}.{n}"] = getattr(layer, n)
    return out


class HFTMode(FinetuneMode):
    name = "hft"

    def __init__(self, cfg, mesh):
        super().__init__(cfg, mesh)
        self.selections: dict[int, dict] = {}  # stage -> {"seed": [seed, stage], "modules": [...]}

    def on_stage_start(self, model: nn.Module, stage: int) -> dict:
        h = self.cfg.finetune.hft
        if stage not in self.selections:  # a resumed stage keeps the selection its checkpoint recorded
            self.selections[stage] = {"seed": [h.seed, stage],
                                      "modules": draw_selection(len(model.model.layers), h.seed, stage)}
        chosen = self.selections[stage]["modules"]
        self._check_same_on_every_rank(chosen, stage)
        mods = _layer_modules(model)
        missing = sorted(set(chosen) - set(mods))
        if missing:
            raise ValueError(f"hft selection of stage {stage} names modules this model lacks: {missing[:3]}... "
                             "(a checkpoint of another model shape?)")
        for p in model.parameters():
            p.requires_grad_(False)
        for name in chosen:
            for p in mods[name].parameters():
                p.requires_grad_(True)
        # Tied embeddings and LM head are one parameter: set it trainable if either flag asks for it.
        extra = [(h.train_embeddings, model.model.embed_tokens), (h.train_lm_head, model.lm_head),
                 (h.train_final_norm, model.model.norm)]
        for on, mod in extra:
            if on:
                for p in mod.parameters():
                    p.requires_grad_(True)
        frac = trainable_fraction(model)
        return {"hft_seed": self.selections[stage]["seed"], "hft_modules": chosen, "trainable_fraction": frac}

    def _check_same_on_every_rank(self, chosen: list[str], stage: int) -> None:
        if not self.mesh.distributed:
            return
        digest = hashlib.sha256(json.dumps(chosen).encode()).hexdigest()
        digests: list = [None] * self.mesh.world_size
        dist.all_gather_object(digests, digest, group=self.mesh.world_group)
        if len(set(digests)) != 1:
            bad = [r for r, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(f"hft: ranks {bad} selected other modules than rank 0 for stage {stage}: every rank "
                               "must run the same recipe (finetune.hft.seed) and model")

    def state_dict(self) -> dict:
        return {"selections": {str(k): v for k, v in self.selections.items()}}

    def load_state_dict(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.selections = {int(k): v for k, v in state.get("selections", {}).items()}
