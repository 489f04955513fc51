"""Start `launch.nproc` local processes through torch's elastic launcher: the same agent, environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and failure handling as `torchrun`."""

from __future__ import annotations

import uuid

from longtrain.config import Config
from longtrain.parallel.mesh import free_port


class LaunchFailed(RuntimeError):
    """A rank failed; the message names each failed rank, its exit code or signal, and why."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


def _worker(cfg: Config) -> dict:
    from longtrain.train.trainer import run_training

    return run_training(cfg)


def launch_local(cfg: Config) -> dict:
    """Run every rank; returns rank 0's summary. When a rank fails the launcher stops the others and
    this raises `LaunchFailed`; when the launcher itself gets SIGTERM/SIGINT it forwards it, the ranks
    checkpoint, and this returns a summary marked preempted."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cfg.launch.master_port or free_port()
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.launch.nproc,
                      run_id=f"longtrain-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                      rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.5, start_method="spawn")
    try:
        results = elastic_launch(lc, _worker)(cfg)
    except SignalException as e:
        return {"preempted": True, "signal": int(e.sigval), "step": None}
    except ChildFailedError as e:
        lines, user = [], True
        for rank, f in sorted(e.failures.items()):
            how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
            msg = f.message if isinstance(f.message, str) else (f.message or {}).get("message", "")
            msg = msg.strip().splitlines()[-1] if msg and msg.strip() else ""
            if not msg or "To enable traceback" in msg:
                msg = "its own message is in the log above"
            lines.append(f"rank {rank} failed ({how}): {msg}")
            user = user and f.exitcode == 2
        raise LaunchFailed("; ".join(lines), user_error=user) from None
    return results[0]
