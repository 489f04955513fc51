"""Where a run's numbers go: a progress line on rank 0, metrics.jsonl, and W&B."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("longtrain")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(message)s", stream=sys.stderr, force=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so callers never branch."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, wandb_cfg=None, config_dict=None,
                 wandb_id: str | None = None):
        self.enabled = enabled
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
                                    name=wandb_cfg.name or run_dir.name, group=wandb_cfg.group,
                                    tags=list(wandb_cfg.tags), dir=str(run_dir), config=config_dict,
                                    id=wandb_id, resume="allow", settings=wandb.Settings(quiet=True))
            self.wandb_id = self.wandb.id

    def log_step(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def progress(self, rec: dict) -> None:
        if not self.enabled:
            return
        step = rec["step"]
        if self.first_step is None:
            self.first_step, self.t0 = step, time.perf_counter()
            eta = "?"
        else:
            rate = (time.perf_counter() - self.t0) / max(step - self.first_step, 1)
            eta = _fmt_eta(rate * (self.total - step))
        line = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                f"gnorm {rec['grad_norm']:.3f} | {rec['tokens_per_s']:,.0f} tok/s | "
                f"{rec['tflops_per_device']:.2f} TFLOP/s | MFU {100 * rec['mfu']:.2f}% | "
                f"mem {rec['peak_mem_gib']:.2f} GiB | ETA {eta}")
        print(line, flush=True)

    def log_eval(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.log_step(rec)
        parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "step"]
        print(f"eval @ step {rec['step']} | " + " | ".join(parts), flush=True)

    def log_stage(self, rec: dict, matrix) -> None:
        """After a stage: its accuracy row, OP and BWT to metrics.jsonl; scalars and the matrix as a table to W&B."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        print(f"stage {rec['stage']} ({rec['stage_name']}) done: accuracy per task "
              + " ".join(f"{100 * a:.1f}%" for a in rec["acc_row"]) + f" | OP {100 * rec['op']:.1f}%"
              + (f" | BWT {100 * rec['bwt']:+.1f}%" if "bwt" in rec else ""), flush=True)
        if self.wandb is not None:
            import wandb

            vals = {"cl/op": rec["op"], **({"cl/bwt": rec["bwt"]} if "bwt" in rec else {})}
            vals.update({f"cl/acc/{matrix.names[j]}": a for j, a in enumerate(rec["acc_row"])})
            rows = [[matrix.names[i]] + r + [None] * (len(matrix.names) - len(r)) for i, r in enumerate(matrix.rows)]
            vals["cl/accuracy_matrix"] = wandb.Table(columns=["after"] + matrix.names, data=rows)
            self.wandb.log(vals, step=rec["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
