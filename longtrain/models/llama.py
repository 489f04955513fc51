"""A Llama-family decoder in plain PyTorch: RMSNorm, RoPE (with Llama-3 scaling), GQA, SwiGLU.

Module and parameter names follow Hugging Face's `LlamaForCausalLM`, so a state dict moves between
the two unchanged. Nothing here knows about processes or devices: sequence parallelism, activation
swapping and engines are transforms applied from `longtrain.parallel` / `longtrain.memory`, which
replace `Attention.core` or wrap `model.model.layers[i]`.

Shape legend: B batch, S sequence (local to this rank once sharded), E hidden size, H query heads,
Hkv key/value heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longtrain.attention import block_attention, get_kernel
from longtrain.attention.documents import documents_for
from longtrain.models.loss import tiled_cross_entropy
from longtrain.models.presets import LlamaArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 (bf16 sums of squares lose the small components), cast back, then scale: as HF does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(args: LlamaArgs, device=None) -> Tensor:
    """Inverse frequencies (D/2,) in fp32, with HF's `default`, `linear` and `llama3` rope types."""
    d = args.hd
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    rs = args.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / rs["factor"]
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, inv_l)
    raise ValueError(f"rope_scaling type {kind!r} is not supported: use default, linear or llama3")


def rope_cos_sin(inv_freq: Tensor, position_ids_BS: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin (B, S, D) for the given (global) positions; angles in fp32 as HF computes them."""
    freqs = position_ids_BS.float()[..., None] * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BSHD: Tensor, cos_BSD: Tensor, sin_BSD: Tensor) -> Tensor:
    half = x_BSHD.shape[-1] // 2
    rotated = torch.cat((-x_BSHD[..., half:], x_BSHD[..., :half]), dim=-1)
    return x_BSHD * cos_BSD[:, :, None, :] + rotated * sin_BSD[:, :, None, :]


class CoreAttention(nn.Module):
    """softmax(QK^T/sqrt(D))V on (B, S, H, D) tensors through a block kernel.

    This is the module sequence parallelism replaces: it sees only this rank's q/k/v. With `doc_ids_BS`
    (packed documents) each token attends only to its own document: one kernel call per document run
    (attention/documents.py), the runs tiling the sequence.
    """

    def __init__(self, kernel: str = "auto", causal: bool = True):
        super().__init__()
        self.kernel = kernel
        self.causal = causal

    def forward(self, q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
        docs = documents_for(doc_ids_BS)
        if docs is None:
            return self._attend(q_BSHD, k_BSHD, v_BSHD, self.causal)
        rows = []
        for b in range(q_BSHD.shape[0]):
            blocks = docs.blocks(b, 0, 0, slice(None), slice(None), self.causal)
            kernel = get_kernel(self.kernel, q_BSHD.device, q_BSHD.dtype).for_varying_shapes()
            rows.append(torch.cat([self._attend(q_BSHD[b:b + 1, qs], k_BSHD[b:b + 1, ks], v_BSHD[b:b + 1, ks], c,
                                                kernel) for qs, ks, c in blocks], dim=1))
        return torch.cat(rows, dim=0)

    def _attend(self, q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, causal: bool, kernel=None) -> Tensor:
        out_BHSD = block_attention(q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2),
                                   causal=causal, kernel=kernel or self.kernel)
        return out_BHSD.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, causal={self.causal}"


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, kernel: str):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.hd
        e, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(e, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(e, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(e, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, e, bias=False)
        self.core = CoreAttention(kernel)

    def forward(self, x_BSE: Tensor, cos: Tensor, sin: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
        return self.output(self.core(*self.project(x_BSE, cos, sin), doc_ids_BS))

    def project(self, x_BSE: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per token: q, k (with RoPE) and v, (B, S, heads, D)."""
        b, s, _ = x_BSE.shape
        q = apply_rope(self.q_proj(x_BSE).view(b, s, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x_BSE).view(b, s, self.n_kv, self.hd), cos, sin)
        v = self.v_proj(x_BSE).view(b, s, self.n_kv, self.hd)
        return q, k, v

    def output(self, o_BSHD: Tensor) -> Tensor:
        """Per token: the output projection of the attention result."""
        b, s = o_BSHD.shape[:2]
        return self.o_proj(o_BSHD.reshape(b, s, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, kernel: str):
        super().__init__()
        self.self_attn = Attention(args, kernel)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
        q, k, v = self.pre_attention(x, cos, sin)
        return self.post_attention(x, self.self_attn.core(q, k, v, doc_ids_BS))

    # The layer in three parts, so memory transforms (memory/swap.py) can treat the per-token parts
    # (any subset of tokens gives the same rows) apart from attention (which mixes tokens).
    def pre_attention(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per token: x -> q, k, v."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def post_attention(self, x: Tensor, o_BSHD: Tensor) -> Tensor:
        """Per token: (layer input, attention result) -> layer output."""
        h = x + self.self_attn.output(o_BSHD)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, kernel: str):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, kernel) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, input_ids_BS: Tensor, position_ids_BS: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
        """doc_ids_BS: packed documents' ids (non-decreasing per sequence); None attends across the whole
        sequence."""
        x = self.embed_tokens(input_ids_BS)
        inv_freq = rope_inv_freq(self.args, device=x.device)
        # RoPE tables in the dtype the projections produce (bf16 under autocast), as HF does.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        cos, sin = rope_cos_sin(inv_freq, position_ids_BS, dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids_BS)
        return self.norm(x)


class LMHead(nn.Linear):
    """The output projection; with labels it returns the tiled loss instead of logits.

    The loss goes through this module's forward (not through `lm_head.weight` read from outside) so
    engines that gather sharded weights around a module's forward (ZeRO-3) see the use.
    """

    def forward(self, h: Tensor, labels: Tensor | None = None, tile_tokens: int = 4096):
        if labels is None:
            return super().forward(h)
        return tiled_cross_entropy(h, self.weight, labels, tile_tokens=tile_tokens)


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: LlamaArgs, attention_kernel: str = "auto"):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, attention_kernel)
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) weights, zero biases, unit norms. Called after `to_empty` for meta-device builds."""
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.normal_(0.0, std, generator=generator)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)

    def forward(self, input_ids_BS: Tensor, position_ids_BS: Tensor | None = None, labels_BS: Tensor | None = None,
                loss_tile_tokens: int = 4096, doc_ids_BS: Tensor | None = None):
        """With labels: (loss_sum, n_label_tokens) from the tiled loss; without: full logits (B, S, V)."""
        if position_ids_BS is None:
            position_ids_BS = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device).expand_as(input_ids_BS)
        return self.lm_head(self.model(input_ids_BS, position_ids_BS, doc_ids_BS), labels_BS, loss_tile_tokens)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
