#!/usr/bin/env bash
# The deepspeed launcher with a hostfile (default: launch/hostfile, one line per node:
# "<host> slots=<ranks>"). With one host it launches locally; with several it reaches the
# other nodes over pdsh/ssh (passwordless ssh needed). It exports RANK/WORLD_SIZE/
# MASTER_ADDR like torchrun and passes --local_rank, which the job accepts.
#   launch/deepspeed.sh --backend deepspeed --deepspeed-config configs/ds_zero2.json
set -euo pipefail
exec "${DEEPSPEED:-deepspeed}" --hostfile "${HOSTFILE:-launch/hostfile}" \
    --master_port "${MASTER_PORT:-29500}" --module sai_dist.train "$@"
