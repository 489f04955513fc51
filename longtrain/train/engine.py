"""Training engines: what turns a loss into an update, and what a checkpoint of that state is.

  TorchEngine      plain torch: AdamW, DDP over the data-parallel ranks (replicated states)
  DeepSpeedEngine  DeepSpeed ZeRO 0-3 (optimizer / gradient / parameter sharding over all dp x sp
                   ranks), bf16 with fp32 master weights, optional CPU offload; the recipe's
                   `deepspeed:` block is merged over what longtrain sets, so DeepSpeed users keep their keys

The trainer sees one interface: `module` (call it for the forward), `backward(loss, last)` per
micro-batch, `step()` once per optimizer step (returns the pre-clip global grad norm), `lr`,
`save(dir)` / `load(dir)` (collective; every rank calls), and `full_state_dict()` (the whole model
on rank 0, gathered from ZeRO-3 shards when needed, for HF export).

An engine optimizes the parameters that have `requires_grad` when it is built. A new trainable set
(a new continual-learning stage) means `destroy()` (which removes the engine's gradient hooks from
the parameters) and a new engine. `refresh_master()` re-reads the optimizer's fp32 master copy from
the weights after something outside the optimizer changed them (FPF); `optimized_parameters()` lists
what the optimizer holds state for.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from longtrain.config import Config
from longtrain.parallel.mesh import Mesh

log = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    t = cfg.train

    def fn(step: int) -> float:  # linear warmup, then cosine from 1 to min_lr_ratio
        if step < t.warmup_steps:
            return (step + 1) / (t.warmup_steps + 1)
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _adamw(params, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=device.type == "cuda")


class TorchEngine:
    name = "torch"

    def __init__(self, model: nn.Module, cfg: Config, mesh: Mesh):
        self.model, self.cfg, self.mesh = model, cfg, mesh
        self.module = model
        if mesh.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [mesh.device.index] if mesh.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids, process_group=mesh.world_group,
                                                  bucket_cap_mb=cfg.parallel.ddp_bucket_cap_mb)
            log.info("engine torch: DDP over %d ranks", mesh.world_size)
        self.optimizer = _adamw(param_groups(model, cfg.train.weight_decay), cfg, mesh.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.autocast = (torch.autocast(mesh.device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                         else nullcontext())

    def destroy(self) -> None:
        self.module = None  # DDP's reducer (and its gradient hooks) goes with the wrapper

    def refresh_master(self) -> None:
        pass  # the weights are the optimizer's master copy

    def optimized_parameters(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def micro_context(self, last: bool):
        """DDP all-reduces only on the last micro-batch of a step."""
        return nullcontext() if last or not self.mesh.distributed else self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        if self.mesh.is_main:  # states are replicated: rank 0 writes them
            from longtrain.train.checkpoint import save_file

            save_file(self.model.state_dict(), folder / "model.pt")
            save_file({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                      folder / "optim.pt")

    def load(self, folder: Path) -> None:
        if not (folder / "model.pt").is_file():
            raise ValueError(f"{folder} was not written by the torch engine (no model.pt): "
                             "resume with the parallel.engine that wrote it")
        self.model.load_state_dict(torch.load(folder / "model.pt", map_location=self.mesh.device, weights_only=True))
        st = torch.load(folder / "optim.pt", map_location=self.mesh.device, weights_only=True)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])

    def full_state_dict(self) -> dict | None:
        return self.model.state_dict() if self.mesh.is_main else None


def deepspeed_config(cfg: Config, mesh: Mesh) -> dict:
    """What longtrain sets, then the recipe's `deepspeed:` block merged over it (the user's keys win)."""
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero_stage, "overlap_comm": mesh.device.type == "cuda", "contiguous_gradients": True}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": mesh.device.type == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": mesh.device.type == "cuda"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * mesh.world_size,  # DeepSpeed counts every rank
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if p.offload_optimizer:  # DeepSpeed's CPU Adam runs the offloaded update (torch AdamW on CPU is far slower)
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                        "weight_decay": t.weight_decay}}
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: nn.Module, cfg: Config, mesh: Mesh):
        import deepspeed

        self.model, self.cfg, self.mesh = model, cfg, mesh
        self.ds_config = deepspeed_config(cfg, mesh)
        groups = param_groups(model, cfg.train.weight_decay)
        client_opt = None if "optimizer" in self.ds_config else _adamw(groups, cfg, mesh.device)
        with warnings.catch_warnings():  # DeepSpeed calls torch collectives that torch marks deprecated
            warnings.simplefilter("ignore", FutureWarning)
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=groups, optimizer=client_opt, config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
                dist_init_required=False)
        self.module = self.ds
        self.autocast = nullcontext()  # DeepSpeed's bf16 mode keeps bf16 weights; nothing to autocast
        z = self.ds_config["zero_optimization"]
        log.info("engine deepspeed: ZeRO-%d over %d ranks, bf16=%s, offload optimizer=%s params=%s",
                 z["stage"], mesh.world_size, self.ds_config["bf16"]["enabled"], "offload_optimizer" in z,
                 "offload_param" in z)

    def destroy(self) -> None:
        self.ds.destroy()  # removes ZeRO's gradient hooks from the parameters
        # DeepSpeed's destroy leaves the engine's own forward hooks on the model: they would run at
        # every later forward and keep this engine (fp32 master, Adam moments) alive with the model.
        for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(self.ds, attr, None)
            if handle is not None:
                handle.remove()
                setattr(self.ds, attr, None)

    def refresh_master(self) -> None:
        opt = self.ds.optimizer
        if hasattr(opt, "refresh_fp32_params"):  # ZeRO-1/2 and the bf16 optimizer keep an fp32 copy
            opt.refresh_fp32_params()

    def optimized_parameters(self) -> list[torch.Tensor]:
        opt = self.ds.optimizer
        groups = getattr(opt, "bit16_groups", None)  # ZeRO-1/2: the parameters flattened into its partitions
        if groups is not None:
            return [p for g in groups for p in g]
        return [p for g in opt.param_groups for p in g["params"]]

    def micro_context(self, last: bool):
        return nullcontext()  # DeepSpeed counts micro-steps and reduces at the accumulation boundary itself

    def backward(self, loss: torch.Tensor) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # The trainer already divides by the global token count: no extra 1/grad_accum scaling.
            self.ds.backward(loss, scale_wrt_gas=False)
            self.ds.step()  # an update only at the accumulation boundary

    def step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def save(self, folder: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.ds.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, folder: Path) -> None:
        if not (folder / "deepspeed").is_dir():
            raise ValueError(f"{folder} was not written by the deepspeed engine: resume with the parallel.engine "
                             "that wrote it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            path, _ = self.ds.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed could not load {folder}/deepspeed")

    def full_state_dict(self) -> dict | None:
        """The whole model on rank 0 (ZeRO-3 shards gathered one parameter at a time), None elsewhere."""
        if self.ds_config["zero_optimization"]["stage"] < 3:
            return self.model.state_dict() if self.mesh.is_main else None
        import deepspeed

        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.mesh.is_main:
                    out[name] = p.detach().to("cpu", copy=True)
        for name, b in self.model.named_buffers():
            if self.mesh.is_main:
                out[name] = b.detach().to("cpu", copy=True)
        return out if self.mesh.is_main else None


ENGINES = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, cfg: Config, mesh: Mesh):
    return ENGINES[cfg.parallel.engine](model, cfg, mesh)
