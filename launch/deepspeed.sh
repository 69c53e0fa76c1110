#!/usr/bin/env bash
# The training job (`python -m sai_dist.train`) under the deepspeed launcher; the DeepSpeed
# example script ds_train.py has its own, launch/deepspeed_example.sh.
# The deepspeed launcher with a hostfile (default: launch/hostfile, one line per node:
# "<host> slots=<ranks>"). With several hosts it reaches the others over pdsh/ssh
# (passwordless ssh needed). With a single host it launches locally; deepspeed would still
# insist on ssh to that host, so the check is skipped (--no_ssh_check).
# It exports RANK/WORLD_SIZE/MASTER_ADDR like torchrun and passes --local_rank, which the
# job accepts.
#   launch/deepspeed.sh --backend deepspeed --deepspeed-config configs/ds_zero2.json
set -euo pipefail
hostfile="${HOSTFILE:-launch/hostfile}"
extra=()
if [[ "$(grep -cvE '^\s*(#|$)' "$hostfile")" == 1 ]]; then extra=(--no_ssh_check); fi
# Rank 0 runs on the first host; deepspeed would otherwise ask it over ssh for its address.
first_host="$(grep -vE '^\s*(#|$)' "$hostfile" | head -n1 | awk '{print $1}')"
if [[ "$first_host" == localhost ]]; then first_host=127.0.0.1; fi
exec "${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" "${extra[@]}" \
    --master_addr "${MASTER_ADDR:-$first_host}" --master_port "${MASTER_PORT:-29500}" \
    --module sai_dist.train "$@"
