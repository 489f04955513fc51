"""The PyTorch-native peer: what a user would otherwise build with plain PyTorch to train a
Llama-3-8B-shaped model on very long sequences, benchmarked the way tools/bench_train.py benchmarks
longtrain, so the two JSON records compare field by field.

    torchrun --nproc-per-node 4 tools/peers/torch_native.py --seq-len 1048576 --layers 4 --cp 4 \\
        --steps 3 --warmup 2 --json out.json
    python tools/peers/torch_native.py --preset debug --seq-len 256 --steps 2 --warmup 1      # CPU smoke run
    python tools/peers/torch_native.py --find-max-seq --cp 4 --nproc 4 --seq-start 262144 --seq-step 65536

The stack, every piece the stock PyTorch / Hugging Face one:
  - model: `transformers.LlamaForCausalLM` from a `LlamaConfig` of longtrain's preset shape
    (longtrain/models/presets.py; `--layers N` keeps the width and truncates the depth), random init
    (normal, std 0.02; norms 1), `attn_implementation="sdpa"`, built on the meta device and materialised
    shard by shard (no host copy of the full model);
  - FSDP2: `fully_shard` on every decoder layer and on the root (a thin module holding the HF model and the
    tiled loss), over all ranks; `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: fp32 sharded
    master weights, bf16 compute, fp32 gradient reduce-scatter;
  - context parallel: `torch.distributed.tensor.experimental.context_parallel` over the `cp` dimension of a
    (dp, cp) mesh, SDPA restricted to `--sdpa-backend` (default: the fastest that runs here, probed in the order
    cudnn, flash, efficient: DESIGN.md section 4 measured cuDNN ~1.7x flash); PyTorch's load balancing
    (head-tail: rank r holds chunks r and 2cp-1-r of 2cp, so seq_len must divide by 2cp) and its KV rotation
    (`set_rotate_method`, `--rotate-method`, PyTorch's default allgather);
  - full activation checkpointing: `apply_activation_checkpointing` with the non-reentrant `checkpoint_wrapper`
    on every decoder layer (applied before FSDP, as torchtitan does);
  - tiled loss: `model.model(...)` gives the hidden states, then cross-entropy over chunks of `--loss-chunk`
    tokens with the LM head weight, each chunk under non-reentrant `torch.utils.checkpoint`, so a chunk's logits
    live only while that chunk is computed (forward, and again in backward): the full logits never exist;
  - AdamW (fused on CUDA) with longtrain's defaults (lr 3e-4, betas 0.9/0.95, weight decay 0.1 except on norms),
    gradient clipping at 1.0; data: random token ids from a fixed seed (one sequence per dp rank and step, the
    same on the ranks of a cp group), labels = the ids shifted by one (seq_len + 1 ids are drawn, so all
    seq_len positions are labelled).

Choices made for HF's LlamaForCausalLM under context parallel (checked in code, not assumed):
  - Position ids. `context_parallel` shards the buffers it is given (`buffers=` / `buffer_seq_dims=`), in place.
    The input ids, the labels and the position ids arange(seq_len) are passed together, so every rank holds the
    matching shard of each and its position ids are the GLOBAL positions of its tokens (RoPE sees the true
    positions). Every step checks, on device, that position_ids are the head-tail layout above and that the ids
    and labels a rank holds are the tokens at those positions (`shard_mismatches`); a mismatch stops the run.
  - Causal masking. Under load balancing a rank's positions are two separate runs, which HF >= 4.53 reads as
    *packed sequences* when attention_mask is None: it would then build an explicit block mask (wrong here, and
    refused by PyTorch's context-parallel SDPA). So the model is given an all-ones 2-D attention_mask (HF's way to
    say "no padding"), for which HF's sdpa mask builder returns None and its sdpa path calls SDPA with
    `attn_mask=None, is_causal=True` (transformers 4.4x does the same from `_update_causal_mask`). Every SDPA
    call is intercepted (between HF and PyTorch's context-parallel SDPA) and refused unless attn_mask is None and
    is_causal is True; the calls are counted (with full checkpointing, 2 per layer and step: forward + recompute).
  - GQA. On CUDA with no mask HF passes `enable_gqa=True` (K/V keep their 8 heads, 4x fewer bytes in the ring).
    `--gqa repeat` expands K/V to the query heads before SDPA instead (HF's own fallback, repeat_kv); the
    memory-efficient kernel has no GQA, so `--sdpa-backend efficient` always repeats.
  - Before training with cp > 1 (CUDA), one short forward compares the context-parallel attention output of the
    first layer, gathered and put back in position order, with a single-device SDPA of the same q/k/v
    (`cp_check` in the record; `--no-verify-cp` skips it).

FLOPs, MFU and memory are counted exactly as longtrain's bench counts them (longtrain.train.metrics.train_flops
for the same shape and seq_len: 6 x matmul parameters per token plus causal attention; recomputation not
counted; MFU against 989 TFLOP/s and against a bf16 matmul measured here by tools/bench_train.py's own code).
The JSON record uses tools/bench_train.py's field names where the meaning is the same (plus "peer", "cp",
"config" and "checks"); its profiled step (one more step under torch.profiler, split into compute / exposed
communication / exposed copies / idle; on by default on CUDA), its --find-max-seq search driver, OOM marker and
exit codes are bench_train's own code.
On CPU (gloo, no CUDA) it runs for plumbing tests: FSDP2 over the ranks, --cp 1 only (context parallel needs
CUDA SDPA kernels), no MFU basis.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))  # tools/bench_train.py: shared helpers, imported rather than copied
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import bench_train as bt  # noqa: E402

from longtrain.config.schema import TrainConfig  # noqa: E402
from longtrain.models.presets import PRESETS, LlamaArgs  # noqa: E402
from longtrain.train.metrics import host_peak_rss_gib, train_flops  # noqa: E402

PEER = "torch-native"
BACKENDS = ("cudnn", "flash", "efficient")  # probed in this order: fastest first (DESIGN.md section 4)
DEFAULTS = TrainConfig()  # longtrain's optimizer settings, loss tile and MFU basis: the same for the peer
INIT_STD = 0.02  # LlamaConfig.initializer_range
# The real SDPA, taken before anything patches it: the cp check's single-device reference.
_SDPA = F.scaled_dot_product_attention


_rank, _say = bt._rank, bt._say  # rank from the launcher's environment; rank 0 prints


# ---- shape ----------------------------------------------------------------------------------
def model_shape(preset: str, layers: int | None) -> LlamaArgs:
    """longtrain's preset shape, depth-truncated to `layers` (the same width)."""
    if preset not in PRESETS:
        raise bt.UsageError(f"--preset {preset!r} is not a longtrain preset: give one of {', '.join(PRESETS)}")
    args = PRESETS[preset]
    if layers is not None and layers > args.num_hidden_layers:
        raise bt.UsageError(f"--layers {layers} is more than the {preset} model's {args.num_hidden_layers} layers: "
                            f"give at most {args.num_hidden_layers} (the flag truncates, it does not deepen)")
    return args.with_overrides(num_hidden_layers=layers)


def peer_flops(args: LlamaArgs, n_seqs: int, seq_len: int) -> float:
    """FLOPs of one step: longtrain's own count (causal attention), so MFU compares like with like."""
    return train_flops(args, n_seqs, seq_len)


def hf_config(args: LlamaArgs):
    """The transformers LlamaConfig of a longtrain shape, with HF's SDPA attention and no KV cache."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads, head_dim=args.hd, rms_norm_eps=args.rms_norm_eps,
        rope_theta=args.rope_theta, rope_scaling=dict(args.rope_scaling) if args.rope_scaling else None,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=args.tie_word_embeddings,
        attention_bias=args.attention_bias, mlp_bias=False, attention_dropout=0.0, initializer_range=INIT_STD,
        use_cache=False, attn_implementation="sdpa")
    if cfg._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers kept attn_implementation={cfg._attn_implementation!r}, not 'sdpa'")
    return cfg


# ---- tiled loss -----------------------------------------------------------------------------
def _chunk_ce_sum(h_CE: torch.Tensor, w_VE: torch.Tensor, labels_C: torch.Tensor) -> torch.Tensor:
    logits_CV = F.linear(h_CE, w_VE)  # in the compute dtype (bf16); the softmax in fp32 (as HF's loss), fp64 stays
    logits_CV = logits_CV.to(torch.promote_types(logits_CV.dtype, torch.float32))
    return F.cross_entropy(logits_CV, labels_C, reduction="sum", ignore_index=-100)


def tiled_cross_entropy_sum(h_NE: torch.Tensor, w_VE: torch.Tensor, labels_N: torch.Tensor,
                            chunk_tokens: int) -> torch.Tensor:
    """Sum of the cross-entropy of N tokens (labels -100 ignored) over chunks of `chunk_tokens`: each chunk's
    logits are recomputed in backward (non-reentrant checkpoint) instead of kept, so at most one chunk's
    logits exist at a time. `split` is one autograd node: the chunks' dh are concatenated once, not summed."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    from torch.utils.checkpoint import checkpoint

    total = None
    for h_c, y_c in zip(h_NE.split(chunk_tokens), labels_N.split(chunk_tokens)):
        part = checkpoint(_chunk_ce_sum, h_c, w_VE, y_c, use_reentrant=False)
        total = part if total is None else total + part
    return total


class TiledLossLM(nn.Module):
    """The FSDP root: the HF model's hidden states, then the tiled loss with its LM head weight (used as a
    tensor, inside this root's forward, where FSDP has it unsharded)."""

    def __init__(self, hf: nn.Module, chunk_tokens: int):
        super().__init__()
        self.hf = hf
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor, labels_BS: torch.Tensor):
        # all-ones mask = no padding: HF returns no mask and SDPA runs with is_causal=True (see the top of the file)
        out = self.hf.model(input_ids=input_ids_BS, attention_mask=torch.ones_like(input_ids_BS),
                            position_ids=position_ids_BS, use_cache=False)
        h_BSE = out.last_hidden_state
        return tiled_cross_entropy_sum(h_BSE.flatten(0, 1), self.hf.lm_head.weight, labels_BS.flatten(),
                                       self.chunk_tokens)


# ---- the SDPA calls: checked, counted, K/V repeated on request ----------------------------------
class SDPAGuard:
    """Sits between HF and whatever F.scaled_dot_product_attention is (PyTorch's context-parallel one inside
    `context_parallel`): refuses a call with a mask or without is_causal, counts calls, and for `repeat` expands
    GQA K/V to the query heads. `capture` keeps the first call's local q, k, v and output (the cp check)."""

    def __init__(self, repeat_kv: bool):
        self.repeat_kv = repeat_kv
        self.calls = 0
        self.gqa_seen: set[str] = set()
        self.capture = False
        self.captured: tuple | None = None

    def __call__(self, inner, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 **kw):
        if attn_mask is not None or is_causal is not True:
            raise RuntimeError(f"SDPA was called with attn_mask={'a tensor' if attn_mask is not None else None}, "
                               f"is_causal={is_causal}: the peer needs HF's unmasked causal path (attn_mask=None, "
                               "is_causal=True) for context parallel")
        if dropout_p:
            raise RuntimeError(f"SDPA was called with dropout_p={dropout_p}: the benchmark trains without dropout")
        self.calls += 1
        n_rep = query.shape[1] // key.shape[1]
        if self.repeat_kv and n_rep > 1:
            key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
            kw.pop("enable_gqa", None)
        self.gqa_seen.add("enable_gqa" if kw.get("enable_gqa") else
                          "kv heads = query heads" if key.shape[1] == query.shape[1] else "other")
        out = inner(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=True, scale=scale, **kw)
        if self.capture and self.captured is None:
            self.captured = tuple(t.detach() for t in (query, key, value, out)) + (bool(kw.get("enable_gqa")),)
        return out

    @contextlib.contextmanager
    def installed(self):
        """Wraps the current F.scaled_dot_product_attention (enter it inside `context_parallel`, leave it before:
        context_parallel restores SDPA only if it finds its own wrapper there)."""
        inner = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = lambda *a, **k: self(inner, *a, **k)
        try:
            yield self
        finally:
            F.scaled_dot_product_attention = inner


def sdpa_backend_context(device: torch.device, backend: str):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]])


def probe_backends(device: torch.device, args: LlamaArgs, wanted: str) -> tuple[str, dict]:
    """The backend to use and what the probe saw: `wanted`, or for auto the first of BACKENDS whose causal
    fwd+bwd runs here in bf16 at the model's head shape (GQA as the run will call it)."""
    seen = {}
    for b in BACKENDS if wanted == "auto" else (wanted,):
        gqa = b != "efficient" and args.num_key_value_heads != args.num_attention_heads
        kv_heads = args.num_key_value_heads if gqa else args.num_attention_heads
        q = torch.randn(1, args.num_attention_heads, 256, args.hd, device=device, dtype=torch.bfloat16,
                        requires_grad=True)
        k, v = (torch.randn(1, kv_heads, 256, args.hd, device=device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(2))
        try:
            with sdpa_backend_context(device, b):
                _SDPA(q, k, v, is_causal=True, **({"enable_gqa": True} if gqa else {})).sum().backward()
            torch.cuda.synchronize(device)
            seen[b] = "ok"
            return b, seen
        except RuntimeError as e:
            seen[b] = str(e).strip().splitlines()[0][:200]
    if wanted != "auto":
        raise bt.UsageError(f"--sdpa-backend {wanted} does not run here ({seen[wanted]}): give another of "
                            f"{', '.join(BACKENDS)} or auto")
    raise RuntimeError(f"no SDPA backend runs here: {seen}")


# ---- batches ------------------------------------------------------------------------------------
def make_batch(vocab: int, seq_len: int, seed: int, dp_rank: int, step: int, device: torch.device):
    """One sequence of random ids (seq_len + 1 drawn): input ids, labels (shifted by one), position ids, and the
    drawn ids (kept to check the shards). The same on every rank of a cp group, different per dp rank and step."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + dp_rank * 10_007 + step)
    ids = torch.randint(0, vocab, (1, seq_len + 1), generator=g, device=device)
    pos = torch.arange(seq_len, device=device).unsqueeze(0)
    return ids[:, :-1].clone(), ids[:, 1:].clone(), pos, ids


def head_tail_positions(seq_len: int, cp: int, cp_rank: int, device: torch.device) -> torch.Tensor:
    """The global positions a cp rank holds under PyTorch's load balancing: chunks r and 2cp-1-r of 2cp."""
    if cp == 1:
        return torch.arange(seq_len, device=device)
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device),
                      torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c, device=device)])


def shard_mismatches(ids_B1: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor,
                     expected_pos: torch.Tensor) -> torch.Tensor:
    """How many tokens of this rank's shard break the contract (on device, no sync): position ids not the
    expected global positions, or input ids / labels that are not the tokens at (position, position + 1)."""
    p = pos.reshape(-1)
    if p.numel() != expected_pos.numel():
        return torch.tensor(float(max(p.numel(), expected_pos.numel())), device=p.device)
    bad = (p != expected_pos).sum() + (ids_B1[0, p] != inputs.reshape(-1)).sum()
    return bad + (ids_B1[0, p + 1] != labels.reshape(-1)).sum()


def init_peer_process() -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this rank, its default process group started (the peers' engines want
    one even alone); on CPU the ranks of a node share its cores instead of oversubscribing them."""
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), _rank()
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        if world == 1:
            from longtrain.parallel.mesh import free_port

            for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                               ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    return world, rank, device


# ---- the run ------------------------------------------------------------------------------------
class Peer:
    """Process group, meshes, the sharded model and its optimizer, on every rank."""

    def __init__(self, ns):
        from torch.distributed.device_mesh import init_device_mesh

        self.ns = ns
        self.world, self.rank, self.device = init_peer_process()
        self.cp, self.dp = ns.cp, self.world // ns.cp
        self.fsdp_mesh = init_device_mesh(self.device.type, (self.world,), mesh_dim_names=("fsdp",))
        mesh2 = init_device_mesh(self.device.type, (self.dp, self.cp), mesh_dim_names=("dp", "cp"))
        self.cp_mesh = mesh2["cp"]
        self.dp_rank, self.cp_rank = mesh2.get_local_rank("dp"), mesh2.get_local_rank("cp")

    def build(self, args: LlamaArgs, backend: str):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, CheckpointWrapper, apply_activation_checkpointing, checkpoint_wrapper)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import LlamaForCausalLM
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        ns = self.ns
        self.args, self.backend = args, backend
        config = hf_config(args)
        with torch.device("meta"):
            hf = LlamaForCausalLM(config)
        root = TiledLossLM(hf, ns.loss_chunk)
        apply_activation_checkpointing(
            root, check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in hf.model.layers:
            fully_shard(layer, mesh=self.fsdp_mesh, mp_policy=mp)
        fully_shard(root, mesh=self.fsdp_mesh, mp_policy=mp)
        root.to_empty(device=self.device)
        # non-persistent buffers were left empty by to_empty: rebuild RoPE's inverse frequencies
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(ns.seed * 7919 + self.rank)
        with torch.no_grad():  # each rank initialises its own shard (HF's scheme: normal(0, 0.02), norms 1)
            for p in root.parameters():
                local = p.to_local()
                if p.ndim == 1:
                    local.fill_(1.0)
                else:
                    local.normal_(0.0, INIT_STD, generator=g)
        left = [n for n, t in [*root.named_parameters(), *root.named_buffers()] if t.is_meta]
        assert not left, f"still on the meta device: {left}"
        self.n_layers_wrapped = sum(isinstance(m, CheckpointWrapper) for m in root.modules())
        self.model = root
        decay = [p for p in root.parameters() if p.ndim >= 2]
        no_decay = [p for p in root.parameters() if p.ndim < 2]
        cuda = self.device.type == "cuda"
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": DEFAULTS.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=DEFAULTS.lr,
                                     betas=(DEFAULTS.beta1, DEFAULTS.beta2), eps=DEFAULTS.eps, fused=cuda)
        self.guard = SDPAGuard(repeat_kv=ns.gqa == "repeat" or backend == "efficient")

    @contextlib.contextmanager
    def attention_context(self, buffers: list[torch.Tensor]):
        """Context parallel (shards `buffers` on dim 1 in place), the SDPA backend, and the SDPA guard."""
        with contextlib.ExitStack() as stack:
            if self.cp > 1:
                from torch.distributed.tensor.experimental import context_parallel

                stack.enter_context(context_parallel(self.cp_mesh, buffers=buffers, buffer_seq_dims=[1] * len(buffers),
                                                     no_restore_buffers=set(buffers)))
            stack.enter_context(sdpa_backend_context(self.device, self.backend))
            stack.enter_context(self.guard.installed())
            yield

    def train_step(self, seq_len: int, step: int) -> dict:
        import torch.distributed as dist

        t0 = time.perf_counter()
        inputs, labels, pos, ids = make_batch(self.args.vocab_size, seq_len, self.ns.seed, self.dp_rank, step,
                                              self.device)
        expected = head_tail_positions(seq_len, self.cp, self.cp_rank, self.device)
        total_tokens = self.dp * seq_len  # every position is labelled
        calls0 = self.guard.calls
        with self.attention_context([inputs, labels, pos]):
            bad = shard_mismatches(ids, inputs, labels, pos, expected)
            loss_sum = self.model(inputs, pos, labels)
            # FSDP averages gradients over all ranks: scaled so the result is the mean over all tokens
            (loss_sum * (self.world / total_tokens)).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), DEFAULTS.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats = torch.stack([loss_sum.detach().double(), bad.double()])
        dist.all_reduce(stats)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        loss, mismatches, grad_norm = *stats.tolist(), float(norm)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        if mismatches:
            raise RuntimeError(f"step {step}: {int(mismatches)} token(s) of the context-parallel shards do not match "
                               "their global positions (position ids, input ids or labels sharded differently)")
        n_seqs = self.dp
        flops_dev = peer_flops(self.args, n_seqs, seq_len) / self.world / dt
        return {"step": step + 1, "loss": loss / total_tokens, "grad_norm": grad_norm, "step_time_s": dt,
                "tokens_per_s": n_seqs * seq_len / dt, "tflops_per_device": flops_dev / 1e12,
                "sdpa_calls": self.guard.calls - calls0}

    def check_cp(self, seq_len: int) -> dict:
        """One forward at `seq_len` under context parallel: the first layer's attention output, gathered over the
        cp group and put back in position order, against single-device SDPA of the same gathered q, k, v."""
        import torch.distributed as dist

        inputs, labels, pos, _ = make_batch(self.args.vocab_size, seq_len, self.ns.seed + 1, self.dp_rank, 0,
                                            self.device)
        self.guard.capture, self.guard.captured = True, None
        try:
            with torch.no_grad(), self.attention_context([inputs, labels, pos]):
                self.model(inputs, pos, labels)
        finally:
            self.guard.capture = False
        q, k, v, out, gqa = self.guard.captured
        self.guard.captured = None
        group = self.cp_mesh.get_group()

        def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
            parts = [torch.empty_like(t) for _ in range(self.cp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            return torch.cat(parts, dim=dim)

        order = gather(pos.reshape(1, -1), 1)[0].argsort()
        qf, kf, vf = (gather(t, 2)[:, :, order] for t in (q, k, v))
        got = gather(out, 2)[:, :, order]
        with torch.no_grad(), sdpa_backend_context(self.device, self.backend):
            ref = _SDPA(qf, kf, vf, is_causal=True, **({"enable_gqa": True} if gqa else {}))
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        positions_ok = bool(torch.equal(order.sort().values, torch.arange(seq_len, device=self.device)))
        return {"seq_len": seq_len, "rel_max_err": err, "tolerance": 2e-2, "positions_cover_sequence": positions_ok,
                "ok": err <= 2e-2 and positions_ok}


# ---- what every peer's run does the same way (this peer and tools/peers/alst.py) --------------------

@dataclasses.dataclass
class PeerRun:
    peer: object  # the peer's Peer: device, rank, world, dp, train_step(seq_len, step)
    cuda: bool
    allocator: str | None  # the CUDA allocator mode, as longtrain reports it
    matmul: float | None  # measured bf16 matmul TFLOP/s (the second MFU basis)
    backend: str  # the SDPA backend used
    probe: dict  # what the backend probe measured


def start_peer(ns, make_peer, args: LlamaArgs) -> PeerRun:
    """Allocator mode (before CUDA starts, as longtrain sets it), the peer's process, the matmul basis and
    the SDPA backend probe (before the model exists, so its memory is free and its buffers are not in the
    peaks), then the model."""
    allocator = None
    if torch.cuda.is_available():
        from longtrain.memory.arena import set_cuda_allocator_mode

        allocator = set_cuda_allocator_mode("expandable" if ns.expandable_segments else "default")
    peer = make_peer(ns)
    cuda = peer.device.type == "cuda"
    torch.manual_seed(ns.seed)
    matmul, probe, backend = None, {}, "cpu"
    if cuda:
        matmul = bt.matmul_tflops(peer.device, ns.matmul_n)
        backend, probe = probe_backends(peer.device, args, ns.sdpa_backend)
    peer.build(args, backend)
    return PeerRun(peer, cuda, allocator, matmul, backend, probe)


def train_peer(ns, run: PeerRun, describe=lambda rec: "") -> list[dict]:
    """Peaks reset, then warmup + steps steps, each said on rank 0 (`describe(rec)` adds to the line);
    returns every step's record."""
    peer = run.peer
    if run.cuda:
        torch.cuda.synchronize(peer.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(peer.device)
    recs = []
    for i in range(ns.warmup + ns.steps):
        rec = peer.train_step(ns.seq_len, i)
        recs.append(rec)
        _say(f"  step {i + 1}/{ns.warmup + ns.steps}{' (warm-up)' if i < ns.warmup else ''}: loss {rec['loss']:.4f}"
             f"{describe(rec)}, {rec['step_time_s']:.3f} s, {rec['tokens_per_s']:,.0f} tokens/s")
    return recs


def peer_memory(run: PeerRun, *extra: float) -> torch.Tensor:
    """Peak allocated and reserved GiB, peak RSS and `extra`, on the device for an all-reduce (MAX).
    Read before the profiled step: the profiler's own host memory is not the peer's."""
    cuda, dev = run.cuda, run.peer.device
    return torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else -1.0,
                         torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else -1.0,
                         host_peak_rss_gib(), *extra], dtype=torch.float64, device=dev)


def profile_peer(ns, run: PeerRun) -> list[dict] | None:
    """bench_train's profiled step, on one more of the peer's steps (every rank's split, on every rank)."""
    if not (run.cuda if ns.profile_step is None else ns.profile_step):
        return None
    peer, n = run.peer, ns.warmup + ns.steps
    stepper = types.SimpleNamespace(train_step=lambda: peer.train_step(ns.seq_len, n))
    return bt.profile_all_ranks(stepper, run.cuda, peer.rank, peer.world, ns.trace_dir)


def peer_record(ns, run: PeerRun, name: str, args: LlamaArgs, recs: list[dict], prof, mem: torch.Tensor) -> dict:
    """The fields bench_train's records have, for the timed steps `recs` (rank 0); each peer adds its own."""
    import transformers

    from longtrain.train.trainer import git_sha

    peer, cuda = run.peer, run.cuda
    full_depth = PRESETS[ns.preset].num_hidden_layers
    mid, split, why = bt.median_step_split(recs, prof, cuda)
    tflops = mid["tflops_per_device"]
    peak = ns.peak_tflops if cuda else None
    return {
        "kind": "bench", "peer": name, "recipe": name, "preset": ns.preset, "seq_len": ns.seq_len,
        "world_size": peer.world, "dp": peer.dp, "sequences_per_step": peer.dp,
        "layers": args.num_hidden_layers, "model_layers": full_depth,
        "depth_truncated": args.num_hidden_layers < full_depth,
        "device": peer.device.type, "device_name": torch.cuda.get_device_name(peer.device) if cuda else "cpu",
        "attention_kernel": run.backend, "steps": ns.steps, "warmup": ns.warmup,
        "step_time_s": mid["step_time_s"], "step_time_s_mean": statistics.fmean(r["step_time_s"] for r in recs),
        "tokens_per_s": mid["tokens_per_s"], "tflops_per_device": tflops,
        "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "matmul_tflops": run.matmul, "matmul_n": ns.matmul_n if cuda else None,
        "mfu_measured": tflops / run.matmul if run.matmul else None,
        "mfu_note": None if cuda else "CPU: no peak FLOP rate to compare with (datasheet or measured matmul)",
        "flops_per_step": peer_flops(args, peer.dp, ns.seq_len),
        "peak_mem_allocated_gib": mem[0].item() if cuda else None,
        "peak_mem_reserved_gib": mem[1].item() if cuda else None,
        "host_peak_rss_gib": mem[2].item(),
        "time_split": split,
        "not_measured": [k for k in bt.SPLIT_KEYS if k not in split],
        "not_measured_why": why,
        "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"], "grad_norm_last": recs[-1]["grad_norm"],
        "git_sha": git_sha(), "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cuda_allocator": run.allocator,
    }


def run_peer(ns) -> dict | None:
    """Every rank trains warmup + steps steps; rank 0 returns the record (the others None)."""
    import torch.distributed as dist

    if ns.cp > 1:
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        set_rotate_method(ns.rotate_method)
    args = model_shape(ns.preset, ns.layers)
    run = start_peer(ns, Peer, args)
    peer = run.peer
    cp_check = None
    if run.cuda and peer.cp > 1 and ns.verify_cp:
        cp_check = peer.check_cp(min(ns.seq_len, 2 * peer.cp * 4096))
        if not cp_check["ok"]:
            raise RuntimeError(f"context-parallel attention differs from single-device SDPA: {cp_check}")
    recs = train_peer(ns, run)[ns.warmup:]
    mem = peer_memory(run)
    prof = profile_peer(ns, run)
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    calls = sorted({r["sdpa_calls"] for r in recs})
    gqa_seen = sorted(peer.guard.gqa_seen)
    dist.destroy_process_group()
    if peer.rank != 0:
        return None
    rotate = ns.rotate_method if peer.cp > 1 else None
    return {
        **peer_record(ns, run, PEER, args, recs, prof, mem),
        "overrides": [f"preset={ns.preset}", f"sdpa_backend={run.backend}", f"cp={peer.cp}", f"gqa={ns.gqa}"],
        "sp": peer.cp, "cp": peer.cp, "precision": "bf16", "engine": "fsdp2", "activation_policy": "recompute",
        "swap_host_gib": 0.0,
        "config": {
            "model": "transformers.LlamaForCausalLM (attn_implementation=sdpa), random init",
            "sdpa_backend": run.backend, "sdpa_backend_requested": ns.sdpa_backend, "sdpa_backend_probe": run.probe,
            "gqa": "repeat" if peer.guard.repeat_kv else "enable_gqa (as HF calls SDPA)",
            "cp": peer.cp, "cp_rotate_method": rotate, "cp_load_balance": "head-tail" if peer.cp > 1 else None,
            "fsdp": {"api": "fully_shard (FSDP2)", "units": "each decoder layer + root", "shards": peer.world,
                     "param_dtype": "bfloat16", "reduce_dtype": "float32", "reshard_after_forward": True},
            "ac": {"api": "apply_activation_checkpointing + checkpoint_wrapper", "impl": "non-reentrant",
                   "layers_wrapped": peer.n_layers_wrapped},
            "loss_chunk_tokens": ns.loss_chunk,
            "optimizer": f"AdamW(fused={run.cuda}, lr={DEFAULTS.lr}, betas=({DEFAULTS.beta1}, {DEFAULTS.beta2}), "
                         f"weight_decay={DEFAULTS.weight_decay} except norms), clip {DEFAULTS.grad_clip}",
            "data": f"random token ids, seed {ns.seed}, labels = ids shifted by one",
            "seed": ns.seed,
        },
        "checks": {"sdpa_attn_mask_none_and_is_causal": True, "sdpa_calls_per_step": calls,
                   "sdpa_gqa_calls": gqa_seen, "shard_positions_ids_labels_match": True, "cp_check": cp_check},
    }


def print_peer(r: dict) -> None:
    bt.print_record(r)
    c = r["config"]
    fsdp = c["fsdp"]
    print("\n".join([
        f"  peer                {r['peer']}: {c['model']}",
        f"  configuration       FSDP2 over {fsdp['shards']} rank(s) ({fsdp['param_dtype']} params, "
        f"{fsdp['reduce_dtype']} reduce); context parallel {c['cp']}"
        + (f" ({c['cp_load_balance']} load balance, {c['cp_rotate_method']} rotation)" if c["cp"] > 1 else "")
        + f"; SDPA {c['sdpa_backend']}, GQA {c['gqa']}; full activation checkpointing "
        f"({c['ac']['layers_wrapped']} layers, {c['ac']['impl']}); tiled loss {c['loss_chunk_tokens']} tokens",
        f"  checks              every SDPA call unmasked and causal ({r['checks']['sdpa_calls_per_step']} calls "
        "per step); shards' positions, ids and labels consistent"
        + ("" if r["checks"]["cp_check"] is None else
           f"; cp attention vs single device: rel. max error {r['checks']['cp_check']['rel_max_err']:.2e}"),
        f"  versions            torch {r['torch_version']}, transformers {r['transformers_version']}, "
        f"git {r['git_sha'][:12]}",
    ]), flush=True)


# ---- the longest sequence that fits ----------------------------------------------------------
FORWARDED = (("--preset", "preset"), ("--layers", "layers"), ("--steps", "steps"), ("--warmup", "warmup"),
             ("--cp", "cp"), ("--sdpa-backend", "sdpa_backend"), ("--gqa", "gqa"),
             ("--rotate-method", "rotate_method"), ("--loss-chunk", "loss_chunk"), ("--seed", "seed"),
             ("--matmul-n", "matmul_n"), ("--peak-tflops", "peak_tflops"))


def forwarded_argv(ns, forwarded, switches: list[str], seq: int, out: Path) -> list[str]:
    """A peer's flags for one --find-max-seq attempt: the `forwarded` (flag, dest) pairs that are set, the
    peer's own `switches`, the profiled-step choice, then `seq` tokens and the record's file."""
    argv = [f for flag, dest in forwarded if getattr(ns, dest) is not None for f in (flag, str(getattr(ns, dest)))]
    return argv + switches + bt.profile_step_argv(ns) + ["--seq-len", str(seq), "--json", str(out)]


def attempt_argv(ns, seq: int, out: Path) -> list[str]:
    """The flags of one --find-max-seq attempt: this run's settings at `seq` tokens."""
    switches = ([] if ns.verify_cp else ["--no-verify-cp"]) + \
        ([] if ns.expandable_segments else ["--no-expandable-segments"])
    return forwarded_argv(ns, FORWARDED, switches, seq, out)


child_runner = bt.attempt_runner(str(Path(__file__).resolve()), attempt_argv)


def find_max_seq(ns) -> int:
    unit = 2 * ns.cp if ns.cp > 1 else 1
    return search_peer(ns, child_runner, check_world, unit, f"{unit} (2 x --cp, for the load balancing)",
                       [f"preset={ns.preset}", f"sdpa_backend={ns.sdpa_backend}", f"cp={ns.cp}", f"gqa={ns.gqa}"],
                       peer=PEER, tmp_prefix="peer_torch_native_")


def search_peer(ns, child_runner, check_world, unit: int, unit_why: str, overrides: list[str], *, peer: str,
                tmp_prefix: str) -> int:
    """A peer's --find-max-seq (this one's and tools/peers/alst.py's): the flags checked, bench_train's search
    run with the peer's `child_runner`, the attempts' records and a summary appended to --json."""
    if _rank() != 0:  # under torchrun: rank 0 searches, each attempt starting its own ranks
        return 0
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world != local:
        raise bt.UsageError(f"--find-max-seq starts each attempt's {world} ranks on this node, but torchrun spans "
                            "several nodes: run the search on one node")
    if ns.seq_start <= 0 or ns.seq_step <= 0 or ns.seq_start % ns.seq_step or ns.seq_step % unit:
        raise bt.UsageError(f"--seq-start {ns.seq_start} must be a positive multiple of --seq-step {ns.seq_step}, "
                            f"itself a multiple of {unit_why}")
    if ns.seq_max and (ns.seq_max < ns.seq_start or ns.seq_max % ns.seq_step):
        raise bt.UsageError(f"--seq-max {ns.seq_max} must be a multiple of --seq-step {ns.seq_step}, "
                            f">= --seq-start {ns.seq_start}")
    nproc = ns.nproc or (world if "WORLD_SIZE" in os.environ else 1)
    check_world(ns, nproc)
    best, attempts, failed = bt.run_search(ns, child_runner, nproc, what="--seq-len", who=f"the {peer} peer",
                                           tmp_prefix=tmp_prefix)
    if ns.json:
        summary = {"kind": "find_max_seq", "peer": peer, "recipe": peer, "overrides": overrides,
                   "layers": ns.layers, "world_size": nproc, "seq_start": ns.seq_start, "seq_step": ns.seq_step,
                   "seq_max": ns.seq_max, "max_seq_len": best, "stopped_by_failure": failed,
                   "attempts": [{"seq_len": a.seq_len, "outcome": a.outcome, "detail": a.detail} for a in attempts]}
        bt.append_json(ns.json, [a.record for a in attempts if a.record] + [summary])
    return 1 if failed else 0


# ---- command line -------------------------------------------------------------------------------
def check_world(ns, world: int) -> None:
    if ns.cp > 1 and not torch.cuda.is_available():
        raise bt.UsageError(f"--cp {ns.cp} needs CUDA: PyTorch's context parallel runs the CUDA SDPA kernels "
                            "(cudnn, flash, efficient); on CPU give --cp 1")
    if ns.cp < 1 or world % ns.cp:
        raise bt.UsageError(f"--cp {ns.cp} must divide the {world} rank(s) (torchrun --nproc-per-node): "
                            f"give a divisor of {world}")


def check_flags(ns) -> None:
    """Refusals before any process group or GPU memory exists."""
    bt.check_run_flags(ns)
    if ns.loss_chunk < 1:
        raise bt.UsageError(f"--loss-chunk {ns.loss_chunk} must be >= 1 token")
    model_shape(ns.preset, ns.layers)
    if not torch.cuda.is_available() and ns.sdpa_backend != "auto":
        raise bt.UsageError(f"--sdpa-backend {ns.sdpa_backend} is a CUDA kernel: on CPU leave it at auto "
                            "(SDPA picks its CPU kernel)")
    if ns.json:  # refused now rather than after the run
        bt.read_json_list(ns.json)
    if ns.find_max_seq:
        return
    check_world(ns, int(os.environ.get("WORLD_SIZE", "1")))
    unit = 2 * ns.cp if ns.cp > 1 else 1
    if ns.seq_len < 2 or ns.seq_len % unit:
        near = max(unit, round(ns.seq_len / unit) * unit)
        raise bt.UsageError(f"--seq-len {ns.seq_len} must be a multiple of {unit} (2 x --cp: PyTorch's load "
                            f"balancing splits it into 2 x cp equal chunks) and >= 2: e.g. {near}")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(description="The PyTorch-native peer (HF Llama + FSDP2 + context parallel + full "
                                            "activation checkpointing + tiled loss): tokens/s, MFU, memory.")
    p.add_argument("--preset", default="llama3-8b", help="longtrain model shape (default llama3-8b; debug on CPU)")
    p.add_argument("--layers", type=int, default=None,
                   help="train only N decoder layers of the same width (depth-truncated; default: all)")
    p.add_argument("--seq-len", type=int, default=131072, help="tokens per sequence (default 131072)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default 3)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel degree, dividing the ranks (default 1)")
    p.add_argument("--sdpa-backend", choices=("auto", *BACKENDS), default="auto",
                   help="SDPA kernel (default auto: the first of cudnn, flash, efficient that runs here)")
    p.add_argument("--gqa", choices=("native", "repeat"), default="native",
                   help="native (default): SDPA gets K/V with their own heads as HF passes them (enable_gqa); "
                        "repeat: K/V expanded to the query heads first")
    p.add_argument("--rotate-method", choices=("allgather", "alltoall"), default="allgather",
                   help="context-parallel KV rotation (torch's set_rotate_method; default allgather, torch's own)")
    p.add_argument("--loss-chunk", type=int, default=d.loss_tile_tokens,
                   help=f"tokens per chunk of the tiled loss (default {d.loss_tile_tokens}, longtrain's tile)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the random tokens (default 0)")
    p.add_argument("--no-verify-cp", dest="verify_cp", action="store_false",
                   help="skip the check of the context-parallel attention against single-device SDPA")
    p.add_argument("--no-expandable-segments", dest="expandable_segments", action="store_false",
                   help="keep the CUDA caching allocator's defaults (default: expandable_segments:True, as "
                        "longtrain; an explicit PYTORCH_CUDA_ALLOC_CONF always wins)")
    p.add_argument("--json", default=None, help="append the record(s) to this JSON list (default: none)")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help=f"per-GPU peak for MFU (default {d.peak_tflops:g}: H100/H200 dense bf16)")
    bt.add_measure_args(p, seq_what="--seq-len", seq_start=65536, seq_step=8192, nproc_default="1")
    return p


def main(argv: list[str] | None = None) -> int:
    return bt.run_cli(build_parser().parse_args(argv), "torch_native", check_flags, find_max_seq, run_peer, print_peer)


if __name__ == "__main__":
    sys.exit(main())
