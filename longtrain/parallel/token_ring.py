"""TokenRing attention (arXiv 2412.20501) with a training backward: K/V stay; queries travel.

Legend: q_BSHD local queries (batch, S_local, H, D); k/v (batch, S_local, Hkv, D) (GQA: never expanded,
K/V never move at all); the running result is (B, H, S_local, D) with lse (B, H, S_local), both fp32
(fp64 for fp64 inputs) while merging; N ranks in the sp group, r this rank, s the step.

At step s rank r holds the *queries* of owner src = r - s (mod N) and its own K/V. Which rows meet
which keys (`_block`) follows from the layout (sharding.py), as in ring.py's `_blocks` but with the
roles swapped (visiting queries of src vs the local keys of r):
  non-causal                       all visiting queries x all local keys
  causal, step 0 (own queries)     the local causal block
  causal, contiguous, src > r      all x all (the keys are earlier tokens); src < r: nothing
  causal, zigzag, src > r          all queries x the first half of the keys (chunk r; chunk 2N-1-r
                                   lies after both query chunks src and 2N-1-src)
  causal, zigzag, src < r          the second half of the queries (chunk 2N-1-src) x all keys
                                   (query chunk src lies before both key chunks)
so under zigzag every rank does half a block at every step, as in the ring.

Communication: two channels, each one batch_isend_irecv per step, posted in the same global order
on every rank (hop_s, then ret_s, then hop_{s+1}, ...; each batch waits only on batches posted before
it, on every rank, so neither gloo nor NCCL can deadlock):
  hop  (one hop, r -> r+1)     the visiting query block for step s+1, posted *before* step s's block
                               kernel so it overlaps it. Backward: q, dout, out and lse travel together.
  ret  (direct, r -> r-s)      step s's block result for the visiting rows, straight to their owner
                               src (any hop count); r receives its own rows' result from r+s. Forward:
                               (out, lse) partial, merged by the owner in fp32. Backward: the dQ
                               partial, summed by the owner in fp32. Posted after the block kernel;
                               waited for one step later, so it overlaps the next block.
Both sides derive the rows of a `ret` message from `_block` (the receiver evaluates it for the sender
r+s), so nothing is sent for an empty block and the receiver knows the shape.

Backward (DESIGN.md section 3): every block's backward uses the *final* out and lse of its rows, so
those travel with the queries and dout (out rather than D = rowsum(dO*O) because the kernels take
out). dK/dV are accumulated locally in fp32 and never move; dQ partials go home.

Bytes one rank sends per step (T = B*S_local tokens, e = bytes per element of q's dtype, lse 4 bytes
(fp32), g = H/Hkv; `wire_bytes` computes these and the tests check them against what is posted):
                    one way (to r+1)                      other way (to the owner r-s)
  ring fwd          K,V:        2*T*Hkv*D*e               -
  token_ring fwd    Q:          T*H*D*e                   out+lse: T*H*(D*e + 4)
  ring bwd          K,V,dK,dV:  2*T*Hkv*D*(e + 4)         -       (dK/dV accumulators are fp32)
  token_ring bwd    Q,dO,O,lse: T*H*(3*D*e + 4)           dQ:      T*H*D*e
MHA (g = 1): TokenRing's forward moves the ring's bytes (plus the lse) but split over both
directions, i.e. half per direction. GQA: its busy direction carries T*g*Hkv*D*e = g/2 times the
ring's bytes (bf16 backward: 6g vs 12 units of T*Hkv*D, again g/2), so it loses for g >= 4 unless
the link is idle anyway. The `ret` column is an upper bound: under causal layouts, zigzag returns
half the rows when src < r and contiguous returns nothing then. On a switch (NVSwitch, fat tree) the
direct return is one link's other direction; on a physical ring it would cross s links.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from longtrain.attention import get_kernel, merge_partials
from longtrain.attention.kernels import BlockKernel
from longtrain.parallel.comm import P2PComm
from longtrain.parallel.sharding import check_layout

ALL = slice(None)


def _block(step: int, rank: int, n: int, s_local: int, causal: bool, layout: str) -> tuple[slice, slice, bool] | None:
    """(visiting query rows, local key rows, causal?) of `rank`'s work at `step`, or None."""
    if not causal:
        return ALL, ALL, False
    if step == 0:
        return ALL, ALL, True
    src = (rank - step) % n
    if layout == "contiguous":
        return (ALL, ALL, False) if src > rank else None
    half = s_local // 2
    if src > rank:
        return ALL, slice(0, half), False
    return slice(half, None), ALL, False


def _returned_rows(step: int, rank: int, n: int, s_local: int, causal: bool, layout: str) -> slice | None:
    """Rows of `rank`'s own queries whose result for `step` comes back from rank + step, or None."""
    blk = _block(step, (rank + step) % n, n, s_local, causal, layout) if step > 0 else None
    return None if blk is None else blk[0]


def _t(x_BSHD: Tensor) -> Tensor:
    return x_BSHD.transpose(1, 2)  # a BHSD view over BSHD memory (what the kernels take)


def _rows(sl: slice, s_local: int) -> int:
    return len(range(s_local)[sl])


def _comms(group, device: torch.device) -> tuple[P2PComm, P2PComm]:
    return P2PComm(group, "hop", device), P2PComm(group, "ret", device)


def token_ring_forward(q: Tensor, k: Tensor, v: Tensor, group, *, causal: bool, layout: str,
                       kernel: BlockKernel, scale: float | None) -> tuple[Tensor, Tensor]:
    b, s, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 running result (fp64 stays fp64)
    out = torch.zeros(b, h, s, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
    hop, ret = _comms(group, q.device)
    n, r = hop.world, hop.rank
    q_vis, pending = q, None  # pending: (rows, [out_blk, lse_blk]) of our queries, in flight on ret
    for step in range(n):
        nxt = hop.post([(q_vis, r + 1)], [(q_vis.shape, q.dtype, r - 1)]) if step < n - 1 else None
        sends = []
        if (blk := _block(step, r, n, s, causal, layout)) is not None:
            qs, ks, c = blk
            o_blk, l_blk = kernel.forward(_t(q_vis[:, qs]), _t(k[:, ks]), _t(v[:, ks]), causal=c, scale=scale)
            if step == 0:  # our own queries: merge at once
                out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs], o_blk, l_blk)
            else:
                sends = [(o_blk, r - step), (l_blk.to(acc), r - step)]
        ret.wait()
        if pending is not None:
            rs, (o_in, l_in) = pending
            out[:, :, rs], lse[:, :, rs] = merge_partials(out[:, :, rs], lse[:, :, rs], o_in, l_in)
            pending = None
        recvs = []
        if (rs := _returned_rows(step, r, n, s, causal, layout)) is not None:
            m = _rows(rs, s)
            recvs = [((b, h, m, d), q.dtype, r + step), ((b, h, m), acc, r + step)]
        if sends or recvs:  # both sides skip an empty batch: each derives the other's rows from _block
            bufs = ret.post(sends, recvs)
            pending = (rs, bufs) if recvs else None
        if nxt is not None:
            hop.wait()
            q_vis = nxt[0]
    ret.wait()
    if pending is not None:
        rs, (o_in, l_in) = pending
        out[:, :, rs], lse[:, :, rs] = merge_partials(out[:, :, rs], lse[:, :, rs], o_in, l_in)
    return out.transpose(1, 2).to(q.dtype), lse


def token_ring_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, group, *,
                        causal: bool, layout: str, kernel: BlockKernel,
                        scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    b, s, h, d = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)  # ours alone: K/V never move
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    hop, ret = _comms(group, q.device)
    n, r = hop.world, hop.rank
    vis = [t.contiguous() for t in (q, dout, out, lse)]  # what a block backward needs of its query rows
    pending = None  # (rows, [dq_blk]) of our queries, in flight on ret
    for step in range(n):
        nxt = hop.post([(t, r + 1) for t in vis], [(t.shape, t.dtype, r - 1) for t in vis]) if step < n - 1 else None
        sends = []
        if (blk := _block(step, r, n, s, causal, layout)) is not None:
            qs, ks, c = blk
            q_v, do_v, o_v, l_v = vis
            dq_b, dk_b, dv_b = kernel.backward(_t(do_v[:, qs]), _t(q_v[:, qs]), _t(k[:, ks]), _t(v[:, ks]),
                                               _t(o_v[:, qs]), l_v[:, :, qs], causal=c, scale=scale)
            dk[:, ks] += _t(dk_b)
            dv[:, ks] += _t(dv_b)
            if step == 0:
                dq[:, qs] += _t(dq_b)
            else:
                sends = [(_t(dq_b), r - step)]  # BSHD, q's dtype (as the ring's local dQ partials)
        ret.wait()
        if pending is not None:
            rs, (dq_in,) = pending
            dq[:, rs] += dq_in
            pending = None
        recvs = []
        if (rs := _returned_rows(step, r, n, s, causal, layout)) is not None:
            recvs = [((b, _rows(rs, s), h, d), q.dtype, r + step)]
        if sends or recvs:
            bufs = ret.post(sends, recvs)
            pending = (rs, bufs) if recvs else None
        if nxt is not None:
            hop.wait()
            vis = nxt
    ret.wait()
    if pending is not None:
        rs, (dq_in,) = pending
        dq[:, rs] += dq_in
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class TokenRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, layout: str, kernel: BlockKernel, scale):
        out, lse = token_ring_forward(q, k, v, group, causal=causal, layout=layout, kernel=kernel, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, layout, kernel, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, layout, kernel, scale = ctx.args
        dq, dk, dv = token_ring_backward(dout.contiguous(), q, k, v, out, lse, group, causal=causal, layout=layout,
                                         kernel=kernel, scale=scale)
        return dq, dk, dv, None, None, None, None, None


def token_ring_attention(q_BSHD: Tensor, k_BSHD: Tensor, v_BSHD: Tensor, *, group, causal: bool = True,
                         layout: str = "zigzag", kernel: str | BlockKernel = "auto",
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of the whole sequence for this rank's queries; returns (out_BSHD, lse_BHS fp32).
    Same contract as ring_attention; only the communication differs (see the module docstring)."""
    n = dist.get_world_size(group)
    check_layout(q_BSHD.shape[1] * n, n, layout)  # ValueError, identical on every rank: no hang
    kern = get_kernel(kernel, q_BSHD.device, q_BSHD.dtype)
    return TokenRingAttention.apply(q_BSHD.contiguous(), k_BSHD.contiguous(), v_BSHD.contiguous(), group, causal,
                                    layout, kern, scale)


def wire_bytes(q_shape: tuple, kv_shape: tuple, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """Bytes one rank sends per step, (one way, other way), for ring and token_ring, forward and backward,
    with full rows on the return path (the upper bound; see the module docstring's table)."""
    (b, s, h, d), hkv = q_shape, kv_shape[2]
    e = torch.empty((), dtype=dtype).element_size()
    f = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()  # lse, dK/dV accumulators
    t = b * s
    return {
        "ring_fwd": (2 * t * hkv * d * e, 0),
        "token_ring_fwd": (t * h * d * e, t * h * (d * e + f)),
        "ring_bwd": (2 * t * hkv * d * (e + f), 0),
        "token_ring_bwd": (t * h * (3 * d * e + f), t * h * d * e),
    }
