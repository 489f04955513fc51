"""tools/bench_train.py: the --find-max-seq search (doubling, then bisection) against a fake attempt,
how an attempt's outcome is read, and real CPU runs of the debug recipe: one process, two ranks under
torchrun, and the search's fresh-process attempts."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_train.py"
_spec = importlib.util.spec_from_file_location("bench_train", TOOL)
bt = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = bt  # dataclasses look their module up while the class is made
_spec.loader.exec_module(bt)

FAST = ["parallel.engine=torch"]  # DDP starts faster than DeepSpeed; the bench is the same


def _fits_below(limit, calls=None, fail_at=None):
    """A fake attempt: out of memory above `limit` tokens, a non-OOM failure at `fail_at`."""
    def attempt(s):
        if calls is not None:
            calls.append(s)
        if s == fail_at:
            return bt.Attempt(s, "failed", detail="exit status 1")
        return bt.Attempt(s, "ok" if s <= limit else "oom")
    return attempt


def test_search_doubles_then_bisects():
    calls = []
    best, tried = bt.search_max_seq(_fits_below(20000, calls), start=4096, step=1024)
    # doubling 4K..32K (OOM), then halving the gap [16K, 32K) down to one step of 1K
    assert calls == [4096, 8192, 16384, 32768, 24576, 20480, 18432, 19456]
    assert best == 19456 and [a.seq_len for a in tried] == calls


@pytest.mark.parametrize("start,step", [(4096, 1024), (1024, 1024), (3072, 512), (128, 128)])
def test_search_finds_the_largest_multiple_of_step_that_fits(start, step):
    for limit in [start - 1, start, start + step - 1, 2 * start, 3 * start + 5 * step + 7, 40 * start + 1, 97 * step]:
        calls = []
        best, tried = bt.search_max_seq(_fits_below(limit, calls), start=start, step=step)
        want = limit // step * step if limit >= start else None
        assert best == want, (start, step, limit)
        assert len(calls) == len(set(calls))  # no length tried twice
        ok = [a.seq_len for a in tried if a.outcome == "ok"]
        oom = [a.seq_len for a in tried if a.outcome == "oom"]
        assert not ok or not oom or max(ok) < min(oom)
        if want is not None:  # bracketed to one step: the next length up was seen to run out of memory
            assert want + step in oom
        assert len(calls) <= 2 * (limit // start + 1).bit_length() + (start // step).bit_length() + 2


def test_search_stops_at_the_cap():
    calls = []
    assert bt.search_max_seq(_fits_below(10**9, calls), start=4096, step=1024, cap=12288)[0] == 12288
    assert calls == [4096, 8192, 12288]
    calls = []  # the cap itself out of memory: bisect below it
    assert bt.search_max_seq(_fits_below(10000, calls), start=4096, step=1024, cap=12288)[0] == 9216
    assert calls == [4096, 8192, 12288, 10240, 9216]


def test_a_failure_that_is_not_oom_ends_the_search():
    calls = []
    best, tried = bt.search_max_seq(_fits_below(10**9, calls, fail_at=16384), start=4096, step=1024)
    assert best == 8192 and calls == [4096, 8192, 16384] and tried[-1].outcome == "failed"
    calls = []  # during the bisection too
    best, tried = bt.search_max_seq(_fits_below(20000, calls, fail_at=24576), start=4096, step=1024)
    assert best == 16384 and calls[-1] == 24576 and tried[-1].outcome == "failed"


def test_outcome_needs_both_a_failed_exit_and_the_marker():
    assert bt.classify(0, "done") == "ok"
    assert bt.classify(bt.EXIT_OOM, f"{bt.OOM_MARKER} rank 0: out of memory: CUDA out of memory") == "oom"
    # under torchrun the launcher exits 1 when a worker does; the OOM rank's marker is in the output
    assert bt.classify(1, f"[rank1] ...\n{bt.OOM_MARKER} rank 1: out of memory\nChildFailedError") == "oom"
    assert bt.classify(1, "Traceback ...\nRuntimeError: NCCL error") == "failed"
    assert bt.classify(-9, "") == "failed"  # killed (the host's OOM killer, or a person): not ours to call OOM
    assert bt.classify(2, "bench_train: error: data.seq_len=64 is too short") == "failed"


def test_json_records_are_appended(tmp_path):
    path = tmp_path / "sub" / "b.json"
    bt.append_json(path, [{"kind": "bench", "seq_len": 1}])
    bt.append_json(path, [{"kind": "bench", "seq_len": 2}, {"kind": "find_max_seq"}])
    assert [r.get("seq_len") for r in json.loads(path.read_text())] == [1, 2, None]
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    with pytest.raises(bt.UsageError, match="not a JSON list"):
        bt.append_json(tmp_path / "x.json", [{}])


@pytest.mark.parametrize("argv,message", [
    (["--find-max-seq", "--seq-start", "1000", "--seq-step", "64"], "--seq-start 1000 must be a positive multiple"),
    (["--find-max-seq", "--seq-start", "128", "--seq-step", "64", "--seq-max", "100"], "--seq-max 100 must be"),
    (["--layers", "5"], "--layers 5 is more than the model's 2 layers"),
    (["--steps", "0"], "need --steps >= 1 (got 0)"),
    (["train.stpes=3"], "unknown key 'train.stpes'"),
    (["--find-max-seq", "train.stpes=3"], "unknown key 'train.stpes'"),
])
def test_bad_flags_are_refused_before_any_training(capsys, argv, message):
    assert bt.main(["debug", *argv]) == bt.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("bench_train: error:") and message in err


def test_a_json_file_that_is_not_a_list_is_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    assert bt.main(["debug", "--json", str(tmp_path / "x.json")]) == bt.EXIT_USAGE
    assert "is not a JSON list of records: give a new file" in capsys.readouterr().err


def _bench(*args, torchrun=0, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] \
        if torchrun else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([*launcher, str(TOOL), "debug", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.slow
def test_cpu_smoke_run_writes_a_complete_record(tmp_path):
    out = tmp_path / "b.json"
    r = _bench("--steps", "2", "--warmup", "1", "--layers", "1", "--json", str(out), *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DEPTH-TRUNCATED: 1 of the model's 2 layers" in r.stdout
    assert "MFU                 n/a (CPU" in r.stdout
    (rec,) = json.loads(out.read_text())
    assert rec["kind"] == "bench" and rec["recipe"] == "debug" and rec["overrides"] == FAST
    assert (rec["seq_len"], rec["world_size"], rec["dp"], rec["sp"], rec["sequences_per_step"]) == (128, 1, 1, 1, 4)
    assert (rec["layers"], rec["model_layers"], rec["depth_truncated"]) == (1, 2, True)
    assert (rec["steps"], rec["warmup"], rec["device"]) == (2, 1, "cpu")
    # the trainer's own numbers: tokens/s and TFLOP/s of the same (median) step
    assert rec["tokens_per_s"] == pytest.approx(4 * 128 / rec["step_time_s"], rel=1e-9)
    assert rec["tflops_per_device"] > 0 and rec["time_split"]["step_s"] == rec["step_time_s"]
    # no MFU basis and no GPU memory on CPU: null, with the reason
    for k in ("mfu", "mfu_measured", "matmul_tflops", "peak_tflops", "peak_mem_allocated_gib", "peak_mem_reserved_gib"):
        assert rec[k] is None, k
    assert "CPU" in rec["mfu_note"]
    assert rec["host_peak_rss_gib"] > 0.05 and rec["swap_host_gib"] == 0.0
    assert set(rec["not_measured"]) == {"compute_s", "exposed_comm_s", "exposed_copy_s"}
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", rec["git_sha"]) and rec["torch_version"] == torch.__version__
    assert 4.0 < rec["loss_first"] < 7.0 and 4.0 < rec["loss_last"] < 7.0  # ~ln(320) at the start: real losses


@pytest.mark.slow
def test_two_ranks_under_torchrun_report_once(tmp_path):
    out = tmp_path / "b.json"
    r = _bench("--steps", "2", "--warmup", "1", "--json", str(out), *FAST, torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("tokens/s ") == 1 and r.stdout.count("record appended") == 1
    (rec,) = json.loads(out.read_text())
    assert (rec["world_size"], rec["dp"], rec["sequences_per_step"]) == (2, 2, 8)


@pytest.mark.slow
def test_find_max_seq_runs_each_attempt_in_a_fresh_process(tmp_path):
    out = tmp_path / "b.json"
    r = _bench("--steps", "1", "--warmup", "0", "--find-max-seq", "--seq-start", "128", "--seq-step", "128",
               "--seq-max", "256", "--json", str(out), *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "data.seq_len=128: ok" in r.stdout and "data.seq_len=256: ok" in r.stdout
    assert "longest data.seq_len that trains 1 steps: 256 (the cap --seq-max 256 reached)" in r.stdout
    recs = json.loads(out.read_text())
    assert [(x["kind"], x.get("seq_len")) for x in recs] == [("bench", 128), ("bench", 256), ("find_max_seq", None)]
    assert recs[-1]["max_seq_len"] == 256 and [a["outcome"] for a in recs[-1]["attempts"]] == ["ok", "ok"]


@pytest.mark.slow
def test_find_max_seq_reports_a_failure_as_a_failure(tmp_path):
    """An attempt that fails for another reason than memory (here a sequence too short for the task)
    stops the search, is named a failure, and the search exits non-zero."""
    out = tmp_path / "b.json"
    r = _bench("--steps", "1", "--warmup", "0", "--find-max-seq", "--seq-start", "64", "--seq-step", "64",
               "--json", str(out), *FAST)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "data.seq_len=64: FAILED (not out of memory), exit status 2" in r.stdout
    assert "too short for the needle task" in r.stdout and "out of memory\n" not in r.stdout
    (summary,) = json.loads(out.read_text())
    assert summary["max_seq_len"] is None and summary["stopped_by_failure"]
    assert [a["outcome"] for a in summary["attempts"]] == ["failed"]
