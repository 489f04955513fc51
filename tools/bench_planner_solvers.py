"""The planner's MIP solvers side by side on the same traces: HiGHS (highspy) against CBC (PuLP's own).

    python3 tools/bench_planner_solvers.py [--sizes 25,40,60] [--seeds 8] [--time-limit 10] [--json OUT]

Random traces (like the tests' `_random_requests`, with sizes in 512-byte steps and a horizon that grows
with the count), each planned by `solve_plan` once per solver with the same greedy start
(`--search-iters`, default 0: the orderings only, so that the MIP has a gap to close). Per trace: the
greedy peak, each solver's peak and time, and whether it proved the optimum; then per solver: traces at
the lower bound, mean peak / lower bound, time in all. Traces the greedy already solves (peak = lower
bound, no MIP runs) are counted apart. Runs on the CPU; one thread per solve.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longtrain.config.schema import PLANNER_MIP_SOLVERS  # noqa: E402
from longtrain.memory.planner.core import Request, mip_solver_name, solve_plan  # noqa: E402


def random_trace(seed: int, n: int) -> list[Request]:
    rng = random.Random(seed)
    horizon = 30 * n // 25
    out = []
    for _ in range(n):
        s = rng.randrange(horizon)
        out.append(Request(rng.randint(1, 20) * 512, s, s + rng.randint(1, 10)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="25,40,60", help="requests per trace, comma-separated")
    ap.add_argument("--seeds", type=int, default=8, help="traces per size")
    ap.add_argument("--time-limit", type=float, default=10.0, help="each solve's limit (seconds)")
    ap.add_argument("--search-iters", type=int, default=0, help="the greedy's local search rounds")
    ap.add_argument("--solvers", default="highs,cbc", help=f"from {', '.join(PLANNER_MIP_SOLVERS[1:])}")
    ap.add_argument("--json", help="write the rows and the summary here")
    a = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in a.sizes.split(",")]
        solvers = [mip_solver_name(x) for x in a.solvers.split(",")]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    head = "  ".join(f"{s + ' peak':>10} {'s':>6}" for s in solvers)
    print(f"{'n':>3} {'seed':>4} {'lower bd':>9} {'greedy':>9}  {head}")
    for n in sizes:
        for seed in range(a.seeds):
            reqs = random_trace(seed, n)
            row = {"n": n, "seed": seed, "solvers": {}}
            for s in solvers:
                t = time.perf_counter()
                plan = solve_plan(reqs, a.time_limit, search_iters=a.search_iters, mip_solver=s)
                row["solvers"][s] = {"peak": plan.peak_bytes, "time_s": round(time.perf_counter() - t, 3),
                                     "how": plan.solver}
                row["lower_bound"], row["greedy"] = plan.lower_bound_bytes, plan.greedy_peak_bytes
            rows.append(row)
            mark = {s: "*" if r["how"].endswith("/optimal") or "(= lower bound" in r["how"] else " "
                    for s, r in row["solvers"].items()}
            print(f"{n:>3} {seed:>4} {row['lower_bound']:>9} {row['greedy']:>9}  " + "  ".join(
                f"{r['peak']:>9}{mark[s]} {r['time_s']:>6.2f}" for s, r in row["solvers"].items()), flush=True)
    hard = [r for r in rows if r["greedy"] > r["lower_bound"]]
    summary = {}
    for s in solvers:
        at_lb = sum(r["solvers"][s]["peak"] == r["lower_bound"] for r in hard)
        proven = sum(r["solvers"][s]["how"].endswith("/optimal") for r in hard)
        ratio = sum(r["solvers"][s]["peak"] / r["lower_bound"] for r in hard) / max(len(hard), 1)
        secs = sum(r["solvers"][s]["time_s"] for r in hard)
        summary[s] = {"traces_greedy_above_bound": len(hard), "at_lower_bound": at_lb, "proven_optimal": proven,
                      "mean_peak_over_lower_bound": round(ratio, 4), "time_s": round(secs, 2)}
    print(f"\n{len(rows)} traces, {len(hard)} where the greedy plan is above the lower bound (* = proven optimal); "
          "on those:")
    for s, v in summary.items():
        print(f"  {s:<6} at the lower bound {v['at_lower_bound']:>3}, proven optimal {v['proven_optimal']:>3}, "
              f"mean peak/lower bound {v['mean_peak_over_lower_bound']:.4f}, {v['time_s']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows, "summary": summary}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
