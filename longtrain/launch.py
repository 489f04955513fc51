"""Start `launch.nproc` local processes through torch's elastic launcher: the same agent, environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and failure handling as `torchrun`."""

from __future__ import annotations

import socket
import uuid

from longtrain.config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cfg: Config) -> dict:
    from longtrain.train.trainer import run_training

    return run_training(cfg)


def launch_local(cfg: Config) -> dict:
    """Run every rank; returns rank 0's summary. A failing rank makes the launcher stop the others
    and raise `ChildFailedError` with that rank's traceback."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    port = cfg.launch.master_port or _free_port()
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.launch.nproc, run_id=f"longtrain-{uuid.uuid4().hex[:8]}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0, monitor_interval=0.5,
                      start_method="spawn")
    results = elastic_launch(lc, _worker)(cfg)
    return results[0]
