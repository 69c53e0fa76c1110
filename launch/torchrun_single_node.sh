#!/usr/bin/env bash
# One machine, NPROC ranks (default 2; on a GPU machine set NPROC to the GPU count).
#   launch/torchrun_single_node.sh --backend fsdp2 --steps 300
set -euo pipefail
exec "${TORCHRUN:-torchrun}" --standalone --nnodes=1 --nproc-per-node="${NPROC:-2}" \
    -m sai_dist.train "$@"
