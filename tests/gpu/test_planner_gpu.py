"""The planned allocator on CUDA: tools/planner_gpu_check.py runs a normal and a planned training in fresh
processes (the allocator is chosen before CUDA starts) and compares losses, gradients and plan counters."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fallback", ["pool", "caching"])
def test_planned_allocator_trains_like_the_normal_one(tmp_path, fallback):
    r = subprocess.run([sys.executable, str(ROOT / "tools/planner_gpu_check.py"), "--out", str(tmp_path / "run"),
                        "--fallback", fallback], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "OK" in r.stdout
