"""Runs that go wrong: a preempted launcher, a dead rank, a hung rank, SIGKILL mid-checkpoint, a
full disk, and the two-node loopback launch. Each must end (or resume) within bounded time with a
message that says what happened, and never lose the last complete checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LONG = ["train.steps=400", "data.seq_len=512", "train.eval_interval=0", "checkpoint.interval=0",
        "checkpoint.export_hf=false"]


def _cmd(out, *ov):
    return [sys.executable, "-m", "longtrain", "train", "debug", f"train.output_dir={out}", *ov]


def _losses(out: Path) -> dict[int, float]:
    if not (out / "metrics.jsonl").is_file():
        return {}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _start(out, *ov):
    return subprocess.Popen(_cmd(out, *ov), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _wait_steps(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(_losses(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {n}")


def _workers(proc) -> list[int]:
    """The launcher's rank processes (spawned children running spawn_main)."""
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _run(out, *ov, timeout=300):
    return subprocess.run(_cmd(out, *ov), capture_output=True, text=True, timeout=timeout)


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resumes_exactly(tmp_path):
    two = ["launch.nproc=2", "train.micro_batch_size=1", "train.steps=30", "data.seq_len=512",
           "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.export_hf=false"]
    ref = tmp_path / "ref"
    assert _run(ref, *two).returncode == 0
    out = tmp_path / "cut"
    p = _start(out, *two)
    _wait_steps(out, 5, p)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    assert "checkpoint.resume=auto" in log
    cut = int((out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 5 <= cut < 30
    r = _run(out, *two, "checkpoint.resume=auto")
    assert r.returncode == 0, r.stderr
    assert _losses(out) == _losses(ref)  # ZeRO-2 shards, RNG and data position restored: bitwise


def test_a_dead_rank_stops_every_rank_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    p = _start(out, "launch.nproc=2", "train.micro_batch_size=1", "checkpoint.interval=5", *LONG[:3])
    _wait_steps(out, 8, p)
    t0 = time.time()
    os.kill(_workers(p)[-1], signal.SIGKILL)
    log = p.communicate(timeout=120)[0]
    assert time.time() - t0 < 90
    assert p.returncode == 1, log
    assert "longtrain: training failed: rank" in log and "SIGKILL" in log, log
    # the peer says why it stopped instead of hanging
    assert "a peer rank died or hangs" in log, log
    # and the last complete checkpoint still loads
    r = _run(out, "launch.nproc=2", "train.micro_batch_size=1", "checkpoint.resume=auto", "train.steps=12",
             "data.seq_len=512", "train.eval_interval=0", "checkpoint.export_hf=false")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr


def test_a_hung_rank_is_diagnosed_within_the_configured_time(tmp_path):
    out = tmp_path / "run"
    p = _start(out, "launch.nproc=2", "train.micro_batch_size=1", "launch.timeout_s=5", "launch.hang_timeout_s=10",
               *LONG)
    _wait_steps(out, 5, p)
    victim = _workers(p)[-1]
    os.kill(victim, signal.SIGSTOP)  # alive but silent: the worst kind of failure
    t0 = time.time()
    try:
        log = p.communicate(timeout=150)[0]
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # 10 s to notice, then the launcher's 30 s grace before it kills the stopped rank
    assert time.time() - t0 < 120
    assert p.returncode == 1, log
    assert "launch.hang_timeout_s=10" in log or "launch.timeout_s=5" in log, log
    assert "longtrain: training failed: rank" in log


def test_sigkill_mid_checkpoint_resumes_from_the_previous_complete_one(tmp_path):
    # Checkpoint every step so that a kill at a random moment often lands inside a save.
    args = ["train.steps=40", "checkpoint.interval=1", "checkpoint.keep_last=2", "model.preset=tiny",
            "data.seq_len=256", "train.eval_interval=0", "checkpoint.export_hf=false"]
    ref = tmp_path / "ref"
    assert _run(ref, *args).returncode == 0
    out = tmp_path / "cut"
    for attempt in range(5):
        shutil_rm(out)
        p = _start(out, *args)
        _wait_steps(out, 4, p)
        # kill the moment a checkpoint is being written (its .tmp folder exists)
        deadline = time.time() + 60
        while time.time() < deadline and not list((out / "checkpoints").glob("*.tmp")):
            time.sleep(0.0005)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        if list((out / "checkpoints").glob("*.tmp")):
            break
    assert list((out / "checkpoints").glob("*.tmp")), "no kill landed inside a checkpoint write in 5 tries"
    complete = sorted(x.name for x in (out / "checkpoints").glob("step_*") if not x.name.endswith(".tmp"))
    r = _run(out, *args, "checkpoint.resume=auto")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'checkpoints' / complete[-1]}" in r.stderr
    assert _losses(out) == _losses(ref)


def shutil_rm(path: Path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from longtrain.parallel.mesh import Mesh
    from longtrain.train import checkpoint as ck

    mesh = Mesh(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), dp_rank=0, dp_size=1, dp_group=None)

    class Engine:
        name = "torch"
        full = False

        def save(self, folder):
            if self.full:
                (folder / "model.pt").write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            ck.save_file({"w": torch.ones(3)}, folder / "model.pt")

    eng = Engine()
    root = tmp_path / "checkpoints"
    ck.save_checkpoint(root, step=1, engine=eng, mesh=mesh, meta={}, config_yaml="", keep_last=2)
    eng.full = True
    with pytest.raises(OSError, match="previous checkpoint .* is intact"):
        ck.save_checkpoint(root, step=2, engine=eng, mesh=mesh, meta={}, config_yaml="", keep_last=2)
    assert (root / "latest").read_text() == "step_00000001"
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["step_00000001"]
    assert ck.find_resume("auto", root) == root / "step_00000001"
    assert torch.equal(torch.load(root / "step_00000001" / "model.pt")["w"], torch.ones(3))


def test_two_node_launch_on_loopback(tmp_path):
    from longtrain.parallel.mesh import free_port

    port = str(free_port())
    out = tmp_path / "run"
    env = {**os.environ, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NPROC_PER_NODE": "1",
           "RDZV_ID": "test-two-nodes", "PYTHONUNBUFFERED": "1"}
    args = [f"train.output_dir={out}", "train.micro_batch_size=1", "train.steps=4", "checkpoint.export_hf=false"]
    bare = subprocess.run(["bash", str(ROOT / "launchers" / "multinode.sh"), "debug", *args],  # no torchrun on PATH
                          env={**env, "NODE_RANK": "0", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert bare.returncode == 127 and "torchrun is not on PATH: activate the Python environment" in bare.stderr
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the environment, activated
    nodes = [subprocess.Popen(["bash", str(ROOT / "launchers" / "multinode.sh"), "debug", *args],
                              env={**env, "NODE_RANK": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs
    assert "2 rank(s)" in logs[0] + logs[1]
    assert sorted(_losses(out)) == [1, 2, 3, 4]
