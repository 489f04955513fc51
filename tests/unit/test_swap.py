"""Token-wise activation swapping (memory/swap.py) on CPU: the same code path as on GPU, with host-to-host
copies. Losses and every parameter gradient equal the run that keeps its activations."""

import os

import pytest
import torch

from longtrain.memory.swap import SwappedLayer, apply_activation_swap
from longtrain.models import build_model, model_args


def _model(seed=3, **kw):
    args = model_args("debug", **kw)
    return build_model(args, device=torch.device("cpu"), dtype=torch.float64, attention_kernel="math", seed=seed)


def _loss_and_grads(model, ids, labels, docs=None):
    model.zero_grad()
    loss, _ = model(ids, None, labels, doc_ids_BS=docs)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("alphas,chunk", [({0: 0.0, 1: 0.0}, 0), ({0: 1.0, 1: 1.0}, 0), ({0: 0.5, 1: 0.25}, 0),
                                          ({1: 0.6}, 0), ({0: 0.0, 1: 0.0}, 7), ({0: 0.5, 1: 0.25}, 7)],
                         ids=["alpha0", "alpha1", "mixed", "last-only", "alpha0-chunks", "mixed-chunks"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-doc", "packed"])
def test_swap_matches_keep(alphas, chunk, packed):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 259, (2, 40), generator=g)
    labels = torch.randint(0, 259, (2, 40), generator=g)
    docs = torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [2] * 10]) if packed else None
    ref = _model()
    want_loss, want = _loss_and_grads(ref, ids, labels, docs)
    model = _model()
    streams = apply_activation_swap(model, alphas, torch.device("cpu"), chunk_tokens=chunk)
    assert sum(isinstance(m, SwappedLayer) for m in model.modules()) == len(alphas)
    assert list(model.state_dict()) == list(ref.state_dict())  # the same keys (checkpoints, HF export)
    for _ in range(2):  # the second step reuses the host buffers of the first
        streams.reset_stats()
        loss, grads = _loss_and_grads(model, ids, labels, docs)
        # Same arithmetic row by row; splitting the tokens in groups (alpha split, recompute chunks)
        # reorders the sums of the parameter gradients only: float64 agrees to ~1e-15; alpha 0 and 1
        # without chunks (no split) bitwise.
        exact = all(a in (0.0, 1.0) for a in alphas.values()) and not chunk
        assert torch.equal(loss, want_loss) if exact else torch.allclose(loss, want_loss, rtol=1e-13, atol=0)
        for n, gr in grads.items():
            if exact:
                assert torch.equal(gr, want[n]), n
            else:
                torch.testing.assert_close(gr, want[n], rtol=1e-11, atol=1e-14, msg=n)
        assert streams.stats.d2h_bytes > 0 and streams.stats.h2d_bytes == streams.stats.d2h_bytes
    pinned = streams.stats.host_bytes_pinned
    _loss_and_grads(model, ids, labels, docs)
    assert streams.stats.host_bytes_pinned == pinned  # no new host buffers after the first step


def test_the_pool_counts_what_it_holds_after_a_shape_change():
    model = _model()
    streams = apply_activation_swap(model, {0: 0.5, 1: 0.5}, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    for s in (40, 24, 40):  # a new length replaces the buffers whose size changed
        ids = torch.randint(0, 259, (1, s), generator=g)
        _loss_and_grads(model, ids, ids)
        held = sum(b.numel() for m in model.modules() if hasattr(m, "swap") for b in m.swap.pool if b is not None)
        assert streams.stats.host_bytes_pinned == held


def test_swapped_bytes_follow_alpha():
    """More swapped tokens, more bytes to host; alpha 0 still swaps the layer input and attention."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 259, (1, 64), generator=g)
    moved = {}
    for a in (0.0, 0.5, 1.0):
        model = _model()
        streams = apply_activation_swap(model, {0: a, 1: a}, torch.device("cpu"))
        _loss_and_grads(model, ids, ids)
        moved[a] = streams.stats.d2h_bytes
    assert 0 < moved[0.0] < moved[0.5] < moved[1.0]


# ---- the cost model (swap_plan.decide): hand-checked decisions -------------------------------------
from types import SimpleNamespace  # noqa: E402

from longtrain.config import ConfigError, load_config  # noqa: E402
from longtrain.memory.swap_plan import LayerBytes, SwapPlanError, decide, host_budget  # noqa: E402

LB = LayerBytes(input=100, attention=200, other=1000)  # bytes per layer


def _act(**kw):
    base = dict(policy="auto", alpha="auto", keep_last_layers=2, layers=[], host_budget_gib=0.0)
    return SimpleNamespace(**{**base, **kw})


def _decide(act, budget=10**9, gbps=1e-6, fwd_ms=800.0):
    # 1e-6 GB/s = 1000 B/s: in 800 ms the link moves 800 bytes
    return decide(6, act, LB, gbps, fwd_ms, budget, {k: "test" for k in ("bytes", "pcie", "fwd", "host")})


def test_alpha_is_what_the_link_hides_behind_the_forward():
    plan = _decide(_act())
    # (100 + 200 + alpha * 1000) / 1000 B/s <= 0.8 s  ->  alpha = 0.5; the last 2 layers keep
    assert [(d.policy, d.alpha) for d in plan.layers] == [("swap", 0.5)] * 4 + [("keep", None)] * 2
    assert plan.layers[0].bytes_to_host == 800 and plan.host_bytes == 3200
    assert "swap" in plan.table() and "0-3" in plan.table()


def test_alpha_is_capped_by_the_host_budget():
    plan = _decide(_act(), budget=4 * (300 + 250))  # 4 layers x (300 + alpha 1000) <= 2200 -> alpha 0.25
    assert plan.swap_alphas() == {i: 0.25 for i in range(4)}


def test_auto_recomputes_the_layers_the_budget_cannot_hold_and_swap_refuses():
    plan = _decide(_act(), budget=700)  # alpha 0 needs 300 per layer: two layers fit, the upper two
    assert [d.policy for d in plan.layers] == ["recompute", "recompute", "swap", "swap", "keep", "keep"]
    assert plan.swap_alphas() == {2: 0.05, 3: 0.05}  # (700 / 2 - 300) / 1000
    with pytest.raises(SwapPlanError, match=r"holds the layer input and attention output of 2 of the 4 layers"):
        _decide(_act(policy="swap"), budget=700)
    plan = _decide(_act(), budget=299)  # not even one layer at alpha 0: auto recomputes them all
    assert [d.policy for d in plan.layers] == ["recompute"] * 4 + ["keep", "keep"]
    with pytest.raises(SwapPlanError, match=r"holds the layer input and attention output of 0 of the 4 layers"):
        _decide(_act(policy="swap"), budget=299)


def test_fixed_alpha_and_per_layer_overrides():
    plan = _decide(_act(policy="swap", alpha="0.3"))
    assert set(plan.swap_alphas().values()) == {0.3}
    plan = _decide(_act(layers=["swap(1)", "swap", "recompute", "keep", "keep", "swap(0)"]))
    assert [(d.policy, d.alpha) for d in plan.layers] == [("swap", 1.0), ("swap", 0.5), ("recompute", None),
                                                         ("keep", None), ("keep", None), ("swap", 0.0)]
    with pytest.raises(SwapPlanError, match="has 2 entries; the model has 6 layers"):
        _decide(_act(layers=["keep", "keep"]))
    with pytest.raises(SwapPlanError, match="over the budget"):
        _decide(_act(policy="swap", alpha="1"), budget=3000)


@pytest.mark.parametrize("override,needle", [
    ("memory.activation.alpha=1.5", "memory.activation.alpha='1.5' must be auto or a number in [0, 1]"),
    ("memory.activation.layers=[keep,swap(2)]", "memory.activation.layers[1]='swap(2)' is not keep, recompute"),
    ("memory.activation.policy=swapp", "did you mean 'swap'?"),
])
def test_bad_swap_settings_are_refused_when_loading(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("debug", [override])
    assert needle in str(e.value)


def test_host_budget_over_what_the_node_has_is_refused():
    with pytest.raises(SwapPlanError, match=r"host_budget_gib=1e\+06 exceeds this node's available host memory"):
        host_budget(_act(host_budget_gib=1e6), local_ranks=2)
    assert host_budget(_act(), local_ranks=2)[0] > 0


# ---- memory.allocator: the CUDA allocator mode set before CUDA starts -------------------------------
def test_allocator_mode_is_set_unless_the_environment_says(monkeypatch):
    from longtrain.memory import arena
    from longtrain.memory.arena import configure_cuda_allocator

    def fresh():  # a new process: nothing set (setenv first, so that teardown restores the absence too)
        for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "LONGTRAIN_ALLOC_CONF"):
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        monkeypatch.setattr(arena, "_applied", None)

    fresh()
    cfg = load_config("debug", [])
    assert cfg.memory.allocator == "expandable"  # the default
    assert configure_cuda_allocator(cfg) == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert configure_cuda_allocator(cfg) == "expandable_segments:True"  # a second entry point: unchanged
    monkeypatch.setattr(arena, "_applied", None)  # a rank started by this process inherits the marked setting
    assert configure_cuda_allocator(cfg) == "expandable_segments:True"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's setting wins, by either name
        fresh()
        monkeypatch.setenv(name, "max_split_size_mb:512")
        assert configure_cuda_allocator(cfg) == f"{name}=max_split_size_mb:512 (from the environment)"
        assert os.environ[name] == "max_split_size_mb:512" and "LONGTRAIN_ALLOC_CONF" not in os.environ
    fresh()
    assert configure_cuda_allocator(load_config("debug", ["memory.allocator=default"])) == "caching allocator defaults"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    with pytest.raises(ConfigError, match="memory.allocator"):
        load_config("debug", ["memory.allocator=planned"])


# ---- the tiled MLP (memory.activation.mlp_chunk_tokens) ---------------------------------------------
@pytest.mark.parametrize("policy", ["none", "recompute"])
def test_tiled_mlp_matches_the_plain_layer(policy):
    from longtrain.memory.checkpointing import TiledMLP, apply_activation_checkpointing, apply_tiled_mlp

    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 259, (2, 40), generator=g)
    ref = _model()
    want_loss, want = _loss_and_grads(ref, ids, ids)
    model = apply_tiled_mlp(_model(), 7)  # 40 tokens: chunks of 7, the last one short
    if policy == "recompute":
        apply_activation_checkpointing(model)  # nested: the layer's recompute runs the MLP chunk by chunk
    assert sum(isinstance(m, TiledMLP) for m in model.modules()) == 2
    assert list(model.state_dict()) == list(ref.state_dict())
    loss, grads = _loss_and_grads(model, ids, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=0)
    for n, gr in grads.items():  # the chunks reorder the sums of the MLP weights' gradients only
        torch.testing.assert_close(gr, want[n], rtol=1e-11, atol=1e-14, msg=n)


def test_tiled_mlp_goes_on_the_layers_that_are_not_swapped():
    from longtrain.memory.activation import apply_activation_policy
    from longtrain.memory.checkpointing import TiledMLP

    cfg = load_config("debug", ["memory.activation.layers=[swap(0.5),recompute]", "memory.activation.mlp_chunk_tokens=8",
                                "memory.activation.layer_fwd_ms=1", "memory.activation.pcie_gbps=10",
                                "memory.activation.host_budget_gib=1", "model.dtype=float64"])
    model = _model()
    apply_activation_policy(model, cfg, torch.device("cpu"))
    tiled = [i for i, layer in enumerate(model.model.layers) if any(isinstance(m, TiledMLP) for m in layer.modules())]
    assert tiled == [1]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 259, (1, 33), generator=g)
    want_loss, want = _loss_and_grads(_model(), ids, ids)
    loss, grads = _loss_and_grads(model, ids, ids)
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=0)
    for n, gr in grads.items():
        torch.testing.assert_close(gr, want[n], rtol=1e-11, atol=1e-14, msg=n)
