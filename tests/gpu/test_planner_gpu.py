"""The planned allocator on CUDA: tools/planner_gpu_check.py runs a normal and a planned training in fresh
processes (the allocator is chosen before CUDA starts) and compares losses, gradients and plan counters;
with two GPUs the trainer does the same under sequence parallelism (each rank plans its own requests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from load_tool import load_tool

from longtrain.config.schema import PLANNER_FALLBACKS, PLANNER_REUSE_AFTER

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fallback,reuse_after", [(fb, "free") for fb in PLANNER_FALLBACKS]
                         + [("caching", r) for r in PLANNER_REUSE_AFTER if r != "free"])
def test_planned_allocator_trains_like_the_normal_one(tmp_path, fallback, reuse_after):
    r = subprocess.run([sys.executable, str(ROOT / "tools/planner_gpu_check.py"), "--out", str(tmp_path / "run"),
                        "--fallback", fallback, "--reuse-after", reuse_after], capture_output=True, text=True,
                       timeout=900)
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


def _train(out: Path, *overrides) -> list[float]:
    r = subprocess.run([sys.executable, "-m", "longtrain", "train", "debug", f"train.output_dir={out}", *overrides],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in recs if "loss" in x]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("setup", [
    ["parallel.sp.method=ring", "parallel.engine=torch", "memory.activation.policy=swap",
     "memory.activation.alpha=0.5", "memory.activation.keep_last_layers=0"],
    ["parallel.sp.method=token_ring", "parallel.zero_stage=3", "memory.planner.reuse_after=free"],
    ["parallel.sp.method=ring", "parallel.zero_stage=3", "memory.activation.policy=swap",
     "memory.activation.alpha=0", "memory.activation.keep_last_layers=0", "memory.planner.reuse_after=release"]],
    ids=["ring-ddp-swap", "token_ring-zero3-free", "ring-zero3-swap-release"])
def test_planned_allocator_under_sequence_parallelism(tmp_path, setup):
    """sp=2 over NCCL, started by the trainer: each rank plans its own shard's requests (the ring's send and
    receive buffers, the swap's copies, ZeRO-3's gathers among them). With the plan in check mode the run
    gives the losses and weights of the same run on torch's caching allocator, and every rank replays its
    plan from iteration 3 on with no miss, no refusal and no lifetime break (the reports the trainer writes).
    Tensors other streams still read when freed are reused after the next layer pass (the default,
    `reuse_after=next_pass`), at their free (the second case) or at their release (the third)."""
    from safetensors.torch import load_file

    common = ["launch.nproc=2", "parallel.sp.degree=2", "train.device=cuda", "train.precision=fp32",
              "model.dtype=float32", "train.attention_kernel=math", "data.seq_len=1024", "train.steps=8",
              "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.export_hf=true", *setup]
    ref = _train(tmp_path / "caching", *common, "memory.allocator=default")
    got = _train(tmp_path / "planned", *common, "memory.planner.enabled=true", "memory.planner.check=true",
                 "memory.planner.time_limit_s=10")
    assert len(got) == len(ref) == 8
    assert got == pytest.approx(ref, rel=1e-6)
    a, b = load_file(str(tmp_path / "caching" / "hf" / "model.safetensors")), \
        load_file(str(tmp_path / "planned" / "hf" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
    for rank in (0, 1):
        rep = json.loads((tmp_path / "planned" / f"memory_plan_runtime_rank{rank}_report.json").read_text())
        assert rep["state"] == "replay" and rep["served"] > 0, rep
        said = [x.split("=")[1] for x in setup if x.startswith("memory.planner.reuse_after=")]
        assert rep["reuse_after"] == (said[0] if said else "next_pass")
        bad = {k: rep[k] for k in ("miss_size", "miss_length", "miss_stream", "refused_overlap", "check_lifetime",
                                   "check_leaked", "layout_misses") if rep[k]}
        assert not bad, (rank, bad, rep["refusals"], rep["lifetimes"])
