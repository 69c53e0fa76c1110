#!/usr/bin/env bash
# Several machines, c10d rendezvous. Run the SAME command on every node:
#   NNODES=2 NPROC=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=myjob launch/torchrun_multi_node.sh --backend hsdp
# RDZV_ENDPOINT is host:port of any one node (it hosts the rendezvous store); no node rank
# is needed, the rendezvous assigns them. Elastic range: NNODES=2:4.
set -euo pipefail
: "${NNODES:?set NNODES (e.g. 2)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
exec "${TORCHRUN:-torchrun}" --nnodes="$NNODES" --nproc-per-node="${NPROC:-2}" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-sai-dist}" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m sai_dist.train "$@"
