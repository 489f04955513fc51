"""Atomic, resumable checkpoints for the plain-torch engine.

Layout under `<output_dir>/checkpoints/`:
  step_00000010/   model.pt, optim.pt (model/optimizer/scheduler states), rng_rank<r>.pt (one per rank),
                   meta.json (step, data position, model shape, W&B run id, stage, accuracy matrix,
                   fine-tuning mode state), finetune.pt (the mode's tensors), config.yaml
  latest           the name of the newest complete checkpoint, replaced atomically last

A checkpoint is written into `step_X.tmp` and renamed only when every rank has finished writing,
so a crash mid-write leaves a `.tmp` folder that resume ignores, and the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from longtrain.config import ConfigError
from longtrain.models.presets import LlamaArgs
from longtrain.parallel.mesh import Mesh

log = logging.getLogger(__name__)


def _barrier(mesh: Mesh) -> None:
    if mesh.distributed:
        dist.barrier(group=mesh.world_group)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj, path: Path) -> None:
    """torch.save, flushed to disk before returning (a rename after it must never expose a partial file)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(ckpt_root: Path, *, step: int, engine, mesh: Mesh, meta: dict, config_yaml: str,
                    keep_last: int, files: dict | None = None) -> Path:
    """Collective: every rank calls. On a write error (disk full) the partial folder is removed on
    every rank and the error re-raised; the previous checkpoint and `latest` are untouched.
    `files`: name -> object, written by rank 0 with torch.save (state identical on every rank)."""
    name = f"step_{step:08d}"
    final, tmp = ckpt_root / name, ckpt_root / f"{name}.tmp"
    if mesh.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(mesh)
    error = None
    try:
        engine.save(tmp)
        save_file(rng_state(), tmp / f"rng_rank{mesh.rank}.pt")
        if mesh.is_main:
            for fname, obj in (files or {}).items():
                save_file(obj, tmp / fname)
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": mesh.world_size,
                                                       "engine": engine.name}, indent=2))
    except OSError as e:
        error = e
    if _any_rank(error is not None, mesh):
        if mesh.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(mesh)
        raise OSError(f"checkpoint at step {step} failed ({error or 'on another rank'}); "
                      f"the previous checkpoint in {ckpt_root} is intact")
    if mesh.is_main:
        for f in tmp.rglob("*"):  # the engine's own files too: flushed before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer_tmp = ckpt_root / "latest.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, ckpt_root / "latest")
        _fsync_dir(ckpt_root)
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    _barrier(mesh)
    return final


def _any_rank(flag: bool, mesh: Mesh) -> bool:
    if not mesh.distributed:
        return flag
    t = torch.tensor([float(flag)], device=mesh.device)
    dist.all_reduce(t, group=mesh.world_group)
    return bool(t.item())


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "meta.json").is_file())


def find_resume(spec: str | None, ckpt_root: Path) -> Path | None:
    """`auto`: the newest complete checkpoint (via `latest`, else by name); a path: that folder."""
    if spec is None:
        return None
    if spec != "auto":
        path = Path(spec)
        if not (path / "meta.json").is_file():
            raise ConfigError(f"checkpoint.resume={spec!r} is not a complete checkpoint (no meta.json)")
        return path
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        target = ckpt_root / pointer.read_text().strip()
        if (target / "meta.json").is_file():
            return target
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def check_model_shape(path: Path, meta: dict, args: LlamaArgs) -> None:
    saved = meta.get("model_args", {})
    now = dataclasses.asdict(args)
    diff = [f"{k}={saved.get(k)!r} (checkpoint) vs {now[k]!r} (recipe)" for k in now if saved.get(k) != now[k]]
    if diff:
        raise ConfigError(f"checkpoint {path} was saved for another model shape: {'; '.join(diff)}. "
                         "Resume with the recipe that wrote it, or start a new output_dir.")


def load_checkpoint(path: Path, *, engine, mesh: Mesh, args: LlamaArgs) -> dict:
    meta = json.loads((path / "meta.json").read_text())
    check_model_shape(path, meta, args)
    if meta.get("engine", "torch") != engine.name:
        raise ConfigError(f"checkpoint {path} was written by parallel.engine={meta.get('engine')!r}; this run uses "
                         f"{engine.name!r}: resume with the engine that wrote it")
    if engine.name == "deepspeed" and meta.get("world_size") != mesh.world_size:
        raise ConfigError(f"checkpoint {path} holds ZeRO shards of {meta.get('world_size')} ranks; this run has "
                         f"{mesh.world_size}: resume with the same number of ranks")
    engine.load(path)
    rng = path / f"rng_rank{mesh.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.warning("%s has no RNG state for rank %d (saved with %s ranks): RNG streams restart",
                    path, mesh.rank, meta.get("world_size"))
    return meta
