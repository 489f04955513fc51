"""Attention block kernels behind one interface: forward returns (out, lse), backward takes (out, lse) back.

Layout legend (all tensors logically BHSD; strides may be anything with a unit last stride, e.g. the
transposed views of (B, S, H, D) tensors that the model passes):
  q_BHSD          (batch, q_heads, S_q, head_dim)
  k_BHSD, v_BHSD  (batch, kv_heads, S_k, head_dim), q_heads % kv_heads == 0 (GQA, group g = q_heads // kv_heads;
                  q head h reads kv head h // g, the repeat_interleave / HF `repeat_kv` convention)
  lse_BHS         (batch, q_heads, S_q), float32 (float64 only from the math kernel on float64 inputs), natural log
  out             q's shape and dtype
Semantics: causal is top-left aligned (query i sees keys j <= i) and needs S_q == S_k; scale defaults to
1/sqrt(head_dim).

Why backward takes (out, lse) from the caller: ring attention runs one backward per key block of a query
row, and each must use the row's *final merged* out/lse (P_block = exp(S_block - lse_final), D = rowsum(dO*O)),
not the block's own. Every kernel here therefore recomputes P from q, k and the given lse.

Four kernels: MathKernel (reference, any dtype/device), CpuFlashKernel (aten CPU flash op), FlashKernel
(aten CUDA flash op, FlashAttention-2) and CudnnKernel (aten cuDNN op, ~1.7x flash on H100/H200). The CUDA
classes only touch torch.cuda inside available()/forward()/backward(), behind a device check.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

aten = torch.ops.aten


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D BHSD, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, Hq, Sq, D), (Bk, Hkv, Sk, Dk) = q.shape, k.shape
    if B != Bk or D != Dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q_heads={Hq} is not a multiple of kv_heads={Hkv} (GQA needs q_heads % kv_heads == 0)")
    if causal and Sq != Sk:
        raise ValueError(
            f"causal attention is top-left aligned and needs S_q == S_k, got S_q={Sq}, S_k={Sk}; "
            "use causal=False for off-diagonal blocks"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} "
                         f"on {q.device}/{k.device}/{v.device}")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # The fused ops accept any batch/head/seq strides but need the head_dim elements adjacent.
    return t if t.stride(-1) == 1 else t.contiguous()


def _bshd(t_BHSD: Tensor) -> Tensor:
    """The same logical BHSD tensor stored in (B, S, H, D) order; free if it already is (a transposed view)."""
    t_BSHD = t_BHSD.transpose(1, 2)
    return t_BHSD if t_BSHD.is_contiguous() else t_BSHD.contiguous().transpose(1, 2)


def _expand_kv(t_BHSD: Tensor, group: int) -> Tensor:
    # Transient GQA expansion for ops that need equal head counts: lives only inside one kernel call.
    return t_BHSD if group == 1 else t_BHSD.repeat_interleave(group, dim=1)


def _sum_group(dt_BHSD: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    # Inverse of _expand_kv for gradients: sum the g query heads sharing a kv head, in fp32 (bf16 sums drift).
    if group == 1:
        return dt_BHSD.to(dtype)
    B, H, S, D = dt_BHSD.shape
    return dt_BHSD.view(B, H // group, group, S, D).sum(2, dtype=torch.float32).to(dtype)


class BlockKernel:
    """One attention block. Subclasses implement _forward/_backward with a resolved float scale."""

    name: str = ""

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
        _check_qkv(q, k, v, causal)
        out, lse = self._forward(q, k, v, causal, _resolve_scale(q, scale))
        assert out.shape == q.shape and out.dtype == q.dtype, (self.name, out.shape, out.dtype)
        assert lse.shape == q.shape[:-1], (self.name, lse.shape)
        return out, lse

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                 causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients for one block given the row's (possibly merged, external) out and lse.

        out and dout are cast to q's dtype and lse to float32 (float64 for the float64 math path), so a
        float32 merged output from merge_partials can be passed as is.
        """
        _check_qkv(q, k, v, causal)
        if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:-1]:
            raise ValueError(
                f"backward needs dout and out shaped like q {tuple(q.shape)} and lse like {tuple(q.shape[:-1])}, "
                f"got dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}"
            )
        dq, dk, dv = self._backward(dout, q, k, v, out, lse, causal, _resolve_scale(q, scale))
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape, self.name
        return dq, dk, dv

    def for_varying_shapes(self) -> "BlockKernel":
        """The kernel to use when block shapes change from call to call (packed documents'
        sub-blocks): this one, unless it pays a per-shape set-up (cuDNN)."""
        return self

    def _forward(self, q, k, v, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _backward(self, dout, q, k, v, out, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _resolve_scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


class MathKernel(BlockKernel):
    """Reference: materialises the S_q x S_k scores, in float32 (float64 for float64 inputs).

    GQA without expanding K/V: q (B, Hq, Sq, D) is viewed as (B, Hkv, g*Sq, D), i.e. the group's query rows
    are stacked, so one matmul against the kv head serves the whole group and, in backward, the matmul
    contraction over those rows sums dK/dV over the group for free.
    """

    name = "math"

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return dtype.is_floating_point

    @staticmethod
    def _probs(q, k, lse, causal: bool, scale: float):
        """Scores folded per kv head, and P = exp(S - lse) using the given lse (own or external)."""
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        q3 = q.to(ct).reshape(B, Hkv, (Hq // Hkv) * Sq, D)
        k3 = k.to(ct)
        s = (q3 @ k3.transpose(-1, -2)).mul_(scale).view(B, Hkv, Hq // Hkv, Sq, Sk)
        if causal:
            s.masked_fill_(torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, g, Sq); -inf for an empty key set
        else:
            lse = lse.to(ct).reshape(B, Hkv, Hq // Hkv, Sq)
        # An empty key set gives lse = -inf and exp(-inf - -inf) = NaN: those rows have P = 0.
        p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(nan=0.0)
        return q3, k3, p.view(B, Hkv, (Hq // Hkv) * Sq, Sk), lse, ct

    def _forward(self, q, k, v, causal, scale):
        B, Hq, Sq, D = q.shape
        q3, _, p3, lse, ct = self._probs(q, k, None, causal, scale)
        out = (p3 @ v.to(ct)).view(B, Hq, Sq, D)
        return out.to(q.dtype), lse.reshape(B, Hq, Sq)

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        B, Hq, Sq, D = q.shape
        Hkv = k.shape[1]
        q3, k3, p3, _, ct = self._probs(q, k, lse, causal, scale)
        do3 = dout.to(ct).reshape(B, Hkv, -1, D)
        o3 = out.to(ct).reshape(B, Hkv, -1, D)
        v3 = v.to(ct)
        dv = p3.transpose(-1, -2) @ do3                       # sums over the group's stacked rows
        dp = do3 @ v3.transpose(-1, -2)
        delta = (do3 * o3).sum(-1, keepdim=True)              # D = rowsum(dO * O), from the final O
        ds = p3 * (dp - delta)                                # softmax backward
        dq = (ds @ k3).mul_(scale).view(B, Hq, Sq, D)
        dk = (ds.transpose(-1, -2) @ q3).mul_(scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class CpuFlashKernel(BlockKernel):
    """aten._scaled_dot_product_flash_attention_for_cpu (+ _backward): blocked online softmax on CPU.

    The op returns lse (B, H, S) float32 for float32/bf16/fp16 inputs (float64 would give float64 lse, so
    float64 is left to the math kernel). It wants equal head counts, so K/V are expanded for GQA inside the
    call (transient) and dK/dV summed back over the group.
    """

    name = "cpu_flash"
    _dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return (torch.device(device).type == "cpu" and dtype in self._dtypes
                and hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"))

    def _forward(self, q, k, v, causal, scale):
        g = q.shape[1] // k.shape[1]
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, g), _expand_kv(v, g), 0.0, causal, attn_mask=None, scale=scale)
        return out, lse

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        g = q.shape[1] // k.shape[1]
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype), q, _expand_kv(k, g), _expand_kv(v, g), out.to(q.dtype), lse.float(),
            0.0, causal, attn_mask=None, scale=scale)
        return dq, _sum_group(dk, g, k.dtype), _sum_group(dv, g, v.dtype)


def _cuda_ok(device: torch.device, dtype: torch.dtype, op_name: str) -> bool:
    """Common CUDA gate: a CUDA device of sm80+ (Ampere/Hopper), fp16/bf16, and the op compiled in."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not hasattr(aten, op_name):
        return False
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


# Both CUDA ops take kv_heads < q_heads natively (no K/V copy, dK/dV come back per kv head); checked on
# torch 2.11 / H200 against the expanded form (identical) and by tests/gpu. Older torch (the package allows
# 2.5+) is not checked, so there we expand K/V transiently inside the call, as on CPU.
_NATIVE_CUDA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.11"


def _cuda_kv_group(q: Tensor, k: Tensor) -> int:
    """How many times to repeat K/V heads before the CUDA op: 1 where the op handles GQA itself."""
    return 1 if _NATIVE_CUDA_GQA else q.shape[1] // k.shape[1]


def _check_head_dim(q: Tensor, name: str) -> None:
    D = q.shape[-1]
    if D % 8 != 0 or D > 256:
        raise ValueError(f"the {name} attention kernel needs head_dim % 8 == 0 and <= 256, got {D}; use 'math'")


class FlashKernel(BlockKernel):
    """aten._scaled_dot_product_flash_attention (+ _backward): FlashAttention-2 on CUDA.

    The op transposes BHSD views to BSHD internally and only needs a unit last stride, so the model's
    transposed (B, S, H, D) views go in without a copy. GQA: see _cuda_kv_group. Dense (non-varlen) mode:
    cum_seq_q/k are passed as None (undefined), which selects the dense path.
    """

    name = "flash"

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        if not _cuda_ok(device, dtype, "_scaled_dot_product_flash_attention"):
            return False
        check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        return check() if check is not None else True

    def _forward(self, q, k, v, causal, scale):
        _check_head_dim(q, self.name)
        g = _cuda_kv_group(q, k)
        q, k, v = (_last_dim_contiguous(t) for t in (q, _expand_kv(k, g), _expand_kv(v, g)))
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]  # out (B,H,S,D) view of a BSHD buffer; lse (B,H,S) float32

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        _check_head_dim(q, self.name)
        g = _cuda_kv_group(q, k)
        ke, ve = _expand_kv(k, g), _expand_kv(v, g)
        q, ke, ve, out, dout = (_last_dim_contiguous(t) for t in (q, ke, ve, out.to(q.dtype), dout.to(q.dtype)))
        # philox seed/offset are read only when dropout_p > 0; ours is 0, so empty int64 tensors will do.
        rng = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, ke, ve, out, lse.float().contiguous(), None, None, q.shape[2], ke.shape[2],
            0.0, causal, rng, rng, scale=scale)
        return dq, _sum_group(dk, g, k.dtype), _sum_group(dv, g, v.dtype)


class CudnnKernel(BlockKernel):
    """aten._scaled_dot_product_cudnn_attention (+ _backward): cuDNN 9 fused attention, the fastest on H200.

    cuDNN's LSE is (B, H, S, 1): squeezed to lse_BHS on the way out, unsqueezed on the way into backward.
    Backward arguments: attn_bias and cum_seq_q/k are None (undefined; a *defined* cum_seq_q would select
    the nested/varlen path), max_q/max_k are the dense S_q/S_k (the dense path uses them as the sequence
    lengths), philox seed/offset are unused with dropout 0. GQA: see _cuda_kv_group.

    Layout: every tensor given to the op (q, k, v; out and dout too in backward) is first put in one
    canonical memory order, BSHD (see _bshd). Measured on torch 2.11 / cuDNN 9.19: torch caches the cuDNN
    backward graph by q/k/v shapes and strides but not out/dout's, so after one backward with out in BSHD
    order, a call with the same q/k/v but out/dout in BHSD order returned dq off by 280%, silently (and
    the other way round). One fixed layout for everything keeps every cached graph valid. BSHD is the
    order the model's transposed views already have (no copy there); BHSD-contiguous callers pay a copy.
    """

    name = "cudnn"

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        if not _cuda_ok(device, dtype, "_scaled_dot_product_cudnn_attention"):
            return False
        return torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000

    def for_varying_shapes(self) -> BlockKernel:
        # torch builds (and runtime-compiles) one cuDNN graph per new shape; packed documents give new
        # sub-block shapes at every step, which stalled a 4-GPU test for minutes (commit log, perf-log.md).
        # FlashAttention-2 has no per-shape set-up.
        return KERNELS["flash"]

    def _forward(self, q, k, v, causal, scale):
        _check_head_dim(q, self.name)
        g = _cuda_kv_group(q, k)
        q, k, v = (_bshd(t) for t in (q, _expand_kv(k, g), _expand_kv(v, g)))
        res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        return out, lse.reshape(q.shape[:-1])  # (B,H,S,1) -> (B,H,S)

    def _backward(self, dout, q, k, v, out, lse, causal, scale):
        _check_head_dim(q, self.name)
        g = _cuda_kv_group(q, k)
        ke, ve = _expand_kv(k, g), _expand_kv(v, g)
        q, ke, ve, out, dout = (_bshd(t) for t in (q, ke, ve, out.to(q.dtype), dout.to(q.dtype)))
        lse_BHS1 = lse.float().contiguous().unsqueeze(-1)
        rng = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, ke, ve, out, lse_BHS1, rng, rng, None, None, None, q.shape[2], ke.shape[2],
            0.0, causal, scale=scale)
        return dq, _sum_group(dk, g, k.dtype), _sum_group(dv, g, v.dtype)


KERNELS: dict[str, BlockKernel] = {
    k.name: k for k in (MathKernel(), CpuFlashKernel(), FlashKernel(), CudnnKernel())
}

# Preference order for "auto": the fastest measured kernel first (DESIGN.md section 4), math always last.
_AUTO_ORDER = {"cuda": ("cudnn", "flash", "math"), "cpu": ("cpu_flash", "math")}


def get_kernel(name: str | BlockKernel, device: torch.device | str, dtype: torch.dtype) -> BlockKernel:
    """Resolve a kernel name ("auto", "math", "cpu_flash", "flash", "cudnn") for a device and dtype."""
    if isinstance(name, BlockKernel):
        return name
    device = torch.device(device)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("math",)):
            if KERNELS[candidate].available(device, dtype):
                return KERNELS[candidate]
        raise ValueError(f"no attention kernel supports device {device} with dtype {dtype}")
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of 'auto', {', '.join(map(repr, KERNELS))}")
    kernel = KERNELS[name]
    if not kernel.available(device, dtype):
        usable = [n for n, kk in KERNELS.items() if kk.available(device, dtype)]
        raise ValueError(
            f"attention kernel {name!r} is not available on device {device} for dtype {dtype}; "
            f"available there: {', '.join(usable) or 'none'} (or 'auto')"
        )
    return kernel


class _BlockAttention(torch.autograd.Function):
    """forward -> kernel.forward, backward -> kernel.backward with the saved (out, lse)."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale, kernel: BlockKernel):
        out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.kernel = causal, scale, kernel
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def block_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                             kernel: BlockKernel | str = "auto") -> tuple[Tensor, Tensor]:
    """Differentiable attention of one block; returns (out, lse). lse carries no gradient."""
    return _BlockAttention.apply(q, k, v, causal, scale, get_kernel(kernel, q.device, q.dtype))


def block_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None,
                    kernel: BlockKernel | str = "auto") -> Tensor:
    """Differentiable attention of one block; returns out only."""
    return block_attention_with_lse(q, k, v, causal=causal, scale=scale, kernel=kernel)[0]
