"""`fpf` and `kfpf`: Forgetting-Prone-module Fine-tuning (arXiv 2304.04158).

Only a few modules are task-specific and forget. They are found from training dynamics: the drift
of a module is the RMS change of its parameters, sqrt(mean((theta_now - theta_ref)^2)) (normalised
by its size, so a norm and a large matrix compare), measured between snapshots. The most drifting
modules (top-k, or above a threshold) are the forgetting-prone (FP) ones; they alone are fine-tuned
on a small replay buffer (replay.py), reservoir-sampled over every stage's training samples.

  fpf   trains every parameter each stage, adds up each module's drift over the stages (snapshot
        at stage start, compared at stage end), and runs one FP fine-tune after the last stage.
  kfpf  the same fine-tune k times, evenly spaced over all training steps (no replay between):
        drift since the previous snapshot (stage start or previous fine-tune) picks the modules.

The FP fine-tune runs outside the engine: a forward on the plain model, `torch.autograd.grad` for
the FP parameters only (no gradient reaches `.grad`, so no gradient hook of the engine fires),
gradients summed over every rank, a short-lived AdamW. Weights changed outside the engine's
optimizer would be overwritten by its stale fp32 master copy at its next step, so the engine's
master copy is then re-read from the weights (`engine.refresh_master()`). The selection is made on
rank 0 and broadcast.

Under ZeRO-3 the model's parameters are partitions between uses. ZeRO-3's module hooks gather them
around the fine-tune's forward and backward as in training (`engine.release_params()` then puts back
those a backward that stops at the FP modules left gathered); the AdamW update runs on the FP
parameters gathered whole and is written back into every rank's partition, which the master copy
is refreshed from. Drift reads each module gathered whole, one module at a time: the reference is
taken at stage start, before the stage's engine exists, so it cannot be in that engine's partition
layout, and one all-gather of the model per measurement is less than one training step's.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from longtrain.finetune.base import FinetuneMode, StageContext, leaf_modules
from longtrain.finetune.replay import ReplayBuffer
from longtrain.finetune.stages import resolve_stages
from longtrain.parallel.mesh import all_reduce_sum
from longtrain.train.engine import gathered, numel

log = logging.getLogger(__name__)


def _flat(mod: nn.Module) -> torch.Tensor:
    """A module's own parameters, whole, flattened, fp32, on the CPU. Under ZeRO-3 they are gathered
    one module at a time (collective: every rank calls, in the same module order)."""
    params = list(mod.parameters(recurse=False))
    with gathered(params):
        return torch.cat([p.detach().float().flatten() for p in params]).cpu()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each module's parameters, flattened, fp32, on the CPU (the reference drift is measured from)."""
    return {name: _flat(mod) for name, mod in leaf_modules(model).items()}


def module_drift(model: nn.Module, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    mods = leaf_modules(model)
    return {name: (_flat(mods[name]) - ref[name]).pow(2).mean().sqrt().item() for name in ref}


def select_modules(drift: dict[str, float], select: str, top_k: int, threshold: float) -> list[str]:
    ranked = sorted(drift, key=lambda n: (-drift[n], n))  # ties by name: deterministic
    if select == "topk":
        return ranked[:top_k]
    return [n for n in ranked if drift[n] > threshold]


def replay_finetune(ctx: StageContext, modules: list[str], buffer: ReplayBuffer, fcfg, round_id: int) -> dict:
    """Fine-tune only `modules` on the replay buffer for fcfg.steps steps; returns a record."""
    mesh, model = ctx.mesh, ctx.model
    mods = leaf_modules(model)
    params = [p for n in modules for p in mods[n].parameters(recurse=False)]
    if not params or not len(buffer):
        return {"fpf_round": round_id, "fpf_modules": modules, "fpf_skipped": True}
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=fcfg.lr, weight_decay=0.0)
    mb, G = fcfg.micro_batch_size, fcfg.micro_batch_size * mesh.dp_size
    losses = []
    model.train()
    for step in range(fcfg.steps):
        rng = np.random.default_rng([fcfg.seed, round_id, step])  # the same global batch on every rank
        pick = rng.choice(len(buffer), size=G, replace=len(buffer) < G)
        mine = pick[mesh.dp_rank * mb:(mesh.dp_rank + 1) * mb]
        loss_sum, ntok = ctx.forward_loss([ctx.sample(*buffer.items[i]) for i in mine])
        tot = all_reduce_sum(torch.stack([loss_sum.detach().double(), ntok.double()]), mesh)
        # d(global mean loss) = sum over ranks of d(this rank's loss sum / global tokens), as in training
        grads = torch.autograd.grad(loss_sum / tot[1].clamp(min=1).to(loss_sum.dtype), params)
        ctx.engine.release_params()
        # ZeRO-3: the FP parameters whole for the update (the same on every rank: same gradients,
        # same AdamW), written back into each rank's partition on exit, where the next forward reads them
        with gathered(params, modify=True):
            for p, g in zip(params, grads):
                p.grad = all_reduce_sum(g.contiguous(), mesh)
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append((tot[0] / tot[1].clamp(min=1)).item())
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    ctx.engine.refresh_master()
    n = sum(numel(p) for p in params)
    log.info("fpf round %d: %d modules (%d parameters) fine-tuned %d steps on %d replayed sequences: loss %.4f -> %.4f",
             round_id, len(modules), n, fcfg.steps, len(buffer), losses[0], losses[-1])
    return {"fpf_round": round_id, "fpf_modules": modules, "fpf_params": n, "fpf_loss_first": losses[0],
            "fpf_loss_last": losses[-1], "replay_sequences": len(buffer), "replay_tokens": buffer.tokens()}


class FPFMode(FinetuneMode):
    name = "fpf"

    def __init__(self, cfg, mesh):
        super().__init__(cfg, mesh)
        self.fcfg = cfg.finetune.fpf
        self.stages = resolve_stages(cfg)
        self.buffer = ReplayBuffer(self.fcfg.replay_tokens, [s.data.seq_len for s in self.stages], self.fcfg.seed)
        self.ref: dict[str, torch.Tensor] = {}
        self.ref_stage = -1  # the stage whose start (or last fine-tune) `ref` was taken at
        self.drift: dict[str, float] = {}
        self.rounds = 0

    # -- hooks --
    def on_stage_start(self, model: nn.Module, stage: int) -> dict:
        for p in model.parameters():
            p.requires_grad_(True)
        if self.ref_stage != stage:  # a resumed stage keeps the reference its checkpoint stored
            self.ref, self.ref_stage = snapshot(model), stage
        return {}

    def on_batch(self, stage: int, indices: list[int]) -> None:
        for i in indices:
            self.buffer.add(stage, i)

    def on_stage_end(self, ctx: StageContext, stage: int, last: bool) -> dict | None:
        for name, d in module_drift(ctx.model, self.ref).items():
            self.drift[name] = self.drift.get(name, 0.0) + d
        if not last:
            return None
        return self._finetune(ctx, self.drift)

    # -- shared by fpf and kfpf --
    def _finetune(self, ctx: StageContext, drift: dict[str, float]) -> dict:
        f = self.fcfg
        chosen = select_modules(drift, f.select, f.top_k, f.threshold)
        if self.mesh.distributed:  # rank 0 decides: float ties must not split the ranks
            box = [chosen]
            dist.broadcast_object_list(box, src=0, group=self.mesh.world_group)
            chosen = box[0]
        rec = replay_finetune(ctx, chosen, self.buffer, f, self.rounds)
        self.rounds += 1
        return {**rec, "fpf_drift": {n: drift[n] for n in chosen}}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "ref_stage": self.ref_stage, "drift": self.drift,
                "rounds": self.rounds}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ref/{k}": v for k, v in self.ref.items()}

    def load_state_dict(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.ref_stage, self.drift, self.rounds = state["ref_stage"], dict(state["drift"]), state["rounds"]
        self.ref = {k[4:]: v for k, v in tensors.items() if k.startswith("ref/")}


class KFPFMode(FPFMode):
    name = "kfpf"

    def __init__(self, cfg, mesh):
        super().__init__(cfg, mesh)
        total = sum(s.steps for s in self.stages)
        k = min(self.fcfg.k, total)
        self.trigger_steps = sorted({round(total * j / k) for j in range(1, k + 1)})

    def on_step_end(self, ctx: StageContext, step: int) -> dict | None:
        if step not in self.trigger_steps:
            return None
        rec = self._finetune(ctx, module_drift(ctx.model, self.ref))
        self.ref = snapshot(ctx.model)  # the next round measures drift from here
        return {**rec, "step": step}

    def on_stage_end(self, ctx: StageContext, stage: int, last: bool) -> dict | None:
        return None
