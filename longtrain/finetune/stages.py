"""Stages (tasks trained one after another) and the continual-learning metrics.

A recipe's `stages:` list gives each stage a name, steps, a learning rate and the `data` keys that
differ from the top-level `data:` section; with no list the run is one stage made of `train` and
`data`. After stage i the trainer evaluates every task seen so far (j <= i): a[i][j] is the answer
accuracy on task j after training task i. With T stages (0-based, last row T-1):
  OP  = mean_j a[T-1][j]                   (overall performance at the end, over every task)
  BWT = mean_{j < T-1} (a[T-1][j] - a[j][j])  (backward transfer: negative = forgetting; none for T = 1)
(DESIGN.md section 3, indices shifted to start at 0.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longtrain.config.load import stage_data
from longtrain.config.schema import Config, DataConfig


@dataclass
class Stage:
    index: int
    name: str
    steps: int
    lr: float
    data: DataConfig


def resolve_stages(cfg: Config) -> list[Stage]:
    t = cfg.train
    if not cfg.stages:
        return [Stage(0, "task0", t.steps, t.lr, cfg.data)]
    return [Stage(i, s.name or f"task{i}", s.steps or t.steps, s.lr or t.lr, stage_data(cfg, i))
            for i, s in enumerate(cfg.stages)]


def stage_config(cfg: Config, stage: Stage) -> Config:
    """The config an engine sees for one stage: its steps and lr drive the warmup + cosine schedule."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=stage.steps, lr=stage.lr),
                               data=stage.data)


class AccuracyMatrix:
    """a[i][j], filled row by row (row i has entries j = 0..i)."""

    def __init__(self, names: list[str], rows: list[list[float]] | None = None):
        self.names = list(names)
        self.rows: list[list[float]] = [list(r) for r in rows or []]

    def add_row(self, accs: list[float]) -> None:
        i = len(self.rows)
        assert len(accs) == i + 1, f"row {i} needs {i + 1} accuracies, got {len(accs)}"
        self.rows.append(list(accs))

    def op(self) -> float:
        last = self.rows[-1]
        return sum(last) / len(last)

    def bwt(self) -> float | None:
        T = len(self.rows)
        if T < 2:
            return None
        last = self.rows[-1]
        return sum(last[j] - self.rows[j][j] for j in range(T - 1)) / (T - 1)

    def record(self) -> dict:
        """What goes to metrics.jsonl and W&B after each stage."""
        i = len(self.rows) - 1
        rec = {"stage": i, "stage_name": self.names[i], "acc_row": self.rows[-1], "op": self.op()}
        bwt = self.bwt()
        if bwt is not None:
            rec["bwt"] = bwt
        return rec

    def table(self) -> str:
        """Markdown: one row per trained stage, one column per task, then OP and BWT of the run so far."""
        head = "| after \\ eval | " + " | ".join(self.names) + " |\n|---|" + "---|" * len(self.names) + "\n"
        body = ""
        for i, row in enumerate(self.rows):
            cells = [f"{100 * a:.1f}" for a in row] + [""] * (len(self.names) - len(row))
            body += f"| {self.names[i]} | " + " | ".join(cells) + " |\n"
        bwt = self.bwt()
        foot = f"\nOP = {100 * self.op():.1f}%, BWT = " + ("n/a (one stage)" if bwt is None else f"{100 * bwt:+.1f}%")
        return head + body + foot + " (accuracies in %)\n"
