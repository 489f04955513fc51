"""Ulysses attention: all-to-all from sequence shards to head shards, full-sequence attention on this
rank's heads with one block kernel call, all-to-all back (DeepSpeed-Ulysses, arXiv 2309.14509).

Legend: N ranks in the sp group, r this rank; B batch, S_l tokens per rank, S_g = N * S_l, H query
heads, Hkv KV heads, D head_dim; Hn = H / N query heads and m KV heads per rank after the exchange
(see `kv_replication`); W the summed head count of one packed exchange (q|k|v: Hn + 2m).
  q_BSHD, k_BSHD, v_BSHD   this rank's tokens in the layout's order (sharding.py), all heads
  *_BGhD                   all S_g tokens in *global* order, this rank's h heads
  buf_NBSWD                an all-to-all buffer: chunk i goes to / came from rank i

Token order. The exchange hands rank r every rank's tokens in rank order, i.e. in each rank's layout
order (zigzag: chunks 0, 2N-1, 1, 2N-2, ...), one batch after another per rank. One row gather
(`_Plan.to_global`, built once from `shard_positions`) puts them in global order, so that the block
kernel's top-left causal mask is the global one; its inverse (`to_ranks`) goes back. Without causal
masking the key order does not matter and the query rows come back through the same inverse, so only
the (rank, batch) -> (batch, rank) interleave is left, and for B = 1 nothing at all.

Heads (GQA: query head j reads KV head j // g, g = H / Hkv). N must divide H. Rank r takes query heads
[r*Hn, (r+1)*Hn) and the KV heads they read:
  Hkv % N == 0   KV heads [r*Hkv/N, (r+1)*Hkv/N): a plain scatter, m = Hkv / N
  N % Hkv == 0   the one KV head its Hn query heads share: m = 1, each KV head goes to N / Hkv ranks
  otherwise      its query heads straddle KV groups unevenly (e.g. H=28, Hkv=4, N=7), so it gets one KV
                 copy per query head: m = Hn, local MHA, up to g times the KV bytes of a scatter
In every case the KV heads sent, concatenated over ranks, are `repeat_interleave(k, rep)` with
rep = N * m / Hkv, so the gradient of a replicated head is a plain sum over `rep` neighbours (fp32).

Cost per rank: forward one packed q|k|v exchange, one for out, one small one for lse (fp32, 1/D of
out's elements); backward one for dout and one packed dq|dk|dv. Backward is autograd: the exchange is
an autograd.Function whose backward is the inverse exchange, composed with the differentiable
`block_attention_with_lse`; lse is returned without gradient, as by ring_attention.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.attention import block_attention_with_lse, get_kernel
from longtrain.attention.kernels import BlockKernel
from longtrain.parallel.sharding import check_layout, shard_positions


def kv_replication(h: int, hkv: int, n: int) -> int:
    """rep: each KV head is sent `rep` times in all (rank r gets m = Hkv * rep / N of them). Raises a
    ValueError for head counts Ulysses cannot split; pure arithmetic, so every rank raises alike."""
    if hkv < 1 or h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    if h % n:
        valid = [d for d in range(1, h + 1) if h % d == 0]
        raise ValueError(f"Ulysses attention splits the query heads over the sp group, so the sp degree must "
                         f"divide them: H={h} query heads (Hkv={hkv} KV heads) over N={n} ranks; valid degrees: "
                         f"{valid} (or use method='ring')")
    if hkv % n == 0:
        return 1
    if n % hkv == 0:
        return n // hkv
    return h // hkv  # one KV copy per query head


@dataclass(frozen=True)
class _Plan:
    n: int
    b: int
    s_local: int
    to_global: Tensor | None  # (B*S_g,): received row (rank, batch, local) of each (batch, global pos); None: identity
    to_ranks: Tensor | None   # its inverse permutation


@functools.lru_cache(maxsize=16)
def _plan(n: int, b: int, s_local: int, layout: str, causal: bool, device: torch.device) -> _Plan:
    s_g = n * s_local
    # global position of each token in rank order (only causal masking needs the true order)
    pos = torch.cat([shard_positions(s_g, i, n, layout) for i in range(n)]) if causal else torch.arange(s_g)
    u = torch.argsort(pos)  # rank-order index of global token t
    src, loc = u // s_local, u % s_local
    rows_BG = (src * b + torch.arange(b)[:, None]) * s_local + loc  # received buffer is (N, B, S_l)
    rows = rows_BG.flatten()
    if torch.equal(rows, torch.arange(rows.numel())):
        return _Plan(n, b, s_local, None, None)
    return _Plan(n, b, s_local, rows.to(device), torch.argsort(rows).to(device))


def _a2a(buf: Tensor, group) -> Tensor:
    buf = buf.contiguous()  # first: empty_like keeps a strided input's strides, the collective assumes none
    out = torch.empty_like(buf)
    dist.all_to_all_single(out, buf, group=group)
    return out


def _to_heads(xs: list[Tensor], reps: list[int], plan: _Plan, group) -> list[Tensor]:
    """Sequence shards -> head shards: xs[i] (B, S_l, Hi, D), heads repeated reps[i] times, then split
    evenly over the ranks; returns per tensor (B, S_g, Hi*reps[i]/N, D) in global token order."""
    n, b, s = plan.n, plan.b, plan.s_local
    d = xs[0].shape[-1]
    parts = [x if r == 1 else x.repeat_interleave(r, dim=2) for x, r in zip(xs, reps)]
    widths = [p.shape[2] // n for p in parts]
    buf_NBSWD = xs[0].new_empty(n, b, s, sum(widths), d)
    o = 0
    for p, w in zip(parts, widths):
        buf_NBSWD[..., o:o + w, :] = p.unflatten(2, (n, w)).permute(2, 0, 1, 3, 4)
        o += w
    recv_rows = _a2a(buf_NBSWD, group).view(n * b * s, -1, d)
    out, o = [], 0
    for w in widths:  # index_select of a head slice gives a contiguous tensor: one copy per tensor
        rows = recv_rows[:, o:o + w]
        rows = rows if plan.to_global is None else rows.index_select(0, plan.to_global)
        out.append(rows.reshape(b, n * s, w, d))  # a view (of the receive buffer if there was no gather)
        o += w
    return out


def _to_seq(ys: list[Tensor], plan: _Plan, group) -> list[Tensor]:
    """Inverse of `_to_heads` without repetition: ys[i] (B, S_g, hi, D) in global order -> (B, S_l, N*hi, D)."""
    n, b, s = plan.n, plan.b, plan.s_local
    d = ys[0].shape[-1]
    widths = [y.shape[2] for y in ys]
    y_BGWD = torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]
    rows = y_BGWD.reshape(b * n * s, -1, d)
    rows = rows if plan.to_ranks is None else rows.index_select(0, plan.to_ranks)
    recv_NBSWD = _a2a(rows.view(n, b, s, -1, d), group)  # chunk i: rank i's heads of my tokens
    return [p.permute(1, 2, 0, 3, 4).reshape(b, s, n * w, d) for p, w in zip(recv_NBSWD.split(widths, dim=3), widths)]


def _sum_reps(g_BSXD: Tensor, rep: int) -> Tensor:
    """Gradient of repeat_interleave(rep) over heads: sum the replicas, in fp32 (fp64 stays fp64)."""
    if rep == 1:
        return g_BSXD
    b, s, x, d = g_BSXD.shape
    acc = torch.promote_types(g_BSXD.dtype, torch.float32)
    return g_BSXD.view(b, s, x // rep, rep, d).sum(3, dtype=acc).to(g_BSXD.dtype)


class _QKVToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rep: int, plan: _Plan, group):
        ctx.args = (rep, plan, group)
        return tuple(_to_heads([q, k, v], [1, rep, rep], plan, group))

    @staticmethod
    def backward(ctx, dq, dk, dv):
        rep, plan, group = ctx.args
        dq, dk, dv = _to_seq([dq, dk, dv], plan, group)
        return dq, _sum_reps(dk, rep), _sum_reps(dv, rep), None, None, None


class _ToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, plan: _Plan, group):
        ctx.args = (plan, group)
        return _to_seq([y], plan, group)[0]

    @staticmethod
    def backward(ctx, dy):
        plan, group = ctx.args
        return _to_heads([dy], [1], plan, group)[0], None, None


def ulysses_attention(q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, *, group, causal: bool = True,
                      layout: str = "zigzag", kernel: str | BlockKernel = "auto",
                      scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of the whole sequence for this rank's queries; returns (out_BSHD, lse_BHS fp32)."""
    n = dist.get_world_size(group)
    b, s_local, h, _ = q_BSHD.shape
    # every refusal comes before the first collective, so a bad config raises on all ranks, never hangs
    rep = kv_replication(h, k_BSHD.shape[2], n)
    check_layout(s_local * n, n, layout)
    kern = get_kernel(kernel, q_BSHD.device, q_BSHD.dtype)
    plan = _plan(n, b, s_local, layout, causal, q_BSHD.device)

    q_BGhD, k_BGhD, v_BGhD = _QKVToHeads.apply(q_BSHD, k_BSHD, v_BSHD, rep, plan, group)
    out_BhGD, lse_BhG = block_attention_with_lse(q_BGhD.transpose(1, 2), k_BGhD.transpose(1, 2),
                                                 v_BGhD.transpose(1, 2), causal=causal, scale=scale, kernel=kern)
    out_BSHD = _ToSeq.apply(out_BhGD.transpose(1, 2), plan, group)
    lse_BSH1 = _to_seq([lse_BhG.transpose(1, 2).unsqueeze(-1)], plan, group)[0]  # no gradient (as ring's)
    return out_BSHD, lse_BSH1.squeeze(-1).transpose(1, 2).contiguous()
