"""What each layer does with its activations: keep, recompute or swap(alpha), by MEMO's cost model.

Inputs, all measured unless the recipe gives them:
  bytes    a layer's swapped bytes at this shape, split as MEMO does: S_input (layer input), S_attn
           (attention's saved q, k, v, output and LSE) and S_other (the per-token activations of the
           alpha tokens, per unit alpha). Measured by running one layer of the model's width through
           the swap hooks at a few tokens on the host and scaling per token (`measure_layer_bytes`).
  B        host<->device bandwidth (`memory.activation.pcie_gbps`, else a timed pinned copy).
  T_fwd    one layer's forward time at the training shape (`memory.activation.layer_fwd_ms`, else timed).
  M_host   host memory for swapped activations on this rank (`memory.activation.host_budget_gib`,
           else 80% of the node's available memory divided by the ranks on the node).
alpha is the largest value with (S_input + S_attn + alpha * S_other) / B <= T_fwd (copies hidden
behind the next layer's forward) and n_swapped * (S_input + S_attn + alpha * S_other) <= M_host. The last
`keep_last_layers` layers keep their activations (their backward comes first). When even alpha = 0
does not fit the host budget in every swappable layer, `auto` recomputes the layers that do not fit (the
lowest ones) and `swap` refuses with the numbers.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import torch

GiB = 1024**3


class SwapPlanError(ValueError):
    """A recipe whose swap settings cannot work (a user error: named values and the fix)."""


@dataclass
class LayerBytes:
    input: int  # S_input: the layer input, always swapped in full
    attention: int  # S_attn: what attention saves (q, k, v, out, lse)
    other: int  # S_other: per-token activations of all tokens (alpha = 1)

    def at(self, alpha: float) -> int:
        return int(self.input + self.attention + alpha * self.other)


@dataclass
class LayerDecision:
    index: int
    policy: str  # keep | recompute | swap
    alpha: float | None = None
    bytes_to_host: int = 0
    copy_ms: float = 0.0


@dataclass
class SwapPlan:
    layers: list[LayerDecision]
    layer_bytes: LayerBytes
    pcie_gbps: float
    layer_fwd_ms: float
    host_budget_bytes: int
    sources: dict  # where each input came from: "measured" | "recipe"

    @property
    def host_bytes(self) -> int:
        return sum(d.bytes_to_host for d in self.layers)

    def swap_alphas(self) -> dict[int, float]:
        return {d.index: d.alpha for d in self.layers if d.policy == "swap"}

    def recompute_layers(self) -> list[int]:
        return [d.index for d in self.layers if d.policy == "recompute"]

    def table(self) -> str:
        b, src = self.layer_bytes, self.sources
        lines = [
            "activation memory per layer (MEMO cost model)",
            f"  S_input {b.input / GiB:.3f} GiB, S_attn {b.attention / GiB:.3f} GiB, S_other {b.other / GiB:.3f} GiB "
            f"(per layer, all tokens; {src['bytes']})",
            f"  host<->device {self.pcie_gbps:.1f} GB/s ({src['pcie']}), layer forward {self.layer_fwd_ms:.1f} ms "
            f"({src['fwd']}), host budget {self.host_budget_bytes / GiB:.1f} GiB ({src['host']})",
            "  layer  policy     alpha  to host GiB  copy ms  fwd ms",
        ]
        for d in _runs(self.layers):
            alpha = "" if d[0].alpha is None else f"{d[0].alpha:.3f}"
            idx = f"{d[0].index}" if len(d) == 1 else f"{d[0].index}-{d[-1].index}"
            lines.append(f"  {idx:<6} {d[0].policy:<10} {alpha:>5}  {d[0].bytes_to_host / GiB:11.3f}  "
                         f"{d[0].copy_ms:7.1f}  {self.layer_fwd_ms:6.1f}")
        lines.append(f"  total to host {self.host_bytes / GiB:.2f} GiB of {self.host_budget_bytes / GiB:.1f} GiB")
        return "\n".join(lines) + "\n"


def _runs(layers: list[LayerDecision]) -> list[list[LayerDecision]]:
    """Consecutive layers with the same decision, for a short table."""
    out: list[list[LayerDecision]] = []
    for d in layers:
        if out and (out[-1][-1].policy, out[-1][-1].alpha) == (d.policy, d.alpha):
            out[-1].append(d)
        else:
            out.append([d])
    return out


_LAYER_RE = re.compile(r"^(keep|recompute|swap)(?:\((0(?:\.\d+)?|1(?:\.0*)?)\))?$")


def parse_layer_policy(text: str, where: str) -> tuple[str, float | None]:
    m = _LAYER_RE.match(str(text).strip())
    if not m or (m.group(2) is not None and m.group(1) != "swap"):
        raise SwapPlanError(f"{where}={text!r} is not keep, recompute, swap or swap(<alpha in [0, 1]>)")
    return m.group(1), None if m.group(2) is None else float(m.group(2))


def parse_alpha(text) -> float | None:
    """`memory.activation.alpha`: 'auto' (None) or a number in [0, 1]."""
    if str(text) == "auto":
        return None
    try:
        a = float(text)
    except ValueError:
        a = -1.0
    if not 0.0 <= a <= 1.0:
        raise SwapPlanError(f"memory.activation.alpha={text!r} must be auto or a number in [0, 1]")
    return a


def link_alpha(layer_bytes: LayerBytes, pcie_gbps: float, layer_fwd_ms: float) -> float:
    """MEMO's bandwidth constraint alone: the largest alpha whose copies fit in one layer's forward."""
    budget = pcie_gbps * 1e9 * layer_fwd_ms / 1e3 - layer_bytes.input - layer_bytes.attention
    return max(0.0, min(1.0, budget / max(layer_bytes.other, 1)))


def decide(n_layers: int, act, layer_bytes: LayerBytes, pcie_gbps: float, layer_fwd_ms: float,
           host_budget_bytes: int, sources: dict) -> SwapPlan:
    """The per-layer decisions (pure: every input given)."""
    policy = act.policy
    overrides = list(act.layers)
    if overrides and len(overrides) != n_layers:
        raise SwapPlanError(f"memory.activation.layers has {len(overrides)} entries; the model has {n_layers} "
                            "layers: give one per layer, or none")
    fixed_alpha = parse_alpha(act.alpha)
    per_byte_ms = 1e3 / (pcie_gbps * 1e9)
    base = layer_bytes.input + layer_bytes.attention
    swappable = [i for i in range(n_layers) if i < n_layers - act.keep_last_layers]
    decisions: dict[int, tuple[str, float | None]] = {}
    if overrides:
        for i, text in enumerate(overrides):
            decisions[i] = parse_layer_policy(text, f"memory.activation.layers[{i}]")
    elif policy in ("none", "recompute"):
        decisions = {i: ("keep" if policy == "none" else "recompute", None) for i in range(n_layers)}
    else:  # swap | auto
        n_fit = len(swappable) if base <= 0 else min(len(swappable), host_budget_bytes // max(base, 1))
        if n_fit < len(swappable) and policy == "swap":
            raise SwapPlanError(
                f"host budget {host_budget_bytes / GiB:.1f} GiB holds the layer input and attention output of "
                f"{n_fit} of the {len(swappable)} layers to swap ({base / GiB:.2f} GiB each, at alpha 0): raise "
                f"memory.activation.host_budget_gib to {len(swappable) * base / GiB:.1f} or more, use "
                f"memory.activation.policy=auto (recomputes the layers that do not fit), or shorten data.seq_len")
        # The layers that do not fit are the lowest ones: a recomputed layer's backward holds the whole
        # layer's activations at once, and at the bottom it runs when nothing above is stored any more.
        swap_set = set(swappable[len(swappable) - n_fit:])
        if fixed_alpha is not None:
            alpha = fixed_alpha
        else:
            a_host = (host_budget_bytes / max(len(swap_set), 1) - base) / max(layer_bytes.other, 1)
            alpha = max(0.0, min(link_alpha(layer_bytes, pcie_gbps, layer_fwd_ms), a_host))
        for i in range(n_layers):
            if i in swap_set:
                decisions[i] = ("swap", alpha)
            elif i in swappable:
                decisions[i] = ("recompute", None)
            else:
                decisions[i] = ("keep", None)
    layers = []
    for i in range(n_layers):
        pol, a = decisions[i]
        if pol == "swap":
            a = fixed_alpha if a is None else a
            if a is None:  # a per-layer plain `swap` with alpha auto: the fastest alpha the link hides
                a = link_alpha(layer_bytes, pcie_gbps, layer_fwd_ms)
            nbytes = layer_bytes.at(a)
            layers.append(LayerDecision(i, "swap", a, nbytes, nbytes * per_byte_ms))
        else:
            layers.append(LayerDecision(i, pol))
    plan = SwapPlan(layers, layer_bytes, pcie_gbps, layer_fwd_ms, host_budget_bytes, sources)
    if plan.host_bytes > host_budget_bytes:
        raise SwapPlanError(f"the swapped layers need {plan.host_bytes / GiB:.1f} GiB of host memory, over the "
                            f"budget of {host_budget_bytes / GiB:.1f} GiB: lower memory.activation.alpha, swap fewer "
                            f"layers, or raise memory.activation.host_budget_gib")
    return plan


# ---- measurements ---------------------------------------------------------------------------------
def measure_layer_bytes(args, dtype: torch.dtype, tokens_total: int, probe_tokens: int = 4) -> LayerBytes:
    """Swap one layer through the swap hooks on the host at `probe_tokens` tokens (alpha 0 and 1), read
    the bytes per part, and scale to `tokens_total` (batch x S_local) tokens.

    Every saved tensor's size per token is linear in one width (hidden, MLP, q or kv heads x head_dim)
    and in the tokens, so the probe runs a layer narrowed by f = gcd of those widths' head counts (same
    head_dim) and multiplies by f: exact, and 1/f^2 of the full layer's weights and work."""
    import math

    from longtrain.memory.swap import LayerSwap, SwappedLayer, SwapStreams
    from longtrain.models.llama import DecoderLayer, rope_cos_sin, rope_inv_freq

    hd = args.hd
    f = math.gcd(args.num_key_value_heads, args.num_attention_heads, args.hidden_size, args.intermediate_size)
    small = args.with_overrides(hidden_size=args.hidden_size // f, intermediate_size=args.intermediate_size // f,
                                num_attention_heads=args.num_attention_heads // f,
                                num_key_value_heads=args.num_key_value_heads // f, head_dim=hd)
    with torch.device("meta"):  # no init: the values do not matter, only what is saved
        layer = DecoderLayer(small, "math").to(dtype)
    layer.to_empty(device="cpu")
    for prm in layer.parameters():
        prm.data.normal_()
    x = torch.randn(1, probe_tokens, small.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(rope_inv_freq(small), torch.arange(probe_tokens)[None], dtype)
    parts = {}
    for alpha in (0.0, 1.0):
        streams = SwapStreams(torch.device("cpu"))
        SwappedLayer(layer, LayerSwap(streams, 0), alpha)(x, cos, sin).sum().backward()
        parts[alpha] = streams.stats.d2h_by_part
    scale = f * tokens_total / probe_tokens
    attention = parts[1.0].get("attention", 0)
    inp = parts[0.0].get("pre", 0) + parts[0.0].get("post", 0)  # alpha 0: the checkpointed parts' inputs
    other = parts[1.0].get("pre", 0) + parts[1.0].get("post", 0)
    return LayerBytes(int(inp * scale), int(attention * scale), int(other * scale))


def measure_copy_gbps(device: torch.device, nbytes: int = 256 * 1024**2) -> float:
    """Device-to-host bandwidth into pinned memory (CUDA), or host memcpy bandwidth (CPU)."""
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        return 3 * nbytes / (a.elapsed_time(b) / 1e3) / 1e9
    src, dst = torch.empty(nbytes // 4, dtype=torch.uint8), torch.empty(nbytes // 4, dtype=torch.uint8)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    return 3 * (nbytes // 4) / (time.perf_counter() - t0) / 1e9


def measure_layer_fwd_ms(layer, x, cos, sin, doc_ids=None) -> float:
    """One layer's forward at the training shape, timed on its second call (the first builds kernels)."""
    with torch.no_grad():
        layer(x, cos, sin, doc_ids)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        layer(x, cos, sin, doc_ids)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) * 1e3


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can hand out without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def host_budget(act, local_ranks: int) -> tuple[int, str]:
    """This rank's host budget in bytes, and where it came from; refuses a budget the node cannot hold."""
    share = host_available_bytes() // max(local_ranks, 1)
    if act.host_budget_gib <= 0:
        return int(0.8 * share), f"80% of {share / GiB:.1f} GiB available per rank"
    want = int(act.host_budget_gib * GiB)
    if want > share:
        raise SwapPlanError(
            f"memory.activation.host_budget_gib={act.host_budget_gib:g} exceeds this node's available host memory "
            f"per rank, {share / GiB:.1f} GiB ({host_available_bytes() / GiB:.1f} GiB available, shared by "
            f"{local_ranks} ranks): lower it, or set 0 for 80% of what is available")
    return want, "recipe"


def plan_for_recipe(cfg, args, device: torch.device, local_ranks: int, fwd_ms: float | None) -> SwapPlan:
    """`decide` with the recipe's values where given, measurements elsewhere. `fwd_ms` is the timed
    layer forward (None: not timed, e.g. `longtrain plan-memory` or preflight, which say so)."""
    act = cfg.memory.activation
    tokens = cfg.train.micro_batch_size * (cfg.data.seq_len // cfg.parallel.sp.degree)
    compute_dtype = torch.bfloat16 if cfg.train.precision == "bf16" or cfg.model.dtype == "bfloat16" else \
        getattr(torch, cfg.model.dtype)
    layer_bytes = measure_layer_bytes(args, compute_dtype, tokens)
    sources = {"bytes": "measured on a narrowed layer on the host, scaled"}
    if act.pcie_gbps > 0:
        gbps, sources["pcie"] = act.pcie_gbps, "recipe"
    else:
        gbps, sources["pcie"] = measure_copy_gbps(device), f"measured on {device.type}"
    if act.layer_fwd_ms > 0:
        fwd, sources["fwd"] = act.layer_fwd_ms, "recipe"
    elif fwd_ms is not None:
        fwd, sources["fwd"] = fwd_ms, "measured"
    else:
        fwd, sources["fwd"] = 1.0, "NOT measured: set memory.activation.layer_fwd_ms; alpha below assumes 1 ms"
    budget, sources["host"] = host_budget(act, local_ranks)
    return decide(args.num_hidden_layers, act, layer_bytes, gbps, fwd, budget, sources)
