"""`longtrain` command line.

  longtrain train RECIPE [key=value ...]        train (starts launch.nproc local processes itself
                                                when not under torchrun)
  longtrain config show RECIPE [key=value ...]  print the resolved config
  longtrain plan-memory RECIPE [key=value ...]  trace one layer, plan its memory (MEMO MIP), print the
                                                tables and write the plans' JSON into the run directory
  longtrain report RUN_DIR [RUN_DIR ...] [--bench JSON ...] [--out DIR]
                                                plots (PNG) and report.md from runs' metrics.jsonl and
                                                tools/bench_train.py JSON

A RECIPE is a YAML path or a name from recipes/ (quickstart, debug, ...). User errors (bad keys,
values, paths) print one line naming the problem and the fix, and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from longtrain.config import ConfigError, load_config, to_yaml

EXIT_USAGE = 2


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def cmd_config_show(ns) -> int:
    cfg = load_config(ns.recipe, ns.overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def cmd_train(ns) -> int:
    from longtrain.launch import LaunchFailed, launch_local
    from longtrain.train.preflight import preflight
    from longtrain.train.trainer import run_training

    cfg = load_config(ns.recipe, ns.overrides)
    preflight(cfg)
    try:
        summary = run_training(cfg) if _under_torchrun() or cfg.launch.nproc == 1 else launch_local(cfg)
    except LaunchFailed as e:  # every rank's own error is in the log above; this names who failed and how
        print(f"longtrain: {'error' if e.user_error else 'training failed'}: {e}", file=sys.stderr)
        return EXIT_USAGE if e.user_error else 1
    if summary.get("preempted"):
        where = f"step {summary['step']}" if summary.get("step") is not None else "the next step boundary"
        print(f"stopped by a signal at {where}: checkpoint saved in {cfg.train.output_dir}/checkpoints; "
              "run again with checkpoint.resume=auto to continue", file=sys.stderr)
        return 128 + summary.get("signal", 15)
    return 0


def cmd_plan_memory(ns) -> int:
    from longtrain.memory.planner.recipe import plan_recipe

    cfg = load_config(ns.recipe, ns.overrides)
    report = plan_recipe(cfg, out_dir=None if ns.no_write else cfg.train.output_dir)
    sys.stdout.write(report.text())
    return 0


def cmd_report(ns) -> int:
    from longtrain.train.report import ReportError, write_report

    try:
        out = write_report(ns.run_dirs, ns.bench, ns.out)
    except ReportError as e:
        print(f"longtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"report written to {out / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longtrain", description="Train LLMs on million-token sequences.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", nargs="?", default="quickstart",
                   help="YAML path or recipe name (default: quickstart, the CPU first run)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=20")
    t.set_defaults(fn=cmd_train)
    pm = sub.add_parser("plan-memory", help="trace one layer (meta device, no GPU) and print its memory plan")
    pm.add_argument("recipe", nargs="?", default="quickstart", help="YAML path or recipe name")
    pm.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=131072")
    pm.add_argument("--no-write", action="store_true", help="print only; do not write the JSON plans")
    pm.set_defaults(fn=cmd_plan_memory)
    r = sub.add_parser("report", help="plot runs' metrics and bench results into PNGs and report.md")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (train.output_dir) with metrics.jsonl")
    r.add_argument("--bench", nargs="+", default=[], metavar="JSON",
                   help="tools/bench_train.py --json files: MFU and peak memory vs sequence length (default: none)")
    r.add_argument("--out", default=None, help="output folder (default: the first run directory's report/)")
    r.set_defaults(fn=cmd_report)
    c = sub.add_parser("config", help="inspect recipes")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(fn=cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if getattr(ns, "recipe", None) and "=" in ns.recipe:  # `longtrain train key=value ...`: the default recipe
        ns.overrides.insert(0, ns.recipe)
        ns.recipe = "quickstart"
    try:
        return ns.fn(ns)
    except ConfigError as e:
        print(f"longtrain: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
