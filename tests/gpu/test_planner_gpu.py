"""The planned allocator on CUDA: tools/planner_gpu_check.py runs a normal and a planned training in fresh
processes (the allocator is chosen before CUDA starts) and compares losses, gradients and plan counters."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from load_tool import load_tool

from longtrain.config.schema import PLANNER_FALLBACKS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fallback", PLANNER_FALLBACKS)
def test_planned_allocator_trains_like_the_normal_one(tmp_path, fallback):
    r = subprocess.run([sys.executable, str(ROOT / "tools/planner_gpu_check.py"), "--out", str(tmp_path / "run"),
                        "--fallback", fallback], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "OK" in r.stdout


def test_snapshot_step_is_drawn_beside_a_plan(tmp_path):
    """bench_train's --memory-snapshot step: the pickle holds that step's allocator actions, which the
    snapshot reader turns into requests and plan_memory.py draws beside their plan."""
    from longtrain.memory.planner import solve_plan
    from longtrain.memory.planner.snapshot import allocator_peaks, requests_from_snapshot

    bt = load_tool("bench_train.py", "bench_train")
    pm = load_tool("plan_memory.py", "plan_memory")

    class Stepper:  # what record_snapshot_step needs of a trainer: one step that allocates and frees
        def train_step(self):
            a = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
            b = torch.empty(5 << 20, dtype=torch.uint8, device="cuda")
            del a
            c = torch.empty(2 << 20, dtype=torch.uint8, device="cuda")
            del b, c

    path = bt.record_snapshot_step(Stepper(), str(tmp_path / "snap.pickle"), 0)
    snap = pm._load_snapshot(path)
    reqs = requests_from_snapshot(snap, torch.cuda.current_device())
    assert {2 << 20, 3 << 20, 5 << 20} <= {r.size for r in reqs}
    assert allocator_peaks(snap, torch.cuda.current_device())["allocated_peak_bytes"] >= 8 << 20
    png = pm.draw(solve_plan(reqs, time_limit_s=5), tmp_path / "p.png", snapshot=snap)
    assert Path(png).stat().st_size > 0
