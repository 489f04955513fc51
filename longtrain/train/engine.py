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

Under ZeRO-3 a parameter is an empty placeholder between uses (its rank's piece lives in
`p.ds_tensor`). The model stays partitioned from the first engine on: a later engine adopts the
partitioned parameters as DeepSpeed adopts a model built under `zero.Init`, so a new stage never
holds the whole model on one rank. Code that reads or writes whole parameters outside a forward
wraps that in `gathered(params)`; `numel(p)` is a parameter's full size either way.
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


def numel(p: torch.Tensor) -> int:
    """The full number of elements, also of a ZeRO-3 parameter (an empty placeholder between uses)."""
    return getattr(p, "ds_numel", p.numel())


def shape(p: torch.Tensor) -> torch.Size:
    """The full shape, also of a ZeRO-3 parameter (whose placeholder is 1-D and empty)."""
    return getattr(p, "ds_shape", p.shape)


def gathered(params, modify: bool = False):
    """A context in which `params` hold their full values on every rank. ZeRO-3 parameters are
    all-gathered (those already whole, ZeRO-3's persistent small ones, are left as they are) and
    released on exit; with `modify=True` every one of them is gathered, and rank 0's values are
    written back into every rank's partition on exit (change them identically on every rank, or on
    rank 0). Ordinary tensors need nothing: a no-op then, and DeepSpeed is not imported."""
    zero = [p for p in params if hasattr(p, "ds_id")]
    if zero and not modify:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        zero = [p for p in zero if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not zero:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero, modifier_rank=0 if modify else None)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if len(shape(p)) < 2 or "norm" in name else decay).append(p)
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

    def release_params(self) -> None:
        pass  # nothing is partitioned

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
        self.zero3 = z["stage"] == 3
        log.info("engine deepspeed: ZeRO-%d over %d ranks, bf16=%s, offload optimizer=%s params=%s",
                 z["stage"], mesh.world_size, self.ds_config["bf16"]["enabled"], "offload_optimizer" in z,
                 "offload_param" in z)

    def destroy(self) -> None:
        # ZeRO-3: the next engine adopts the partitioned model as one built under zero.Init
        self.release_params()
        self.ds.destroy()  # removes ZeRO's gradient hooks from the parameters (and ZeRO-3's module hooks)
        # DeepSpeed's destroy leaves the engine's own forward hooks on the model: they would run at
        # every later forward and keep this engine (fp32 master, Adam moments) alive with the model.
        for attr in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(self.ds, attr, None)
            if handle is not None:
                handle.remove()
                setattr(self.ds, attr, None)
        if self.zero3:
            # The partitions are views into this engine's flat buffer, and every parameter points
            # back at its optimizer: give each partition its own storage and drop the link, so this
            # engine's buffers, fp32 master and Adam moments are freed before the next engine is built.
            for p in self.model.parameters():
                part = p.ds_tensor.data.clone()
                p.ds_tensor.data = part.pin_memory() if p.ds_tensor.is_pinned() else part
                if hasattr(p, "_z3_optimizer"):
                    del p._z3_optimizer

    def release_params(self) -> None:
        """ZeRO-3: every parameter back in its partition (the persistent small ones too), after a
        forward and backward outside the engine (FPF): `torch.autograd.grad` computes only what leads
        to the parameters it differentiates, so a module whose output gradient was computed (which
        gathered its weights) but not its input gradient never runs its release hook."""
        if self.zero3:
            self.ds.optimizer.parameter_offload.partition_all_parameters()

    def refresh_master(self) -> None:
        """ZeRO-1/2 (and the bf16 optimizer) copy their fp32 master from the weights; ZeRO-3 from its
        partitions (`p.ds_tensor`), which `gathered(params, modify=True)` writes on exit."""
        opt = self.ds.optimizer
        if hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()

    def optimized_parameters(self) -> list[torch.Tensor]:
        opt = self.ds.optimizer
        # ZeRO-1/2: bit16_groups, the parameters flattened into its partitions; ZeRO-3: fp16_groups
        groups = getattr(opt, "bit16_groups", None) if not self.zero3 else opt.fp16_groups
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
        if not self.zero3:
            return self.model.state_dict() if self.mesh.is_main else None
        out = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            with gathered([p]):
                if self.mesh.is_main:
                    out[name] = p.detach().to("cpu", copy=True)
        for name, b in self.model.named_buffers():
            if self.mesh.is_main:
                out[name] = b.detach().to("cpu", copy=True)
        return out if self.mesh.is_main else None


ENGINES = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, cfg: Config, mesh: Mesh):
    return ENGINES[cfg.parallel.engine](model, cfg, mesh)
