"""The ALST peer: DeepSpeed-Ulysses the way Arctic Long Sequence Training (ALST, arXiv 2506.13996) uses it on a
Llama-3-8B-shaped model, benchmarked the way tools/bench_train.py benchmarks longtrain, so the JSON records
compare field by field with longtrain's and with tools/peers/torch_native.py's.

    torchrun --nproc-per-node 4 tools/peers/alst.py --seq-len 1048576 --layers 4 --sp 4 --steps 3 --warmup 2 \\
        --json out.json
    python tools/peers/alst.py --preset debug --seq-len 256 --steps 2 --warmup 1                # CPU smoke run
    python tools/peers/alst.py --find-max-seq --sp 4 --nproc 4 --seq-start 524288 --seq-step 65536

The stack follows DeepSpeed's ALST tutorial (docs/_tutorials/ulysses-alst-sequence-parallelism.md) and
ArcticTraining's SFT trainer, with the API of the installed DeepSpeed (0.19.8), every piece theirs:
  - model: `transformers.LlamaForCausalLM` from tools/peers/torch_native.py's LlamaConfig of longtrain's preset
    shape (`--layers N` truncates the depth), HF's `sdpa` attention, built under `deepspeed.zero.Init` (each rank
    only ever holds its shards) and initialised parameter by parameter from a per-parameter seed (normal(0, 0.02),
    norms 1), so the weights do not depend on the number of ranks;
  - ZeRO-3 (`deepspeed.initialize`, stage 3, bf16 weights with fp32 master and optimizer states) over all ranks;
    AdamW with longtrain's settings (lr 3e-4, betas 0.9/0.95, weight decay 0.1 except norms; torch's, fused on
    CUDA, as the torch-native peer) or, with --offload-optimizer, DeepSpeed's CPU AdamW with the states in host
    memory (ALST's published runs: `offload_optimizer: cpu`, `cpu_adam`); gradient clipping 1.0;
  - Ulysses sequence parallelism: `UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", sp, 1,
    seq_length, seq_length_is_variable=True)` swaps HF's sdpa entry for Ulysses' wrapper (all-to-all from sequence
    shards to head shards before attention, back after), returns the mpu given to `deepspeed.initialize`; with
    sp > 1 HF's sdpa mask builder is replaced by one returning None (ArcticTraining does the same: no
    [S, S] mask is ever built), so SDPA runs unmasked with is_causal=True; `seq_parallel_communication_data_type`
    bf16 (ALST's setting; fp32 with --precision fp32);
  - the batch: `UlyssesSPDataLoaderAdapter` around a DataLoader, as ALST does. Each rank's DataLoader yields
    whole sequences; the adapter gathers one from each rank of the sp group and hands every rank its contiguous
    shard of each in turn, with `labels` replaced by pre-shifted `shift_labels` (the last position is -100, so
    seq_len - 1 positions are labelled). The sequences are torch_native.py's (`make_batch`, same seed, same
    (dp rank, step) -> tokens), so both peers train on the same tokens;
  - tiled MLP: `LlamaMLP.forward` patched before the model is built to run DeepSpeed's `TiledMLP` over
    ceil(S_local / hidden) sequence shards (the count max-reduced over ranks), as the tutorial patches it;
  - tiled fused logits + loss: `model.model(...)` gives the hidden states, then DeepSpeed's `TiledFusedLogitsLoss`
    runs the LM head and HF's causal-LM loss over shards of about --loss-shard-gib GiB of fp32 logits
    (ArcticTraining's sizing, 1 GiB), the per-rank loss weighted by its labelled tokens and averaged over the
    sp group through a differentiable all_gather (ArcticTraining's code);
  - activation checkpointing of every decoder layer (HF's non-reentrant `torch.utils.checkpoint`), each layer's
    checkpointed input offloaded to pinned host memory on a side stream by DeepSpeed's
    `get_checkpoint_hidden_states_offloading_ctx_manager()` around forward + backward: the installed DeepSpeed's
    way for non-reentrant checkpointing (the tutorial; ArcticTraining's own `activation_checkpoint_cpu_offload`
    monkey-patches the reentrant checkpoint, which is not part of DeepSpeed); its defaults keep the last layer's
    input on the GPU. Under ZeRO-3 DeepSpeed's own marker misses the tensor the checkpoint saves with transformers
    5.2x (see OffloadMarker): the peer marks it after ZeRO-3's hooks, and every step checks that each checkpointed
    layer's input reached the offload engine;
  - `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (ALST's fourth trick; --no-expandable-segments leaves it).
Not used: Liger-Kernel (ALST's fused kernels; not installed here; TiledFusedLogitsLoss is ALST's fallback for it)
and flash-attn's `flash_attention_2/3` (a separate package): SDPA runs with the backend of --sdpa-backend
(default: the fastest that runs here, probed as torch_native.py does), so the two peers use the same kernel.

Loss gradient (--loss-grad). DeepSpeed's TiledFusedLogitsLoss runs the LM head's backward inside its forward with
an upstream gradient of 1 for its own (summed) output and, in its backward, scales only the hidden states'
gradient by the real upstream gradient: the LM head weight's gradient is that of the summed token losses, not of
the loss that is back-propagated. With ArcticTraining's `loss = sum / labelled tokens` (then the sp-weighted
average) the LM head weight's gradient is (labelled tokens per rank / sp) times too large, while every other
gradient is right. `alst` (default) keeps that code exactly; `exact` gives TiledFusedLogitsLoss the already
scaled per-rank loss (sp x sum / labelled tokens of the sequence) and back-propagates it with gradient 1, so every
gradient is that of the mean loss (sp x compensates DeepSpeed's averaging over the sp ranks, as the all_gather's
backward does in ArcticTraining's code). Both compute the same forward and cost the same.

Checks, every step: each rank's input ids, shift labels and position ids are the contiguous shard of the
sequence it should hold (`shard_mismatches`); every SDPA call is unmasked and causal and sees the full sequence
with its share of the heads (q [1, H/sp, S, D], k/v [1, max(H_kv/sp, 1), S, D]; torch_native.py's guard);
counts of SDPA calls (2 per layer: forward, recompute), tiled MLP calls and shards, loss shards, and the
offload engine's statistics (inputs marked, offloaded, restored, bytes).

FLOPs, MFU and memory are counted as longtrain's bench counts them (longtrain.train.metrics.train_flops: 6 x
matmul parameters per token plus causal attention, recomputation not counted; MFU against 989 TFLOP/s and
against a bf16 matmul measured here by tools/bench_train.py's code); the record has bench_train's field names
(plus "peer", "config", "checks"); the profiled step, --find-max-seq search, OOM marker and exit codes are
bench_train's; swap_host_gib is the pinned host memory the checkpoint offload filled in a step.
On CPU (gloo) it runs whole for plumbing tests, sp > 1 included (the all-to-all is all_to_all_single, which gloo
has): ZeRO-3, Ulysses, the adapter, tiled MLP and loss, checkpointing. What the CPU cannot run: the offload
itself (DeepSpeed's CPU accelerator has no streams and its engine keeps every tensor in place: the record
counts the marked inputs it skipped), DeepSpeed's CPU Adam (a just-in-time C++ build), MFU, the GPU time split.
Needs `einops` (a DeepSpeed dependency the sequence-parallel code imports).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))  # tools/bench_train.py: shared helpers, imported rather than copied
sys.path.insert(0, str(ROOT / "tools" / "peers"))  # torch_native.py: the model, data, FLOPs and SDPA guard
if str(ROOT) not in sys.path:
    sys.path.insert(2, str(ROOT))

import bench_train as bt  # noqa: E402
import torch_native as tn  # noqa: E402

from longtrain.models.presets import LlamaArgs  # noqa: E402

PEER = "alst"
DEFAULTS = tn.DEFAULTS  # longtrain's optimizer settings and MFU basis: the same for every peer
LOSS_SHARD_GIB = 1.0  # ArcticTraining: loss shards of about 1 GiB of fp32 logits
IGNORE = -100  # the label of an unlabelled position (HF, DeepSpeed)
_rank, _say = bt._rank, bt._say  # rank from the launcher's environment; rank 0 prints


# ---- tiled MLP (DeepSpeed's TiledMLP, patched into HF's LlamaMLP as ALST does) --------------------------
class MLPStats:
    calls = 0  # patched LlamaMLP.forward calls (forward and checkpoint recompute)
    shards: set[int] = set()


def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def tiled_mlp_forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
    """LlamaMLP.forward through DeepSpeed's TiledMLP over ceil(S_local / hidden) sequence shards, the count taken as
    the maximum over all ranks (a rank running fewer shards would stop serving its ZeRO-3 weight shards)."""
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = torch.tensor(math.ceil(x_BSE.shape[-2] / x_BSE.shape[-1]), device=x_BSE.device)
    dist.all_reduce(shards, op=dist.ReduceOp.MAX)
    n = int(shards.item())
    MLPStats.calls += 1
    MLPStats.shards.add(n)
    # compute_params: ZeRO-3 reduces these weights' gradients only after the last shard's backward
    return TiledMLP.apply(_swiglu, self, x_BSE, n, [self.down_proj.weight, self.gate_proj.weight,
                                                    self.up_proj.weight])


def enable_tiled_mlp() -> None:
    """Before the model is built (the tutorial's order)."""
    from transformers.models.llama import modeling_llama

    modeling_llama.LlamaMLP.forward = tiled_mlp_forward


# ---- tiled fused logits + loss (DeepSpeed's TiledFusedLogitsLoss, ArcticTraining's use of it) -------------
def loss_shard_count(tokens: int, vocab: int, shard_gib: float) -> int:
    """ArcticTraining's count: shards of about `shard_gib` GiB of fp32 logits (the last one may be shorter)."""
    return max(1, math.ceil(tokens * vocab * 4 / 2**30 / shard_gib))


def _logits_loss_sum(model_with_head: nn.Module, h_NE: torch.Tensor, shift_labels_N: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
    """One shard: LM head, then HF's causal-LM loss on the pre-shifted labels, summed over the labelled tokens
    (num_items_in_batch=1 makes HF sum; ArcticTraining multiplies HF's mean by the labelled count, the same value
    but NaN for a shard with no label). HF upcasts the logits to fp32."""
    logits = model_with_head.lm_head(h_NE)
    loss = model_with_head.loss_function(logits=logits, labels=None, vocab_size=model_with_head.config.vocab_size,
                                         shift_labels=shift_labels_N, num_items_in_batch=1)
    return loss * scale if scale != 1.0 else loss


def alst_loss(model_with_head: nn.Module, h_BSE: torch.Tensor, shift_labels_BS: torch.Tensor, shards: int,
              sp_group, sp: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tensor to back-propagate, this sequence's mean loss, detached). `alst`: ArcticTraining's code (the
    per-rank mean, weighted by the ranks' labelled tokens through a differentiable all_gather); `exact`: the
    per-rank sum scaled by sp / the sequence's labelled tokens inside TiledFusedLogitsLoss (see the top of the
    file), back-propagated with gradient 1."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    head = [model_with_head.lm_head.weight]
    good = (shift_labels_BS != IGNORE).sum()
    if mode == "exact":
        total_good = good.clone()
        if sp > 1:
            dist.all_reduce(total_good, group=sp_group)
        scale = sp / max(int(total_good.item()), 1)
        fn = lambda m, h, y: _logits_loss_sum(m, h, y, scale)  # noqa: E731
        local = TiledFusedLogitsLoss.apply(fn, model_with_head, h_BSE, shift_labels_BS, None, shards, head, "sum")
        mean = local.detach().clone()
        if sp > 1:
            dist.all_reduce(mean, group=sp_group)
        return local, mean / sp
    total = TiledFusedLogitsLoss.apply(_logits_loss_sum, model_with_head, h_BSE, shift_labels_BS, None, shards,
                                       head, "sum")
    loss = total / good.clamp_min(1)
    if sp > 1:
        losses, goods = dnn.all_gather(loss, group=sp_group), dnn.all_gather(good, group=sp_group)
        loss = sum(lr * gr for lr, gr in zip(losses, goods)) / sum(goods)
    return loss, loss.detach()


# ---- the batches (UlyssesSPDataLoaderAdapter over torch_native's sequences) ---------------------------
class Sequences(torch.utils.data.Dataset):
    """What one rank's DataLoader yields: torch_native.make_batch's sequence of step k * sp + sp_rank for this dp
    rank (input_ids, labels = input_ids as the adapter wants them unshifted, position_ids 0..S-1). The adapter
    serves the sp group's sequences in sp-rank order, so step t of every rank of dp rank d trains on
    make_batch(..., d, t): torch_native's sequence of that step."""

    def __init__(self, vocab: int, seq_len: int, seed: int, dp_rank: int, sp: int, sp_rank: int, n: int,
                 device: torch.device):
        self.vocab, self.seq_len, self.seed, self.dp_rank = vocab, seq_len, seed, dp_rank
        self.sp, self.sp_rank, self.n, self.device = sp, sp_rank, n, device

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> dict:
        inputs, _, pos, _ = tn.make_batch(self.vocab, self.seq_len, self.seed, self.dp_rank, k * self.sp + self.sp_rank,
                                          self.device)
        return {"input_ids": inputs[0], "labels": inputs[0].clone(), "position_ids": pos[0]}


def ulysses_positions(seq_len: int, sp: int, sp_rank: int, device: torch.device) -> torch.Tensor:
    """The global positions an sp rank holds under Ulysses: the contiguous chunk sp_rank of sp."""
    c = seq_len // sp
    return torch.arange(sp_rank * c, (sp_rank + 1) * c, device=device)


def shard_mismatches(ids_B1: torch.Tensor, inputs: torch.Tensor, shift_labels: torch.Tensor, pos: torch.Tensor,
                     expected_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """How many tokens of this rank's shard break the contract (on device, no sync): position ids not the expected
    global positions, input ids not the tokens there, or shift labels not the next token (-100 at the last
    position of the sequence, where the adapter has no next token)."""
    p = pos.reshape(-1)
    if p.numel() != expected_pos.numel():
        return torch.tensor(float(max(p.numel(), expected_pos.numel())), device=p.device)
    want = torch.where(p == seq_len - 1, torch.full_like(p, IGNORE), ids_B1[0, p + 1])
    bad = (p != expected_pos).sum() + (ids_B1[0, p] != inputs.reshape(-1)).sum()
    return bad + (want != shift_labels.reshape(-1)).sum()


# ---- the SDPA calls: torch_native's guard, plus the Ulysses geometry -----------------------------------
class UlyssesSDPAGuard(tn.SDPAGuard):
    """torch_native's guard (unmasked, causal, counted) that also records the (query heads, KV heads, sequence) of
    every call: under Ulysses each rank attends over the whole sequence with its share of the heads."""

    def __init__(self):
        super().__init__(repeat_kv=False)
        self.shapes: set[tuple[int, int, int, int]] = set()

    def __call__(self, inner, query, key, value, *args, **kw):
        self.shapes.add((query.shape[1], key.shape[1], query.shape[2], key.shape[2]))
        return super().__call__(inner, query, key, value, *args, **kw)


# ---- the checkpoint offload: DeepSpeed's context manager, its inputs marked where ZeRO-3 hands them over ----
class OffloadMarker:
    """Marks, for DeepSpeed's checkpoint offload manager, the tensor each decoder layer's checkpoint saves.

    DeepSpeed's own marker wraps `GradientCheckpointingLayer.__call__` and marks the hidden states as the caller
    passed them. ZeRO-3's forward pre-hook on every module then hands `forward` a new tensor (its
    PostBackwardFunctionModule, `output.detach()`). Transformers versions whose layer checkpoints inside `__call__`
    (the hooks then run inside the checkpoint) save the marked tensor; those that checkpoint `forward` (5.2x: "module
    hooks stay outside the checkpoint") save the hook's tensor, which carries no mark, and nothing is offloaded. A
    forward pre-hook registered after ZeRO-3's marks the tensor `forward` receives, through the same manager (its
    `mark`); a forward hook drops a mark the checkpoint did not consume. The step's statistics say whether every
    layer's input reached the offload engine (offloaded, kept last, or skipped on CPU)."""

    def __init__(self, manager, layers: nn.ModuleList):
        self.manager, self.on = manager, False
        for layer in layers:
            layer.register_forward_pre_hook(self._mark)
            layer.register_forward_hook(self._unmark)

    def _wanted(self, module: nn.Module, args: tuple) -> bool:
        return (self.on and module.training and torch.is_grad_enabled() and bool(module.gradient_checkpointing)
                and bool(args) and torch.is_tensor(args[0]))

    def _mark(self, module: nn.Module, args: tuple) -> None:
        if self._wanted(module, args):
            self.manager.mark(args[0])

    def _unmark(self, module: nn.Module, args: tuple, output) -> None:
        if self._wanted(module, args):
            self.manager._consume_mark(args[0])

    @contextlib.contextmanager
    def active(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False


# ---- the DeepSpeed configuration ----------------------------------------------------------------------
def ds_config(ns, sp: int, cuda: bool) -> dict:
    """ZeRO-3 as ALST runs it (only what ALST sets; DeepSpeed's defaults otherwise)."""
    zero: dict = {"stage": 3}
    if not cuda:
        zero["overlap_comm"] = False  # overlapping needs accelerator streams (the CPU accelerator has none)
    if ns.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    cfg = {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "gradient_clipping": DEFAULTS.grad_clip, "zero_optimization": zero,
        "bf16": {"enabled": ns.precision == "bf16"},
        "sequence_parallel_size": sp,  # the tutorial's key (DeepSpeed then counts world / sp data-parallel ranks)
        "seq_parallel_communication_data_type": "bf16" if ns.precision == "bf16" else "fp32",
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    if ns.offload_optimizer:  # DeepSpeed's CPU AdamW runs the update on the host (ALST's cpu_adam)
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": DEFAULTS.lr, "betas": [DEFAULTS.beta1, DEFAULTS.beta2],
                                                        "eps": DEFAULTS.eps, "weight_decay": DEFAULTS.weight_decay}}
    return cfg


# ---- the run ------------------------------------------------------------------------------------------
class Peer:
    """Process group, Ulysses groups, the ZeRO-3 engine, the adapted DataLoader, on every rank."""

    def __init__(self, ns):
        import deepspeed.comm as ds_dist

        self.ns = ns
        self.world, self.rank, self.device = tn.init_peer_process()
        cuda = self.device.type == "cuda"
        ds_dist.init_distributed(dist_backend="nccl" if cuda else "gloo", dist_init_required=False, verbose=False)
        self.sp, self.dp = ns.sp, self.world // ns.sp
        self.sp_rank, self.dp_rank = self.rank % self.sp, self.rank // self.sp  # DeepSpeed's sp groups: consecutive

    def build(self, args: LlamaArgs, backend: str):
        import deepspeed
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager)
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter
        from transformers import LlamaForCausalLM

        from longtrain.train.engine import param_groups

        ns, cuda = self.ns, self.device.type == "cuda"
        self.args, self.backend = args, backend
        if ns.tiled_mlp:
            enable_tiled_mlp()
        config = tn.hf_config(args)
        self.ds_cfg = ds_config(ns, self.sp, cuda)
        dtype = torch.bfloat16 if ns.precision == "bf16" else torch.float32
        with deepspeed.zero.Init(config_dict_or_path=self.ds_cfg, dtype=dtype):
            hf = LlamaForCausalLM(config)
        self._init_weights(hf)
        # every decoder layer checkpointed, non-reentrant (HF's default; the offload context needs it)
        enable_ac = getattr(hf, "activation_checkpointing_enable", None)
        if enable_ac is not None:  # transformers >= 5.2x
            enable_ac(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.n_layers_checkpointed = sum(bool(getattr(m, "gradient_checkpointing", False))
                                         for m in hf.model.layers)
        # Ulysses into HF (returns None for sp 1); with sp > 1 no causal mask is built (ArcticTraining)
        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=hf, core_attn_implementation="sdpa", sequence_parallel_size=self.sp,
            micro_batch_size=1, seq_length=ns.seq_len, seq_length_is_variable=True)
        if self.sp > 1:
            import transformers.masking_utils

            transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", lambda *a, **k: None)
            self.sp_group = mpu.get_sequence_parallel_group()
            assert mpu.get_sequence_parallel_rank() == self.sp_rank
        else:  # the adapter still wants a group: each rank its own
            import torch.distributed as dist

            self.sp_group = [dist.new_group([r]) for r in range(self.world)][self.rank]
        groups = param_groups(hf, DEFAULTS.weight_decay)
        client_opt = None
        if not ns.offload_optimizer:
            client_opt = torch.optim.AdamW(groups, lr=DEFAULTS.lr, betas=(DEFAULTS.beta1, DEFAULTS.beta2),
                                           eps=DEFAULTS.eps, fused=cuda)
        self.engine, self.opt, _, _ = deepspeed.initialize(model=hf, model_parameters=groups, optimizer=client_opt,
                                                           config=self.ds_cfg, mpu=mpu, dist_init_required=False)
        self.engine.train()
        self.hf = self.engine.module
        self.offload = get_checkpoint_hidden_states_offloading_ctx_manager() if ns.offload_checkpoints else None
        self.offload_marker = OffloadMarker(self.offload, self.hf.model.layers) if self.offload is not None else None
        n_draws = -(-(ns.warmup + ns.steps + 1) // self.sp)  # +1: the profiled step
        loader = torch.utils.data.DataLoader(Sequences(args.vocab_size, ns.seq_len, ns.seed, self.dp_rank, self.sp,
                                                       self.sp_rank, n_draws, self.device), batch_size=1)
        self.loader = UlyssesSPDataLoaderAdapter(loader, sp_rank=self.sp_rank, sp_group=self.sp_group,
                                                 sp_world_size=self.sp, device=self.device)
        self.guard = UlyssesSDPAGuard()
        self.comm_dtype = str(getattr(self.engine, "communication_data_type", None))

    def _init_weights(self, hf: nn.Module) -> None:
        """Every parameter from its own seed (normal(0, 0.02), 1-D ones: HF's scheme), written whole by rank 0 and
        partitioned by ZeRO-3: the same weights for any number of ranks."""
        import deepspeed

        for i, (name, p) in enumerate(hf.named_parameters()):
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if p.ndim == 1:
                    p.fill_(1.0)
                else:
                    g = torch.Generator(device=p.device).manual_seed(self.ns.seed * 7919 + i)
                    p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * tn.INIT_STD)

    @contextlib.contextmanager
    def step_context(self):
        """Forward and backward: the checkpoint offload (it must see both), the SDPA backend, the guard."""
        with contextlib.ExitStack() as stack:
            if self.offload is not None:
                stack.enter_context(self.offload)
                stack.enter_context(self.offload_marker.active())
            stack.enter_context(tn.sdpa_backend_context(self.device, self.backend))
            stack.enter_context(self.guard.installed())
            yield

    def train_step(self, seq_len: int, step: int) -> dict:
        import torch.distributed as dist
        from deepspeed.runtime.utils import move_to_device

        ns = self.ns
        t0 = time.perf_counter()
        batch = move_to_device(next(self.loader), self.device)
        inputs, pos, shift_labels = batch["input_ids"], batch["position_ids"], batch["shift_labels"]
        ids = tn.make_batch(self.args.vocab_size, seq_len, ns.seed, self.dp_rank, step, self.device)[3]
        bad = shard_mismatches(ids, inputs, shift_labels, pos,
                               ulysses_positions(seq_len, self.sp, self.sp_rank, self.device), seq_len)
        calls0, mlp0 = self.guard.calls, MLPStats.calls
        shards = loss_shard_count(shift_labels.numel(), self.args.vocab_size, ns.loss_shard_gib)
        with self.step_context():
            h = self.hf.model(input_ids=inputs, position_ids=pos, use_cache=False).last_hidden_state
            loss, mean = alst_loss(self.hf, h, shift_labels, shards, self.sp_group, self.sp, ns.loss_grad)
            self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        off = self.offload.stats if self.offload is not None else None
        stats = torch.stack([mean.double(), bad.double(),
                             torch.tensor(float(off.offloaded_bytes if off else 0), device=self.device).double()])
        dist.all_reduce(stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        loss_sum, mismatches, offloaded = stats.tolist()
        if off is not None and off.offloaded_tensors + off.kept_last_tensors + off.skipped_marked_tensors \
                != self.n_layers_checkpointed:
            raise RuntimeError(f"step {step}: the checkpoint offload saw {off.offloaded_tensors} offloaded + "
                               f"{off.kept_last_tensors} kept + {off.skipped_marked_tensors} skipped layer inputs, not "
                               f"the {self.n_layers_checkpointed} checkpointed layers' (statistics {off})")
        if mismatches:
            raise RuntimeError(f"step {step}: {int(mismatches)} token(s) of the Ulysses shards do not match their "
                               "global positions (position ids, input ids or shift labels sharded differently)")
        n_seqs = self.dp
        flops_dev = tn.peer_flops(self.args, n_seqs, seq_len) / self.world / dt
        return {"step": step + 1, "loss": loss_sum / self.world,  # every rank of a sequence holds its mean loss
                "grad_norm": float(norm) if norm is not None else float("nan"), "step_time_s": dt,
                "tokens_per_s": n_seqs * seq_len / dt, "tflops_per_device": flops_dev / 1e12,
                "sdpa_calls": self.guard.calls - calls0, "mlp_calls": MLPStats.calls - mlp0, "loss_shards": shards,
                "offload": None if off is None else {
                    "marked": off.marked_tensors, "offloaded": off.offloaded_tensors,
                    "kept_last": off.kept_last_tensors, "restored": off.restored_tensors,
                    "skipped": off.skipped_marked_tensors, "offloaded_bytes": off.offloaded_bytes},
                "offloaded_bytes_all_ranks": offloaded}


def check_geometry(peer: Peer, seq_len: int) -> dict:
    """What every SDPA call saw against what Ulysses must give it: all S tokens, H/sp query heads, and H_kv/sp KV
    heads (one, replicated, when sp exceeds the KV heads)."""
    a, sp = peer.args, peer.sp
    want = (a.num_attention_heads // sp, max(a.num_key_value_heads // sp, 1), seq_len, seq_len)
    seen = sorted(peer.guard.shapes)
    return {"expected_q_kv_heads_q_kv_len": list(want), "seen": [list(s) for s in seen], "ok": seen == [want]}


def run_peer(ns) -> dict | None:
    """Every rank trains warmup + steps steps; rank 0 returns the record (the others None)."""
    import torch.distributed as dist

    args = peer_shape(ns)
    run = tn.start_peer(ns, Peer, args)  # ALST's allocator: expandable segments (--expandable-segments)
    peer, cuda = run.peer, run.cuda
    all_recs = tn.train_peer(ns, run, lambda rec: f", grad norm {rec['grad_norm']:.4g}")
    geometry = check_geometry(peer, ns.seq_len)
    if not geometry["ok"]:
        raise RuntimeError(f"SDPA did not see the Ulysses geometry: {geometry}")
    recs = all_recs[ns.warmup:]
    mem = tn.peer_memory(run, max((r["offload"] or {}).get("offloaded_bytes", 0) for r in all_recs) / 2**30)
    prof = tn.profile_peer(ns, run)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    offload_per_step = sorted({tuple(sorted(r["offload"].items())) for r in recs if r["offload"]})
    # the engine (its ZeRO-3 hooks and workers) goes before the process group, as bench_train tears
    # longtrain's down: left to the interpreter's exit, one CI run's rank aborted there
    # ("terminate called without an active exception") after its record was written
    peer.engine.destroy()
    dist.destroy_process_group()
    if peer.rank != 0:
        return None

    import deepspeed

    backend = run.backend
    z = peer.ds_cfg["zero_optimization"]
    return {
        **tn.peer_record(ns, run, PEER, args, recs, prof, mem),
        "overrides": [f"preset={ns.preset}", f"sdpa_backend={backend}", f"sp={peer.sp}",
                      f"loss_grad={ns.loss_grad}"] + (["untie_embeddings"] if ns.untie_embeddings else [])
                     + ([] if ns.tiled_mlp else ["tiled_mlp=off"])
                     + ([] if ns.offload_checkpoints else ["offload_checkpoints=off"])
                     + (["offload_optimizer=cpu"] if ns.offload_optimizer else []),
        "sp": peer.sp, "cp": 1, "precision": ns.precision, "engine": "deepspeed-zero3",
        "activation_policy": "recompute+offload" if ns.offload_checkpoints else "recompute",
        "swap_host_gib": mem[3].item(),
        "losses": [r["loss"] for r in all_recs], "grad_norms": [r["grad_norm"] for r in all_recs],
        "config": {
            "model": "transformers.LlamaForCausalLM (attn_implementation=sdpa), random init (per-parameter seeds), "
                     "built under deepspeed.zero.Init",
            "sdpa_backend": backend, "sdpa_backend_requested": ns.sdpa_backend, "sdpa_backend_probe": run.probe,
            "sp": peer.sp, "sp_method": "ulysses (UlyssesSPAttentionHF.register_with_transformers, sdpa)",
            "sp_mask": "HF sdpa mask builder returns None (sp > 1)" if peer.sp > 1 else "HF's (None: no padding)",
            "batch": "UlyssesSPDataLoaderAdapter (contiguous shards, pre-shifted labels)",
            "zero": {"stage": z["stage"], "shards": peer.world, "overlap_comm": z.get("overlap_comm", "default"),
                     "offload_optimizer": "cpu" if ns.offload_optimizer else None,
                     "param_dtype": "bfloat16" if ns.precision == "bf16" else "float32",
                     "grad_communication_dtype": peer.comm_dtype},
            "deepspeed_config": peer.ds_cfg,
            "tiled_mlp": {"on": ns.tiled_mlp, "shards": sorted(MLPStats.shards),
                          "rule": "ceil(S_local / hidden), max over ranks"},
            "tiled_loss": {"api": "TiledFusedLogitsLoss", "shard_gib": ns.loss_shard_gib,
                           "shards": sorted({r["loss_shards"] for r in all_recs}), "loss_grad": ns.loss_grad},
            "ac": {"api": "HF activation checkpointing, non-reentrant",
                   "layers_checkpointed": peer.n_layers_checkpointed,
                   "offload": "deepspeed get_checkpoint_hidden_states_offloading_ctx_manager (defaults: pinned, "
                              "side stream, last layer's input kept)" if ns.offload_checkpoints else None,
                   "offload_marker": "OffloadMarker: forward pre-hook after ZeRO-3's, through the manager's mark()"
                                     if ns.offload_checkpoints else None},
            "optimizer": ("DeepSpeed CPU AdamW (offloaded)" if ns.offload_optimizer else f"torch AdamW(fused={cuda})")
                         + f", lr={DEFAULTS.lr}, betas=({DEFAULTS.beta1}, {DEFAULTS.beta2}), "
                           f"weight_decay={DEFAULTS.weight_decay} except norms, clip {DEFAULTS.grad_clip}",
            "data": f"torch_native.make_batch sequences, seed {ns.seed}; shift labels (seq_len - 1 labelled)",
            "seed": ns.seed,
        },
        "checks": {"sdpa_attn_mask_none_and_is_causal": True,
                   "sdpa_calls_per_step": sorted({r["sdpa_calls"] for r in recs}),
                   "sdpa_gqa_calls": sorted(peer.guard.gqa_seen), "ulysses_geometry": geometry,
                   "tiled_mlp_calls_per_step": sorted({r["mlp_calls"] for r in recs}),
                   "shard_positions_ids_labels_match": True,
                   "offload_per_step": [dict(t) for t in offload_per_step],
                   "offload_note": None if cuda else ("CPU: DeepSpeed's offload engine keeps tensors that are not on "
                                                      "an accelerator in place (the marked ones count as skipped)")},
        "deepspeed_version": deepspeed.__version__,
    }


def print_peer(r: dict) -> None:
    bt.print_record(r)
    c, k = r["config"], r["checks"]
    off = k["offload_per_step"]
    print("\n".join([
        f"  peer                {r['peer']}: {c['model']}",
        f"  configuration       ZeRO-3 over {c['zero']['shards']} rank(s) ({c['zero']['param_dtype']} params, "
        f"grads communicated in {c['zero']['grad_communication_dtype']}, optimizer {c['optimizer'].split(',')[0]}); "
        f"Ulysses sp {c['sp']}; SDPA {c['sdpa_backend']}; tiled MLP "
        + (f"{c['tiled_mlp']['shards']} shard(s)" if c["tiled_mlp"]["on"] else "off")
        + f"; tiled loss {c['tiled_loss']['shards']} shard(s) ({c['tiled_loss']['loss_grad']} gradient); "
        f"{c['ac']['layers_checkpointed']} layers checkpointed" + (", inputs offloaded to CPU" if c["ac"]["offload"]
                                                                   else ""),
        f"  checks              every SDPA call unmasked and causal ({k['sdpa_calls_per_step']} calls per step), "
        f"Ulysses geometry {k['ulysses_geometry']['seen']}; shards' positions, ids and labels consistent; offload "
        f"per step {off}",
        f"  versions            torch {r['torch_version']}, transformers {r['transformers_version']}, deepspeed "
        f"{r['deepspeed_version']}, git {r['git_sha'][:12]}",
    ]), flush=True)


# ---- the longest sequence that fits ----------------------------------------------------------------
FORWARDED = (("--preset", "preset"), ("--layers", "layers"), ("--steps", "steps"), ("--warmup", "warmup"),
             ("--sp", "sp"), ("--sdpa-backend", "sdpa_backend"), ("--loss-shard-gib", "loss_shard_gib"),
             ("--loss-grad", "loss_grad"), ("--precision", "precision"), ("--seed", "seed"),
             ("--matmul-n", "matmul_n"), ("--peak-tflops", "peak_tflops"))
SWITCHES = (("tiled_mlp", "--no-tiled-mlp"), ("offload_checkpoints", "--no-offload-checkpoints"),
            ("expandable_segments", "--no-expandable-segments"))


def attempt_argv(ns, seq: int, out: Path) -> list[str]:
    """The flags of one --find-max-seq attempt: this run's settings at `seq` tokens."""
    switches = [flag for dest, flag in SWITCHES if not getattr(ns, dest)]
    switches += ["--offload-optimizer"] if ns.offload_optimizer else []
    switches += ["--untie-embeddings"] if ns.untie_embeddings else []
    return tn.forwarded_argv(ns, FORWARDED, switches, seq, out)


child_runner = bt.attempt_runner(str(Path(__file__).resolve()), attempt_argv)


def find_max_seq(ns) -> int:
    return tn.search_peer(ns, child_runner, check_world, ns.sp,
                          f"--sp {ns.sp} (Ulysses splits the sequence into sp equal shards)",
                          [f"preset={ns.preset}", f"sdpa_backend={ns.sdpa_backend}", f"sp={ns.sp}",
                           f"loss_grad={ns.loss_grad}"], peer=PEER, tmp_prefix="peer_alst_")


# ---- command line -----------------------------------------------------------------------------------
def peer_shape(ns) -> LlamaArgs:
    """The preset's shape (depth-truncated by --layers), with an untied LM head under --untie-embeddings."""
    args = tn.model_shape(ns.preset, ns.layers)
    return args.with_overrides(tie_word_embeddings=False) if ns.untie_embeddings else args


def check_world(ns, world: int) -> None:
    if ns.sp < 1 or world % ns.sp:
        raise bt.UsageError(f"--sp {ns.sp} must divide the {world} rank(s) (torchrun --nproc-per-node): "
                            f"give a divisor of {world}")
    a = peer_shape(ns)
    h, kv = a.num_attention_heads, a.num_key_value_heads
    if h % ns.sp or (kv % ns.sp and ns.sp % kv):
        raise bt.UsageError(f"--sp {ns.sp} must divide the {h} query heads, and divide or be a multiple of the {kv} "
                            f"KV heads (Ulysses splits the heads over the sp ranks)")


def check_flags(ns) -> None:
    """Refusals before any process group or GPU memory exists."""
    import importlib.util

    bt.check_run_flags(ns)
    if not ns.loss_shard_gib > 0:
        raise bt.UsageError(f"--loss-shard-gib {ns.loss_shard_gib} must be > 0")
    if peer_shape(ns).tie_word_embeddings:
        raise bt.UsageError(f"--preset {ns.preset} ties the LM head to the embedding: TiledFusedLogitsLoss reduces the "
                            "LM head's gradient under ZeRO-3 inside the forward, and the embedding's gradient then "
                            "reaches the same parameter a second time (DeepSpeed asserts): give --untie-embeddings")
    cuda = torch.cuda.is_available()
    if not cuda and ns.sdpa_backend != "auto":
        raise bt.UsageError(f"--sdpa-backend {ns.sdpa_backend} is a CUDA kernel: on CPU leave it at auto "
                            "(SDPA picks its CPU kernel)")
    if cuda and ns.precision != "bf16":
        raise bt.UsageError(f"--precision {ns.precision} is for the CPU exactness tests: on CUDA the peer is "
                            "measured in bf16")
    for mod, pkg in (("deepspeed", "deepspeed"), ("einops", "einops"), ("transformers", "transformers")):
        if importlib.util.find_spec(mod) is None:
            raise bt.UsageError(f"the ALST peer needs the {pkg} package (DeepSpeed's sequence-parallel code imports "
                                "einops): install it (on the GPU machine: add it to the wheels, "
                                f"shared/device/wheels.sh {pkg})")
    if ns.json:  # refused now rather than after the run
        bt.read_json_list(ns.json)
    if ns.find_max_seq:
        return
    check_world(ns, int(os.environ.get("WORLD_SIZE", "1")))
    if ns.seq_len < 2 * ns.sp or ns.seq_len % ns.sp:
        near = max(2 * ns.sp, round(ns.seq_len / ns.sp) * ns.sp)
        raise bt.UsageError(f"--seq-len {ns.seq_len} must be a multiple of --sp {ns.sp} (Ulysses splits it into sp "
                            f"equal contiguous shards) and >= {2 * ns.sp}: e.g. {near}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The ALST peer (HF Llama + DeepSpeed ZeRO-3 + Ulysses sequence parallel "
                                            "+ tiled MLP and loss + checkpoint offload to CPU): tokens/s, MFU, memory.")
    p.add_argument("--preset", default="llama3-8b", help="longtrain model shape (default llama3-8b; debug on CPU)")
    p.add_argument("--layers", type=int, default=None,
                   help="train only N decoder layers of the same width (depth-truncated; default: all)")
    p.add_argument("--untie-embeddings", action="store_true",
                   help="an LM head of its own for a preset that ties it (debug, tiny, 1b): ALST's tiled loss cannot "
                        "train a tied head under ZeRO-3 (llama3-8b is untied; the FLOP count is the same)")
    p.add_argument("--seq-len", type=int, default=131072, help="tokens per sequence (default 131072)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree, dividing the ranks (default 1)")
    p.add_argument("--sdpa-backend", choices=("auto", *tn.BACKENDS), default="auto",
                   help="SDPA kernel (default auto: the first of cudnn, flash, efficient that runs here)")
    p.add_argument("--loss-shard-gib", type=float, default=LOSS_SHARD_GIB,
                   help=f"GiB of fp32 logits per tiled-loss shard (default {LOSS_SHARD_GIB:g}, ArcticTraining's)")
    p.add_argument("--loss-grad", choices=("alst", "exact"), default="alst",
                   help="alst (default): ArcticTraining's loss code, whose LM head weight gradient is too large (see "
                        "the top of the file); exact: the same computation with every gradient that of the mean loss")
    p.add_argument("--no-tiled-mlp", dest="tiled_mlp", action="store_false", help="HF's MLP, not tiled (ablation)")
    p.add_argument("--no-offload-checkpoints", dest="offload_checkpoints", action="store_false",
                   help="keep the checkpointed layer inputs on the GPU (ablation)")
    p.add_argument("--offload-optimizer", action="store_true",
                   help="ZeRO-3 optimizer states in host memory, DeepSpeed's CPU AdamW (ALST's published runs; "
                        "default: torch AdamW on the GPU, as the torch-native peer)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 (default); fp32 only on CPU, for the exactness tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the random tokens (default 0)")
    p.add_argument("--no-expandable-segments", dest="expandable_segments", action="store_false",
                   help="keep the CUDA caching allocator's defaults (default: expandable_segments:True, as ALST; "
                        "an explicit PYTORCH_CUDA_ALLOC_CONF always wins)")
    p.add_argument("--json", default=None, help="append the record(s) to this JSON list (default: none)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULTS.peak_tflops,
                   help=f"per-GPU peak for MFU (default {DEFAULTS.peak_tflops:g}: H100/H200 dense bf16)")
    bt.add_measure_args(p, seq_what="--seq-len", seq_start=131072, seq_step=16384, nproc_default="1")
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    # DeepSpeed calls torch collectives that torch marks deprecated, once per step: noise, not news
    warnings.filterwarnings("ignore", message=r".* is deprecated\. Please use", category=FutureWarning)
    return bt.run_cli(build_parser().parse_args(argv), "alst", check_flags, find_max_seq, run_peer, print_peer)


if __name__ == "__main__":
    sys.exit(main())
