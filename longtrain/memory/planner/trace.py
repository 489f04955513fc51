"""Trace the allocation requests (size, order, lifetime) of one decoder layer's forward and backward.

A `TorchDispatchMode` sees every aten op below autograd, so it sees exactly the tensors the allocator is
asked for: op outputs, the tensors autograd saves for backward, gradients. A new storage is one
allocation; it is freed when its last reference (Python or C++: a view, autograd's saved tensors, .grad)
goes away. We learn that moment from a weakref finalizer on the `UntypedStorage` object: torch keeps a
storage's Python object alive as long as its C++ StorageImpl lives (PyObject preservation), so the
finalizer runs exactly when the memory would go back to the allocator. Tracing runs on the `meta` device:
shapes, dtypes and lifetimes are those of a real run, no memory is used, so an 8B layer at 128K tokens is
traced on a laptop in a second (tests compare a meta trace with a CPU trace of the same layer).

Time is an event clock: every allocation and every free advances it by one. A request allocated at
event a and freed at event f has the half-open lifetime [a, f); requests still alive when the trace ends
end at the final clock value. What the trace does not see: memory that kernels allocate and free inside
one op (cuDNN/cuBLAS workspaces, the CUDA caching allocator's rounding and its per-stream pools) and
allocations made outside the layer (the optimizer, communication buckets).

Determinism (checked by `check_deterministic` and the tests): every layer of a model, and every step, asks
for the same sizes in the same order, because the op sequence depends only on shapes and dtypes. What
breaks it: a different sequence length or micro-batch size (every size changes), packing with a
varlen/cu_seqlens kernel whose workspace depends on the document boundaries, autocast (weight casts are
cached per autocast region, so only the first layer use pays them), gradient accumulation into an
existing .grad (the first micro-step allocates the weight gradients, later ones add in place), activation
checkpointing or swapping policies that differ between layers (e.g. the last layers not swapped), and
the attention kernel choice (cuDNN vs flash vs math allocate differently).
"""

from __future__ import annotations

import dataclasses
import weakref
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longtrain.memory.planner.core import Request


@dataclasses.dataclass(frozen=True)
class TracedRequest:
    """One allocation of a trace: the planner's Request plus where it came from."""

    request: Request
    op: str  # the aten op that first produced the storage
    phase: str  # "fwd" or "bwd": the pass that allocated it
    shape: tuple[int, ...]
    dtype: str
    role: str = "transient"  # transient | skeletal | output | grad_input | weight_grad (see LayerTrace.kinds)


@dataclasses.dataclass
class LayerTrace:
    """One layer's forward + backward requests in allocation order, with the phase boundary.

    fwd_end: the clock value at which forward ended and backward began; end: the final clock value.
    """

    requests: list[TracedRequest]
    fwd_end: int
    end: int
    meta: dict = dataclasses.field(default_factory=dict)

    def plain(self) -> list[Request]:
        return [t.request for t in self.requests]

    def signature(self) -> list[tuple]:
        """What must match between layers and steps: sizes, lifetimes (in event order) and ops."""
        return [(t.request.size, t.request.start, t.request.end, t.op, t.phase) for t in self.requests]

    def kinds(self) -> dict[str, list[Request]]:
        """Requests by role:

        transient: allocated and freed inside the layer's forward or inside its backward (level 1 plans them);
        skeletal: allocated in forward, freed in backward (saved for backward: what swapping moves);
        output: the layer's output (the next layer's input); grad_input: the gradient the layer's backward
        returns for its input (the previous layer's backward consumes it); weight_grad: the weight
        gradients (kept until the optimizer step; under ZeRO the engine copies them into its buckets).
        """
        out: dict[str, list[Request]] = {k: [] for k in ROLES}
        for t in self.requests:
            out[t.role].append(t.request)
        return out


ROLES = ("transient", "skeletal", "output", "grad_input", "weight_grad")


class AllocationTracer(TorchDispatchMode):
    """Records a Request for every new storage that an aten op returns while the mode is active."""

    def __init__(self):
        super().__init__()
        self.clock = 0
        self.phase = "fwd"
        self.active = False
        self.fwd_end = 0
        self._live: dict[int, int] = {}  # storage key -> index into self.records
        self.records: list[dict] = []
        self._finalizers: list[weakref.finalize] = []
        self.roles: dict[int, str] = {}  # record index -> role, for records that are not transient/skeletal

    def _free(self, key: int) -> None:
        idx = self._live.pop(key, None)
        if idx is not None and self.records[idx]["end"] is None:
            self.records[idx]["end"] = self.clock
            # Frees while another layer runs (between this layer's forward and backward) do not move this
            # layer's clock: for this layer they all happen at the forward/backward boundary.
            if self.active:
                self.clock += 1

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def _see(self, t: torch.Tensor, op: str, input_keys: set[int]) -> None:
        st = t.untyped_storage()
        key = st._cdata  # the StorageImpl's address: the identity of the allocation while it lives
        if key in self._live or key in input_keys or st.nbytes() == 0:
            return  # a view / in-place / out= result of an input's storage, or an empty tensor
        self._live[key] = len(self.records)
        self.records.append(dict(size=int(st.nbytes()), start=self.clock, end=None, op=op, phase=self.phase,
                                 shape=tuple(t.shape), dtype=str(t.dtype).replace("torch.", "")))
        self.clock += 1
        self._finalizers.append(weakref.finalize(st, self._free, key))

    def tag(self, t: torch.Tensor, role: str) -> None:
        """Give the record of t's storage a role (the layer output, the input gradient, ...)."""
        idx = self._live.get(t.untyped_storage()._cdata)
        if idx is not None:
            self.roles[idx] = role

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Storages the op was given (a weight's, for `t`, whether or not we saw it allocated): an output
        # that lives in one of them is a view or an in-place result, not an allocation.
        input_keys = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, name, input_keys)
        return out

    def finish(self) -> tuple[list[TracedRequest], int]:
        self._live.clear()
        for f in self._finalizers:  # storages still alive (outputs, .grad) end with the trace
            f.detach()
        end = self.clock
        out = []
        for k, r in enumerate(self.records):
            e = end if r["end"] is None else r["end"]
            role = self.roles.get(k) or ("skeletal" if r["phase"] == "fwd" and e > self.fwd_end else "transient")
            if role == "transient" and e >= end and r["phase"] == "bwd":
                role = "weight_grad"  # alive after backward and not the input gradient: a parameter's .grad
            out.append(TracedRequest(Request(r["size"], r["start"], e), r["op"], r["phase"], r["shape"], r["dtype"],
                                     role))
        return out, end


def trace_kernel(name: str, device: torch.device, dtype: torch.dtype):
    """The attention kernel whose requests the trace records.

    On meta, "auto" means what a GPU run picks: cuDNN for bf16/fp16, the math kernel otherwise; a named
    CUDA kernel is traced through its meta shape functions (its availability check wants a real GPU).
    """
    from longtrain.attention.kernels import KERNELS, get_kernel

    device = torch.device(device)
    if device.type != "meta":
        return get_kernel(name, device, dtype)
    if name == "auto":
        name = "cudnn" if dtype in (torch.bfloat16, torch.float16) else "math"
    if name not in KERNELS:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of 'auto', {', '.join(map(repr, KERNELS))}")
    base = type(KERNELS[name])

    class _OnMeta(base):
        def available(self, device, dtype):
            return torch.device(device).type == "meta"

    return _OnMeta()


def trace_layer(args, seq_len: int, *, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "meta", layer_index: int = 0, n_layers: int = 1,
                kernel=None) -> list[LayerTrace]:
    """Forward then backward of `n_layers` consecutive decoder layers of shape `args` at `seq_len` tokens.

    Returns one LayerTrace per layer (forward of every layer first, then backward in reverse, as in
    training), each re-timed to start at 0 so traces of different layers compare directly. Parameters
    are in `dtype` (bf16: the DeepSpeed bf16 engine keeps bf16 weights; no autocast casts). The input
    requires grad, as a layer's input does in a model. kernel: a BlockKernel (default: `trace_kernel("auto")`).
    """
    from longtrain.models.llama import DecoderLayer, rope_cos_sin, rope_inv_freq

    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"trace_layer needs seq_len > 0 and batch > 0, got seq_len={seq_len}, batch={batch}")
    device = torch.device(device)
    kern = kernel if kernel is not None else trace_kernel("auto", device, dtype)
    with torch.device(device):
        layers = [DecoderLayer(args, "auto").to(dtype) for _ in range(n_layers)]
        for layer in layers:
            layer.self_attn.core.kernel = kern
        if device.type != "meta":
            g = torch.Generator(device=device).manual_seed(0)
            for layer in layers:
                for p in layer.parameters():
                    torch.nn.init.normal_(p, std=0.02, generator=g)
        pos = torch.arange(seq_len).expand(batch, seq_len)
        cos, sin = rope_cos_sin(rope_inv_freq(args, device=device), pos, dtype)
        x0 = torch.randn(batch, seq_len, args.hidden_size, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(batch, seq_len, args.hidden_size, dtype=dtype)
    tracers = [AllocationTracer() for _ in layers]
    outs = []
    x = x0
    for layer, tr in zip(layers, tracers):
        with tr:
            x = layer(x, cos, sin)
        tr.tag(x, "output")
        outs.append(x)
    del x  # outs holds each output until its layer's backward, nothing else may
    results: list = [None] * n_layers
    for i in reversed(range(n_layers)):
        tr = tracers[i]
        tr.phase = "bwd"
        tr.fwd_end = tr.clock
        with tr:
            # The layer's backward alone: gradient w.r.t. its input and weights, as the engine runs it.
            y = outs[i]
            inputs = [x0 if i == 0 else outs[i - 1]] + list(layers[i].parameters())
            grads = torch.autograd.grad(y, inputs, grad_out)
            outs[i] = y = None  # the layer output's last use: forward is over for it
            grad_out = grads[0]
            tr.tag(grad_out, "grad_input")
            for p, gp in zip(layers[i].parameters(), grads[1:]):
                p.grad = gp
                tr.tag(gp, "weight_grad")
            del grads, gp
        # The layer's passes are over: whatever it allocated and is still alive outlives the trace.
        results[i] = tr.finish()
    meta = dict(seq_len=seq_len, batch=batch, dtype=str(dtype).replace("torch.", ""), device=str(device),
                hidden=args.hidden_size, kernel=getattr(kern, "name", str(kern)))
    return [LayerTrace(reqs, tr.fwd_end, end, meta=dict(meta, layer=layer_index + i))
            for i, ((reqs, end), tr) in enumerate(zip(results, tracers))]


def check_deterministic(traces: list[LayerTrace]) -> None:
    """Raise ValueError naming the first difference if the layers' request lists differ."""
    if not traces:
        return
    ref = traces[0].signature()
    for i, tr in enumerate(traces[1:], start=1):
        sig = tr.signature()
        if len(sig) != len(ref):
            raise ValueError(f"layer {i} makes {len(sig)} requests, layer 0 makes {len(ref)}")
        for j, (a, b) in enumerate(zip(ref, sig)):
            if a != b:
                raise ValueError(f"request {j} differs between layer 0 {a} and layer {i} {b}")



def trace_iteration(args, seq_len: int, *, batch: int = 1, dtype: torch.dtype = torch.bfloat16,
                    kernel=None) -> list[TracedRequest]:
    """Every request of one iteration of the model body on meta: embedding, all layers and the final norm,
    forward then backward (the LM head and loss are left out: see below). Checks level 2 against a real
    iteration: its lower bound should be close to level 2's."""
    from longtrain.models.llama import LlamaForCausalLM, rope_cos_sin, rope_inv_freq

    device = torch.device("meta")
    kern = kernel if kernel is not None else trace_kernel("auto", device, dtype)
    with device:
        model = LlamaForCausalLM(args).to(dtype)
        for layer in model.model.layers:
            layer.self_attn.core.kernel = kern
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        pos = torch.arange(seq_len).expand(batch, seq_len)
    tr = AllocationTracer()
    with tr:
        # LlamaForCausalLM.forward step by step: its autocast query does not accept the meta device.
        x = model.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(rope_inv_freq(args, device=device), pos, dtype)
        for layer in model.model.layers:
            x = layer(x, cos, sin)
        h = model.model.norm(x)
        del x
        tr.fwd_end = tr.clock
        tr.phase = "bwd"
        # The tiled loss asks torch about autocast on the tensor's device, which meta does not support:
        # backward starts from the final norm's output with the gradient the loss would give it.
        h.backward(torch.empty_like(h))
        del h
    reqs, _ = tr.finish()
    return reqs
