#!/usr/bin/env bash
# Create .venv with longtrain and its test tools. Where no NVIDIA GPU is present, the CPU build of
# torch 2.13.0 is installed first (so the project's torch range does not pull a CUDA build);
# with a GPU, pip takes the CUDA build that satisfies pyproject.toml's range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.5,<2.15"
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
python -m pip install -q -e ".[dev,highs]"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # DeepSpeed compiles its CPU shared-memory comm op the first time its comm backend starts, and its
  # CPU Adam the first time optimizer offload is used (about a minute each). Build both once here, so
  # that the first training run (or test) does not stall on them.
  DS_ACCELERATOR=cpu python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()
from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 \
    || echo "note: DeepSpeed's CPU ops did not build; DeepSpeed will try again at their first use"
fi
python -c "import torch, longtrain; print(f'longtrain {longtrain.__version__} ready: torch {torch.__version__}, python in .venv')"
