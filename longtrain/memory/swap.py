"""Token-wise activation swapping (MEMO, DESIGN.md section 3): `memory.activation.policy: swap|auto`.

Each swapped decoder layer keeps nothing on the GPU between its forward and its backward:
  - the layer input and everything attention saves (q, k, v, its output and LSE) go to host memory
    in full: attention is never recomputed;
  - the per-token parts of the layer (norms, projections, RoPE, MLP: `DecoderLayer.pre_attention` and
    `post_attention`) run in two row groups. The first alpha * S_local tokens run normally and their
    saved activations go to host; the other tokens run under activation checkpointing and are
    recomputed in backward from the layer input and the attention output (both on host already).
Deviation from MEMO, on purpose: q, k, v are swapped for every token rather than recomputed for the
(1 - alpha) share; they are ~8% of a Llama layer's skeletal bytes and their recompute would need
the projections twice.

Mechanics (one `LayerSwap` per layer, `saved_tensors_hooks`):
  pack    a tensor autograd saves: parameters and tensors from outside the layer (RoPE tables) are
          kept by reference; anything else has its storage copied once per layer (views share it) into
          a host buffer, on the D2H stream after an event from the compute stream; `record_stream`
          keeps the device memory from being reused before the copy ends.
  prefetch when backward reaches layer i (a hook on its output gradient), layer i's and the previous
          swapped layer's storages are copied back on the H2D stream, so layer i-1's copy runs while
          layer i computes its backward.
  unpack  the compute stream waits for that copy's event, then uses the buffer.
Host buffers are pinned at their exact size (CUDA), allocated at the first step and reused by every
later step. The (1 - alpha) tokens can be recomputed in chunks (`memory.activation.chunk_tokens`), so
that backward holds one chunk's per-token activations at a time instead of the whole layer's. On CPU
the same code runs with host-to-host copies and no streams, so the numerics are tested here.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


@dataclass
class _Packed:
    """One device storage swapped to host: the host copy and, after the fetch, the device copy."""
    host: Tensor  # uint8, nbytes
    dtype: torch.dtype
    device_copy: Tensor | None = None


@dataclass
class SwapStats:
    """Bytes moved and copy times of one step (CUDA: measured with events after the step)."""
    d2h_bytes: int = 0
    h2d_bytes: int = 0
    host_bytes_pinned: int = 0
    d2h_by_part: dict = field(default_factory=dict)  # bytes swapped while in "pre" / "attention" / "post"
    events: list = field(default_factory=list)  # (kind, start, end) cuda events


def _unpin(ptr: int, device: torch.device) -> None:
    """Runs just before a pinned host buffer is freed (it is replaced only on a shape change): the copies
    queued on it must be done first."""
    try:
        torch.cuda.synchronize(device)
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown: the process is going away with its memory
        pass


class SwapStreams:
    """The side streams and the host-buffer pool shared by every swapped layer of a model."""

    def __init__(self, device: torch.device):
        self.device = device = torch.device(device.type, torch.cuda.current_device()) \
            if device.type == "cuda" and device.index is None else device
        self.cuda = device.type == "cuda"
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.stats = SwapStats()
        self.timing = False  # record copy events (bench_memory.py): costs a little
        self.copies = True  # False: leave saved tensors on the device (bench_memory.py's no-copy twin)

    def host_buffer(self, nbytes: int) -> Tensor:
        """A host buffer of exactly `nbytes`, page-locked on CUDA. Not from torch's pinned caching
        allocator: that one rounds every block up to a power of two (a 4.2 GiB layer input would pin
        8 GiB), which breaks the host budget's accounting. Plain host memory registered with
        cudaHostRegister is pinned at its own size, and unregistered when the buffer is freed."""
        host = torch.empty(nbytes, dtype=torch.uint8)
        if self.cuda and nbytes:
            ptr = host.data_ptr()
            err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
            if err:
                raise RuntimeError(f"pinning {nbytes / 2**30:.2f} GiB of host memory failed (cudaError {err}): "
                                   "lower memory.activation.host_budget_gib or the swapped share (alpha)")
            weakref.finalize(host, _unpin, ptr, self.device)
        self.stats.host_bytes_pinned += nbytes
        return host

    def drop_host_buffer(self, host: Tensor) -> None:
        """A buffer leaves the pool (a shape change): it no longer counts (it is unpinned when freed)."""
        self.stats.host_bytes_pinned -= host.numel()

    @contextlib.contextmanager
    def timed(self, kind: str):
        """Bracket copies on the current stream with timing events (only when `timing` is on)."""
        if not self.timing:
            yield
            return
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        yield
        b.record()
        self.stats.events.append((kind, a, b))

    def copy_time_s(self) -> tuple[float, float]:
        """Seconds spent in D2H and H2D copies (sum of event intervals) since the last reset."""
        torch.cuda.synchronize(self.device)
        t = {"d2h": 0.0, "h2d": 0.0}
        for kind, a, b in self.stats.events:
            t[kind] += a.elapsed_time(b) / 1e3
        return t["d2h"], t["h2d"]

    def reset_stats(self) -> None:
        pinned = self.stats.host_bytes_pinned
        self.stats = SwapStats(host_bytes_pinned=pinned)


class LayerSwap:
    """Saved-tensor hooks of one layer: pack to host, prefetch, unpack."""

    def __init__(self, streams: SwapStreams, index: int):
        self.streams, self.index = streams, index
        self.prev: LayerSwap | None = None  # the swapped layer before this one (prefetched during our backward)
        self.external: set[int] = set()
        self.storages: dict[int, int] = {}  # device storage ptr -> slot, this step
        self.slots: list[_Packed] = []
        self.pool: list[Tensor | None] = []  # host buffers, reused step after step
        self.alive: list[Tensor] = []  # the packed storages, held until the layer's forward ends
        self.part = "pre"  # which part of the layer is running (bytes are counted per part)
        self.d2h_done: torch.cuda.Event | None = None
        self.h2d_done: torch.cuda.Event | None = None
        self.fetched = False

    # ---- forward --------------------------------------------------------------------------------
    def begin(self, external: list[Tensor]) -> None:
        self.external = {t.untyped_storage().data_ptr() for t in external if t is not None}
        self.storages, self.slots, self.fetched = {}, [], False

    def end_forward(self) -> None:
        # Storages were held so that no freed-and-reused address could be mistaken for a packed one
        # (the dedup key is the address); from here the host copies are the only reference.
        self.alive, self.storages = [], {}

    def release(self, grad: Tensor | None = None):
        """The layer's backward is done (hook on its input's gradient): drop the device copies."""
        for p in self.slots:
            p.device_copy = None
        return grad

    def pack(self, t: Tensor):
        base = t if t._base is None else t._base  # linear saves weight.t(): a view of the Parameter
        if (isinstance(base, nn.Parameter) or t.untyped_storage().data_ptr() in self.external
                or t.device != self.streams.device or t.untyped_storage().nbytes() == 0 or not self.streams.copies):
            # Weights, shared tables (RoPE), tensors on another device (checkpoint's CPU placeholder) and
            # empty ones: kept by reference, as autograd does; likewise everything when copies are off.
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        slot = self.storages.get(ptr)
        if slot is None:
            slot = self.storages[ptr] = len(self.slots)
            self.slots.append(self._to_host(st, t.dtype, slot))
        return (slot, t.dtype, t.shape, t.stride(), t.storage_offset())

    def _to_host(self, st, dtype: torch.dtype, slot: int) -> _Packed:
        s = self.streams
        nbytes = st.nbytes()
        if slot < len(self.pool) and self.pool[slot] is not None and self.pool[slot].numel() == nbytes:
            host = self.pool[slot]
        else:  # first step (or a shape change): a new host buffer for this slot, kept for the next steps
            if slot < len(self.pool) and self.pool[slot] is not None:
                s.drop_host_buffer(self.pool[slot])
                self.pool[slot] = None  # freed (and unpinned) before the new one is pinned
            host = s.host_buffer(nbytes)
            self.pool[slot:slot + 1] = [host]
        src = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
        self.alive.append(src)
        s.stats.d2h_bytes += nbytes
        s.stats.d2h_by_part[self.part] = s.stats.d2h_by_part.get(self.part, 0) + nbytes
        if s.cuda:
            ready = torch.cuda.current_stream(s.device).record_event()
            with torch.cuda.stream(s.d2h):
                s.d2h.wait_event(ready)
                with s.timed("d2h"):
                    host.copy_(src, non_blocking=True)
            src.record_stream(s.d2h)  # the device memory stays ours until the copy is done
            self.d2h_done = s.d2h.record_event()
        else:
            host.copy_(src)
        return _Packed(host, dtype)

    # ---- backward -------------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Start copying this layer's storages back to the device (idempotent within a step)."""
        if self.fetched:
            return
        self.fetched = True
        s = self.streams
        devs = [torch.empty(p.host.numel(), dtype=torch.uint8, device=s.device) for p in self.slots]
        # The device buffers come from the compute stream's pool, ready for work ordered after their
        # allocation there (a block freed there can still be read by queued compute kernels, and a planned
        # allocator may have ordered their reuse on that stream): the copy stream starts from this point.
        compute_now = torch.cuda.current_stream(s.device).record_event() if s.cuda else None
        for p, dev in zip(self.slots, devs):
            s.stats.h2d_bytes += p.host.numel()
            if s.cuda:
                with torch.cuda.stream(s.h2d):
                    s.h2d.wait_event(compute_now)
                    if self.d2h_done is not None:
                        s.h2d.wait_event(self.d2h_done)
                    with s.timed("h2d"):
                        dev.copy_(p.host, non_blocking=True)
                dev.record_stream(s.h2d)
            else:
                dev.copy_(p.host)
            p.device_copy = dev
        self.h2d_done = s.h2d.record_event() if s.cuda else None

    def on_backward(self, grad: Tensor) -> Tensor:
        """Hook on the layer output's gradient: our backward starts now; fetch us (if not yet) and
        start on the previous swapped layer, which will overlap our backward."""
        self.prefetch()
        if self.prev is not None:
            self.prev.prefetch()
        return grad

    def unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        slot, dtype, shape, stride, offset = packed
        self.prefetch()
        p = self.slots[slot]
        if self.streams.cuda:
            torch.cuda.current_stream(self.streams.device).wait_event(self.h2d_done)
        flat = p.device_copy.view(dtype)
        return flat.as_strided(shape, stride, offset)


class SwappedLayer(ActivationWrapper):
    """A decoder layer whose activations live on the host between forward and backward.

    `alpha`: share of the local tokens whose per-token activations are swapped; the rest are recomputed
    (0: recompute all per-token work, attention output still swapped; 1: swap everything).
    ActivationWrapper (torch's base of checkpoint_wrapper) keeps the wrapped layer's parameter names,
    so checkpoints and HF export see the plain model."""

    def __init__(self, layer: nn.Module, swap: LayerSwap, alpha: float, chunk_tokens: int = 0):
        super().__init__(layer)
        self.swap = swap
        self.alpha = float(alpha)
        self.chunk_tokens = int(chunk_tokens)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, doc_ids_BS: Tensor | None = None) -> Tensor:
        layer = self._checkpoint_wrapped_module
        if not torch.is_grad_enabled():
            return layer(x, cos, sin, doc_ids_BS)
        sw = self.swap
        n = int(round(self.alpha * x.shape[1]))
        sw.begin([cos, sin, doc_ids_BS])
        with torch.autograd.graph.saved_tensors_hooks(sw.pack, sw.unpack):
            sw.part = "pre"
            q, k, v = self._rows(layer.pre_attention, n, self.chunk_tokens, x, cos, sin)
            sw.part = "attention"
            o = layer.self_attn.core(q, k, v, doc_ids_BS)
            sw.part = "post"
            y = self._rows(layer.post_attention, n, self.chunk_tokens, x, o)
        sw.end_forward()
        if y.requires_grad:
            y.register_hook(sw.on_backward)
        if x.requires_grad:
            x.register_hook(sw.release)
        return y

    @staticmethod
    def _rows(fn, n: int, chunk: int, *inputs: Tensor):
        """fn over all tokens, as row groups: [0, n) with its activations saved (and swapped by the
        hooks), [n, S) checkpointed, in chunks of `chunk` tokens (0: one chunk) so that backward
        recomputes one chunk's activations at a time. A checkpointed chunk saves nothing but its
        inputs, which are views of the layer input / attention output: the hooks store their storage once."""
        s = inputs[0].shape[1]
        if n >= s:
            return fn(*inputs)
        step = chunk if chunk > 0 else s - n
        parts = [fn(*(t[:, :n] for t in inputs))] if n > 0 else []
        for a in range(n, s, step):
            parts.append(checkpoint(fn, *(t[:, a:a + step] for t in inputs), use_reentrant=False,
                                    preserve_rng_state=False))
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(group, dim=1) for group in zip(*parts))
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return f"swap alpha={self.alpha:g}" + (f", recompute chunks of {self.chunk_tokens}" if self.chunk_tokens else "")


def apply_activation_swap(model: nn.Module, alphas: dict[int, float], device: torch.device,
                          chunk_tokens: int = 0) -> SwapStreams:
    """Wrap the layers in `alphas` (index -> alpha) as SwappedLayer; returns the shared streams/pool.
    `chunk_tokens`: recompute the (1 - alpha) tokens in chunks of this many (0: all at once)."""
    streams = SwapStreams(device)
    layers = model.model.layers
    prev = None
    for i in sorted(alphas):
        sw = LayerSwap(streams, i)
        sw.prev = prev
        layers[i] = SwappedLayer(layers[i], sw, alphas[i], chunk_tokens)
        prev = sw
    if prev is not None:
        # Backward reaches the last swapped layer only after the kept layers above it: start its fetch
        # when backward begins (the gradient of the final norm's input).
        def start_fetch(_mod, inputs, _out, last=prev):
            if inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: (last.prefetch(), g)[1])
        model.model.norm.register_forward_hook(start_fetch)
    return streams
