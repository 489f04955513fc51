"""`longtrain report`: plots and report.md from hand-written metrics.jsonl and bench JSON (numbers
checked against values computed by hand), a real CPU run's metrics, and the refusals of bad input."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from longtrain.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _step(step, loss, tps, mfu, mem, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": tps, "tflops_per_device": 1.0,
            "mfu": mfu, "peak_mem_gib": mem, "step_time_s": 0.1, "tokens": 512, **extra}


def _write(path: Path, lines) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _run_a(root: Path) -> Path:
    """A run resumed from step 2: steps 3 (logged again) and 4 follow the first try's step 3. The first
    try's step 3 (loss 3.5, 200 tok/s, 2.5 GiB) must not count."""
    host = dict(peak_mem_reserved_gib=3.0, host_peak_rss_gib=4.0, swap_host_gib=0.5)
    return _write(root / "run_a", [
        {"step": 0, "stage": 0, "stage_name": "task0", "trainable_fraction": 1.0},
        _step(1, 5.0, 100.0, 0.10, 1.0, **host),
        _step(2, 4.0, 300.0, 0.30, 2.0, **host),
        _step(3, 3.5, 200.0, 0.20, 2.5, **host),
        {"step": 3, "eval_loss": 3.9, "eval_needle_acc": 0.0},
        _step(3, 3.0, 400.0, 0.40, 1.8, **host),
        _step(4, 2.0, 500.0, 0.50, 1.9, **host),
        {"step": 4, "eval_loss": 2.5},
        {"step": 4, "stage": 0, "stage_name": "task0", "acc_row": [0.0], "op": 0.0},
    ])


def _run_b(root: Path) -> Path:
    """A run from before host memory was logged, whose last line was cut short by a crash."""
    return _write(root / "run_b", [_step(1, 6.0, 10.0, 0.001, 0.30), _step(2, 5.0, 30.0, 0.003, 0.31),
                                   _step(3, 4.0, 20.0, 0.002, 0.32), '{"step": 4, "loss": 3.'])


def _bench(root: Path) -> Path:
    base = {"kind": "bench", "recipe": "recipes/llama3-1b-32k-1gpu.yaml", "overrides": [], "world_size": 1,
            "layers": 16, "depth_truncated": False, "tflops_per_device": 400.0, "peak_mem_reserved_gib": 50.0}
    recs = [{**base, "seq_len": 32768, "tokens_per_s": 1000.0, "mfu": 0.40, "mfu_measured": 0.52,
             "peak_mem_allocated_gib": 40.0},
            {**base, "seq_len": 65536, "overrides": ["data.seq_len=65536"], "tokens_per_s": 900.5, "mfu": 0.45,
             "mfu_measured": 0.59, "peak_mem_allocated_gib": 70.25},
            {"kind": "bench", "recipe": "debug", "overrides": ["parallel.engine=torch"], "world_size": 2, "layers": 1,
             "model_layers": 2, "depth_truncated": True, "seq_len": 128, "tokens_per_s": 3894.04, "tflops_per_device": 0.003,
             "mfu": None, "mfu_measured": None, "peak_mem_allocated_gib": None, "peak_mem_reserved_gib": None},
            {"kind": "find_max_seq", "max_seq_len": 65536}]
    path = root / "bench.json"
    path.write_text(json.dumps(recs))
    return path


def _table(md: str) -> dict[str, list[str]]:
    """report.md's run table: run name -> cells."""
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| run_")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_numbers_and_plots(tmp_path, capsys):
    a, b, bench = _run_a(tmp_path), _run_b(tmp_path), _bench(tmp_path)
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--bench", str(bench), "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    for name in ("loss", "tokens_per_s", "mfu", "gpu_memory", "host_memory", "bench_mfu_vs_seq", "bench_memory_vs_seq"):
        _assert_png(out / f"{name}.png")
    md = (out / "report.md").read_text()
    rows = _table(md)
    # run_a, by hand: steps 1, 2, 3 (the resumed record), 4 -> median tok/s of 100, 300, 400, 500 = 350;
    # MFU median of 10, 30, 40, 50 % = 35 %; peak memory max(1.0, 2.0, 1.8, 1.9) = 2.0 (not the discarded 2.5)
    assert rows["run_a"] == ["4", "4", "2.0000", "350.0", "35.00%", "2.00"]
    # run_b: the cut line is skipped; medians of (10, 30, 20) and (0.1, 0.3, 0.2) %
    assert rows["run_b"] == ["3", "3", "4.0000", "20.0", "0.20%", "0.32"]
    assert "run_b: 1 line(s) of metrics.jsonl were not JSON" in md
    assert "| llama3-1b-32k-1gpu x1 | 65536 | 900.5 | 400.00 | 45.00% | 59.00% | 70.25 | 50.00 |" in md
    assert "| llama3-1b-32k-1gpu x1 | 32768 | 1000.0 | 400.00 | 40.00% | 52.00% | 40.00 | 50.00 |" in md
    # a CPU record has no MFU basis and no GPU memory; a depth-truncated one says so
    assert ("| debug x2, 1 of 2 layers (depth-truncated) parallel.engine=torch | 128 | 3894.0 | 0.00 | n/a | n/a | n/a "
            "| n/a |") in md
    assert "Not plotted" not in md


def test_plots_nobody_has_are_skipped_and_named(tmp_path):
    b = _run_b(tmp_path)
    out = b / "report"  # the default: the first run's report/
    assert main(["report", str(_run_a(tmp_path)), "--out", str(out)]) == 0
    _assert_png(out / "host_memory.png")
    assert main(["report", str(b)]) == 0
    assert not (out / "host_memory.png").exists()  # the earlier report's plot is not left to pass for this one
    _assert_png(out / "loss.png")
    md = (out / "report.md").read_text()
    assert "- host_memory.png: no run logged host_peak_rss_gib or swap_host_gib" in md
    assert "![host_memory.png]" not in md and "![loss.png](loss.png)" in md


def test_runs_with_the_same_name_are_told_apart(tmp_path):
    x = _run_b(tmp_path / "x")
    y = _run_b(tmp_path / "y")
    assert main(["report", str(x), str(y), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "report.md").read_text()
    assert f"| {x} |" in md and f"| {y} |" in md


@pytest.mark.parametrize("case,message", [
    ("missing_dir", "does not exist: give a run's train.output_dir"),
    ("no_metrics", "has no metrics.jsonl"),
    ("empty", "metrics.jsonl is empty"),
    ("only_eval", "has no training-step records"),
    ("bench_missing", "bench file"),
    ("bench_not_json", "is not JSON"),
    ("bench_no_records", "holds no bench records"),
    ("out_is_a_file", "cannot be the report folder"),
])
def test_bad_input_is_refused_with_the_fix(tmp_path, capsys, case, message):
    good = str(_run_b(tmp_path))
    run, bench = good, []
    if case == "missing_dir":
        run = str(tmp_path / "nope")
    elif case == "no_metrics":
        (tmp_path / "bare").mkdir()
        run = str(tmp_path / "bare")
    elif case == "empty":
        run = str(_write(tmp_path / "empty", []))
    elif case == "only_eval":
        run = str(_write(tmp_path / "evals", [{"step": 3, "eval_loss": 2.0}]))
    elif case == "bench_missing":
        bench = [str(tmp_path / "nope.json")]
    elif case == "bench_not_json":
        (tmp_path / "b.json").write_text("[{")
        bench = [str(tmp_path / "b.json")]
    elif case == "bench_no_records":
        (tmp_path / "b.json").write_text(json.dumps([{"kind": "find_max_seq"}]))
        bench = [str(tmp_path / "b.json")]
    out = tmp_path / "out"
    if case == "out_is_a_file":
        out.write_text("not a folder")
    argv = ["report", good, run, "--out", str(out)] + (["--bench", *bench] if bench else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("longtrain: error:") and message in err and "Traceback" not in err
    assert out.is_file() if case == "out_is_a_file" else not out.exists()  # inputs are read before any write


@pytest.mark.slow
def test_report_of_a_real_cpu_run_with_swapping(tmp_path):
    """A real run (debug model, CPU, activations swapped): its step records carry the memory fields,
    and report.md's row is what its metrics.jsonl says."""
    run = tmp_path / "swap"
    r = subprocess.run([sys.executable, "-m", "longtrain", "train", "debug", f"train.output_dir={run}", "train.steps=3",
                        "parallel.engine=torch", "checkpoint.export_hf=false", "train.eval_interval=0",
                        "memory.activation.policy=swap", "memory.activation.alpha=0.5",
                        "memory.activation.keep_last_layers=0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for x in steps:
        assert x["host_peak_rss_gib"] > 0.05 and x["swap_host_gib"] > 0  # the swap pool's host buffers
        assert "peak_mem_reserved_gib" not in x  # CUDA only
    r = subprocess.run([sys.executable, "-m", "longtrain", "report", str(run)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name in ("loss", "tokens_per_s", "mfu", "gpu_memory", "host_memory"):
        _assert_png(run / "report" / f"{name}.png")
    row = _table((run / "report" / "report.md").read_text().replace("| swap |", "| run_swap |"))["run_swap"]
    assert row == ["3", "3", f"{steps[-1]['loss']:.4f}", f"{statistics.median(x['tokens_per_s'] for x in steps):.1f}",
                   f"{100 * statistics.median(x['mfu'] for x in steps):.2f}%",
                   f"{max(x['peak_mem_gib'] for x in steps):.2f}"]
