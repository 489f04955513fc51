#!/usr/bin/env bash
# One node, all its GPUs (or NPROC processes):  launchers/torchrun.sh RECIPE [key=value ...]
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC" -ge 1 ] || NPROC=1
command -v torchrun > /dev/null || { echo "$0: torchrun is not on PATH: activate the Python environment longtrain is installed in (e.g. . .venv/bin/activate)" >&2; exit 127; }
exec torchrun --standalone --nproc-per-node "$NPROC" -m longtrain train "$@"
