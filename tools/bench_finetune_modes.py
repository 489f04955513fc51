"""Time per optimizer step of finetune modes (full vs hft by default) on the same recipe.

    python tools/bench_finetune_modes.py [--recipe continual-cpu] [--modes full hft] [--rounds 2] [key=value ...]

Runs each mode `rounds` times, alternating (full, hft, full, hft, ...) so that a machine whose load
changes affects both alike, one stage of the recipe each, and prints the median step time (first
steps dropped) and the trainable fraction. Writes the table as JSON next to the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="continual-cpu")
    ap.add_argument("--modes", nargs="+", default=["full", "hft"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", type=int, default=3, help="first steps of each run left out (warm-up)")
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_modes_"))
    times: dict[str, list[float]] = {m: [] for m in ns.modes}
    frac: dict[str, float] = {}
    for r in range(ns.rounds):
        for m in ns.modes:
            out = root / f"{m}_{r}"
            cmd = [sys.executable, "-m", "longtrain", "train", ns.recipe, f"finetune.mode={m}",
                   f"train.output_dir={out}", "stages=[{}]", "train.eval_samples=1", "checkpoint.export_hf=false",
                   *ns.overrides]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            times[m] += [x["step_time_s"] for x in recs if "step_time_s" in x][ns.skip:]
            frac[m] = next(x["trainable_fraction"] for x in recs if "trainable_fraction" in x)
    base = statistics.median(times[ns.modes[0]])
    rows = []
    print(f"| mode | trainable | median step (ms) | vs {ns.modes[0]} |\n|---|---|---|---|")
    for m in ns.modes:
        med = statistics.median(times[m])
        rows.append({"mode": m, "trainable_fraction": frac[m], "median_step_s": med, "steps": len(times[m])})
        print(f"| {m} | {100 * frac[m]:.1f}% | {1000 * med:.1f} | {med / base:.2f}x |")
    (root / "bench.json").write_text(json.dumps({"overrides": ns.overrides, "rows": rows}, indent=2))
    print(f"runs and bench.json in {root}")


if __name__ == "__main__":
    main()
