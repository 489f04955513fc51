"""The trainer on a CUDA GPU: bf16, `auto` picks cuDNN, losses fall and match fp32 closely."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(out, *ov):
    r = subprocess.run([sys.executable, "-m", "longtrain", "train", "debug", f"train.output_dir={out}",
                        "train.device=cuda", "checkpoint.export_hf=false", *ov],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x], r.stderr


def test_debug_recipe_trains_on_gpu_with_cudnn(tmp_path):
    recs, log = _run(tmp_path / "bf16", "train.precision=bf16", "train.steps=20", "data.seq_len=256")
    assert "kernel cudnn" in log, log
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3
    ref, _ = _run(tmp_path / "fp32", "train.precision=fp32", "train.steps=20", "data.seq_len=256",
                  "train.attention_kernel=math")
    # bf16 matmuls (8-bit mantissa) vs fp32: per-step losses within 2% over 20 steps of a tiny model
    for a, b in zip(recs, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)
