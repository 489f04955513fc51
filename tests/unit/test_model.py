"""The model against transformers' LlamaForCausalLM on the same weights, HF I/O, and the tiled loss."""

import json

import pytest
import torch

from longtrain.models import PRESETS, build_model, model_args, save_hf
from longtrain.models.llama import rope_inv_freq
from longtrain.models.loss import tiled_cross_entropy

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _hf_model(model_type="llama", rope_scaling=None, tie=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=5000.0,
              tie_word_embeddings=tie)
    if rope_scaling:
        kw["rope_scaling"] = dict(rope_scaling)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kw)
    else:
        cfg = transformers.LlamaConfig(**kw)
    m = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so parity really checks them
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.mark.parametrize("model_type,rope,tie", [("llama", None, False), ("llama", LLAMA3_ROPE, True),
                                                   ("qwen2", None, False)])
def test_logits_match_transformers(tmp_path, model_type, rope, tie):
    hf = _hf_model(model_type, rope, tie)
    hf.save_pretrained(tmp_path / "hf")
    args = model_args("debug", pretrained=str(tmp_path / "hf"))
    ours = build_model(args, device=torch.device("cpu"), dtype=torch.float32, attention_kernel="math",
                       pretrained=str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    # Same fp32 arithmetic up to op order (fused vs split matmuls, softmax kernels): ~1e-6 relative.
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=2e-5)


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    args = PRESETS["debug"].with_overrides(num_key_value_heads=1)
    ours = build_model(args, device=torch.device("cpu"), dtype=torch.float32, attention_kernel="math", seed=3).eval()
    save_hf(ours, tmp_path / "out", max_shard_bytes=50_000)  # force several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=2e-5, atol=2e-5)
    # and back: our loader reads the sharded folder into an identical model
    again = build_model(model_args("debug", pretrained=str(tmp_path / "out")), device=torch.device("cpu"),
                        dtype=torch.float32, attention_kernel="math", pretrained=str(tmp_path / "out"))
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_shape_mismatch_is_refused(tmp_path):
    ours = build_model(PRESETS["debug"], device=torch.device("cpu"), dtype=torch.float32)
    save_hf(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    other = build_model(PRESETS["debug"].with_overrides(intermediate_size=128), device=torch.device("cpu"),
                        dtype=torch.float32)
    with pytest.raises(ValueError, match="intermediate|shape"):
        from longtrain.models import load_hf_weights
        load_hf_weights(other, tmp_path / "a")
    assert cfg["model_type"] == "llama"


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0,
                                   rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=1024)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    args = PRESETS["debug"].with_overrides(hidden_size=128, num_attention_heads=2, rope_theta=500000.0,
                                           rope_scaling=dict(LLAMA3_ROPE))
    torch.testing.assert_close(rope_inv_freq(args), ref.float(), rtol=1e-6, atol=0)


def test_meta_init_is_deterministic_and_tied():
    a = build_model(PRESETS["debug"], device=torch.device("cpu"), dtype=torch.float32, seed=7)
    b = build_model(PRESETS["debug"], device=torch.device("cpu"), dtype=torch.float32, seed=7)
    c = build_model(PRESETS["debug"], device=torch.device("cpu"), dtype=torch.float32, seed=8)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("tile", [1, 7, 64, 10_000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiled_loss_equals_full_loss(tile, dtype):
    g = torch.Generator().manual_seed(tile)
    h = torch.randn(3, 50, 16, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(33, 16, dtype=dtype, generator=g, requires_grad=True)
    y = torch.randint(0, 33, (3, 50), generator=g)
    y[0, :10] = -100  # ignored labels carry no loss and no gradient
    y[2, -1] = -100
    loss, n = tiled_cross_entropy(h, w, y, tile_tokens=tile)
    (loss * 0.37).backward()  # a non-unit upstream gradient must scale both gradients
    dh, dw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.t()).reshape(-1, 33).double(), y.reshape(-1), reduction="sum",
                                            ignore_index=-100)
    (ref * 0.37).backward()
    assert n.item() == (y != -100).sum().item()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, **tol)
    torch.testing.assert_close(dh, h.grad, **tol)
    torch.testing.assert_close(dw, w.grad, **tol)


def test_model_loss_path_equals_logits_path():
    m = build_model(PRESETS["debug"], device=torch.device("cpu"), dtype=torch.float64, attention_kernel="math", seed=1)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    loss, n = m(ids, labels_BS=labels, loss_tile_tokens=13)
    ref = torch.nn.functional.cross_entropy(m(ids).reshape(-1, m.args.vocab_size), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-10, atol=1e-10)
    assert n.item() == 80
