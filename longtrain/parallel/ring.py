"""Ring attention: each rank keeps its queries; K/V blocks travel the ring, one hop per step.

Legend: q_BSHD local queries (batch, S_local, H, D); k/v (batch, S_local, Hkv, D) (GQA: never
expanded, neither in memory nor on the wire); the running result is (B, H, S_local, D) with lse
(B, H, S_local), both fp32 (fp64 for fp64 inputs) while merging; N ranks in the sp group, r this rank.

At step s rank r holds the K/V of rank src = r - s (mod N). Which queries meet which keys at that
step (`_blocks`) follows from the layout (sharding.py):
  non-causal                       all local queries x all received keys
  causal, step 0 (own keys)        the local causal block
  causal, contiguous, src < r      all x all (earlier tokens); src > r: nothing (later tokens)
  causal, zigzag, src < r          all queries x the first half of the keys (chunk src; chunk
                                   2N-1-src lies after every local query)
  causal, zigzag, src > r          the second half of the queries (chunk 2N-1-r) x all keys
                                   (chunk r lies before both received chunks)
so under zigzag every rank does half a block at every step.

Forward: the next K/V are in flight while the current block runs; partial results are merged in
fp32 with their LSE (merge.py). Backward (DESIGN.md section 3): every block's backward uses the
*final* out and LSE; dQ accumulates locally in fp32; dK/dV accumulators (fp32) travel the ring
behind the K/V they belong to, each rank adding its contribution, and after N hops arrive home.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longtrain.attention import get_kernel, merge_partials
from longtrain.attention.kernels import BlockKernel
from longtrain.parallel.comm import RingComm

ALL = slice(None)


def _blocks(step: int, rank: int, n: int, s_local: int, causal: bool, layout: str) -> list[tuple[slice, slice, bool]]:
    """(query rows, key rows, causal?) of the block work at `step`."""
    if not causal:
        return [(ALL, ALL, False)]
    if step == 0:
        return [(ALL, ALL, True)]
    src = (rank - step) % n
    if layout == "contiguous":
        return [(ALL, ALL, False)] if src < rank else []
    half = s_local // 2
    if src < rank:
        return [(ALL, slice(0, half), False)]
    return [(slice(half, None), ALL, False)]


def _t(x_BSHD: Tensor) -> Tensor:
    return x_BSHD.transpose(1, 2)  # a BHSD view over BSHD memory (what the kernels take)


def ring_forward(q: Tensor, k: Tensor, v: Tensor, comm: RingComm, *, causal: bool, layout: str,
                 kernel: BlockKernel, scale: float | None) -> tuple[Tensor, Tensor]:
    b, s, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 running result (fp64 stays fp64)
    out = torch.zeros(b, h, s, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    n = comm.world
    for step in range(n):
        nxt = comm.exchange([k, v]) if step < n - 1 else None
        for qs, ks, c in _blocks(step, comm.rank, n, s, causal, layout):
            o_blk, l_blk = kernel.forward(_t(q[:, qs]), _t(k[:, ks]), _t(v[:, ks]), causal=c, scale=scale)
            out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs], o_blk, l_blk)
        if nxt is not None:
            comm.wait()
            k, v = nxt
    return out.transpose(1, 2).to(q.dtype), lse


def ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_comm: RingComm,
                  dkv_comm: RingComm, *, causal: bool, layout: str, kernel: BlockKernel,
                  scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    b, s, h, d = q.shape
    n = kv_comm.world
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
    dkv_in_flight = None
    for step in range(n):
        nxt = kv_comm.exchange([k, v]) if step < n - 1 else None
        dk_blk = torch.zeros_like(dk_acc)
        dv_blk = torch.zeros_like(dv_acc)
        for qs, ks, c in _blocks(step, kv_comm.rank, n, s, causal, layout):
            dq_b, dk_b, dv_b = kernel.backward(_t(dout[:, qs]), _t(q[:, qs]), _t(k[:, ks]), _t(v[:, ks]),
                                               _t(out[:, qs]), lse[:, :, qs], causal=c, scale=scale)
            dq[:, qs] += _t(dq_b)
            dk_blk[:, ks] += _t(dk_b)
            dv_blk[:, ks] += _t(dv_b)
        if dkv_in_flight is not None:  # the accumulators of this step's K/V, from the previous rank
            dkv_comm.wait()
            dk_acc, dv_acc = dkv_in_flight
        dk_acc += dk_blk
        dv_acc += dv_blk
        dkv_in_flight = dkv_comm.exchange([dk_acc, dv_acc])
        if nxt is not None:
            kv_comm.wait()
            k, v = nxt
    dkv_comm.wait()  # after N hops the accumulators of our own K/V are back, with every rank's share
    dk, dv = dkv_in_flight
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, layout: str, kernel: BlockKernel, scale):
        out, lse = ring_forward(q, k, v, RingComm(group), causal=causal, layout=layout, kernel=kernel, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, layout, kernel, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout, kernel, scale = ctx.args
        dq, dk, dv = ring_backward(dout.contiguous(), q, k, v, out, lse, RingComm(group), RingComm(group),
                                   causal=causal, layout=layout, kernel=kernel, scale=scale)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, *, group, causal: bool = True,
                   layout: str = "zigzag", kernel: str | BlockKernel = "auto",
                   scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of the whole sequence for this rank's queries; returns (out_BSHD, lse_BHS fp32)."""
    kern = get_kernel(kernel, q_BSHD.device, q_BSHD.dtype)
    return RingAttention.apply(q_BSHD.contiguous(), k_BSHD.contiguous(), v_BSHD.contiguous(), group, causal, layout,
                               kern, scale)
