"""`longtrain report`: plots and a summary table from runs' metrics.jsonl and tools/bench_train.py JSON.

    longtrain report RUN_DIR [RUN_DIR ...] [--bench JSON ...] [--out DIR]

Per run (one line each, the legend is the run directory's name): loss, tokens/s, MFU, device memory
and host memory over steps. From bench records: MFU and peak memory against sequence length, one
line per configuration (recipe, overrides, depth, ranks). Writes PNGs and report.md into --out
(default: RUN_DIR/report of the first run). A plot no input has the numbers for is left out, and
report.md says so. Resumed runs log the steps after their checkpoint twice: the last record of a
step is the one kept (it belongs to the run that went on).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


class ReportError(ValueError):
    """Bad input (a missing run directory, an empty metrics.jsonl, ...): printed without a traceback, exit 2."""


@dataclass
class Run:
    name: str  # the legend: the directory's name (its path when two runs share a name)
    path: Path
    steps: list[dict]  # one training-step record per step, ascending
    skipped_lines: int = 0  # lines that are not JSON (a write cut short by a crash)


@dataclass
class Plot:
    file: str
    title: str
    ylabel: str
    series: list[tuple[str, str, float]]  # (record key, line style, scale) drawn for each run or bench group
    why_missing: str = ""  # what no input logged, when the plot is skipped


# Over steps, from metrics.jsonl. peak_mem_gib is the process's peak RSS on CPU runs (no device memory there).
RUN_PLOTS = [
    Plot("loss.png", "training loss", "loss", [("loss", "-", 1.0)]),
    Plot("tokens_per_s.png", "throughput", "tokens/s (all ranks)", [("tokens_per_s", "-", 1.0)]),
    Plot("mfu.png", "model FLOPs utilisation (train.peak_tflops basis)", "MFU (%)", [("mfu", "-", 100.0)]),
    Plot("gpu_memory.png", "peak device memory (solid: allocated, dashed: reserved; CPU runs: process RSS)",
         "GiB", [("peak_mem_gib", "-", 1.0), ("peak_mem_reserved_gib", "--", 1.0)]),
    Plot("host_memory.png", "host memory (solid: peak process RSS, dashed: activation swap pool)",
         "GiB", [("host_peak_rss_gib", "-", 1.0), ("swap_host_gib", "--", 1.0)]),
]
# Against sequence length, from bench_train.py records.
BENCH_PLOTS = [
    Plot("bench_mfu_vs_seq.png", "MFU vs sequence length (solid: datasheet peak, dashed: measured matmul)",
         "MFU (%)", [("mfu", "-", 100.0), ("mfu_measured", "--", 100.0)]),
    Plot("bench_memory_vs_seq.png", "peak GPU memory vs sequence length (solid: allocated, dashed: reserved)",
         "GiB", [("peak_mem_allocated_gib", "-", 1.0), ("peak_mem_reserved_gib", "--", 1.0)]),
]


def read_run(run_dir: str | Path) -> Run:
    """The training-step records of a run (records with `step` and `loss`; eval and stage records
    are left out), the last one of each step kept."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist: give a run's train.output_dir "
                          "(the folder holding metrics.jsonl)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{path} has no metrics.jsonl: give a run's train.output_dir (the folder "
                          "`longtrain train` wrote config.yaml and metrics.jsonl into)")
    by_step: dict[int, dict] = {}
    skipped = 0
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(rec, dict) and "step" in rec and "loss" in rec:
            by_step[int(rec["step"])] = rec
    if not by_step:
        what = ("is empty" if not metrics.read_text().strip()
                else "has no training-step records (lines with step and loss)")
        raise ReportError(f"{metrics} {what}: the run stopped before its first step? Train it, or leave it out")
    return Run(path.name, path, [by_step[s] for s in sorted(by_step)], skipped)


def read_bench(json_path: str | Path) -> list[dict]:
    """The `kind: bench` records of a tools/bench_train.py --json file (a JSON list)."""
    path = Path(json_path)
    if not path.is_file():
        raise ReportError(f"bench file {str(json_path)!r} does not exist: give the --json file of tools/bench_train.py")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"bench file {path} is not JSON ({e.msg}, line {e.lineno}): give the --json file of "
                          "tools/bench_train.py") from None
    recs = [r for r in data if isinstance(r, dict) and r.get("kind") == "bench"] if isinstance(data, list) else []
    if not recs:
        raise ReportError(f"bench file {path} holds no bench records (a JSON list of objects with kind: bench, "
                          "as tools/bench_train.py --json writes)")
    return recs


def _median(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _peak(recs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in recs if r.get(key) is not None]
    return max(vals) if vals else None


def run_summary(run: Run) -> dict:
    """The numbers of report.md's run table: medians over every logged step, peak over the run."""
    return {"steps": len(run.steps), "last_step": run.steps[-1]["step"], "final_loss": run.steps[-1]["loss"],
            "median_tokens_per_s": _median(run.steps, "tokens_per_s"), "median_mfu": _median(run.steps, "mfu"),
            "peak_mem_gib": _peak(run.steps, "peak_mem_gib")}


def _bench_group(rec: dict) -> str:
    """Bench records that differ only in seq_len share a line."""
    over = [o for o in rec.get("overrides", []) if not o.startswith("data.seq_len=")]
    depth = (f", {rec.get('layers')} of {rec.get('model_layers')} layers (depth-truncated)"
             if rec.get("depth_truncated") else "")
    return f"{Path(str(rec.get('recipe', '?'))).stem} x{rec.get('world_size', 1)}{depth}" + (
        f" {' '.join(over)}" if over else "")


def _draw(plot: Plot, lines: list[tuple[str, list[dict]]], x_key: str, xlabel: str, out: Path, log_x: bool) -> bool:
    """One PNG: for each (label, records) a line per series key the records have. False if nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, (label, recs) in enumerate(lines):
        color, labelled = f"C{i % 10}", False
        for key, style, scale in plot.series:
            pts = sorted((r[x_key], r[key] * scale) for r in recs
                         if r.get(key) is not None and r.get(x_key) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, color=color, marker="o" if len(pts) < 30 else None, markersize=3,
                    label=None if labelled else label)
            drawn = labelled = True
    if drawn:
        ax.set_title(plot.title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(plot.ylabel)
        if log_x:
            ax.set_xscale("log", base=2)
        else:
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / plot.file, dpi=100)
    plt.close(fig)
    return drawn


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def write_report(run_dirs: list[str], bench_files: list[str] = (), out: str | Path | None = None) -> Path:
    """Read every input (all errors before anything is written), draw the plots, write report.md;
    returns the output folder."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)
    bench = [rec for f in bench_files for rec in read_bench(f)]
    out = Path(out) if out is not None else runs[0].path / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise ReportError(f"--out {out} cannot be the report folder ({e.strerror}): give a folder path") from None

    drawn, skipped = [], []
    for plot in RUN_PLOTS:
        if _draw(plot, [(r.name, r.steps) for r in runs], "step", "step", out, log_x=False):
            drawn.append(plot.file)
        else:
            skipped.append((plot.file, "no run logged " + " or ".join(k for k, _, _ in plot.series)))
    if bench:
        groups: dict[str, list[dict]] = {}
        for rec in bench:
            groups.setdefault(_bench_group(rec), []).append(rec)
        for plot in BENCH_PLOTS:
            if _draw(plot, list(groups.items()), "seq_len", "sequence length (tokens)", out, log_x=True):
                drawn.append(plot.file)
            else:
                skipped.append((plot.file, "no bench record has " + " or ".join(k for k, _, _ in plot.series)
                                + " (CPU records leave them null)"))

    md = ["# Training report", "", "| run | steps | last step | final loss | median tokens/s | median MFU | "
          "peak GPU memory (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        s = run_summary(r)
        md.append(f"| {r.name} | {s['steps']} | {s['last_step']} | {s['final_loss']:.4f} | "
                  f"{_fmt(s['median_tokens_per_s'], '.1f')} | "
                  f"{_pct(s['median_mfu'])} | "
                  f"{_fmt(s['peak_mem_gib'], '.2f')} |")
    md += ["", "Medians over every logged step; a step logged twice (a resumed run) counts once, its last record. "
           "Peak memory is the largest peak_mem_gib logged (on CPU runs: the process's peak RSS)."]
    notes = [f"- {r.name}: {r.skipped_lines} line(s) of metrics.jsonl were not JSON and were skipped"
             for r in runs if r.skipped_lines]
    if bench:
        md += ["", "## Benchmarks (tools/bench_train.py)", "",
               "| configuration | seq_len | tokens/s | TFLOP/s per GPU | MFU (peak) | MFU (measured matmul) | "
               "peak allocated (GiB) | peak reserved (GiB) |", "|---|---|---|---|---|---|---|---|"]
        for rec in sorted(bench, key=lambda r: (_bench_group(r), r.get("seq_len") or 0)):
            md.append(f"| {_bench_group(rec)} | {rec.get('seq_len')} | {_fmt(rec.get('tokens_per_s'), '.1f')} | "
                      f"{_fmt(rec.get('tflops_per_device'), '.2f')} | {_pct(rec.get('mfu'))} | "
                      f"{_pct(rec.get('mfu_measured'))} | {_fmt(rec.get('peak_mem_allocated_gib'), '.2f')} | "
                      f"{_fmt(rec.get('peak_mem_reserved_gib'), '.2f')} |")
    md += ["", "## Plots", ""] + [f"![{f}]({f})" for f in drawn]
    for f, _ in skipped:  # a plot of an earlier report into the same folder would pass for this one's
        (out / f).unlink(missing_ok=True)
    if skipped:
        md += ["", "## Not plotted", ""] + [f"- {f}: {why}" for f, why in skipped]
    if notes:
        md += ["", "## Notes", ""] + notes
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out
