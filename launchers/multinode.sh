#!/usr/bin/env bash
# Several nodes through a c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launchers/multinode.sh RECIPE [key=value ...]
# NPROC_PER_NODE defaults to the node's GPU count (1 without GPUs). RDZV_ID names the job (default: longtrain).
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host of node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
command -v torchrun > /dev/null || { echo "$0: torchrun is not on PATH: activate the Python environment longtrain is installed in (e.g. . .venv/bin/activate)" >&2; exit 127; }
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-longtrain}" \
  --max-restarts 0 -m longtrain train "$@"
