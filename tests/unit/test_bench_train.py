"""tools/bench_train.py: the --find-max-seq search (doubling, then bisection) against a fake attempt,
how an attempt's outcome is read, the time split of a profiled step (interval arithmetic checked by
hand and against a brute-force count, the classes of GPU activity, a chrome trace read), and real CPU
runs of the debug recipe: one process, two ranks under torchrun, a profiled step, and the search's
fresh-process attempts."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from load_tool import load_tool

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "bench_train.py"
bt = load_tool("bench_train.py", "bench_train")

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


def test_an_out_of_memory_exit_says_where_the_planned_allocators_memory_was(monkeypatch, capsys):
    from longtrain.memory.planner import runtime

    core = runtime.host_core()
    held = core.malloc(3 * 2**30 // 2, 1)  # outside any window: the fallback serves it
    monkeypatch.setattr(runtime, "_ACTIVE", core)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as e:
        bt.exit_if_oom(torch.OutOfMemoryError("CUDA out of memory (longtrain planned allocator): 33554432 bytes"))
    err = capsys.readouterr().err
    assert e.value.code == bt.EXIT_OOM and bt.classify(bt.EXIT_OOM, err) == "oom"
    assert "memory plan at the failure: region 0.00 GiB" in err
    assert "outside the plan 1.50 (peak 1.50)" in err and "reserved 1.50 GiB" in err
    core.free(held, 1)
    monkeypatch.setattr(runtime, "_ACTIVE", None)  # no planned allocator: the marker line only
    with pytest.raises(SystemExit):
        bt.exit_if_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert "memory plan" not in capsys.readouterr().err


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
    (["--no-profile-step", "--trace-dir", "t"], "--trace-dir keeps the trace of the profiled step"),
    (["--find-max-seq", "--trace-dir", "t"], "--trace-dir keeps the trace of the profiled step"),
    (["--gpu-budget-gib", "-1"], "--gpu-budget-gib -1.0 must be >= 0"),
    (["--find-max-seq", "--memory-snapshot", "s.pickle"], "--memory-snapshot records one run's step"),
    (["--memory-snapshot", "s.pickle"], "--memory-snapshot records torch's CUDA caching allocator: this run is not"),
])
def test_bad_flags_are_refused_before_any_training(capsys, argv, message):
    assert bt.main(["debug", *argv]) == bt.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("bench_train: error:") and message in err


def test_memory_snapshot_is_refused_with_the_planned_allocator(monkeypatch, capsys):
    """The planned allocator replaces torch's caching allocator, whose history the snapshot records: refused
    by name before any training (CUDA faked present; the refusal comes before CUDA is touched)."""
    import longtrain.train.preflight as pf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pf, "preflight", lambda cfg: None)
    assert bt.main(["debug", "--memory-snapshot", "s.pickle", "memory.planner.enabled=true"]) == bt.EXIT_USAGE
    assert "memory.planner.enabled=true replaces it" in capsys.readouterr().err


def test_search_attempts_carry_the_gpu_budget(monkeypatch, tmp_path):
    seen = []

    def fake_attempt(script, argv, nproc, seq, out, timeout, check=None):
        seen.append(argv)
        return bt.Attempt(seq, "oom")

    monkeypatch.setattr(bt, "run_attempt", fake_attempt)
    ns = bt.build_parser().parse_intermixed_args(["debug", "--gpu-budget-gib", "40", "--find-max-seq"])
    assert bt.child_runner(ns, 1, tmp_path)(4096).outcome == "oom"
    argv = seen[0]
    assert argv[argv.index("--gpu-budget-gib") + 1] == "40.0" and "data.seq_len=4096" in argv


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
    for k in ("mfu", "mfu_measured", "matmul_tflops", "peak_tflops", "peak_mem_allocated_gib", "peak_mem_reserved_gib",
              "timed_mem_allocated_gib", "timed_mem_reserved_gib"):
        assert rec[k] is None, k
    assert "CPU" in rec["mfu_note"]
    assert rec["host_peak_rss_gib"] > 0.05 and rec["swap_host_gib"] == 0.0
    # no step profiled by default on CPU (no GPU timeline): the split is named as not measured, with why
    assert rec["time_split"]["profiled"] is False and "compute_s" not in rec["time_split"]
    assert rec["not_measured"] == list(bt.SPLIT_KEYS) and rec["not_measured_why"].startswith("CPU: no GPU timeline")
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", rec["git_sha"]) and rec["torch_version"] == torch.__version__
    assert 4.0 < rec["loss_first"] < 7.0 and 4.0 < rec["loss_last"] < 7.0  # ~ln(320) at the start: real losses


@pytest.mark.slow
def test_two_ranks_under_torchrun_report_once(tmp_path):
    out = tmp_path / "b.json"
    r = _bench("--steps", "2", "--warmup", "1", "--json", str(out), "--profile-step", *FAST, torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("tokens/s ") == 1 and r.stdout.count("record appended") == 1
    (rec,) = json.loads(out.read_text())
    assert (rec["world_size"], rec["dp"], rec["sequences_per_step"]) == (2, 2, 8)
    # every rank profiled the extra step (gathered on rank 0); on CPU none has a split
    split = rec["time_split"]
    assert [x["rank"] for x in split["per_rank"]] == [0, 1] and split["profiled_step"] == 4
    assert all(x["profiled_step_s"] > 0 and x["events"] == {"compute": 0, "comm": 0, "copy": 0}
               for x in split["per_rank"])
    assert rec["not_measured_why"] == "CPU: the profiler sees no GPU timeline to split (rank(s) 0, 1)"


@pytest.mark.slow
def test_cpu_profiled_step_is_an_extra_step_and_leaves_the_split_unmeasured(tmp_path, capsys):
    """--profile-step on CPU: one more step runs under the profiler (CPU activity only) after the
    timed ones; its interval is read back from the kept trace, the split is reported unavailable."""
    out, traces = tmp_path / "b.json", tmp_path / "traces"
    r = _bench("--steps", "1", "--warmup", "1", "--layers", "1", "--json", str(out), "--profile-step",
               "--trace-dir", str(traces), *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    (rec,) = json.loads(out.read_text())
    split = rec["time_split"]
    assert split["profiled"] is True and split["profiled_step"] == 3  # warm-up 1, timed 2, profiled 3
    assert "profiled step 3: one more step after the timed ones, not in the median" in r.stdout
    assert rec["steps"] == 1 and split["step_s"] == rec["step_time_s"]  # the median is the timed step's alone
    assert rec["not_measured"] == list(bt.SPLIT_KEYS)
    assert rec["not_measured_why"] == "CPU: the profiler sees no GPU timeline to split (rank(s) 0)"
    (rank0,) = split["per_rank"]
    assert rank0["events"] == {"compute": 0, "comm": 0, "copy": 0} and "compute_s" not in rank0
    # the step's interval comes from the trace: a real range, of the order of the trainer's own timing
    trace = json.loads((traces / "profiled_step_rank0.json").read_text())
    (ann,) = [e for e in trace["traceEvents"] if e.get("name") == bt.STEP_ANNOTATION]
    assert split["profiled_step_s"] == pytest.approx(ann["dur"] / 1e6) and split["profiled_step_s"] > 0
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])  # the CPU ops of that step were recorded

    # the table of a GPU run prints the measured split: this record with two ranks' hand-made splits
    rec["time_split"].update(bt.combine_splits(list(_two_ranks()))[0])
    rec.update(not_measured=[], not_measured_why=None)
    bt.print_record(rec)
    table = capsys.readouterr().out
    assert "not measured" not in table
    assert "profiled step 14: one more step after the timed ones, not in the median; 2500.0 ms under the profiler" \
        in table
    assert ("max over ranks: compute 1500.0 ms (60%), exposed comm 500.0 ms (20%), exposed copies 500.0 ms (20%), "
            "idle 750.0 ms (30%); comm 1000.0 ms and copies 500.0 ms in all (hidden or not)") in table
    assert ("  rank 1: compute 1000.0 ms (40%), exposed comm 250.0 ms (10%), exposed copies 500.0 ms (20%), "
            "idle 750.0 ms (30%); comm 750.0 ms and copies 500.0 ms in all") in table


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


# ---- the time split of a profiled step ---------------------------------------------------------
def _split(step, compute=(), comm=(), copy=()):
    return bt.split_intervals(step, list(compute), list(comm), list(copy))


@pytest.mark.parametrize("case,step,compute,comm,copy,want", [
    # compute 0-5 (two overlapping kernels), comm 4-7 (exposed 5-7), copies 6-8 and 9-9.5 (exposed 7-8, 9-9.5)
    ("overlaps", (0, 10), [(0, 4), (3, 5)], [(4, 7)], [(6, 8), (9, 9.5)],
     dict(compute_s=5, comm_s=3, copy_s=2.5, exposed_comm_s=2, exposed_copy_s=1.5, idle_s=1.5)),
    # comm nested in compute (and in itself) is hidden; a copy before everything is exposed
    ("nesting", (0, 10), [(1, 9), (2, 3)], [(2, 3), (4, 6), (5, 5.5)], [(0, 1)],
     dict(compute_s=8, comm_s=3, copy_s=1, exposed_comm_s=0, exposed_copy_s=1, idle_s=1)),
    ("disjoint", (0, 10), [(0, 2)], [(3, 4)], [(5, 7)],
     dict(compute_s=2, comm_s=1, copy_s=2, exposed_comm_s=1, exposed_copy_s=2, idle_s=5)),
    ("nothing", (2, 5), [], [], [],
     dict(compute_s=0, comm_s=0, copy_s=0, exposed_comm_s=0, exposed_copy_s=0, idle_s=3)),
    ("comm only", (2, 5), [], [(2, 3)], [],
     dict(compute_s=0, comm_s=1, copy_s=0, exposed_comm_s=1, exposed_copy_s=0, idle_s=2)),
    # clipped to the step, unsorted, zero-length intervals count nothing
    ("clipped", (0, 10), [(8, 12), (-3, 1)], [(5, 5)], [(11, 20)],
     dict(compute_s=3, comm_s=0, copy_s=0, exposed_comm_s=0, exposed_copy_s=0, idle_s=7)),
    # copies under communication only are hidden too: only 5-6 is exposed
    ("copy under comm", (0, 6), [], [(0, 5)], [(1, 2), (4, 6)],
     dict(compute_s=0, comm_s=5, copy_s=3, exposed_comm_s=5, exposed_copy_s=1, idle_s=0)),
    # a copy 1-8 under compute (0-3), then comm (3-6), exposed 6-8; comm exposed 3-6
    ("copy across both", (0, 10), [(0, 3)], [(2, 6)], [(1, 8)],
     dict(compute_s=3, comm_s=4, copy_s=7, exposed_comm_s=3, exposed_copy_s=2, idle_s=2)),
])
def test_split_intervals_by_hand(case, step, compute, comm, copy, want):
    got = _split(step, compute, comm, copy)
    assert got == {"step_s": step[1] - step[0], **{k: pytest.approx(v, abs=1e-12) for k, v in want.items()}}, case
    parts = got["compute_s"] + got["exposed_comm_s"] + got["exposed_copy_s"] + got["idle_s"]
    assert parts == pytest.approx(got["step_s"])


def test_split_intervals_match_a_count_of_unit_cells():
    """Random integer intervals: every quantity equals the number of unit cells [t, t+1) of the step
    that are covered by the classes it names."""
    rng = random.Random(8)
    for _ in range(300):
        lo = rng.randint(0, 10)
        hi = lo + rng.randint(0, 20)
        cls = [[tuple(sorted(rng.sample(range(-3, 34), 2))) for _ in range(rng.randint(0, 5))] for _ in range(3)]
        cells = [[any(s <= t < e for s, e in c) for c in cls] for t in range(lo, hi)]
        want = {"step_s": hi - lo, "compute_s": sum(a for a, _, _ in cells), "comm_s": sum(b for _, b, _ in cells),
                "copy_s": sum(c for _, _, c in cells), "exposed_comm_s": sum(b and not a for a, b, _ in cells),
                "exposed_copy_s": sum(c and not (a or b) for a, b, c in cells),
                "idle_s": sum(not (a or b or c) for a, b, c in cells)}
        assert bt.split_intervals((lo, hi), *cls) == want, (lo, hi, cls)


@pytest.mark.parametrize("cat,name,want", [
    ("kernel", "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "comm"),
    ("kernel", "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "comm"),
    ("kernel", "void ncclKernel_AllReduce_RING_LL_Sum_float(ncclWorkElem)", "comm"),
    ("kernel", "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)", "compute"),
    ("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "compute"),
    ("kernel", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "compute"),
    ("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", "copy"),
    ("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", "copy"),
    ("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", "copy"),
    ("gpu_memcpy", "Memcpy DtoD (Device -> Device)", "compute"),
    ("gpu_memcpy", "Memcpy PtoP (Device -> Device)", "comm"),
    ("gpu_memset", "Memset (Device)", "compute"),
    ("gpu_user_annotation", "bench_train::profiled_step", None),  # record_function's range on the GPU
    ("user_annotation", "bench_train::profiled_step", None),
    ("cpu_op", "aten::mm", None),
    ("cuda_runtime", "cudaLaunchKernel", None),
    ("cuda_runtime", "ncclCommInitRank", None),  # a host call named nccl is no GPU communication
    ("cuda_sync", "Stream Sync", None),
])
def test_device_activity_classes(cat, name, want):
    assert bt.device_activity_class({"ph": "X", "cat": cat, "name": name, "ts": 0, "dur": 1}) == want


def _x(cat, name, ts, dur, **kw):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7, **kw}


def test_split_from_a_chrome_trace():
    """A trace in kineto's layout (microseconds, absolute times ~1e12): the step is the annotation's
    range; compute 0-400 us, NCCL 300-600 us, a host copy 550-800 us, a kernel running past the step's
    end clipped; the GPU side of the annotation, CPU ops and flow events are not GPU work."""
    t0 = 5051281925943.357
    events = [
        {"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": "python"}},
        _x("user_annotation", bt.STEP_ANNOTATION, t0, 1000.0),
        _x("gpu_user_annotation", bt.STEP_ANNOTATION, t0 + 1, 998.0),
        _x("cpu_op", "aten::mm", t0 + 2, 50.0),
        _x("cuda_runtime", "cudaLaunchKernel", t0 + 3, 5.0),
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "ts": t0 + 4, "pid": 0, "tid": 7},
        _x("kernel", "void at::native::elementwise_kernel<128, 2>(int)", t0 + 0.0, 250.0),
        _x("kernel", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", t0 + 200.0, 200.0, tid=8),
        _x("kernel", "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", t0 + 300.0, 300.0, tid=20),
        _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", t0 + 550.0, 250.0, tid=30),
        _x("kernel", "void at::native::reduce_kernel<512, 1>(int)", t0 + 950.0, 100.0),
    ]
    got = bt.split_from_trace({"traceEvents": events})
    assert got["events"] == {"compute": 3, "comm": 1, "copy": 1} and got["why"] is None
    assert got["profiled_step_s"] == pytest.approx(1e-3)
    want = {"step_s": 1000, "compute_s": 450, "comm_s": 300, "copy_s": 250, "exposed_comm_s": 200,
            "exposed_copy_s": 200, "idle_s": 150}  # microseconds: compute 0-400 and 950-1000
    assert got["split"] == {k: pytest.approx(v / 1e6, abs=1e-9) for k, v in want.items()}

    no_gpu = bt.split_from_trace({"traceEvents": events[:6]})
    assert no_gpu["split"] is None and no_gpu["why"] == "the profiler recorded no GPU activity in the step"
    assert no_gpu["events"] == {"compute": 0, "comm": 0, "copy": 0} and no_gpu["profiled_step_s"] > 0
    no_step = bt.split_from_trace({"traceEvents": events[2:]})  # no host range: no interval to measure over
    assert no_step["split"] is None and no_step["profiled_step_s"] is None
    assert no_step["why"] == f"the trace holds 0 '{bt.STEP_ANNOTATION}' ranges, not one"


def _two_ranks():
    """profile_step's results of two ranks, from hand-made intervals (seconds)."""
    a = {"rank": 0, "step": 14, "profiled_step_s": 2.0, "events": {"compute": 9, "comm": 2, "copy": 1}, "why": None,
         "split": _split((0, 2), [(0, 1.5)], [(1, 2)], [])}
    b = {"rank": 1, "step": 14, "profiled_step_s": 2.5, "events": {"compute": 9, "comm": 2, "copy": 1}, "why": None,
         "split": _split((0, 2.5), [(0, 1)], [(0.5, 1.25)], [(2, 2.5)])}
    return a, b


def test_ranks_combine_into_maxima_and_keep_their_own_splits():
    a, b = _two_ranks()
    out, why = bt.combine_splits([a, b])
    assert why is None and out["profiled_step"] == 14 and out["profiled_step_s"] == 2.5
    assert {k: out[k] for k in bt.SPLIT_KEYS} == {"compute_s": 1.5, "exposed_comm_s": 0.5, "exposed_copy_s": 0.5,
                                                  "idle_s": 0.75, "comm_s": 1.0, "copy_s": 0.5}
    assert out["per_rank"][1] == {"rank": 1, "profiled_step_s": 2.5, "events": b["events"], "compute_s": 1.0,
                                  "exposed_comm_s": 0.25, "exposed_copy_s": 0.5, "idle_s": 0.75, "comm_s": 0.75,
                                  "copy_s": 0.5}
    c = {**b, "split": None, "why": "the profiler recorded no GPU activity in the step"}
    out, why = bt.combine_splits([a, c])
    assert why == "the profiler recorded no GPU activity in the step (rank(s) 1)"
    assert not set(bt.SPLIT_KEYS) & set(out) and "compute_s" in out["per_rank"][0]
    assert "compute_s" not in out["per_rank"][1]


def test_an_attempt_past_its_timeout_is_stopped(tmp_path):
    """--attempt-timeout: the attempt's process is stopped (not left running on the GPU) and the attempt
    counts as failed, not as out of memory."""
    import time

    script = tmp_path / "hang.py"
    script.write_text("import os, time\nopen(os.environ['HANG_PID_FILE'], 'w').write(str(os.getpid()))\n"
                      "time.sleep(120)\n")
    os.environ["HANG_PID_FILE"] = str(tmp_path / "pid")
    try:
        t0 = time.monotonic()
        a = bt.run_attempt(str(script), [], 1, 4096, tmp_path / "out.json", timeout=2)
    finally:
        del os.environ["HANG_PID_FILE"]
    assert time.monotonic() - t0 < 60
    assert a.outcome == "failed" and "--attempt-timeout 2 s (stopped)" in a.detail
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone
