"""End-to-end training through the CLI: 2 gloo processes vs 1, resume after SIGTERM, recompute policy."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# float64 + the math kernel: the only difference between runs is the order of additions (DDP's
# all-reduce), so losses agree to ~1e-12 relative; 1e-9 leaves room without hiding a real bug
# (a wrong normalisation or a missed sample changes the loss at the 1e-3 level).
EXACT = ["model.dtype=float64", "train.attention_kernel=math", "train.steps=6", "checkpoint.export_hf=false"]


def _train(out: Path, *overrides, check=True):
    r = subprocess.run([sys.executable, "-m", "longtrain", "train", "debug", f"train.output_dir={out}", *overrides],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The unsharded reference: one process, plain torch engine, float64."""
    out = tmp_path_factory.mktemp("ref") / "one"
    _train(out, *EXACT, "parallel.engine=torch", "checkpoint.export_hf=true")
    return out


# ZeRO keeps its master weights in fp32 whatever the model dtype, so after each update the weights
# are those of the float64 run rounded to fp32 (relative 6e-8); six steps stay well inside 1e-6.
# The offload case runs the update in DeepSpeed's CPU Adam, with parameters in host memory between uses.
@pytest.mark.parametrize("engine,rel", [
    (["parallel.engine=torch"], 1e-9), (["parallel.zero_stage=2"], 1e-6), (["parallel.zero_stage=3"], 1e-6),
    (["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true"], 1e-6)],
    ids=["ddp", "zero2", "zero3", "zero3-offload"])
def test_two_processes_match_one(tmp_path, one_process, engine, rel):
    _train(tmp_path / "two", *EXACT, *engine, "launch.nproc=2", "train.micro_batch_size=1",
           "checkpoint.export_hf=true")
    one, two = _losses(one_process), _losses(tmp_path / "two")
    assert list(one) == list(range(1, 7)) and list(two) == list(one)
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=rel), s
    assert one[6] < one[1]  # and it learns
    run = tmp_path / "two"
    assert (run / "config.yaml").read_text().startswith("# git_sha:")
    assert (run / "checkpoints" / "latest").read_text() == "step_00000006"
    # the exported model (gathered from ZeRO-3 shards where sharded) is the single-process model
    a = load_file(str(one_process / "hf" / "model.safetensors"))
    b = load_file(str(run / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rel, atol=rel, msg=k)  # weights are O(0.1), norms O(1)


@pytest.mark.parametrize("sp,rel", [(["parallel.engine=torch", "parallel.sp.method=ring"], 1e-9),
                                    (["parallel.zero_stage=2", "parallel.sp.layout=contiguous"], 1e-6)],
                         ids=["ring-zigzag-ddp", "ring-contiguous-zero2"])
def test_sequence_parallel_training_matches_one_process(tmp_path, one_process, sp, rel):
    """sp=2: each rank holds half of every sequence; losses and eval equal the unsharded run's
    (float64: same arithmetic up to the order of additions; ZeRO: fp32 master weights, see above)."""
    r = _train(tmp_path / "sp", *EXACT, *sp, "launch.nproc=2", "parallel.sp.degree=2")
    assert "dp 1 x sp 2" in r.stderr
    one, two = _losses(one_process), _losses(tmp_path / "sp")
    assert list(two) == list(one)
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=rel), s
    ev = [json.loads(x) for x in (tmp_path / "sp" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    ev1 = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [e["eval_loss"] for e in ev] == pytest.approx([e["eval_loss"] for e in ev1], rel=rel)
    assert [e["eval_needle_acc"] for e in ev] == [e["eval_needle_acc"] for e in ev1]


def test_packed_documents_with_sequence_parallel_match_one_process(tmp_path):
    """Packed documents (a jsonl corpus of short documents: several per 128-token sequence, some cut by
    the sp shard boundary) with the per-document mask: sp=2 ring over zigzag shards equals one process."""
    import random

    rnd = random.Random(5)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(rnd.choice("abcdefgh ") for _ in range(rnd.randint(5, 90)))})
                              + "\n" for _ in range(400)))
    data = ["data.source=jsonl", f"data.paths=[{corpus}]", "data.eval_fraction=0.1"]
    _train(tmp_path / "one", *EXACT, *data, "parallel.engine=torch")
    _train(tmp_path / "sp", *EXACT, *data, "parallel.engine=torch", "launch.nproc=2", "parallel.sp.degree=2")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "sp")
    assert list(two) == list(one) == list(range(1, 7))
    for s in one:  # (that the mask changes the result is tests/unit/test_documents.py's business)
        assert two[s] == pytest.approx(one[s], rel=1e-9), s


def test_activation_swapping_with_sequence_parallel_matches_one_process(tmp_path, one_process):
    """Token-wise swapping (half the tokens swapped, half recomputed, every layer) under sp=2 ring:
    the losses of the unsharded run that keeps its activations (float64; only sums reordered)."""
    r = _train(tmp_path / "swap", *EXACT, "parallel.engine=torch", "launch.nproc=2", "parallel.sp.degree=2",
               "memory.activation.policy=swap", "memory.activation.alpha=0.5", "memory.activation.keep_last_layers=0")
    assert "activation swapping: 2 layers swap to host" in r.stderr
    one, two = _losses(one_process), _losses(tmp_path / "swap")
    assert list(two) == list(one)
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-9), s


def test_recompute_policy_gives_the_same_losses(tmp_path):
    _train(tmp_path / "keep", *EXACT)
    _train(tmp_path / "recompute", *EXACT, "memory.activation.policy=recompute")
    # recomputation repeats the same float64 arithmetic: bitwise equal
    assert _losses(tmp_path / "keep") == _losses(tmp_path / "recompute")


def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    # Slow the steps down (longer sequences) so the signal lands mid-run.
    args = ["train.steps=12", "data.seq_len=512", "checkpoint.interval=0", "checkpoint.export_hf=false",
            "train.eval_interval=0"]
    _train(tmp_path / "full", *args)
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "longtrain", "train", "debug", f"train.output_dir={out}", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    cut_at = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= cut_at < 12, log
    _train(out, *args, "checkpoint.resume=auto")
    full, resumed = _losses(tmp_path / "full"), _losses(out)
    assert resumed == full  # every step, before and after the cut, bitwise


def test_half_written_checkpoint_is_ignored(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.steps=3", "checkpoint.interval=0", "checkpoint.export_hf=false")
    # A crash mid-write leaves a .tmp folder and, worse, a stray newer folder without meta.json.
    (out / "checkpoints" / "step_00000009.tmp").mkdir()
    (out / "checkpoints" / "step_00000008").mkdir()
    (out / "checkpoints" / "latest").unlink()
    r = _train(out, "train.steps=4", "checkpoint.resume=auto", "checkpoint.export_hf=false")
    assert "resumed from" in r.stderr and "step_00000003" in r.stderr
    assert sorted(_losses(out)) == [1, 2, 3, 4]


def test_resume_with_another_model_shape_is_refused(tmp_path):
    out = tmp_path / "run"
    _train(out, "train.steps=2", "checkpoint.export_hf=false")
    r = _train(out, "train.steps=4", "checkpoint.resume=auto", "model.preset=tiny", check=False)
    assert r.returncode == 2 and "another model shape" in r.stderr and "Traceback" not in r.stderr


def test_wandb_offline_run_is_resumed_under_the_same_id(tmp_path):
    out = tmp_path / "run"
    wb = ["logging.wandb.mode=offline", "checkpoint.export_hf=false", "train.eval_interval=0"]
    _train(out, "train.steps=3", *wb)
    _train(out, "train.steps=5", "checkpoint.resume=auto", *wb)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1, runs  # one W&B run continued, not two
    meta = json.loads((out / "checkpoints" / "step_00000005" / "meta.json").read_text())
    assert meta["wandb_id"] == ids.pop()
