"""tools/peers/alst.py, the ALST (DeepSpeed-Ulysses) peer, on CPU: its loss against the full cross-entropy (and the
LM head gradient of DeepSpeed's TiledFusedLogitsLoss as ArcticTraining uses it), its shard check, its data against
the torch-native peer's, its FLOP count against longtrain's bench, its flags; then, under torchrun with gloo, a
2-rank sp=2 run writing a complete record, and the sp=2 losses and gradient norms equal to sp=1's on the same data."""

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

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("deepspeed", "einops",
                                                                                   "transformers")),
                                reason="needs deepspeed, einops and transformers")

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "peers" / "alst.py"
alst = load_tool("peers/alst.py", "peer_alst")
tn = alst.tn


# ---- the tiled loss -------------------------------------------------------------------------------
def _debug_hf():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ns = alst.build_parser().parse_args(["--preset", "debug", "--untie-embeddings"])
    return LlamaForCausalLM(tn.hf_config(alst.peer_shape(ns))).double().train()


def test_loss_shards_follow_arctic_trainings_rule():
    # ~1 GiB of fp32 logits per shard: 256K tokens of Llama 3's 128256-token vocabulary are 125.25 GiB
    assert alst.loss_shard_count(262144, 128256, 1.0) == 126
    assert alst.loss_shard_count(262144, 128256, 0.5) == 251
    assert alst.loss_shard_count(10, 320, 1.0) == 1


@pytest.mark.parametrize("mode", ["alst", "exact"])
def test_tiled_loss_and_its_gradients_against_the_full_cross_entropy(mode):
    """Both modes give the mean loss over the labelled tokens and the hidden states' (so every layer's) exact
    gradient. The LM head weight's: exact in `exact`; in `alst` (ArcticTraining's `sum / labelled`) the gradient of
    the sum, i.e. `labelled` times the true one, because TiledFusedLogitsLoss runs that weight's backward inside its
    forward with gradient 1 and later scales only the hidden states' gradient (DeepSpeed 0.19.8)."""
    model = _debug_hf()
    s, v = 40, model.config.vocab_size
    ids = torch.randint(0, v, (1, s), generator=torch.Generator().manual_seed(1))
    y = torch.cat([ids[:, 1:], torch.full((1, 1), alst.IGNORE)], 1)  # the adapter's shift labels
    y[0, [3, 17]] = alst.IGNORE
    n = int((y != alst.IGNORE).sum())
    pos = torch.arange(s)[None]
    watch = {"head": model.lm_head.weight, "down0": model.model.layers[0].mlp.down_proj.weight,
             "embed": model.model.embed_tokens.weight}

    def grads(loss):
        loss.backward()
        out = {k: p.grad.clone() for k, p in watch.items()}
        for p in model.parameters():
            p.grad = None  # before the next forward: TiledFusedLogitsLoss computes the LM head's gradient in it
        return out

    h = model.model(input_ids=ids, position_ids=pos).last_hidden_state
    # fp32 softmax like HF's loss (it upcasts the logits): the same per-token arithmetic, summed in another order
    ref = F.cross_entropy(model.lm_head(h)[0].float(), y[0], ignore_index=alst.IGNORE)
    g_ref = grads(ref)
    h = model.model(input_ids=ids, position_ids=pos).last_hidden_state
    loss, mean = alst.alst_loss(model, h, y, 3, None, 1, mode)
    g = grads(loss)
    torch.testing.assert_close(mean, ref.detach(), rtol=1e-6, atol=0)

    def close(a, b):  # the loss is fp32 (eps 1.2e-7): 1e-6 of the largest gradient for entries that cancel to ~0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())

    close(g["down0"], g_ref["down0"])
    close(g["embed"], g_ref["embed"])
    close(g["head"], g_ref["head"] * (1 if mode == "exact" else n))
    if mode == "alst":  # the factor is real: far outside the tolerance
        assert (g["head"] - g_ref["head"]).abs().max() > 0.5 * g_ref["head"].abs().max()


# ---- the shards and the data ------------------------------------------------------------------------
def test_shard_check_sees_wrong_positions_ids_and_labels():
    s, sp, dev = 32, 2, torch.device("cpu")
    inputs, _, _, ids = tn.make_batch(320, s, 0, 0, 4, dev)
    shift = torch.cat([inputs[:, 1:], torch.full((1, 1), alst.IGNORE)], 1)  # what the adapter makes of labels=inputs
    for r in range(sp):
        pos = alst.ulysses_positions(s, sp, r, dev)
        assert pos.tolist() == list(range(16 * r, 16 * (r + 1)))
        sl = slice(16 * r, 16 * (r + 1))
        assert alst.shard_mismatches(ids, inputs[:, sl], shift[:, sl], pos[None], pos, s) == 0
        assert alst.shard_mismatches(ids, inputs[:, sl], shift[:, sl], torch.arange(16)[None] + 16 * (1 - r), pos,
                                     s) > 0  # the other rank's positions
        assert alst.shard_mismatches(ids, inputs[:, sl], inputs[:, sl], pos[None], pos, s) > 0  # unshifted labels
    # the last label of the sequence must be -100: the adapter has no next token for it
    bad = shift.clone()
    bad[0, -1] = ids[0, s]
    assert alst.shard_mismatches(ids, inputs[:, 16:], bad[:, 16:], torch.arange(16, 32)[None],
                                 alst.ulysses_positions(s, sp, 1, dev), s) == 1


def test_each_ranks_loader_yields_the_torch_native_peers_sequences():
    """The adapter serves an sp group's sequences in sp-rank order, so the k-th sequence of sp rank r is step
    k * sp + r: make_batch's sequence of that (dp rank, step), as the torch-native peer trains on it."""
    ds = alst.Sequences(320, 64, 7, dp_rank=1, sp=2, sp_rank=1, n=5, device=torch.device("cpu"))
    item = ds[3]
    inputs = tn.make_batch(320, 64, 7, 1, 3 * 2 + 1, torch.device("cpu"))[0]
    assert torch.equal(item["input_ids"], inputs[0]) and torch.equal(item["labels"], inputs[0])
    assert item["position_ids"].tolist() == list(range(64)) and len(ds) == 5


# ---- FLOPs, configuration, flags ----------------------------------------------------------------------
@pytest.mark.parametrize("preset,layers,n_seqs,seq", [("llama3-8b", 4, 1, 1 << 20), ("llama3-8b", None, 2, 131072),
                                                      ("debug", None, 1, 256)])
def test_flops_equal_bench_trains_for_the_same_shape(preset, layers, n_seqs, seq):
    from longtrain.config import load_config
    from longtrain.train.metrics import train_flops
    from longtrain.train.preflight import model_shape

    over = [f"model.preset={preset}"] + ([f"model.num_hidden_layers={layers}"] if layers else [])
    bench_args = model_shape(load_config("debug", over))  # what tools/bench_train.py's trainer counts with
    argv = ["--preset", preset, "--untie-embeddings"] + (["--layers", str(layers)] if layers else [])
    args = alst.peer_shape(alst.build_parser().parse_args(argv))
    assert tn.peer_flops(args, n_seqs, seq) == train_flops(bench_args, n_seqs, seq)


def test_deepspeed_config_is_alsts():
    ns = alst.build_parser().parse_args(["--sp", "4"])
    c = alst.ds_config(ns, 4, cuda=True)
    assert c["zero_optimization"] == {"stage": 3} and c["bf16"] == {"enabled": True}
    assert (c["sequence_parallel_size"], c["seq_parallel_communication_data_type"]) == (4, "bf16")
    assert c["gradient_clipping"] == 1.0 and "optimizer" not in c  # torch AdamW, given to deepspeed.initialize
    off = alst.ds_config(alst.build_parser().parse_args(["--offload-optimizer"]), 1, cuda=True)
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["optimizer"]["type"] == "AdamW"
    assert alst.ds_config(alst.build_parser().parse_args(["--precision", "fp32"]), 2, cuda=False)[
        "seq_parallel_communication_data_type"] == "fp32"


@pytest.mark.parametrize("argv,world,message", [
    ([], 1, "ties the LM head to the embedding"),
    (["--untie-embeddings", "--sp", "2"], 1, "--sp 2 must divide the 1 rank(s)"),
    (["--untie-embeddings", "--sp", "3"], 3, "must divide the 4 query heads"),
    (["--untie-embeddings", "--sp", "2", "--seq-len", "255"], 2, "--seq-len 255 must be a multiple of --sp 2"),
    (["--untie-embeddings", "--loss-shard-gib", "0"], 1, "--loss-shard-gib 0.0 must be > 0"),
    (["--untie-embeddings", "--layers", "3"], 1, "--layers 3 is more than the debug model's 2 layers"),
    (["--untie-embeddings", "--steps", "0"], 1, "need --steps >= 1 (got 0)"),
    (["--untie-embeddings", "--sdpa-backend", "flash"], 1, "--sdpa-backend flash is a CUDA kernel"),
])
def test_bad_flags_are_refused_before_any_training(capsys, monkeypatch, argv, world, message):
    if torch.cuda.is_available() and "CUDA" in message:
        pytest.skip("refused only without CUDA")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert alst.main(["--preset", "debug", *argv]) == alst.bt.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("alst: error:") and message in err


def test_find_max_seq_attempts_carry_the_runs_settings(tmp_path):
    ns = alst.build_parser().parse_args(["--preset", "debug", "--layers", "1", "--sp", "2", "--loss-shard-gib", "0.5",
                                         "--find-max-seq", "--no-tiled-mlp", "--offload-optimizer",
                                         "--untie-embeddings", "--loss-grad", "exact"])
    argv = alst.attempt_argv(ns, 4096, tmp_path / "x.json")
    again = alst.build_parser().parse_args(argv)
    for flag, dest in alst.FORWARDED:
        assert getattr(again, dest) == getattr(ns, dest), flag
    for dest, _ in alst.SWITCHES:
        assert getattr(again, dest) == getattr(ns, dest), dest
    assert (again.seq_len, again.offload_optimizer, again.untie_embeddings, again.find_max_seq, again.json) == (
        4096, True, True, False, str(tmp_path / "x.json"))


# ---- torchrun, gloo -----------------------------------------------------------------------------------
def _run(tmp_path: Path, name: str, nproc: int, *flags: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(TOOL), "--preset", "debug", "--untie-embeddings", "--seq-len", "256",
                        "--loss-shard-gib", "0.0001", "--json", str(out), *flags],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("record appended") == 1  # rank 0 alone reports
    (rec,) = json.loads(out.read_text())
    rec["_stdout"] = r.stdout
    return rec


@pytest.mark.slow
def test_two_ranks_sp2_run_writes_a_complete_record(tmp_path):
    rec = _run(tmp_path, "sp2", 2, "--sp", "2", "--steps", "2", "--warmup", "1", "--profile-step")
    assert (rec["kind"], rec["peer"], rec["recipe"], rec["device"]) == ("bench", "alst", "alst", "cpu")
    assert (rec["seq_len"], rec["world_size"], rec["dp"], rec["sp"], rec["cp"]) == (256, 2, 1, 2, 1)
    assert (rec["sequences_per_step"], rec["layers"], rec["model_layers"], rec["depth_truncated"]) == (1, 2, 2, False)
    assert (rec["steps"], rec["warmup"], rec["precision"], rec["engine"]) == (2, 1, "bf16", "deepspeed-zero3")
    c, k = rec["config"], rec["checks"]
    assert c["zero"]["shards"] == 2 and c["zero"]["param_dtype"] == "bfloat16" and c["sp"] == 2
    assert c["deepspeed_config"]["sequence_parallel_size"] == 2 and c["tiled_loss"]["loss_grad"] == "alst"
    # 128 tokens per rank: ceil(128 / 64 hidden) = 2 MLP shards; 128 x 320 fp32 logits over 1e-4 GiB = 2 loss shards
    assert c["tiled_mlp"]["shards"] == [2] and c["tiled_loss"]["shards"] == [2]
    assert c["ac"]["layers_checkpointed"] == 2 and c["ac"]["offload"]
    # full checkpointing: each layer's attention and MLP run twice a step (forward, recompute in backward)
    assert k["sdpa_calls_per_step"] == [4] and k["tiled_mlp_calls_per_step"] == [4]
    # Ulysses: every rank attends over all 256 tokens with 2 of the 4 query heads and 1 of the 2 KV heads
    assert k["ulysses_geometry"] == {"expected_q_kv_heads_q_kv_len": [2, 1, 256, 256], "seen": [[2, 1, 256, 256]],
                                     "ok": True}
    assert k["shard_positions_ids_labels_match"] is True
    # the offload engine got both layers' checkpointed inputs; on CPU it keeps them in place (counted as skipped)
    (off,) = k["offload_per_step"]
    assert (off["skipped"], off["offloaded"], off["kept_last"], off["offloaded_bytes"]) == (2, 0, 0, 0)
    assert rec["swap_host_gib"] == 0.0
    for key in ("loss_first", "loss_last", "step_time_s", "tokens_per_s", "tflops_per_device", "grad_norm_last"):
        assert math.isfinite(rec[key]) and rec[key] > 0, key
    assert len(rec["losses"]) == 3 and all(5.0 < x < 6.5 for x in rec["losses"])  # ~ln(320) on random tokens
    assert rec["tokens_per_s"] == pytest.approx(256 / rec["step_time_s"], rel=1e-9)
    from longtrain.train.metrics import train_flops
    assert rec["flops_per_step"] == train_flops(tn.model_shape("debug", None), 1, 256)
    assert rec["tflops_per_device"] == pytest.approx(rec["flops_per_step"] / 2 / rec["step_time_s"] / 1e12, rel=1e-9)
    for key in ("mfu", "mfu_measured", "matmul_tflops", "peak_tflops", "peak_mem_allocated_gib",
                "peak_mem_reserved_gib"):
        assert rec[key] is None, key
    split = rec["time_split"]  # bench_train's profiled step, on every rank; on CPU no GPU timeline to split
    assert split["profiled"] is True and split["profiled_step"] == 4
    assert [x["rank"] for x in split["per_rank"]] == [0, 1]
    assert rec["not_measured"] == list(alst.bt.SPLIT_KEYS) and "CPU" in rec["not_measured_why"]
    assert rec["host_peak_rss_gib"] > 0.05 and rec["deepspeed_version"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", rec["git_sha"]) and rec["torch_version"] == torch.__version__


@pytest.mark.slow
def test_sp2_trains_as_sp1_on_the_same_data(tmp_path):
    """fp32, every gradient exact (--loss-grad exact): 3 steps with Ulysses over 2 ranks against 1 rank. Step 1's
    loss is a forward only: the same per-token arithmetic in both, summed in another order (fp32: 1e-6). Later steps
    and the gradient norms also go through the backward, whose weight gradients are sums over tokens cut
    differently (tiled MLP 2 vs 4 shards per rank, loss shards, the ZeRO reduction over 2 ranks); on random tokens
    these sums cancel heavily: changing only sp=1's tiling moves the gradient norm by ~2e-5 and step 2's loss by
    ~1e-5, hence 5e-5 and 2e-4. A sharding error is far larger: wrong labels or positions change step 1's loss, a
    misplaced gradient scale the norm (--loss-grad alst's LM head gradient halves it at sp=2)."""
    common = ("--steps", "3", "--warmup", "0", "--precision", "fp32", "--loss-grad", "exact", "--no-profile-step")
    one = _run(tmp_path, "sp1", 1, *common)
    two = _run(tmp_path, "sp2", 2, "--sp", "2", *common)
    assert (one["sp"], two["sp"]) == (1, 2)
    assert (one["config"]["tiled_mlp"]["shards"], two["config"]["tiled_mlp"]["shards"]) == ([4], [2])
    assert two["checks"]["ulysses_geometry"]["ok"] and one["checks"]["ulysses_geometry"]["seen"] == [[4, 2, 256, 256]]
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-6)
    assert two["losses"] == pytest.approx(one["losses"], rel=5e-5)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=2e-4)
    assert all(0.1 < g < 10 for g in one["grad_norms"])
