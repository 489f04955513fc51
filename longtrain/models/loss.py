"""Cross-entropy over the LM head in sequence tiles: full logits (S x V) never exist.

At 1M tokens and a 128K vocabulary the logits alone would be 512 GB in fp32. The loss is computed
tile by tile, and because the gradient of a summed cross-entropy w.r.t. its logits is known in the
same pass (softmax - onehot), each tile's dh and dW are formed right away and the logits freed: one
pass, no recomputation in backward. Backward only scales the stored gradients by grad_output.

Legend: N tokens (B*S flattened), E hidden, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _compute_dtype(h: Tensor) -> torch.dtype:
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


class _TiledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NE: Tensor, w_VE: Tensor, labels_N: Tensor, tile: int, cdtype: torch.dtype):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = w_VE.to(cdtype)
        acc = torch.promote_types(cdtype, torch.float32)  # fp32 softmax and sums (fp64 stays fp64)
        loss = torch.zeros((), dtype=acc, device=h_NE.device)
        dh_NE = torch.empty_like(h_NE) if need_dh else None
        dw_VE = torch.zeros(w_VE.shape, dtype=acc, device=w_VE.device) if need_dw else None
        for s in range(0, h_NE.shape[0], tile):
            h_t = h_NE[s:s + tile].to(cdtype)
            y_t = labels_N[s:s + tile]
            valid = y_t != IGNORE_INDEX
            logits = (h_t @ w.t()).to(acc)  # (T, V)
            lse = torch.logsumexp(logits, dim=-1)
            y_safe = torch.where(valid, y_t, 0)
            picked = logits.gather(1, y_safe[:, None]).squeeze(1)
            loss += ((lse - picked) * valid).sum()
            if need_dh or need_dw:
                # d(sum CE)/dlogits = softmax - onehot on valid rows, 0 on ignored ones; built in place.
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, y_safe[:, None], -torch.ones_like(lse)[:, None])
                g.mul_(valid[:, None])
                g = g.to(cdtype)
                if need_dh:
                    dh_NE[s:s + tile] = (g @ w).to(h_NE.dtype)
                if need_dw:
                    dw_VE += (g.t() @ h_t).to(acc)  # accumulate the weight gradient across tiles in fp32
            del logits
        ctx.save_for_backward(*(t for t in (dh_NE, dw_VE) if t is not None))
        ctx.has = (need_dh, need_dw)
        ctx.w_dtype = w_VE.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        saved = list(ctx.saved_tensors)
        dh = dw = None
        if ctx.has[0]:
            dh = saved.pop(0)
            dh = dh * grad_loss.to(dh.dtype)
        if ctx.has[1]:
            dw = (saved.pop(0) * grad_loss).to(ctx.w_dtype)
        return dh, dw, None, None, None


def tiled_cross_entropy(h_BSE: Tensor, w_VE: Tensor, labels_BS: Tensor, tile_tokens: int = 4096):
    """Returns (sum of per-token CE over labelled tokens, number of labelled tokens).

    Summed rather than averaged so callers can normalise by the token count of the whole global
    batch (across micro-batches and ranks), which keeps sharded runs exactly equal to unsharded ones.
    Matmuls run in the autocast dtype when autocast is on, softmax always in fp32.
    """
    if tile_tokens <= 0:
        raise ValueError(f"tile_tokens={tile_tokens} must be > 0")
    h_NE = h_BSE.reshape(-1, h_BSE.shape[-1])
    labels_N = labels_BS.reshape(-1)
    cdtype = _compute_dtype(h_BSE)
    with torch.autocast(h_BSE.device.type, enabled=False):  # dtypes are chosen explicitly inside
        loss = _TiledCrossEntropy.apply(h_NE, w_VE, labels_N, tile_tokens, cdtype)
    return loss, (labels_N != IGNORE_INDEX).sum()
