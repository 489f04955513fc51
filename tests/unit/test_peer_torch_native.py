"""tools/peers/torch_native.py, the PyTorch-native peer, on CPU: its tiled loss against the full cross-entropy,
its FLOP count against longtrain's bench, its HF model's shape against the preset, the SDPA guard (HF's
unmasked causal path, and the packed-sequence mask it avoids), context parallel's sharding of the ids, labels and
position ids (2 gloo ranks), and a 2-rank FSDP2 run under torchrun writing a complete record."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from load_tool import load_tool

# not imported here: the spawned ranks of the sharding test import this module and need no transformers
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "peers" / "torch_native.py"
tn = load_tool("peers/torch_native.py", "peer_torch_native")


# ---- the tiled loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_tiled_loss_equals_full_cross_entropy_and_its_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    n, e, v = 40, 16, 23
    h = torch.randn(n, e, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, e, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    y[[3, 17, 39]] = -100  # ignored positions contribute neither loss nor gradient
    gy = 0.37  # an upstream gradient other than 1

    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    dh_ref, dw_ref = torch.autograd.grad(ref * gy, (h, w))
    got = tn.tiled_cross_entropy_sum(h, w, y, chunk)
    dh, dw = torch.autograd.grad(got * gy, (h, w))
    assert got.dtype == torch.float64  # fp64 stays fp64 (bf16 logits go to fp32)
    # the same sums in another order: equal to fp64 rounding
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-10, atol=1e-12)
    assert dh[[3, 17, 39]].abs().max() == 0


def test_tiled_loss_refuses_an_empty_chunk():
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        tn.tiled_cross_entropy_sum(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), 0)


# ---- FLOPs and shape: the same model as longtrain's bench -------------------------------------
@pytest.mark.parametrize("preset,layers,n_seqs,seq", [("llama3-8b", 4, 1, 1 << 20), ("llama3-8b", None, 2, 131072),
                                                      ("debug", 1, 3, 256)])
def test_flops_equal_bench_trains_for_the_same_shape(preset, layers, n_seqs, seq):
    from longtrain.config import load_config
    from longtrain.train.metrics import train_flops
    from longtrain.train.preflight import model_shape

    over = [f"model.preset={preset}"] + ([f"model.num_hidden_layers={layers}"] if layers else [])
    bench_args = model_shape(load_config("debug", over))  # what tools/bench_train.py's trainer counts with
    assert tn.peer_flops(tn.model_shape(preset, layers), n_seqs, seq) == train_flops(bench_args, n_seqs, seq)


@pytest.mark.parametrize("preset,layers", [("llama3-8b", 4), ("llama3-8b", None), ("debug", None)])
@needs_hf
def test_the_hf_model_has_the_presets_shape(preset, layers):
    """Counted on the real HF module (on the meta device: no memory): the matmul weights the FLOP formula
    assumes, the heads, and RoPE's inverse frequencies (Llama-3 scaling) equal longtrain's."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from longtrain.models.llama import rope_inv_freq
    from longtrain.train.metrics import matmul_params

    args = tn.model_shape(preset, layers)
    cfg = tn.hf_config(args)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    assert linear == matmul_params(args)
    assert len(hf.model.layers) == args.num_hidden_layers
    attn = hf.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (args.num_attention_heads * args.hd,
                                                                    args.num_key_value_heads * args.hd)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == args.tie_word_embeddings
    torch.testing.assert_close(LlamaRotaryEmbedding(cfg).inv_freq.float(), rope_inv_freq(args).float(),
                               rtol=1e-6, atol=0)


# ---- HF's SDPA calls ----------------------------------------------------------------------------
def _debug_model():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    return tn.TiledLossLM(LlamaForCausalLM(tn.hf_config(tn.model_shape("debug", None))), chunk_tokens=5).eval()


@needs_hf
def test_hf_calls_sdpa_unmasked_and_causal_with_head_tail_positions():
    """A cp rank's position ids are two separate runs (here rank 0 of cp 2: chunks 0 and 3 of 4). With the
    all-ones mask HF still calls SDPA with attn_mask=None, is_causal=True, and the loss is that of HF's own
    forward on the same positions; without a mask HF reads the positions as packed sequences and builds one,
    which the guard refuses (the reason for the all-ones mask)."""
    model = _debug_model()
    pos = tn.head_tail_positions(48, 2, 0, torch.device("cpu"))[None]  # 0..11 and 36..47
    assert pos[0, :12].tolist() == list(range(12)) and pos[0, 12:].tolist() == list(range(36, 48))
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)  # any labels: the loss is compared with HF's own forward
    guard = tn.SDPAGuard(repeat_kv=False)
    with torch.no_grad(), guard.installed():
        got = model(ids, pos, labels)
    assert guard.calls == 2 and guard.gqa_seen == {"enable_gqa"}
    with torch.no_grad():
        logits = model.hf(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, F.cross_entropy(logits[0].float(), labels[0], reduction="sum"))
    with torch.no_grad(), guard.installed(), pytest.raises(RuntimeError, match="attn_mask=a tensor"):
        model.hf.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False)


@needs_hf
def test_repeat_kv_gives_the_same_attention():
    model, ids = _debug_model(), torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    pos, labels = torch.arange(16)[None], ids.roll(-1, 1)
    out = {}
    for repeat in (False, True):
        guard = tn.SDPAGuard(repeat_kv=repeat)
        with torch.no_grad(), guard.installed():
            out[repeat] = model(ids, pos, labels)
        assert guard.gqa_seen == ({"kv heads = query heads"} if repeat else {"enable_gqa"})
    torch.testing.assert_close(out[True], out[False], rtol=1e-6, atol=0)


# ---- context parallel's sharding of the batch (gloo) --------------------------------------------
def _shard_worker(rank, world, port, q):
    import argparse

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        peer = tn.Peer(argparse.Namespace(cp=world))
        s, dev = 32, torch.device("cpu")
        inputs, labels, pos, ids = tn.make_batch(320, s, 0, peer.dp_rank, 5, dev)
        expected = tn.head_tail_positions(s, peer.cp, peer.cp_rank, dev)
        local_positions = torch.arange(peer.cp_rank * s // world, (peer.cp_rank + 1) * s // world)[None]
        from torch.distributed.tensor.experimental import context_parallel
        with context_parallel(peer.cp_mesh, buffers=[inputs, labels, pos], buffer_seq_dims=[1, 1, 1]):
            report = {"rank": rank, "shape": tuple(inputs.shape), "pos": pos[0].tolist(),
                      "ok": tn.shard_mismatches(ids, inputs, labels, pos, expected).item(),
                      # position ids that were not sharded with the ids: each rank's contiguous range
                      "unsharded_pos": tn.shard_mismatches(ids, inputs, labels, local_positions, expected).item(),
                      "labels_of_other_rank": tn.shard_mismatches(ids, inputs, labels.flip(1), pos, expected).item()}
        q.put(report)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put({"rank": rank, "error": repr(e)})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_shards_ids_labels_and_positions_together():
    from ranks import spawn_ranks

    reports = sorted(spawn_ranks(_shard_worker, 2, timeout=120), key=lambda r: r["rank"])
    assert all("error" not in r for r in reports), reports
    # PyTorch's head-tail load balancing over 4 chunks of 8: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert reports[0]["pos"] == list(range(0, 8)) + list(range(24, 32))
    assert reports[1]["pos"] == list(range(8, 24))
    for r in reports:
        assert r["shape"] == (1, 16) and r["ok"] == 0
        assert r["unsharded_pos"] > 0 and r["labels_of_other_rank"] > 0  # the check sees what it guards against


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--cp", "2", "--seq-len", "256"], "--cp 2 needs CUDA"),
    (["--sdpa-backend", "flash"], "--sdpa-backend flash is a CUDA kernel"),
    (["--layers", "3"], "--layers 3 is more than the debug model's 2 layers"),
    (["--steps", "0"], "need --steps >= 1 (got 0)"),
    (["--loss-chunk", "0"], "--loss-chunk 0 must be >= 1"),
    (["--preset", "llama9"], "is not a longtrain preset"),
    (["--no-profile-step", "--trace-dir", "t"], "--trace-dir keeps the trace of the profiled step"),
])
def test_bad_flags_are_refused_before_any_training(capsys, argv, message):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("refused only without CUDA")
    assert tn.main(["--preset", "debug", *argv]) == tn.bt.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("torch_native: error:") and message in err


def test_find_max_seq_attempts_carry_the_runs_settings(tmp_path):
    ns = tn.build_parser().parse_args(["--preset", "debug", "--layers", "1", "--cp", "1", "--loss-chunk", "64",
                                       "--find-max-seq", "--no-verify-cp", "--gqa", "repeat"])
    argv = tn.attempt_argv(ns, 4096, tmp_path / "x.json")
    again = tn.build_parser().parse_args(argv)
    for flag, dest in tn.FORWARDED:
        assert getattr(again, dest) == getattr(ns, dest), flag
    assert (again.seq_len, again.verify_cp, again.find_max_seq, again.json) == (4096, False, False,
                                                                                str(tmp_path / "x.json"))
    assert again.profile_step is None  # unset: each attempt takes the default (profiled on CUDA)
    ns.profile_step = False
    assert tn.build_parser().parse_args(tn.attempt_argv(ns, 4096, tmp_path / "x.json")).profile_step is False


@pytest.mark.slow
@needs_hf
def test_two_ranks_fsdp_run_writes_a_complete_record(tmp_path):
    out = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(TOOL),
                        "--preset", "debug", "--seq-len", "128", "--steps", "2", "--warmup", "0", "--loss-chunk", "48",
                        "--profile-step", "--json", str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("record appended") == 1  # rank 0 alone reports
    (rec,) = json.loads(out.read_text())
    assert (rec["kind"], rec["peer"], rec["recipe"], rec["device"]) == ("bench", "torch-native", "torch-native", "cpu")
    assert (rec["seq_len"], rec["world_size"], rec["dp"], rec["cp"], rec["sp"]) == (128, 2, 2, 1, 1)
    assert (rec["sequences_per_step"], rec["layers"], rec["model_layers"], rec["depth_truncated"]) == (2, 2, 2, False)
    assert (rec["steps"], rec["warmup"], rec["precision"], rec["engine"]) == (2, 0, "bf16", "fsdp2")
    c = rec["config"]
    assert c["fsdp"]["shards"] == 2 and c["ac"]["layers_wrapped"] == 2 and c["loss_chunk_tokens"] == 48
    assert c["cp"] == 1 and c["sdpa_backend"] == "cpu"
    # full checkpointing: every layer's attention runs twice a step (forward, recompute in backward)
    assert rec["checks"]["sdpa_calls_per_step"] == [4] and rec["checks"]["shard_positions_ids_labels_match"]
    for k in ("loss_first", "loss_last", "step_time_s", "tokens_per_s", "tflops_per_device", "grad_norm_last"):
        assert math.isfinite(rec[k]) and rec[k] > 0, k
    assert 5.0 < rec["loss_first"] < 6.5 and 5.0 < rec["loss_last"] < 6.5  # ~ln(320) on random tokens
    assert rec["tokens_per_s"] == pytest.approx(2 * 128 / rec["step_time_s"], rel=1e-9)
    from longtrain.train.metrics import train_flops
    assert rec["flops_per_step"] == train_flops(tn.model_shape("debug", None), 2, 128)
    assert rec["tflops_per_device"] == pytest.approx(rec["flops_per_step"] / 2 / rec["step_time_s"] / 1e12, rel=1e-9)
    for k in ("mfu", "mfu_measured", "matmul_tflops", "peak_tflops", "peak_mem_allocated_gib", "peak_mem_reserved_gib"):
        assert rec[k] is None, k
    # bench_train's profiled step, one more on every rank (gathered on rank 0); on CPU no GPU timeline to split
    split = rec["time_split"]
    assert split["profiled"] is True and split["profiled_step"] == 3 and split["step_s"] == rec["step_time_s"]
    assert [x["rank"] for x in split["per_rank"]] == [0, 1] and all(x["profiled_step_s"] > 0 for x in split["per_rank"])
    assert rec["not_measured"] == list(tn.bt.SPLIT_KEYS) and "CPU" in rec["not_measured_why"]
    assert "profiled step 3: one more step after the timed ones" in r.stdout
    assert rec["host_peak_rss_gib"] > 0.05
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", rec["git_sha"]) and rec["torch_version"] == torch.__version__
